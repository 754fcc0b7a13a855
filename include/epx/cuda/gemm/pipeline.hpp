// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! The schedule of the tensor-core mainloops' ring of shared-memory stages: which stage holds which
//! k-tile, how far ahead the cp.async copies run, and how many copy groups may still be in flight
//! when a k-tile is read. One k-tile's copies are one cp.async group (an empty group where there is
//! no tile left, so the counts stay uniform); each iteration kt of the k-loop does
//!
//!   cp.async.wait_group kCopyGroupsPending      // this thread's copies of k-tile kt have landed
//!   (fence.proxy.async when the readers are wgmma) + __syncthreads    // ... everyone's have
//!   copy k-tile refill_tile(kt) into stage(refill_tile(kt)); cp.async.commit_group
//!   read stage(kt)   (ldmatrix + mma.sync, or wgmma groups: then wgmma.wait_group kReadGroupsInFlight)
//!
//! The refilled stage is the one read kReadGroupsInFlight + 1 iterations earlier: with synchronous
//! reads (ldmatrix) it was last read in iteration kt - 1, before this iteration's barrier; with one
//! wgmma group left in flight after each iteration, the group of k-tile kt - 1 may still read its
//! stage after the barrier, so the ring gives up one stage of prefetch for it.
//! tests/kernel_math/gemm_pipeline_test.cpp replays this schedule with the ISA's wait semantics and
//! checks every read sees its k-tile and no stage is written while any warp may still read it.

#include <epx/config.hpp>

namespace epx::detail {

template <int Stages, int ReadGroupsInFlight>
struct StageRing {
  static constexpr int kStages = Stages;
  //! wgmma groups left in flight at the end of an iteration (0: the reads are synchronous, ldmatrix).
  static constexpr int kReadGroupsInFlight = ReadGroupsInFlight;
  //! k-tiles whose copies run ahead of the one being read (the prologue loads this many).
  static constexpr int kPrefetch = Stages - 1 - ReadGroupsInFlight;
  //! cp.async.wait_group's count at the top of an iteration: all but the newest kPrefetch - 1 groups
  //! have landed, the oldest of which is the current k-tile's.
  static constexpr int kCopyGroupsPending = kPrefetch - 1;
  static_assert(kPrefetch >= 1, "a ring needs a stage to read and one to fill");

  //! The stage that holds k-tile `kt`.
  EPX_HOST_DEVICE static constexpr int stage(int kt) { return kt % Stages; }
  //! The k-tile whose copies iteration `kt` issues (if it exists).
  EPX_HOST_DEVICE static constexpr int refill_tile(int kt) { return kt + kPrefetch; }
};

//! The mma.sync mainloop: ldmatrix reads are done when the warp reaches the next barrier.
template <int Stages>
using MmaStageRing = StageRing<Stages, 0>;
//! The wgmma mainloop: one wgmma group stays in flight across the barrier (the tensor cores never drain).
template <int Stages>
using WgmmaStageRing = StageRing<Stages, 1>;

}  // namespace epx::detail
