// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! The expert MLP on the GPU with epx's grouped GEMM (expert policy Grouped): two launches.
//!   GEMM 1: x · gate_upᵀ (+ bias), activation fused in the epilogue -> a [rows, I] (stored as T)
//!   GEMM 2: a · downᵀ (+ bias) (· row_scale)                          -> out [rows, H]
//! The gate_up product never reaches memory in fp32 or in T: the epilogue activates it from the
//! accumulators, as the Host reference does from its fp32 scratch (gemm/expert_mlp.hpp).

#include <epx/core/space.hpp>
#include <epx/core/workspace.hpp>
#include <epx/cuda/grouped_gemm.cuh>
#include <epx/cuda/launch.cuh>
#include <epx/cuda/nvtx.hpp>
#include <epx/gemm/expert_mlp.hpp>
#include <epx/parallel/moe_config.hpp>

#include <cstdint>
#include <span>
#include <string_view>
#include <utility>

namespace epx {

//! Options of expert_mlp(StreamRef, ...).
struct ExpertMlpOptions {
  //! [x.rows] device memory or nullptr: each output row is multiplied by it (the routing weight
  //! of the permuted row, when the caller wants it applied here instead of in unpermute).
  float const* row_scale = nullptr;
  //! Rows the experts are expected to hold in total (picks the GEMM tiles); -1: x.rows.
  std::int64_t rows_hint = -1;
};

namespace detail {

template <class T, class Carver>
std::span<T> carve_cuda_expert_mlp(Carver& carver, ExpertMlpConfig const& c, std::int64_t max_rows) {
  return carver.template take<T>(static_cast<std::size_t>(max_rows) * static_cast<std::size_t>(c.intermediate));
}

}  // namespace detail

//! Device workspace bytes of expert_mlp(StreamRef, ...) for up to `max_rows` rows (host arithmetic).
template <float_element T>
[[nodiscard]] std::size_t cuda_expert_mlp_workspace_bytes(ExpertMlpConfig const& config, std::int64_t max_rows) {
  return detail::layout_bytes([&](auto& c) { return detail::carve_cuda_expert_mlp<T>(c, config, max_rows); });
}

//! @brief The expert MLP on the GPU over rows grouped by local expert (semantics of
//! gemm/expert_mlp.hpp; the Host twin is its oracle).
//! @param[in]  stream          the caller's stream; no sync, no allocation, capturable in a CUDA graph
//! @param[in]  weights         device memory, K-major, dtype == T (bf16/fp16 need hidden and intermediate
//!                             multiples of 8, 16-byte aligned weights)
//! @param[in]  x               [rows, hidden] device memory
//! @param[in]  expert_offsets  [num_local_experts + 1] **device** memory
//! @param[out] out             [rows, hidden] device memory; rows outside the offsets' range untouched
//! @param[in]  workspace       device memory, >= cuda_expert_mlp_workspace_bytes<T>(config, x.rows)
template <float_element T>
void expert_mlp(StreamRef stream, ExpertMlpConfig const& config, ExpertWeights const& weights,
                std::type_identity_t<MatrixView<T const>> x, std::span<std::int32_t const> expert_offsets,
                MatrixView<T> out, Workspace workspace, ExpertMlpOptions const& options = {}) {
  EPX_NVTX_RANGE(Experts);
  constexpr std::string_view where = "expert_mlp";
  detail::CudaStream const s(stream, where);
  auto const w = detail::check_expert_mlp_args<T>(where, config, weights, x, out, expert_offsets);
  detail::require(expert_offsets.data() != nullptr, Errc::kInvalidArgument, where, "expert_offsets.data()", "nullptr",
                  "device memory holding num_local_experts + 1 offsets");
  auto const activated = detail::carve_layout(
      workspace, where, [&](auto& c) { return detail::carve_cuda_expert_mlp<T>(c, config, x.rows); });
  detail::check_gemm_layout<T>(where, "config.hidden", config.hidden, x, w.gate_up.data, weights.num_local_experts);
  MatrixView<T> const act(activated.data(), x.rows, config.intermediate);
  detail::check_gemm_layout<T>(where, "config.intermediate", config.intermediate, MatrixView<T const>(act), w.down.data,
                               weights.num_local_experts);
  if (x.rows == 0 || weights.num_local_experts == 0) return;

  // GEMM 1 + activation: over paired columns when gated (paired_columns.hpp), ReLU in place
  // otherwise; one kernel per activation (the epilogue's operation is a template parameter).
  auto up = detail::linear_gemm_args<T, T>(x, w.gate_up, w.gate_up_bias, expert_offsets, act, nullptr);
  up.epilogue.concatenated = config.gate_up_layout == GateUpLayout::kConcatenated;
  up.epilogue.clamped = config.clamped_swiglu;
  auto first_gemm = [&]<detail::EpilogueKind kKind>() {
    detail::run_grouped_gemm<kKind>(up, options.rows_hint, s, where);
  };
  switch (detail::first_gemm_epilogue(config.activation)) {
    case detail::EpilogueKind::kReLU: first_gemm.template operator()<detail::EpilogueKind::kReLU>(); break;
    case detail::EpilogueKind::kGeGLU: first_gemm.template operator()<detail::EpilogueKind::kGeGLU>(); break;
    case detail::EpilogueKind::kGeGLUTanh: first_gemm.template operator()<detail::EpilogueKind::kGeGLUTanh>(); break;
    case detail::EpilogueKind::kClampedSwiGLU:
      first_gemm.template operator()<detail::EpilogueKind::kClampedSwiGLU>();
      break;
    default: first_gemm.template operator()<detail::EpilogueKind::kSwiGLU>(); break;
  }

  // GEMM 2 (+ bias, row scale).
  auto const down = detail::linear_gemm_args<T, T>(MatrixView<T const>(act), w.down, w.down_bias, expert_offsets, out,
                                                   options.row_scale);
  detail::run_grouped_gemm<detail::EpilogueKind::kLinear>(down, options.rows_hint, s, where);
}

}  // namespace epx
