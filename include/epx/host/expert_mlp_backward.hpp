// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! The backward of the expert MLP (host reference). Forward (gemm/expert_mlp.hpp), for the rows of
//! local expert e:
//!   h   = x · gate_up[e]ᵀ (+ gate_up_bias[e])   [rows, gate_up_rows]  fp32: what backward needs saved
//!   a   = activation(gate, up)                   [rows, intermediate]  stored as T
//!   out = a · down[e]ᵀ (+ down_bias[e])          [rows, hidden]
//! Backward, for dy = dL/dout:
//!   d_down[e] = dyᵀ · a, d_down_bias[e] = column sums of dy     (a recomputed from h, as forward rounds it)
//!   da        = dy · down[e]                                      fp32
//!   dh        = da * activation_grad(gate, up)                    fp32, into h's gate and up columns
//!   d_gate_up[e] = dhᵀ · x, d_gate_up_bias[e] = column sums of dh
//!   dx        = dh · gate_up[e]
//! Each step is the grouped GEMM backward of host/grouped_gemm_backward.hpp: fp32 accumulation in a
//! fixed order, bitwise deterministic.

#include <epx/core/space.hpp>
#include <epx/gemm/expert_mlp.hpp>
#include <epx/gemm/expert_mlp_backward.hpp>
#include <epx/gemm/paired_columns.hpp>
#include <epx/host/expert_mlp.hpp>
#include <epx/host/grouped_gemm.hpp>
#include <epx/host/grouped_gemm_backward.hpp>

#include <type_traits>

namespace epx {

//! @brief GEMM 1 of the expert MLP, h = x · gate_up[e]ᵀ (+ gate_up_bias[e]) in fp32: bitwise what
//! expert_mlp computes before its activation (the same grouped_gemm call). It is what
//! expert_mlp_backward needs from forward: keep it (rows * gate_up_rows * 4 bytes) or recompute it
//! here before the backward (one GEMM of 2 * rows * gate_up_rows * hidden flops).
//! @param[in]  config          shapes and activation
//! @param[in]  weights         the local experts' weights, dtype == T
//! @param[in]  x               [rows, hidden], rows of local expert l in [offsets[l], offsets[l+1])
//! @param[in]  expert_offsets  [num_local_experts + 1]
//! @param[out] gate_up_out     [rows, gate_up_rows]; rows outside [offsets.front(), offsets.back())
//!                             are left untouched
template <class TX>
requires float_element<TX>
void expert_mlp_gate_up(Host, ExpertMlpConfig const& config, ExpertWeights const& weights, MatrixView<TX> x_in,
                        std::span<std::int32_t const> expert_offsets, MatrixView<float> gate_up_out) {
  constexpr std::string_view where = "expert_mlp_gate_up";
  using T = std::remove_const_t<TX>;
  MatrixView<T const> const x(x_in);
  auto const w = detail::check_expert_mlp_gate_up_args<T>(where, config, weights, x, expert_offsets, gate_up_out);
  detail::check_group_offsets(where, "expert_offsets", expert_offsets, weights.num_local_experts, x.rows,
                              "num_local_experts");
  grouped_gemm(Host{}, x, w.gate_up, w.gate_up_bias, expert_offsets, gate_up_out);
}

//! @brief The backward of expert_mlp (host reference): dx and the local experts' weight and bias
//! gradients, for both gate/up layouts and every activation (derivatives at the kinks: see
//! detail::activation_grad).
//! @param[in]  config          forward's config
//! @param[in]  weights         forward's weights, dtype == T
//! @param[in]  x               [rows, hidden]: forward's input, rows of local expert l in
//!                             [offsets[l], offsets[l+1])
//! @param[in]  expert_offsets  [num_local_experts + 1]: forward's offsets
//! @param[in]  gate_up_out     [rows, gate_up_rows]: forward's h, from expert_mlp_gate_up
//! @param[in]  dy              [rows, hidden]: dL/dout
//! @param[out] dx              [rows, hidden]: dL/dx; rows outside [offsets.front(), offsets.back())
//!                             are left untouched
//! @param[out] grads           the weight gradients (every local expert written: zeros for one with
//!                             no rows); bias gradients where their pointer is not null
//! @param[in]  workspace       at least expert_mlp_backward_workspace_bytes<T>(config, x.rows) bytes
//! No output may alias an input or the workspace.
template <class TX, float_element G>
requires float_element<TX>
void expert_mlp_backward(Host, ExpertMlpConfig const& config, ExpertWeights const& weights, MatrixView<TX> x_in,
                         std::span<std::int32_t const> expert_offsets, MatrixView<float const> gate_up_out,
                         std::type_identity_t<MatrixView<G const>> dy, std::type_identity_t<MatrixView<G>> dx,
                         ExpertWeightGrads<G> const& grads, Workspace workspace) {
  constexpr std::string_view where = "expert_mlp_backward";
  using T = std::remove_const_t<TX>;
  MatrixView<T const> const x(x_in);
  auto const w = detail::check_expert_mlp_backward_args<T, G>(where, config, weights, x, expert_offsets, gate_up_out,
                                                              dy, MatrixView<G const>(dx), grads);
  std::int64_t const rows = x.rows, gate_up_rows = config.gate_up_rows(), inter = config.intermediate;
  detail::check_group_offsets(where, "expert_offsets", expert_offsets, weights.num_local_experts, rows,
                              "num_local_experts");
  auto const scratch = detail::carve_layout(
      workspace, where, [&](auto& c) { return detail::carve_expert_mlp_backward<T>(c, config, rows); });

  MatrixView<T> act(scratch.activated.data(), rows, inter);
  MatrixView<float> d_act(scratch.d_activated.data(), rows, inter);
  MatrixView<float> dh(scratch.d_gate_up_out.data(), rows, gate_up_rows);
  std::int64_t const first = expert_offsets.front(), last = expert_offsets.back();

  // GEMM 2: out = a · down[e]ᵀ (+ down_bias[e]).
  detail::activate_rows(config, gate_up_out, first, last, act);
  grouped_gemm_backward_weight(Host{}, act, dy, expert_offsets, grads.down, grads.down_bias);
  grouped_gemm_backward_data(Host{}, dy, w.down, expert_offsets, d_act);

  // The activation: each column's gradient goes to its gate and up columns of h.
  auto const n_inter = static_cast<int>(inter);
  bool const concatenated = config.gate_up_layout == GateUpLayout::kConcatenated;
  bool const gated = is_gated(config.activation);
  for (std::int64_t r = first; r < last; ++r) {
    for (int i = 0; i < n_inter; ++i) {
      int const gate_col = gated ? detail::gate_column(i, n_inter, concatenated) : i;
      int const up_col = detail::up_column(i, n_inter, concatenated);
      float const up = gated ? gate_up_out(r, up_col) : 0.0f;
      auto const g = detail::activation_grad(config.activation, gate_up_out(r, gate_col), up, config.clamped_swiglu);
      dh(r, gate_col) = d_act(r, i) * g.d_gate;
      if (gated) dh(r, up_col) = d_act(r, i) * g.d_up;
    }
  }

  // GEMM 1: h = x · gate_up[e]ᵀ (+ gate_up_bias[e]).
  grouped_gemm_backward_weight(Host{}, x, MatrixView<float const>(dh), expert_offsets, grads.gate_up,
                               grads.gate_up_bias);
  grouped_gemm_backward_data(Host{}, MatrixView<float const>(dh), w.gate_up, expert_offsets, dx);
}

}  // namespace epx
