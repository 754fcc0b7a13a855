// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! The schedule of the tensor-core mainloop's ring of shared-memory stages: which stage holds which
//! k-tile, how far ahead the cp.async copies run, and how many copy groups may still be in flight
//! when a k-tile is read. One k-tile's copies are one cp.async group (an empty group where there is
//! no tile left, so the counts stay uniform); each iteration kt of the k-loop does
//!
//!   cp.async.wait_group kCopyGroupsPending      // this thread's copies of k-tile kt have landed
//!   __syncthreads                               // ... everyone's have, and every warp is done
//!                                               //     reading k-tile kt - 1
//!   copy k-tile refill_tile(kt) into stage(refill_tile(kt)); cp.async.commit_group
//!   read stage(kt)   (ldmatrix + mma.sync: synchronous, done before the warp's next barrier)
//!
//! The refilled stage is the one read in iteration kt - 1, before this iteration's barrier, so the
//! copies run Stages - 1 k-tiles ahead of the reads.
//! tests/kernel_math/gemm_pipeline_test.cpp replays this schedule with the ISA's wait semantics and
//! checks every read sees its k-tile and no stage is written while any warp may still read it.

#include <epx/config.hpp>

namespace epx::detail {

//! The mma.sync mainloop's ring of `Stages` stages.
template <int Stages>
struct MmaStageRing {
  static constexpr int kStages = Stages;
  //! k-tiles whose copies run ahead of the one being read (the prologue loads this many).
  static constexpr int kPrefetch = Stages - 1;
  //! cp.async.wait_group's count at the top of an iteration: all but the newest kPrefetch - 1 groups
  //! have landed, the oldest of which is the current k-tile's.
  static constexpr int kCopyGroupsPending = kPrefetch - 1;
  static_assert(kPrefetch >= 1, "a ring needs a stage to read and one to fill");

  //! The stage that holds k-tile `kt`.
  EPX_HOST_DEVICE static constexpr int stage(int kt) { return kt % Stages; }
  //! The k-tile whose copies iteration `kt` issues (if it exists).
  EPX_HOST_DEVICE static constexpr int refill_tile(int kt) { return kt + kPrefetch; }
};

}  // namespace epx::detail
