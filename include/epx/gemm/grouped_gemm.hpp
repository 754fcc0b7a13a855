// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! The grouped GEMM's protocol, shared by every backend:
//!   for each group g and each row r in [offsets[g], offsets[g + 1]):
//!     c[r, n] = sum over k of a[r, k] * b[g][n, k]  (+ bias[g][n])   with fp32 accumulation.
//! B is K-major (a linear layer's [out, in] weight), one matrix per group, stacked.

#include <epx/core/dtype.hpp>
#include <epx/core/views.hpp>

#include <cstdint>
#include <span>

namespace epx::detail {

template <class TA, class TB, class TC>
void check_grouped_gemm_args(MatrixView<TA const> a, BatchedMatrixView<TB const> b, TB const* bias,
                             std::span<std::int32_t const> offsets, MatrixView<TC> c) {
  constexpr std::string_view where = "grouped_gemm";
  check_matrix(where, "a", a, -1, -1);
  require(b.batch >= 0 && b.rows >= 0 && b.cols == a.cols, Errc::kShapeMismatch, where, "b (batch, n, k)",
          fmt::format("({}, {}, {})", b.batch, b.rows, b.cols), fmt::format("k = a.cols = {}", a.cols));
  require(b.data != nullptr || b.batch * b.rows * b.cols == 0, Errc::kInvalidArgument, where, "b.data", "nullptr",
          "a pointer to the stacked weights");
  require(offsets.size() == static_cast<std::size_t>(b.batch) + 1, Errc::kShapeMismatch, where, "offsets.size()",
          offsets.size(), fmt::format("b.batch + 1 = {}", b.batch + 1));
  check_matrix(where, "c", c, a.rows, b.rows);
  (void)bias;
}

}  // namespace epx::detail
