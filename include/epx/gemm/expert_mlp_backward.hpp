// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! What every backend's expert_mlp_backward shares: its scratch layout (so that one workspace size
//! serves the Host reference and the CUDA twin) and its argument checks. The maths is documented
//! in host/expert_mlp_backward.hpp.

#include <epx/core/workspace.hpp>
#include <epx/gemm/expert_mlp.hpp>
#include <epx/host/grouped_gemm_backward.hpp>

#include <cstdint>
#include <span>
#include <string_view>
#include <utility>

namespace epx {
namespace detail {

//! Scratch of expert_mlp_backward.
template <class T>
struct ExpertMlpBackwardScratch {
  std::span<T> activated;          // [rows, intermediate]: forward's a, recomputed from h
  std::span<float> d_activated;    // [rows, intermediate]: da
  std::span<float> d_gate_up_out;  // [rows, gate_up_rows]: dh
};

template <class T, class Carver>
ExpertMlpBackwardScratch<T> carve_expert_mlp_backward(Carver& carver, ExpertMlpConfig const& c, std::int64_t max_rows) {
  auto const rows = static_cast<std::size_t>(max_rows);
  auto const inter = static_cast<std::size_t>(c.intermediate);
  return {carver.template take<T>(rows * inter), carver.template take<float>(rows * inter),
          carver.template take<float>(rows * static_cast<std::size_t>(c.gate_up_rows()))};
}

//! The checks of expert_mlp_gate_up that do not read the offsets' values. Returns the typed weights.
template <class T>
TypedExpertWeights<T> check_expert_mlp_gate_up_args(std::string_view where, ExpertMlpConfig const& config,
                                                    ExpertWeights const& weights, MatrixView<T const> x,
                                                    std::span<std::int32_t const> expert_offsets,
                                                    MatrixView<float> gate_up_out) {
  validate(config, where);
  auto const w = typed_weights<T>(config, weights, where);
  check_matrix(where, "x", x, -1, config.hidden);
  check_matrix(where, "gate_up_out", gate_up_out, x.rows, config.gate_up_rows());
  require(expert_offsets.size() == static_cast<std::size_t>(weights.num_local_experts) + 1, Errc::kShapeMismatch, where,
          "expert_offsets.size()", expert_offsets.size(),
          fmt::format("num_local_experts + 1 = {}", weights.num_local_experts + 1));
  return w;
}

//! The checks of expert_mlp_backward that do not read the offsets' values (the CUDA twin's are in
//! device memory): config, weights, x, h, dy, dx, one offset per local expert plus the end, the
//! gradients' shapes. Returns the typed weights.
template <class T, class G>
TypedExpertWeights<T> check_expert_mlp_backward_args(std::string_view where, ExpertMlpConfig const& config,
                                                     ExpertWeights const& weights, MatrixView<T const> x,
                                                     std::span<std::int32_t const> expert_offsets,
                                                     MatrixView<float const> gate_up_out, MatrixView<G const> dy,
                                                     MatrixView<G const> dx, ExpertWeightGrads<G> const& grads) {
  validate(config, where);
  auto const w = typed_weights<T>(config, weights, where);
  std::int64_t const rows = x.rows, experts = weights.num_local_experts;
  check_matrix(where, "x", x, -1, config.hidden);
  check_matrix(where, "gate_up_out", gate_up_out, rows, config.gate_up_rows());
  check_matrix(where, "dy", dy, rows, config.hidden);
  check_matrix(where, "dx", dx, rows, config.hidden);
  require(expert_offsets.size() == static_cast<std::size_t>(experts) + 1, Errc::kShapeMismatch, where,
          "expert_offsets.size()", expert_offsets.size(), fmt::format("num_local_experts + 1 = {}", experts + 1));
  check_batched(where, "grads.gate_up", grads.gate_up, experts, config.gate_up_rows(), config.hidden);
  check_batched(where, "grads.down", grads.down, experts, config.hidden, config.intermediate);
  return w;
}

//! An expert part's backward scratch (host/expert_parallel.hpp, cuda/expert_mlp.cuh): GEMM 1's
//! output h in fp32, recomputed from the saved input rows (none when the forward kept h:
//! `h_kept`), then expert_mlp_backward's workspace.
template <class T, class Carver>
std::pair<std::span<float>, Workspace> carve_expert_part_backward(Carver& c, ExpertMlpConfig const& mlp,
                                                                  std::int64_t max_rows, bool h_kept = false) {
  auto const h = c.template take<float>(
      h_kept ? 0 : static_cast<std::size_t>(max_rows) * static_cast<std::size_t>(mlp.gate_up_rows()));
  auto const rest = c.template take<std::byte>(
      layout_bytes([&](auto& inner) { return carve_expert_mlp_backward<T>(inner, mlp, max_rows); }));
  return {h, Workspace(rest.data(), rest.size())};
}

}  // namespace detail

//! Workspace bytes of `expert_mlp_backward` (Host and Cuda) for up to `max_rows` rows (pure host
//! arithmetic): max_rows * (intermediate * (sizeof(T) + 4) + gate_up_rows * 4) plus alignment.
template <float_element T>
[[nodiscard]] std::size_t expert_mlp_backward_workspace_bytes(ExpertMlpConfig const& config, std::int64_t max_rows) {
  return detail::layout_bytes([&](auto& c) { return detail::carve_expert_mlp_backward<T>(c, config, max_rows); });
}

}  // namespace epx
