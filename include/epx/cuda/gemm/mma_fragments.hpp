// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! How the mma.sync mainloop feeds mma.m16n8k16 from a stage (smem_layout.hpp) and where its
//! accumulators land, as lane-level index functions.
//!
//! ldmatrix.x4 loads four 8x8 matrices of 16-bit elements: lanes 8i..8i+7 supply the row addresses
//! of matrix i, and lane t receives elements (row t / 4, columns 2 (t % 4), +1) of matrix i in
//! register i. A stage row is one row of A (or one weight row of B, i.e. one column n of mma's
//! K x N operand), so an 8x8 matrix is 8 rows x one 16-byte chunk of K, and the lane->address maps
//! below pick the matrices so that the registers come out in mma's fragment order:
//!   A (16 x 16 at row0): matrix 0 = rows 0-7 x k 0-7, 1 = rows 8-15 x k 0-7, 2 = rows 0-7 x k 8-15,
//!     3 = rows 8-15 x k 8-15: registers a0..a3 of mma's A fragment as they are.
//!   B (16 n x 16 k at row0, two n8 fragments): matrix 0 = n 0-7 x k 0-7, 1 = n 0-7 x k 8-15,
//!     2 = n 8-15 x k 0-7, 3 = n 8-15 x k 8-15: registers (b0, b1) of fragment nj * 2 and nj * 2 + 1.
//! tests/kernel_math/gemm_mma_test.cpp moves random tiles through these maps and an emulation of
//! the two instructions written from the PTX ISA, and compares with a plain matmul.

#include <epx/config.hpp>
#include <epx/cuda/gemm/smem_layout.hpp>

namespace epx::detail {

//! A 16-byte chunk of a stage: logical chunk `chunk` (K elements [8 chunk, 8 chunk + 8) of the
//! k-tile) of stage row `row`.
struct StageChunk {
  int row;
  int chunk;
};

//! One element of a fragment's tile.
struct FragmentCoord {
  int row;
  int col;
};

//! The chunk whose address `lane` gives to ldmatrix.x4 for the A fragment of the 16 rows from `row0`,
//! k16 step `kk` (0-3) of the k-tile: lanes 0-15 rows 0-15 at k 0-7, lanes 16-31 the same rows at k 8-15.
EPX_HOST_DEVICE constexpr StageChunk ldmatrix_a_chunk(int row0, int kk, int lane) {
  return {row0 + (lane & 15), kk * 2 + (lane >> 4)};
}

//! The chunk whose address `lane` gives to ldmatrix.x4 for the B fragments of the 16 weight rows
//! (product columns) from `row0`, k16 step `kk`: lanes 0-7 n 0-7 at k 0-7, 8-15 n 0-7 at k 8-15,
//! 16-23 n 8-15 at k 0-7, 24-31 n 8-15 at k 8-15.
EPX_HOST_DEVICE constexpr StageChunk ldmatrix_b_chunk(int row0, int kk, int lane) {
  return {row0 + (lane & 7) + ((lane >> 4) << 3), kk * 2 + ((lane >> 3) & 1)};
}

//! Where register r (0-3) of the B ldmatrix.x4 goes: B fragment `n8` (0: columns row0..+7, 1: +8..+15)
//! of the pair, its register `reg` (0: k 0-7, 1: k 8-15).
struct BFragmentSlot {
  int n8;
  int reg;
};
EPX_HOST_DEVICE constexpr BFragmentSlot ldmatrix_b_slot(int r) { return {r >> 1, r & 1}; }

//! The (row, column) of the m16n8 f32 accumulator tile that register e (0-3) of `lane` holds.
//! Registers (0, 1) and (2, 3) are column pairs (p, p + 1), p even: what the epilogue stores.
EPX_HOST_DEVICE constexpr FragmentCoord mma_accumulator_coord(int lane, int e) {
  return {(lane >> 2) + 8 * (e >> 1), 2 * (lane & 3) + (e & 1)};
}

}  // namespace epx::detail
