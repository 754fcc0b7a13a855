// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

#include <epx/core/space.hpp>
#include <epx/gemm/grouped_gemm.hpp>

#include <type_traits>

namespace epx {

//! @brief Grouped GEMM reference: c[r, :] = a[r, :] · b[g]ᵀ (+ bias[g]) for the rows r of group g,
//! fp32 accumulation in k order, one rounding to TC at the end.
//! @param[in]  a        [M, K]
//! @param[in]  b        [G, N, K], K-major
//! @param[in]  bias     [G, N] or nullptr
//! @param[in]  offsets  [G + 1] row ranges of the groups, non-decreasing, offsets[G] <= M
//! @param[out] c        [M, N]; rows outside [offsets[0], offsets[G]) are left untouched
template <class TA, class TB, float_element TC>
requires float_element<TA> && float_element<TB>
void grouped_gemm(Host, MatrixView<TA> a_in, BatchedMatrixView<TB> b_in,
                  std::type_identity_t<std::remove_const_t<TB> const*> bias, std::span<std::int32_t const> offsets,
                  MatrixView<TC> c) {
  MatrixView<std::remove_const_t<TA> const> const a(a_in);
  BatchedMatrixView<std::remove_const_t<TB> const> const b{b_in.data, b_in.batch, b_in.rows, b_in.cols};
  detail::check_grouped_gemm_args(a, b, bias, offsets, c);
  for (std::size_t g = 0; g + 1 < offsets.size(); ++g)  // all offsets first: nothing is written on error
    detail::require(offsets[g] >= 0 && offsets[g] <= offsets[g + 1] && offsets[g + 1] <= a.rows, Errc::kInvalidArgument,
                    "grouped_gemm", fmt::format("offsets[{}..{}]", g, g + 1),
                    fmt::format("[{}, {}]", offsets[g], offsets[g + 1]),
                    fmt::format("0 <= offsets[g] <= offsets[g+1] <= a.rows = {}", a.rows));
  for (std::size_t g = 0; g + 1 < offsets.size(); ++g) {
    auto const bg = b[static_cast<std::int64_t>(g)];
    for (std::int64_t r = offsets[g]; r < offsets[g + 1]; ++r) {
      auto const* arow = a.row(r);
      for (std::int64_t n = 0; n < b.rows; ++n) {
        auto const* brow = bg.row(n);
        float acc = 0.0f;
        for (std::int64_t k = 0; k < a.cols; ++k) acc += to_float(arow[k]) * to_float(brow[k]);
        if (bias != nullptr) acc += to_float(bias[static_cast<std::int64_t>(g) * b.rows + n]);
        c(r, n) = from_float<TC>(acc);
      }
    }
  }
}

}  // namespace epx
