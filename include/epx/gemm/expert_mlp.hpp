// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! The expert MLP's protocol, shared by every backend: for the rows of each local expert,
//!   h   = x · gate_up[e]ᵀ (+ gate_up_bias[e])        [rows, gate_up_rows]  (fp32)
//!   a   = activation(gate, up)                        [rows, intermediate]  (stored as T)
//!   out = a · down[e]ᵀ (+ down_bias[e])               [rows, hidden]        (stored as T)

#include <epx/core/dtype.hpp>
#include <epx/core/views.hpp>
#include <epx/core/workspace.hpp>
#include <epx/gemm/activation.hpp>

#include <cstdint>
#include <span>

namespace epx {

//! How the gate and up rows of a gated gate_up weight are arranged.
enum class GateUpLayout : std::uint8_t {
  kConcatenated,  //!< rows [0, I) are gate, rows [I, 2I) are up (Qwen3-MoE, Mixtral, DeepSeek-V3)
  kInterleaved,   //!< row 2i is gate i, row 2i + 1 is up i (gpt-oss, once its [H, 2I] is transposed)
};

//! Shape and kind of every expert's MLP.
struct ExpertMlpConfig {
  std::int32_t hidden = 0;        //!< H: model width
  std::int32_t intermediate = 0;  //!< I: expert width (the down projection's input)
  Activation activation = Activation::kSwiGLU;
  GateUpLayout gate_up_layout = GateUpLayout::kConcatenated;
  ClampedSwiGLUParams clamped_swiglu = {};  //!< used by Activation::kClampedSwiGLU only

  //! Rows of one expert's gate_up weight: 2 * intermediate when gated, intermediate otherwise.
  [[nodiscard]] std::int32_t gate_up_rows() const noexcept {
    return is_gated(activation) ? 2 * intermediate : intermediate;
  }
};

//! The local experts' weights, K-major and stacked over local experts, all of one element type
//! (in the memory of the execution space). Biases are optional. Build with `expert_weights(...)`.
struct ExpertWeights {
  DType dtype = DType::kBF16;
  std::int32_t num_local_experts = 0;
  void const* gate_up = nullptr;       //!< [num_local_experts, gate_up_rows, hidden]
  void const* down = nullptr;          //!< [num_local_experts, hidden, intermediate]
  void const* gate_up_bias = nullptr;  //!< [num_local_experts, gate_up_rows] or nullptr
  void const* down_bias = nullptr;     //!< [num_local_experts, hidden] or nullptr
};

//! Typed construction of ExpertWeights (the dtype follows T).
template <float_element T>
[[nodiscard]] ExpertWeights expert_weights(std::int32_t num_local_experts, T const* gate_up, T const* down,
                                           T const* gate_up_bias = nullptr, T const* down_bias = nullptr) {
  return {.dtype = dtype_of_v<T>, .num_local_experts = num_local_experts, .gate_up = gate_up, .down = down,
          .gate_up_bias = gate_up_bias, .down_bias = down_bias};
}

namespace detail {

//! A typed view of ExpertWeights.
template <class T>
struct TypedExpertWeights {
  BatchedMatrixView<T const> gate_up;  // [L, gate_up_rows, H]
  BatchedMatrixView<T const> down;     // [L, H, I]
  T const* gate_up_bias;               // [L, gate_up_rows] or nullptr
  T const* down_bias;                  // [L, H] or nullptr
};

inline void validate(ExpertMlpConfig const& c, std::string_view where = "ExpertMlpConfig") {
  require(c.hidden > 0, Errc::kInvalidArgument, where, "hidden", c.hidden, "> 0");
  require(c.intermediate > 0, Errc::kInvalidArgument, where, "intermediate", c.intermediate, "> 0");
  require(c.intermediate <= (1 << 29), Errc::kInvalidArgument, where, "intermediate", c.intermediate,
          "<= 2^29 (2 * intermediate gate/up rows must fit in int32)");
  require(c.hidden <= (1 << 29), Errc::kInvalidArgument, where, "hidden", c.hidden, "<= 2^29");
}

template <class T>
TypedExpertWeights<T> typed_weights(ExpertMlpConfig const& c, ExpertWeights const& w, std::string_view where) {
  require(w.dtype == dtype_of_v<T>, Errc::kInvalidArgument, where, "weights.dtype", w.dtype,
          fmt::format("{} (the activations' element type)", dtype_of_v<T>));
  require(w.num_local_experts >= 0, Errc::kInvalidArgument, where, "weights.num_local_experts", w.num_local_experts,
          ">= 0");
  if (w.num_local_experts > 0) {
    require(w.gate_up != nullptr, Errc::kInvalidArgument, where, "weights.gate_up", "nullptr",
            fmt::format("[{}, {}, {}] elements", w.num_local_experts, c.gate_up_rows(), c.hidden));
    require(w.down != nullptr, Errc::kInvalidArgument, where, "weights.down", "nullptr",
            fmt::format("[{}, {}, {}] elements", w.num_local_experts, c.hidden, c.intermediate));
  }
  return {.gate_up = {static_cast<T const*>(w.gate_up), w.num_local_experts, c.gate_up_rows(), c.hidden},
          .down = {static_cast<T const*>(w.down), w.num_local_experts, c.hidden, c.intermediate},
          .gate_up_bias = static_cast<T const*>(w.gate_up_bias),
          .down_bias = static_cast<T const*>(w.down_bias)};
}

//! The checks every backend's expert_mlp makes: the config, the weights, x and out [rows, hidden],
//! one offset per local expert plus the end. Returns the typed weights.
template <class T>
TypedExpertWeights<T> check_expert_mlp_args(std::string_view where, ExpertMlpConfig const& config,
                                            ExpertWeights const& weights, MatrixView<T const> x, MatrixView<T> out,
                                            std::span<std::int32_t const> expert_offsets) {
  validate(config, where);
  auto const w = typed_weights<T>(config, weights, where);
  check_matrix(where, "x", x, -1, config.hidden);
  check_matrix(where, "out", out, x.rows, config.hidden);
  require(expert_offsets.size() == static_cast<std::size_t>(weights.num_local_experts) + 1, Errc::kShapeMismatch,
          where, "expert_offsets.size()", expert_offsets.size(),
          fmt::format("num_local_experts + 1 = {}", weights.num_local_experts + 1));
  return w;
}

//! Scratch of the reference expert MLP: the fp32 gate_up product and the activation.
template <class T>
struct ExpertMlpScratch {
  std::span<float> gate_up_out;  // [rows, gate_up_rows]
  std::span<T> activated;        // [rows, intermediate]
};

template <class T, class Carver>
ExpertMlpScratch<T> carve_expert_mlp(Carver& carver, ExpertMlpConfig const& c, std::int64_t max_rows) {
  auto const rows = static_cast<std::size_t>(max_rows);
  return {carver.template take<float>(rows * static_cast<std::size_t>(c.gate_up_rows())),
          carver.template take<T>(rows * static_cast<std::size_t>(c.intermediate))};
}

}  // namespace detail

//! Workspace bytes of `expert_mlp` for up to `max_rows` rows (pure host arithmetic).
template <float_element T>
[[nodiscard]] std::size_t expert_mlp_workspace_bytes(ExpertMlpConfig const& config, std::int64_t max_rows) {
  return detail::layout_bytes([&](auto& c) { return detail::carve_expert_mlp<T>(c, config, max_rows); });
}

}  // namespace epx
