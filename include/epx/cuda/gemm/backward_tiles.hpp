// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! The index math of the grouped GEMM's backward kernels (cuda/grouped_gemm_backward.cuh), as plain
//! C++ the host tests walk (tests/kernel_math/grouped_gemm_backward_tiles_test.cpp):
//!   - the tile: 64 x 64 outputs per CTA of 256 threads, each thread a 4 x 4 block of them, the
//!     reduction in slices of 16;
//!   - the load maps of the two kinds of slices: [16, 64] slices read along the 64 (B of the data
//!     gradient, dc and a of the weight gradient) and [64, 16] strips read along the 16 (dc of the
//!     data gradient); consecutive threads read consecutive elements of one row (coalesced);
//!   - the weight gradient's tile numbering: (group, n-block, k-block) with the k-block fastest, so
//!     neighbouring CTAs read the same rows of dc. With a bias gradient and K = 0 each (group,
//!     n-block) still has one tile (no k-columns, the bias only), so that d_bias is written.
//! The data gradient walks its tiles with TileWalker (tile_walk.hpp), K in the place of N.

#include <epx/config.hpp>
#include <epx/core/math.hpp>
#include <epx/cuda/gemm/mma_fragments.hpp>

#include <cstdint>

namespace epx::detail {

struct BackwardTileShape {
  static constexpr int kBM = 64;  //!< rows of da per tile (data); n of db per tile (weight)
  static constexpr int kBN = 64;  //!< k-columns of da or db per tile
  static constexpr int kBK = 16;  //!< reduction slice: n (data) or rows (weight)
  static constexpr int kThreads = 256;
  static constexpr int kLoadPasses = kBM * kBK / kThreads;
  static_assert(kBM == kBN && kBM * kBK % kThreads == 0, "both slices are loaded in whole passes");
  static_assert(kBM == 4 * 16 && kThreads == 16 * 16, "16 x 16 threads of 4 x 4 outputs");

  //! The (slice row, column) of a [kBK, kBN] slice that thread `tid` loads in pass `pass`: the
  //! column fastest, so a warp reads 32 consecutive elements of one row.
  EPX_HOST_DEVICE static constexpr FragmentCoord slice_coord(int tid, int pass) {
    int const i = tid + pass * kThreads;
    return {i / kBN, i % kBN};
  }
  //! The (row, slice column) of a [kBM, kBK] strip that thread `tid` loads in pass `pass`: the
  //! slice column fastest, so 16 threads read 16 consecutive elements of one row.
  EPX_HOST_DEVICE static constexpr FragmentCoord strip_coord(int tid, int pass) {
    int const i = tid + pass * kThreads;
    return {i / kBK, i % kBK};
  }
  //! The (row, column) of the 64 x 64 tile that thread `tid`'s output (i, j) (each 0-3) is.
  EPX_HOST_DEVICE static constexpr FragmentCoord output_coord(int tid, int i, int j) {
    return {(tid / 16) * 4 + i, (tid % 16) * 4 + j};
  }
  //! Whether thread `tid` sums the bias gradient of the tile's row `tid` (weight gradient): the
  //! first kBM threads, one n each.
  EPX_HOST_DEVICE static constexpr bool sums_bias(int tid) { return tid < kBM; }
};

//! K-blocks of the weight gradient per (group, n-block): one even when K = 0 if a bias gradient is
//! wanted (that tile writes d_bias only).
EPX_HOST_DEVICE constexpr int weight_k_blocks(int k, bool with_bias) {
  int const blocks = ceil_div(k, BackwardTileShape::kBN);
  return blocks == 0 && with_bias ? 1 : blocks;
}

//! Tiles of the weight gradient: every group, including those without rows (zeros).
EPX_HOST_DEVICE constexpr long long weight_tiles(int num_groups, int n, int k, bool with_bias) {
  return static_cast<long long>(num_groups) * ceil_div(n, BackwardTileShape::kBM) * weight_k_blocks(k, with_bias);
}

//! One tile of the weight gradient: outputs db[group][n_begin + 0..63][k_begin + 0..63] (those
//! inside [n, k]); `bias` says whether it also writes d_bias[group][n_begin + 0..63].
struct WeightTile {
  int group;
  int n_begin;
  int k_begin;
  bool bias;
};

//! The weight-gradient tile numbered t (< weight_tiles(...)): (group, n-block, k-block), k fastest;
//! the bias is summed by the k-block 0 of each (group, n-block).
EPX_HOST_DEVICE constexpr WeightTile weight_tile(long long t, int n, int k, bool with_bias) {
  long long const k_blocks = weight_k_blocks(k, with_bias);
  long long const n_blocks = ceil_div(n, BackwardTileShape::kBM);
  long long const k_block = t % k_blocks, rest = t / k_blocks;
  long long const n_block = rest % n_blocks, group = rest / n_blocks;
  return {static_cast<int>(group), static_cast<int>(n_block) * BackwardTileShape::kBM,
          static_cast<int>(k_block) * BackwardTileShape::kBN, with_bias && k_block == 0};
}

//! Most tiles the data gradient's walk can have: each group adds at most one partial m-block.
EPX_HOST_DEVICE constexpr long long data_max_tiles(std::int64_t num_rows, int num_groups, int k) {
  return (ceil_div<long long>(num_rows, BackwardTileShape::kBM) + num_groups) *
         ceil_div<long long>(k, BackwardTileShape::kBN);
}

}  // namespace epx::detail
