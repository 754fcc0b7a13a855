// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! One group of a grouped GEMM c[rows of g] = a[rows of g] · b[g]ᵀ as a ptr-array kernel (CUTLASS's)
//! takes it: its problem (M, N, K) and where its A rows, B matrix and D rows start. The index math of
//! cutlass_grouped.cuh's argument kernel, here so that the host tests check it without CUDA.

#include <epx/config.hpp>

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

}  // namespace epx::detail
