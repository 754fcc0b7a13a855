// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! One group of a grouped GEMM c[rows of g] = a[rows of g] · b[g]ᵀ as a ptr-array kernel (CUTLASS's)
//! takes it: its problem (M, N, K) and where its A rows, B matrix and D rows start. The index math of
//! cutlass_grouped.cuh's argument kernel, here so that the host tests check it without CUDA.

#include <epx/config.hpp>
#include <epx/cuda/gemm/tile_walk.hpp>

#include <cstdint>

namespace epx::detail {

struct GroupProblem {
  std::int32_t m = 0;  //!< rows of the group: offsets[g + 1] - offsets[g] (0: no tile)
  std::int32_t n = 0;
  std::int32_t k = 0;
  std::int64_t a_offset = 0;  //!< elements from a to the group's first row: offsets[g] * lda
  std::int64_t b_offset = 0;  //!< elements from b to b[g] ([n, k], K-major): g * n * k
  std::int64_t d_offset = 0;  //!< elements from d to the group's first row: offsets[g] * ldd
};

//! Group g of `offsets` ([groups + 1], ascending), in 64-bit offsets (rows * ld exceeds 2^31 on
//! model sizes: 16384 tokens * 8 slots * 7168 columns).
EPX_HOST_DEVICE constexpr GroupProblem group_problem(std::int32_t const* offsets, std::int32_t g, std::int64_t lda,
                                                     std::int64_t ldd, std::int32_t n, std::int32_t k) {
  std::int32_t const first = offsets[g];
  return {.m = offsets[g + 1] - first,
          .n = n,
          .k = k,
          .a_offset = std::int64_t{first} * lda,
          .b_offset = std::int64_t{g} * n * k,
          .d_offset = std::int64_t{first} * ldd};
}

//! The data gradient of group g, da[rows of g] = dc[rows of g] · b[g] (cutlass_grouped_backward.cuh),
//! as a ptr-array problem: (M, N, K) = (rows of g, k, n); A = dc's rows (row-major, ldc apart), B =
//! b[g] read as [n, k] with k contiguous (CUTLASS's RowMajor B: its N mode is unit-stride), D = da's
//! rows (ldda apart). The rows are clamped into [0, num_rows] (group_rows), so that offsets that
//! leave the buffers give an empty or shortened group, never an access outside them.
EPX_HOST_DEVICE constexpr GroupProblem group_problem_data_gradient(std::int32_t const* offsets, std::int32_t g,
                                                                   std::int64_t num_rows, std::int64_t ldc,
                                                                   std::int64_t ldda, std::int32_t n, std::int32_t k) {
  GroupRows const r = group_rows(offsets, g, num_rows);
  return {.m = static_cast<std::int32_t>(r.end - r.begin),
          .n = k,
          .k = n,
          .a_offset = r.begin * ldc,
          .b_offset = std::int64_t{g} * n * k,
          .d_offset = r.begin * ldda};
}

//! The weight gradient of group g, db[g] = dc[rows of g]ᵀ · a[rows of g], as a ptr-array problem:
//! (M, N, K) = (n, k, rows of g); A = dc's rows read as [n, rows] with n contiguous (CUTLASS's
//! ColumnMajor A, ldc apart), B = a's rows read as [k, rows] with k contiguous (RowMajor B, lda apart),
//! D = db[g] ([n, k] row-major). A group without rows is (0, 0, 0): no tile. (An (n, k, 0) problem
//! would get tiles whose mainloop never runs: CUTLASS would store accumulators it never set; the
//! caller writes those groups' zeros.) Rows clamped as above.
EPX_HOST_DEVICE constexpr GroupProblem group_problem_weight_gradient(std::int32_t const* offsets, std::int32_t g,
                                                                     std::int64_t num_rows, std::int64_t ldc,
                                                                     std::int64_t lda, std::int32_t n, std::int32_t k) {
  GroupRows const r = group_rows(offsets, g, num_rows);
  auto const rows = static_cast<std::int32_t>(r.end - r.begin);
  bool const empty = rows == 0;
  return {.m = empty ? 0 : n,
          .n = empty ? 0 : k,
          .k = rows,
          .a_offset = r.begin * ldc,
          .b_offset = r.begin * lda,
          .d_offset = std::int64_t{g} * n * k};
}

//! The element strides of one operand in CUTLASS's modes: (M, K) for A, (N, K) for B, (M, N) for D.
//! One mode is the unit stride; which one is the operand's layout (RowMajor A: K; ColumnMajor A: M;
//! ColumnMajor B: K; RowMajor B: N; RowMajor D: N). The same for every group of a call.
struct OperandStrides {
  std::int64_t mode0 = 0;
  std::int64_t mode1 = 0;
  friend constexpr bool operator==(OperandStrides, OperandStrides) = default;
};

struct GroupStrides {
  OperandStrides a, b, d;
};

//! The ptr-array problems of the three grouped GEMMs, as functors the argument kernel calls per
//! group, with the strides they read their operands with (checked against the kernel's layouts on
//! the host: cutlass_grouped.cuh).
struct ForwardProblem {  // c = a · b[g]ᵀ, rows clamped into [0, num_rows] as the gradients' are
  std::int32_t const* offsets;
  std::int64_t num_rows, lda, ldd;
  std::int32_t n, k;
  EPX_HOST_DEVICE constexpr GroupProblem operator()(std::int32_t g) const {
    GroupRows const r = group_rows(offsets, g, num_rows);
    std::int32_t const clamped[2] = {static_cast<std::int32_t>(r.begin), static_cast<std::int32_t>(r.end)};
    GroupProblem p = group_problem(clamped, 0, lda, ldd, n, k);
    p.b_offset = std::int64_t{g} * n * k;
    return p;
  }
  [[nodiscard]] constexpr GroupStrides strides() const { return {{lda, 1}, {k, 1}, {ldd, 1}}; }
};

struct DataGradientProblem {  // da = dc · b[g]
  std::int32_t const* offsets;
  std::int64_t num_rows, ldc, ldda;
  std::int32_t n, k;
  EPX_HOST_DEVICE constexpr GroupProblem operator()(std::int32_t g) const {
    return group_problem_data_gradient(offsets, g, num_rows, ldc, ldda, n, k);
  }
  [[nodiscard]] constexpr GroupStrides strides() const { return {{ldc, 1}, {1, k}, {ldda, 1}}; }
};

struct WeightGradientProblem {  // db[g] = dc[rows of g]ᵀ · a[rows of g]
  std::int32_t const* offsets;
  std::int64_t num_rows, ldc, lda;
  std::int32_t n, k;
  EPX_HOST_DEVICE constexpr GroupProblem operator()(std::int32_t g) const {
    return group_problem_weight_gradient(offsets, g, num_rows, ldc, lda, n, k);
  }
  [[nodiscard]] constexpr GroupStrides strides() const { return {{1, ldc}, {1, lda}, {k, 1}}; }
};

}  // namespace epx::detail
