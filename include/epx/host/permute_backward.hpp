// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! The backward of the permute and unpermute stages (host reference). Forward semantics in
//! permute/permute.hpp:
//!   permute:   x_perm[row] = x[sorted_slots[row] / top_k]
//!   unpermute: y[t] = sum over j of topk_weights[t, j] * expert_out[slot_rows[t * top_k + j]]
//! so, for dy = dL/dy and d_x_perm = dL/dx_perm:
//!   permute_backward:   dx[t] = sum over token t's slots j with a row of d_x_perm[slot_rows[t * top_k + j]]
//!   unpermute_backward: d_expert_out[slot_rows[s]] = topk_weights[s] * dy[s / top_k]
//!                       d_topk_weights[s] = dot(dy[s / top_k], expert_out[slot_rows[s]]), 0 for a slot without row
//! Sums run in slot order (and dot products in column order) with fp32 accumulation: bitwise
//! deterministic.

#include <epx/core/space.hpp>
#include <epx/host/permute.hpp>
#include <epx/permute/permute_backward_args.hpp>

#include <type_traits>

namespace epx {
//! @brief The backward of permute: each token's gradient is the sum of its routed rows' gradients,
//! added in slot order with fp32 accumulation (host reference; bitwise deterministic).
//! @param[in]  plan      the plan forward's permute used, from make_plan(Host, ...)
//! @param[in]  d_x_perm  [>= plan rows, hidden]: dL/dx_perm, row r belonging to plan.sorted_slots[r]
//! @param[out] dx        [num_tokens, hidden]: dL/dx, every row written (zeros for a token with no
//!                       routed slot: no id, an invalid id, or experts outside plan.experts only);
//!                       fp32, or the element type (one rounding at the end)
template <class TIn, float_element TDx>
requires float_element<TIn>
void permute_backward(Host, RoutingPlan const& plan, MatrixView<TIn> d_x_perm_in, MatrixView<TDx> dx) {
  using T = std::remove_const_t<TIn>;
  MatrixView<T const> const d_x_perm(d_x_perm_in);
  std::int64_t const num_rows = detail::plan_rows(plan, "permute_backward");
  detail::check_permute_backward_args(plan, num_rows, d_x_perm, dx);
  for (std::int64_t t = 0; t < plan.num_tokens; ++t) {
    TDx* dst = dx.row(t);
    for (std::int64_t h = 0; h < dx.cols; ++h) {
      float acc = 0.0f;
      for (std::int32_t j = 0; j < plan.top_k; ++j) {
        std::int32_t const row = plan.slot_rows[static_cast<std::size_t>(t * plan.top_k + j)];
        if (row >= 0) acc += to_float(d_x_perm(row, h));
      }
      dst[h] = from_float<std::remove_cv_t<TDx>>(acc);
    }
  }
}

//! @brief The backward of unpermute: the gradient of each routed row (its slot's weight times the
//! token's dy, one rounding) and of each slot's weight (the dot product of the token's dy with the
//! row's expert output, fp32 accumulation in column order, each term one fused multiply-add:
//! bitwise deterministic and independent of the compiler's contraction flags).
//! @param[in]  plan            the plan forward's unpermute used, from make_plan(Host, ...)
//! @param[in]  expert_out      [>= plan rows, hidden]: forward's input, row r belonging to plan.sorted_slots[r]
//! @param[in]  topk_weights    [num_tokens, top_k]: forward's weights
//! @param[in]  dy              [num_tokens, hidden]: dL/dy
//! @param[out] d_expert_out    [>= plan rows, hidden]: dL/dexpert_out; rows past the plan's rows are
//!                             left untouched. fp32, or the element type
//! @param[out] d_topk_weights  [num_tokens, top_k]: dL/dtopk_weights, every entry written; 0 for a
//!                             slot without a row in this plan (id -1, an invalid id, or an expert
//!                             outside plan.experts: its weight did not reach y through this plan)
//! No output may alias an input.
template <class TOutIn, class TDyIn, float_element TG>
requires float_element<TOutIn> && float_element<TDyIn>
void unpermute_backward(Host, RoutingPlan const& plan, MatrixView<TOutIn> expert_out_in,
                        MatrixView<float const> topk_weights, MatrixView<TDyIn> dy_in, MatrixView<TG> d_expert_out,
                        MatrixView<float> d_topk_weights) {
  using TOut = std::remove_const_t<TOutIn>;
  using TDy = std::remove_const_t<TDyIn>;
  MatrixView<TOut const> const expert_out(expert_out_in);
  MatrixView<TDy const> const dy(dy_in);
  std::int64_t const num_rows = detail::plan_rows(plan, "unpermute_backward");
  detail::check_unpermute_backward_args(plan, num_rows, expert_out, topk_weights, dy, d_expert_out, d_topk_weights);
  for (std::int64_t t = 0; t < plan.num_tokens; ++t) {
    TDy const* dyt = dy.row(t);
    for (std::int32_t j = 0; j < plan.top_k; ++j) {
      std::int32_t const row = plan.slot_rows[static_cast<std::size_t>(t * plan.top_k + j)];
      if (row < 0) {
        d_topk_weights(t, j) = 0.0f;
        continue;
      }
      float const w = topk_weights(t, j);
      TOut const* src = expert_out.row(row);
      TG* dst = d_expert_out.row(row);
      float dot = 0.0f;
      for (std::int64_t h = 0; h < dy.cols; ++h) {
        float const g = to_float(dyt[h]);
        dst[h] = from_float<std::remove_cv_t<TG>>(w * g);
        dot = detail::add_weighted(dot, g, to_float(src[h]));
      }
      d_topk_weights(t, j) = dot;
    }
  }
}

}  // namespace epx
