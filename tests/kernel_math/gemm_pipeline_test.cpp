// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// The tensor-core mainloop's ring schedule (include/epx/cuda/gemm/pipeline.hpp), replayed on the
// host with the PTX ISA's completion rules, over persistent sequences of tiles with any number of
// k-tiles:
//   cp.async.wait_group N  completes every cp.async group of the thread but the newest N;
//   ldmatrix               completes before the warp's next instruction;
//   bar.sync               orders everything a thread completed before it with everything any
//                          thread issues after it.
// Every thread runs the same schedule, and a stage is written by all threads and read by all
// warps, so two accesses by different threads are ordered only when the first one's completion
// and the second one's issue have a barrier between them. The replay checks that each read of a
// stage sees exactly the copy of its k-tile (that copy is ordered before the read, and every other
// write of the stage is ordered before that copy or after the read), that the copies run the
// ring's full depth ahead of the reads, and that nothing is in flight when the next tile starts.

#include "../common/test_util.hpp"

#include <epx/cuda/gemm/pipeline.hpp>

#include <algorithm>
#include <climits>
#include <utility>

using namespace epx;
using namespace epx::detail;

namespace {

// One access to a stage (an asynchronous copy or a synchronous read): which tile's k-tile it carries, when it was
// issued and when it is known complete (LLONG_MAX: never waited for).
struct Access {
  int stage;
  int tile;
  int k_tile;
  long long issue;
  long long complete = LLONG_MAX;
};

struct Replay {
  std::vector<Access> writes, reads;
  std::vector<long long> barriers;                    // positions, increasing
  std::vector<std::vector<std::size_t>> copy_groups;  // committed groups: indices of writes
  std::vector<std::size_t> open_copies;
  long long now = 0;
  int prefetch_short = 0;  // reads at which the copies had not run as far ahead as the ring allows

  void copy(int stage, int tile, int k_tile) {
    writes.push_back({stage, tile, k_tile, ++now});
    open_copies.push_back(writes.size() - 1);
  }
  void commit_copies() { copy_groups.push_back(std::exchange(open_copies, {})); }
  // cp.async.wait_group n: all committed groups but the newest n are complete from here on.
  void wait_copies(int n) {
    long long const at = ++now;
    for (std::size_t g = 0; g + static_cast<std::size_t>(n) < copy_groups.size(); ++g)
      for (std::size_t i : copy_groups[g]) writes[i].complete = std::min(writes[i].complete, at);
  }
  void barrier() { barriers.push_back(++now); }
  void read_sync(int stage, int tile, int k_tile) {
    ++now;
    reads.push_back({stage, tile, k_tile, now, now});
  }

