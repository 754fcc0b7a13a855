// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

#include <epx/core/space.hpp>
#include <epx/gemm/expert_mlp.hpp>
#include <epx/gemm/paired_columns.hpp>
#include <epx/host/grouped_gemm.hpp>

namespace epx {

namespace detail {

//! The activation of rows [first, last) of GEMM 1's fp32 output h into act (rounded to T): expert_mlp's
//! middle step, which expert_mlp_backward repeats to get the down projection's input.
template <class T>
void activate_rows(ExpertMlpConfig const& config, MatrixView<float const> h, std::int64_t first, std::int64_t last,
                   MatrixView<T> act) {
  auto const inter = static_cast<int>(config.intermediate);
  bool const concatenated = config.gate_up_layout == GateUpLayout::kConcatenated;
  for (std::int64_t r = first; r < last; ++r) {
    for (int i = 0; i < inter; ++i) {
      float gate = h(r, i), up = 0.0f;
      if (is_gated(config.activation)) {
        gate = h(r, gate_column(i, inter, concatenated));
        up = h(r, up_column(i, inter, concatenated));
      }
      act(r, i) = from_float<T>(activate(config.activation, gate, up, config.clamped_swiglu));
    }
  }
}

}  // namespace detail

//! @brief The expert MLP over rows grouped by local expert (host reference; semantics in
//! gemm/expert_mlp.hpp).
//! @param[in]  config          shapes and activation
//! @param[in]  weights         the local experts' weights, dtype == T
//! @param[in]  x               [rows, hidden], rows of local expert l in [offsets[l], offsets[l+1])
//! @param[in]  expert_offsets  [num_local_experts + 1]
//! @param[out] out             [rows, hidden]
//! @param[in]  workspace       at least expert_mlp_workspace_bytes<T>(config, x.rows) bytes
template <float_element T>
void expert_mlp(Host, ExpertMlpConfig const& config, ExpertWeights const& weights,
                std::type_identity_t<MatrixView<T const>> x, std::span<std::int32_t const> expert_offsets,
                MatrixView<T> out, Workspace workspace) {
  expert_mlp<T>(Host{}, config, weights, x, expert_offsets, out, workspace, MatrixView<float>{});
}

//! @brief expert_mlp that also keeps GEMM 1's output (a training forward whose backward should not
//! recompute it): the same results, bit for bit.
//! @param[out] gate_up_out  [x.rows, gate_up_rows] fp32: h = x · gate_upᵀ (+ gate_up bias) of the
//!                          rows in the offsets' range (others untouched), what expert_mlp_gate_up
//!                          writes and expert_mlp_backward reads; an empty view: not kept
template <float_element T>
void expert_mlp(Host, ExpertMlpConfig const& config, ExpertWeights const& weights,
                std::type_identity_t<MatrixView<T const>> x, std::span<std::int32_t const> expert_offsets,
                MatrixView<T> out, Workspace workspace, MatrixView<float> gate_up_out) {
  constexpr std::string_view where = "expert_mlp";
  auto const w = detail::check_expert_mlp_args<T>(where, config, weights, x, out, expert_offsets);
  auto const scratch =
      detail::carve_layout(workspace, where, [&](auto& c) { return detail::carve_expert_mlp<T>(c, config, x.rows); });

  std::int64_t const gate_up_rows = config.gate_up_rows();
  std::int64_t const inter = config.intermediate;
  bool const keep = gate_up_out.data != nullptr;
  if (keep) detail::check_matrix(where, "gate_up_out", MatrixView<float const>(gate_up_out), x.rows, gate_up_rows);
  MatrixView<float> h = keep ? gate_up_out : MatrixView<float>(scratch.gate_up_out.data(), x.rows, gate_up_rows);
  MatrixView<T> act(scratch.activated.data(), x.rows, inter);
  grouped_gemm(Host{}, x, w.gate_up, w.gate_up_bias, expert_offsets, h);

  std::int64_t const first = expert_offsets.front(), last = expert_offsets.back();
  detail::activate_rows(config, MatrixView<float const>(h), first, last, act);
  grouped_gemm(Host{}, act, w.down, w.down_bias, expert_offsets, out);
}

}  // namespace epx
