// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! Launch arithmetic of epx's grid-stride kernels (grid_blocks) and the index math of the row-moving
//! ones (permute, regroup, the fp32 -> T output), kept in plain C++ so that the host tests
//! (tests/kernel_math/row_blocks_test.cpp) check exactly what the kernels compute, without a GPU.
//!
//! These kernels copy whole rows of 16-byte vectors (or single elements when a row is not made of
//! whole vectors). A block is two-dimensional: `threads_x` threads walk the chunks of one row,
//! `rows_per_block` rows are in flight at once, and the grid strides over rows. So no thread ever
//! divides a flat 64-bit index by the row width (a 64-bit `/` and `%` cost ~70 instructions per
//! 16 bytes moved), and a row's chunks are read by consecutive threads (coalesced).

#include <epx/config.hpp>
#include <epx/core/math.hpp>

#include <cstdint>

namespace epx::detail {

//! The shape of one block of a row-moving kernel.
struct RowBlock {
  int threads_x = 0;       //!< threads across a row's chunks: a multiple of 32, at most the block
  int rows_per_block = 0;  //!< rows a block covers per step of the grid-stride loop
};

//! Threads across a row: the fewest warps, doubling from one, that cover the row's chunks, at
//! most `threads_per_block`; the rest of the block takes further rows. Powers of two, so that a
//! block of 2^n warps is always full (threads_x * rows_per_block == threads_per_block).
EPX_HOST_DEVICE constexpr RowBlock row_block(std::int64_t chunks_per_row, int threads_per_block) {
  int x = 32;
  while (x < chunks_per_row && 2 * x <= threads_per_block) x *= 2;
  return {x, threads_per_block / x};
}

//! Blocks of a grid-stride launch over `work` items, `per_block` items a block: one block per
//! `per_block` items, at most `max_blocks` (the loop covers the rest), at least one (a launch with
//! zero blocks is an error; the kernel then does nothing). Every epx launcher sizes its grid here.
constexpr int grid_blocks(std::int64_t work, std::int64_t per_block, int max_blocks) {
  std::int64_t const wanted = ceil_div<std::int64_t>(work, per_block);
  return wanted < 1 ? 1 : (wanted > max_blocks ? max_blocks : static_cast<int>(wanted));
}

//! The unit a row moves in: 16-byte vectors when both rows start 16-byte aligned for every row
//! (base and leading dimension) and the row is whole vectors; one element otherwise.
constexpr bool rows_move_in_vectors(std::uintptr_t a, std::int64_t lda, std::uintptr_t b, std::int64_t ldb,
                                    std::int64_t cols, std::int64_t elem_bytes) {
  std::int64_t const per_vector = 16 / elem_bytes;
  return cols % per_vector == 0 && lda % per_vector == 0 && ldb % per_vector == 0 && a % 16 == 0 && b % 16 == 0;
}

}  // namespace epx::detail
