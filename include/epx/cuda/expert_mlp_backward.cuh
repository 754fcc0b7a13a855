// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! The backward of the expert MLP on the GPU (semantics of host/expert_mlp_backward.hpp, its
//! oracle), with the experts' row ranges in device memory: no host sync, no allocation.
//!   h  = x · gate_upᵀ (+ bias)          expert_mlp_gate_up: epx's grouped GEMM, fp32 out
//!   a  = activation(h)                   group_activation_kernel (group_rows.cuh), rounded to T
//!   d_down = dyᵀ · a, d_down_bias        grouped_gemm_backward_weight
//!   da = dy · down                       grouped_gemm_backward_data, fp32
//!   dh = da * activation'(h)             group_activation_backward_kernel, fp32
//!   d_gate_up = dhᵀ · x, d_gate_up_bias  grouped_gemm_backward_weight
//!   dx = dh · gate_up                    grouped_gemm_backward_data
//! The gradient GEMMs are the correctness path (cuda/grouped_gemm_backward.cuh: each element in
//! the Host's order, no tensor cores); the activation uses the device's exp/tanh, so results agree
//! with the Host to a few ulps of fp32, not bitwise. Deterministic: no atomics. The tensor-core
//! twin, on CUTLASS, is cuda/cutlass_expert_mlp_backward.cuh.

#include <epx/core/space.hpp>
#include <epx/core/workspace.hpp>
#include <epx/cuda/group_rows.cuh>
#include <epx/cuda/grouped_gemm.cuh>
#include <epx/cuda/grouped_gemm_backward.cuh>
#include <epx/cuda/launch.cuh>
#include <epx/cuda/nvtx.hpp>
#include <epx/gemm/expert_mlp.hpp>
#include <epx/gemm/expert_mlp_backward.hpp>

#include <cstdint>
#include <span>
#include <string_view>
#include <type_traits>

