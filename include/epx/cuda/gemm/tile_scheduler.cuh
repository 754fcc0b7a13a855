// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! The grouped GEMM's device-side tile scheduler. The groups' row ranges (the experts' segments of
//! the permuted rows) exist only on the device, so the host cannot size the grid to the work: a
//! persistent grid walks one linear list of output tiles, ordered (group, n-block, m-block) with
//! the m-block fastest, so neighbouring CTAs share a weight slice [BN, K] through L2.
//!
//! Each CTA builds the list's prefix in shared memory from the offsets (one block scan over the
//! groups, in chunks of the block size), then maps its tile numbers to tiles with the monotone walk
//! of tile_walk.hpp: O(groups) per CTA in total.

#include <epx/config.hpp>
#include <epx/core/math.hpp>
#include <epx/cuda/gemm/tile_walk.hpp>

#include <cub/block/block_scan.cuh>

#include <cstdint>

namespace epx::detail {

//! TileWalker over a prefix each CTA builds in shared memory with one block scan.
template <int kThreads, int kBM, int kBN>
class TileScheduler : public TileWalker<kBM, kBN> {
 public:
  //! `tile_start` is shared memory for num_groups + 1 entries. Every thread of the block must call
  //! the constructor (it synchronises the block).
  __device__ TileScheduler(long long* tile_start, std::int32_t const* offsets, int num_groups, std::int64_t num_rows,
                           int n)
      : TileWalker<kBM, kBN>(tile_start, offsets, num_groups, num_rows, n) {
    using Scan = cub::BlockScan<long long, kThreads>;
    __shared__ typename Scan::TempStorage temp;
    int const n_blocks = ceil_div(n, kBN);
    long long running = 0;
    for (int base = 0; base < num_groups; base += kThreads) {
      int const g = base + static_cast<int>(threadIdx.x);
      long long const tiles = g < num_groups ? group_tiles(offsets, g, num_rows, kBM, n_blocks) : 0;
      long long prefix = 0, total = 0;
      Scan(temp).ExclusiveSum(tiles, prefix, total);
      if (g < num_groups) tile_start[g] = running + prefix;
      running += total;
      __syncthreads();  // the scan's temporary storage is reused by the next chunk
    }
    if (threadIdx.x == 0) tile_start[num_groups] = running;
    __syncthreads();
  }
};

}  // namespace epx::detail
