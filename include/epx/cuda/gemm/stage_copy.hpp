// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! Where the cp.async copies of one stage go and come from: which thread copies which 16-byte chunk
//! of which stage row (placement), and the global element offset it reads (source).
//!
//! Placement: the stage's rows x 8 chunks are copied in passes of kThreads chunks; thread `tid`
//! copies chunk tid % 8 of row tid / 8 + pass * (kThreads / 8). Eight consecutive threads fill one
//! 128-byte row (conflict-free stores, coalesced 128-byte reads), the pass count is a compile-time
//! constant (the copy loop unrolls), and since kThreads / 8 is a multiple of 8 a thread's swizzle
//! phase row % 8 is the same in every pass: its shared address advances by a constant per pass.
//!
//! Source: a thread's rows are a fixed stride apart in global memory too (lda rows of A; k or k/2
//! weight rows of B, see paired_weight_row_step), so a tile's copies need one 64-bit base per
//! operand, computed once per tile, plus kt * 64 per k-tile: no 64-bit multiply per copy.

#include <epx/config.hpp>
#include <epx/gemm/paired_columns.hpp>
#include <epx/cuda/gemm/smem_layout.hpp>

#include <cstdint>

namespace epx::detail {

//! The copy placement of an operand with kRows stage rows, copied by kThreads threads.
template <int kRows, int kThreads>
struct StageCopy {
  static_assert(kThreads % (8 * kStageChunksPerRow) == 0,
                "rows per pass must be a multiple of 8 so that a thread's swizzle phase stays fixed");
  static constexpr int kRowsPerPass = kThreads / kStageChunksPerRow;
  static_assert(kRows % kRowsPerPass == 0, "every pass copies whole rows with every thread");
  static constexpr int kPasses = kRows / kRowsPerPass;

  //! The stage row that thread `tid` copies in pass `pass`.
  EPX_HOST_DEVICE static constexpr int row(int tid, int pass) { return tid / kStageChunksPerRow + pass * kRowsPerPass; }
  //! The logical chunk (K elements [8 chunk, 8 chunk + 8) of the k-tile) that thread `tid` copies, in every pass.
  EPX_HOST_DEVICE static constexpr int chunk(int tid) { return tid % kStageChunksPerRow; }
  //! Byte offset in the stage that thread `tid` writes in pass `pass`: pass 0's plus whole row groups.
  EPX_HOST_DEVICE static constexpr int smem_offset(int tid, int pass) {
    return stage_byte_offset(row(tid, 0), chunk(tid)) + pass * kRowsPerPass * kStageRowBytes;
  }
  //! Whether thread `tid`'s chunk of k-tile `kt` lies inside K (else it is zero-filled).
  EPX_HOST_DEVICE static constexpr bool in_k(int tid, int kt, int k) {
    return kt * kStageRowElems + chunk(tid) * kStageChunkElems < k;
  }
};

//! Where one thread's copies of one operand read from, for one tile: pass `pass` of k-tile `kt`
//! reads the 16 bytes at element offset offset(pass, kt) of the operand, when row_valid(pass) (rows
//! past the group's end or past n are zero-filled and read nothing).
struct CopySource {
  std::int64_t first = 0;        //!< element offset of pass 0 at k-tile 0
  std::int64_t pass_stride = 0;  //!< elements between consecutive passes' sources
  int valid_passes = 0;          //!< passes [0, valid_passes) have a row

  [[nodiscard]] EPX_HOST_DEVICE constexpr std::int64_t offset(int pass, int kt) const {
    return first + pass * pass_stride + kt * kStageRowElems;
  }
  [[nodiscard]] EPX_HOST_DEVICE constexpr bool row_valid(int pass) const { return pass < valid_passes; }
};

//! How many passes of StageCopy `Copy` have a row, when `rows_left` rows exist from the thread's pass-0 row on.
template <class Copy>
EPX_HOST_DEVICE constexpr int passes_below(std::int64_t rows_left) {
  if (rows_left <= 0) return 0;
  std::int64_t const passes = (rows_left + Copy::kRowsPerPass - 1) / Copy::kRowsPerPass;
  return passes < Copy::kPasses ? static_cast<int>(passes) : Copy::kPasses;
}

//! Thread `tid`'s copy source for the A rows [row_begin, row_end) of a tile (A is [rows, k], row stride lda).
template <class Copy>
EPX_HOST_DEVICE constexpr CopySource activation_copy_source(int tid, std::int64_t row_begin, std::int64_t row_end,
                                                            std::int64_t lda) {
  int const r0 = Copy::row(tid, 0);
  return {(row_begin + r0) * lda + Copy::chunk(tid) * kStageChunkElems, Copy::kRowsPerPass * lda,
          passes_below<Copy>(row_end - row_begin - r0)};
}

//! Thread `tid`'s copy source for the weight rows of product columns [n_begin, n_begin + rows) of a
//! tile, in one group's [n, k] weights; gated GEMMs over concatenated weights read paired rows.
template <class Copy>
EPX_HOST_DEVICE constexpr CopySource weight_copy_source(int tid, int n_begin, int n, int k, bool gated,
                                                        bool concatenated) {
  int const p0 = n_begin + Copy::row(tid, 0);
  return {static_cast<std::int64_t>(paired_weight_row(p0, n, gated, concatenated)) * k +
              Copy::chunk(tid) * kStageChunkElems,
          static_cast<std::int64_t>(paired_weight_row_step(Copy::kRowsPerPass, gated, concatenated)) * k,
          passes_below<Copy>(static_cast<std::int64_t>(n) - p0)};
}

}  // namespace epx::detail