namespace epx {

//! @brief GEMM 1 of the expert MLP on the GPU, h = x · gate_up[e]ᵀ (+ gate_up_bias[e]) in fp32: what
//! the CUDA expert_mlp_backward reads (keep it from a forward, or recompute it: one GEMM).
//! @param[in]  x               [rows, hidden] device memory
//! @param[in]  expert_offsets  [num_local_experts + 1] **device** memory
//! @param[out] gate_up_out     [rows, gate_up_rows] device memory; rows outside the offsets' range untouched
//! @param[in]  rows_hint       rows the experts are expected to hold (picks the GEMM tiles); -1: x.rows
template <class TX>
requires float_element<TX>
void expert_mlp_gate_up(StreamRef stream, ExpertMlpConfig const& config, ExpertWeights const& weights,
                        MatrixView<TX> x_in, std::span<std::int32_t const> expert_offsets,
                        MatrixView<float> gate_up_out, std::int64_t rows_hint = -1) {
  constexpr std::string_view where = "expert_mlp_gate_up";
  using T = std::remove_const_t<TX>;
  MatrixView<T const> const x(x_in);
  auto const w = detail::check_expert_mlp_gate_up_args<T>(where, config, weights, x, expert_offsets, gate_up_out);
  if (x.rows == 0 || weights.num_local_experts == 0) return;
  grouped_gemm(stream, x, w.gate_up, w.gate_up_bias, expert_offsets, gate_up_out,
               GroupedGemmOptions{.rows_hint = rows_hint});
}

//! @brief The backward of expert_mlp on the GPU: dx and the local experts' weight and bias gradients
//! (semantics, shapes and errors of the Host expert_mlp_backward; `expert_offsets` and every matrix
//! in device memory; offsets are read on the device, clamped like grouped_gemm's).
//! @param[in]  gate_up_out  [rows, gate_up_rows] fp32: forward's h, from expert_mlp_gate_up
//! @param[in]  workspace    device memory, >= expert_mlp_backward_workspace_bytes<T>(config, x.rows)
//! Every local expert's weight gradients are written (zeros for one without rows); dx rows outside
//! [offsets[0], offsets[G]) are left untouched. No output may alias an input or the workspace.
template <class TX, float_element G>
requires float_element<TX>
void expert_mlp_backward(StreamRef stream, ExpertMlpConfig const& config, ExpertWeights const& weights,
                         MatrixView<TX> x_in, std::span<std::int32_t const> expert_offsets,
                         MatrixView<float const> gate_up_out, std::type_identity_t<MatrixView<G const>> dy,
                         std::type_identity_t<MatrixView<G>> dx, ExpertWeightGrads<G> const& grads,
                         Workspace workspace) {
  EPX_NVTX_RANGE(Experts);
  constexpr std::string_view where = "expert_mlp_backward";
  using T = std::remove_const_t<TX>;
  MatrixView<T const> const x(x_in);
  detail::CudaStream const s(stream, where);
  auto const w = detail::check_expert_mlp_backward_args<T, G>(where, config, weights, x, expert_offsets, gate_up_out,
                                                              dy, MatrixView<G const>(dx), grads);
  detail::require(expert_offsets.data() != nullptr, Errc::kInvalidArgument, where, "expert_offsets.data()", "nullptr",
                  "device memory holding num_local_experts + 1 offsets");
  std::int64_t const rows = x.rows, gate_up_rows = config.gate_up_rows(), inter = config.intermediate;
  auto const scratch = detail::carve_layout(
      workspace, where, [&](auto& c) { return detail::carve_expert_mlp_backward<T>(c, config, rows); });
  if (weights.num_local_experts == 0) return;

  MatrixView<T> const act(scratch.activated.data(), rows, inter);
  MatrixView<float> const d_act(scratch.d_activated.data(), rows, inter);
  MatrixView<float> const dh(scratch.d_gate_up_out.data(), rows, gate_up_rows);
  auto const groups = static_cast<int>(weights.num_local_experts);

  // GEMM 2: out = a · down[e]ᵀ (+ down_bias[e]). Its weight gradients are written even without rows.
  detail::launch_group_activation<T, float>(config, nullptr, expert_offsets, groups, rows, gate_up_out, act, s.get());
  grouped_gemm_backward_weight(stream, MatrixView<T const>(act), dy, expert_offsets, grads.down, grads.down_bias);
  grouped_gemm_backward_data(stream, dy, w.down, expert_offsets, d_act);
  // The activation: each column's gradient to its gate and up columns of h.
  detail::launch_group_activation_backward(config, expert_offsets, groups, rows, gate_up_out,
                                           MatrixView<float const>(d_act), dh, s.get());
  // GEMM 1: h = x · gate_up[e]ᵀ (+ gate_up_bias[e]).
  grouped_gemm_backward_weight(stream, x, MatrixView<float const>(dh), expert_offsets, grads.gate_up,
                               grads.gate_up_bias);
  grouped_gemm_backward_data(stream, MatrixView<float const>(dh), w.gate_up, expert_offsets, dx);
}

namespace detail {

//! The SIMT backward of the Cuda expert parts (Grouped without CUTLASS; CutlassGrouped and Grouped for
//! fp16 weights with fp32 gradients; see cutlass_expert_mlp_backward.cuh): h recomputed with epx's grouped
//! GEMM from forward's input rows (one GEMM: two thirds of the experts' forward flops when gated),
//! or the h a forward kept (MoeConfig::save_gate_up_output), then expert_mlp_backward.
struct CudaRecomputingBackward {
  //! `h_kept`: the forwards keep h (MoeConfig::save_gate_up_output), so no h here.
  template <class T>
  [[nodiscard]] std::size_t backward_workspace_bytes(ExpertMlpConfig const& mlp, std::int32_t /*num_groups*/,
                                                     std::int64_t max_rows, bool h_kept = false) const {
    return layout_bytes([&](auto& c) { return carve_expert_part_backward<T>(c, mlp, max_rows, h_kept); });
  }

  template <class T, class G>
  void backward(CudaStream stream, ExpertMlpConfig const& mlp, ExpertWeights const& weights, MatrixView<T const> x,
                std::span<std::int32_t const> device_offsets, MatrixView<G const> dy, MatrixView<G> dx,
                ExpertWeightGrads<G> const& grads, Workspace ws) const {
    auto const parts =
        carve_layout(ws, "backward (experts)", [&](auto& c) { return carve_expert_part_backward<T>(c, mlp, x.rows); });
    MatrixView<float> const h(parts.first.data(), x.rows, mlp.gate_up_rows());
    expert_mlp_gate_up(stream, mlp, weights, x, device_offsets, h);
    expert_mlp_backward(stream, mlp, weights, x, device_offsets, MatrixView<float const>(h), dy, dx, grads,
                        parts.second);
  }

  //! backward from the h a forward kept (bias included): no GEMM 1.
  template <class T, class G>
  void backward(CudaStream stream, ExpertMlpConfig const& mlp, ExpertWeights const& weights, MatrixView<T const> x,
                std::span<std::int32_t const> device_offsets, MatrixView<float const> h, MatrixView<G const> dy,
                MatrixView<G> dx, ExpertWeightGrads<G> const& grads, Workspace ws) const {
    auto const parts = carve_layout(ws, "backward (experts)",
                                    [&](auto& c) { return carve_expert_part_backward<T>(c, mlp, x.rows, true); });
    expert_mlp_backward(stream, mlp, weights, x, device_offsets, h, dy, dx, grads, parts.second);
  }
};

}  // namespace detail
}  // namespace epx