  // Whether a barrier lies strictly between `complete` and `issue`.
  [[nodiscard]] bool ordered(long long complete, long long issue) const {
    if (complete == LLONG_MAX) return false;
    auto const b = std::upper_bound(barriers.begin(), barriers.end(), complete);
    return b != barriers.end() && *b < issue;
  }
};

// The kernel's loop (mma_sm80.cuh) over a persistent sequence of tiles, each with
// k_tiles[t] k-tiles, driven by Ring's schedule.
template <class Ring>
Replay replay(std::vector<int> const& k_tiles) {
  Replay r;
  for (int t = 0; t < static_cast<int>(k_tiles.size()); ++t) {
    int const n = k_tiles[static_cast<std::size_t>(t)];
    for (int kt = 0; kt < Ring::kPrefetch; ++kt) {
      if (kt < n) r.copy(Ring::stage(kt), t, kt);
      r.commit_copies();
    }
    for (int kt = 0; kt < n; ++kt) {
      r.wait_copies(Ring::kCopyGroupsPending);
      r.barrier();
      if (Ring::refill_tile(kt) < n) r.copy(Ring::stage(Ring::refill_tile(kt)), t, Ring::refill_tile(kt));
      r.commit_copies();
      // The copies should be as far ahead as the ring allows (every stage but the one being read
      // holds a later k-tile): k-tile min(kt + kStages - 1, n - 1) issued.
      int const ahead = std::min(kt + Ring::kStages - 1, n - 1);
      bool const issued = std::any_of(r.writes.begin(), r.writes.end(),
                                      [&](Access const& w) { return w.tile == t && w.k_tile == ahead; });
      r.prefetch_short += !issued;
      r.read_sync(Ring::stage(kt), t, kt);
    }
    r.wait_copies(0);
    r.barrier();
  }
  return r;
}

struct Violations {
  long long stale_or_racy_reads = 0;  // a read not ordered after its own copy, or racing another write
  long long racing_writes = 0;        // two writes of one stage not ordered
  long long bad_stages = 0;
  int prefetch_short = 0;
  long long total() const { return stale_or_racy_reads + racing_writes + bad_stages + prefetch_short; }
};

template <class Ring>
Violations check(std::vector<int> const& k_tiles) {
  Replay const r = replay<Ring>(k_tiles);
  Violations v;
  v.prefetch_short = r.prefetch_short;
  for (Access const& w : r.writes) v.bad_stages += w.stage < 0 || w.stage >= Ring::kStages;
  for (Access const& read : r.reads) {
    v.bad_stages += read.stage < 0 || read.stage >= Ring::kStages;
    bool found_own = false;
    for (Access const& w : r.writes) {
      if (w.stage != read.stage) continue;
      if (w.tile == read.tile && w.k_tile == read.k_tile) {
        found_own = true;
        v.stale_or_racy_reads += !r.ordered(w.complete, read.issue);  // the data had landed for everyone
      } else {
        // Another write of this stage: before this read's copy was issued, or after the read completed.
        bool before = false;
        for (Access const& own : r.writes)
          if (own.stage == read.stage && own.tile == read.tile && own.k_tile == read.k_tile)
            before = r.ordered(w.complete, own.issue);
        v.stale_or_racy_reads += !before && !r.ordered(read.complete, w.issue);
      }
    }
    v.stale_or_racy_reads += !found_own;
  }
  for (std::size_t i = 0; i < r.writes.size(); ++i)
    for (std::size_t j = i + 1; j < r.writes.size(); ++j) {
      Access const& a = r.writes[i];
      Access const& b = r.writes[j];
      if (a.stage == b.stage) v.racing_writes += !r.ordered(a.complete, b.issue) && !r.ordered(b.complete, a.issue);
    }
  return v;
}

template <class Ring>
long long check_ring(std::mt19937_64& rng) {
  CAPTURE(Ring::kStages);
  long long total = 0;
  auto run = [&](std::vector<int> const& k_tiles) {
    Violations const v = check<Ring>(k_tiles);
    CAPTURE(k_tiles.size());
    CAPTURE(k_tiles.front());
    CHECK(v.stale_or_racy_reads == 0);
    CHECK(v.racing_writes == 0);
    CHECK(v.bad_stages == 0);
    CHECK(v.prefetch_short == 0);
    total += v.total();
  };
  // Every k-tile count up to three laps of the ring, each followed by a tile of every other count
  // (a persistent CTA's next tile refills the ring the previous one left).
  for (int a = 0; a <= 3 * Ring::kStages + 1; ++a)
    for (int b = 0; b <= 3 * Ring::kStages + 1; ++b) run({a, b});
  std::uniform_int_distribution<int> count(0, 4 * Ring::kStages);
  for (int trial = 0; trial < 20; ++trial) {
    std::vector<int> k_tiles(6);
    for (int& n : k_tiles) n = count(rng);
    run(k_tiles);
  }
  return total;
}

}  // namespace

TEST_CASE("GemmPipeline::mma_ring: each ldmatrix read sees its k-tile, no stage is refilled while a warp may read it") {
  EPX_TEST_SEEDED_RNG(rng);
  long long total = 0;
  total += check_ring<MmaStageRing<2>>(rng);
  total += check_ring<MmaStageRing<3>>(rng);
  total += check_ring<MmaStageRing<4>>(rng);
  total += check_ring<MmaStageRing<5>>(rng);
  total += check_ring<MmaStageRing<8>>(rng);
  INFO("violations over all rings and tile sequences");
  CHECK(total == 0);
}

namespace {

// Schedules that are wrong on purpose, to show the replay catches them.
template <int kPrefetchTiles, int kPending>
struct BrokenRing {
  static constexpr int kStages = 4, kPrefetch = kPrefetchTiles, kCopyGroupsPending = kPending;
  static constexpr int stage(int kt) { return kt % kStages; }
  static constexpr int refill_tile(int kt) { return kt + kPrefetch; }
};

}  // namespace

TEST_CASE(
    "GemmPipeline::replay_detects: the replay finds the races of a ring that refills too early or waits too little") {
  // Copies a whole ring ahead: the stage being read in this iteration is refilled right after the
  // barrier, while the other warps may still read it.
  CHECK(check<BrokenRing<4, 3>>({9}).stale_or_racy_reads > 0);
  // A wait that leaves the current k-tile's copies in flight.
  CHECK(check<BrokenRing<3, 3>>({9}).stale_or_racy_reads > 0);
  // A prefetch shorter than the ring allows is correct but slow: the replay reports it too.
  CHECK(check<BrokenRing<2, 1>>({9}).prefetch_short > 0);
}
