// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

#include <epx/core/space.hpp>
#include <epx/permute/permute.hpp>

#include <algorithm>
#include <type_traits>
#include <vector>

namespace epx {

//! @brief Gathers token rows into expert order (host reference; semantics in permute/permute.hpp).
//! @param[in]  plan    from make_plan(Host, ...)
//! @param[in]  x       [num_tokens, hidden]
//! @param[out] x_perm  [>= plan rows, hidden]; rows past the plan's rows are left untouched
template <float_element T>
void permute(Host, RoutingPlan const& plan, std::type_identity_t<MatrixView<T const>> x, MatrixView<T> x_perm) {
  std::int64_t const num_rows = detail::plan_rows(plan, "permute");
  detail::check_permute_args(plan, num_rows, x, x_perm);
  for (std::int64_t row = 0; row < num_rows; ++row) {
    std::int64_t const token = plan.sorted_slots[static_cast<std::size_t>(row)] / plan.top_k;
    std::copy_n(x.row(token), x.cols, x_perm.row(row));
  }
}

//! @brief Weighted sum of each token's expert outputs, in slot order with fp32 accumulation, each
//! term one fused multiply-add (host reference): bitwise deterministic, and bitwise equal to the
//! CUDA unpermute.
//! @param[in]  plan          from make_plan(Host, ...)
//! @param[in]  expert_out    [>= plan rows, hidden], row r belonging to plan.sorted_slots[r]
//! @param[in]  topk_weights  [num_tokens, top_k]
//! @param[out] y             [num_tokens, hidden]; fp32 for partial sums, or the element type
template <class TIn, float_element TOut>
requires float_element<TIn>
void unpermute(Host, RoutingPlan const& plan, MatrixView<TIn> expert_out_in, MatrixView<float const> topk_weights,
               MatrixView<TOut> y) {
  using T = std::remove_const_t<TIn>;
  MatrixView<T const> const expert_out(expert_out_in);
  std::int64_t const num_rows = detail::plan_rows(plan, "unpermute");
  detail::check_unpermute_args(plan, num_rows, expert_out, topk_weights, y);
  std::vector<float> acc(static_cast<std::size_t>(y.cols));
  for (std::int64_t t = 0; t < plan.num_tokens; ++t) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (std::int32_t j = 0; j < plan.top_k; ++j) {
      std::int32_t const row = plan.slot_rows[static_cast<std::size_t>(t * plan.top_k + j)];
      if (row < 0) continue;
      float const w = topk_weights(t, j);
      T const* src = expert_out.row(row);
      for (std::size_t h = 0; h < acc.size(); ++h) acc[h] = detail::add_weighted(acc[h], w, to_float(src[h]));
    }
    TOut* dst = y.row(t);
    for (std::size_t h = 0; h < acc.size(); ++h) dst[h] = from_float<std::remove_cv_t<TOut>>(acc[h]);
  }
}

}  // namespace epx
