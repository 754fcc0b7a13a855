// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! The grouped GEMM's list of output tiles, as plain C++: the groups' row ranges (clamped), the
//! tile numbering (group, n-block, m-block with the m-block fastest) and the monotone walk from a
//! tile number to its tile. The device scheduler (tile_scheduler.cuh) builds the prefix in shared
//! memory; the host tests (tests/cuda_api, tests/kernel_math) walk the same code.

#include <epx/config.hpp>
#include <epx/core/math.hpp>

#include <cstdint>

namespace epx::detail {

//! Most groups one grouped-GEMM call takes (their tile prefix lives in shared memory: 8 bytes each).
inline constexpr int kMaxGemmGroups = 4096;

//! Rows [begin, end) of one group, clamped into [0, num_rows]: offsets that decrease or leave the
//! buffer give empty or shortened groups, never an access outside A or C.
struct GroupRows {
  std::int64_t begin;
  std::int64_t end;
};

EPX_HOST_DEVICE constexpr GroupRows group_rows(std::int32_t const* offsets, int group, std::int64_t num_rows) {
  std::int64_t begin = offsets[group], end = offsets[group + 1];
  begin = begin < 0 ? 0 : (begin > num_rows ? num_rows : begin);
  end = end < begin ? begin : (end > num_rows ? num_rows : end);
  return {begin, end};
}

//! Rows [offsets[0], offsets[groups]) clamped into [0, num_rows] the same way: the rows a row
//! kernel over every group visits (group_rows.cuh).
EPX_HOST_DEVICE constexpr GroupRows grouped_row_range(std::int32_t const* offsets, int groups, std::int64_t num_rows) {
  std::int32_t const ends[2] = {offsets[0], offsets[groups]};
  return group_rows(ends, 0, num_rows);
}

//! One output tile: rows [row_begin, row_end) of `group` (at most BM of them), columns from n_begin.
struct GemmTile {
  int group;
  std::int64_t row_begin;
  std::int64_t row_end;
  int n_begin;
};

//! Tiles of one group: ceil(rows / BM) m-blocks times the n-blocks.
EPX_HOST_DEVICE inline long long group_tiles(std::int32_t const* offsets, int group, std::int64_t num_rows, int bm,
                                             int n_blocks) {
  GroupRows const r = group_rows(offsets, group, num_rows);
  return ceil_div<long long>(r.end - r.begin, bm) * n_blocks;
}

//! Maps tile numbers to tiles over a prefix `tile_start[g]` (first tile of group g; [num_groups]
//! = total). Host and device: the host tests check that it covers every output exactly once.
template <int kBM, int kBN>
class TileWalker {
 public:
  EPX_HOST_DEVICE TileWalker(long long const* tile_start, std::int32_t const* offsets, int num_groups,
                             std::int64_t num_rows, int n)
      : tile_start_(tile_start),
        offsets_(offsets),
        num_groups_(num_groups),
        num_rows_(num_rows),
        n_blocks_(ceil_div(n, kBN)) {}

  [[nodiscard]] EPX_HOST_DEVICE long long num_tiles() const { return tile_start_[num_groups_]; }

  //! The tile numbered `t` (< num_tiles()); successive calls must pass non-decreasing t.
  [[nodiscard]] EPX_HOST_DEVICE GemmTile tile(long long t) {
    while (tile_start_[group_ + 1] <= t) ++group_;
    long long const local = t - tile_start_[group_];
    long long const m_blocks = (tile_start_[group_ + 1] - tile_start_[group_]) / n_blocks_;
    long long const m_block = local % m_blocks, n_block = local / m_blocks;  // m fastest: B slices reused via L2
    GroupRows const r = group_rows(offsets_, group_, num_rows_);
    std::int64_t const row_begin = r.begin + m_block * kBM;
    std::int64_t const row_end = row_begin + kBM < r.end ? row_begin + kBM : r.end;
    return {group_, row_begin, row_end, static_cast<int>(n_block) * kBN};
  }

 private:
  long long const* tile_start_;
  std::int32_t const* offsets_;
  int num_groups_;
  std::int64_t num_rows_;
  int n_blocks_;
  int group_ = 0;
};

//! The host twin of TileScheduler's prefix (for tests and host-side planning).
inline void host_tile_prefix(long long* tile_start, std::int32_t const* offsets, int num_groups, std::int64_t num_rows,
                             int bm, int bn, int n) {
  long long running = 0;
  for (int g = 0; g < num_groups; ++g) {
    tile_start[g] = running;
    running += group_tiles(offsets, g, num_rows, bm, ceil_div(n, bn));
  }
  tile_start[num_groups] = running;
}

}  // namespace epx::detail
