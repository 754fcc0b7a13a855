// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! The expert MLP's protocol, shared by every backend: for the rows of each local expert,
//!   h   = x · gate_up[e]ᵀ (+ gate_up_bias[e])        [rows, gate_up_rows]  (fp32)
//!   a   = activation(gate, up)                        [rows, intermediate]  (stored as T)
//!   out = a · down[e]ᵀ (+ down_bias[e])               [rows, hidden]        (stored as T)

#include <epx/core/dtype.hpp>
#include <epx/core/tensor_view.hpp>
#include <epx/core/views.hpp>
#include <epx/core/workspace.hpp>
#include <epx/gemm/activation.hpp>

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <span>
#include <type_traits>

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
//! (in the memory of the execution space). Biases are optional.
//!
//! Build it with `expert_weights(TensorView...)`: it records each tensor's extents and strides, and
//! the layer (and `expert_mlp`) then refuses a tensor whose layout is not the one below, naming the
//! expected one. The pointer-only `expert_weights(count, ptr, ptr, ...)` records no shape, so
//! nothing can check it: a tensor in another layout (gpt-oss's `gate_up_proj` is [E, H, 2I],
//! not [E, 2I, H]) is then read as if it were this one, and the result is silently wrong.
struct ExpertWeights {
  DType dtype = DType::kBF16;
  std::int32_t num_local_experts = 0;
  void const* gate_up = nullptr;       //!< [num_local_experts, gate_up_rows, hidden]
  void const* down = nullptr;          //!< [num_local_experts, hidden, intermediate]
  void const* gate_up_bias = nullptr;  //!< [num_local_experts, gate_up_rows] or nullptr
  void const* down_bias = nullptr;     //!< [num_local_experts, hidden] or nullptr
  // What the caller said each tensor is (rank 0: not known, not checked). All four are checked
  // against the config where the weights are used: ExpertParallel's constructor, expert_mlp.
  TensorShape gate_up_shape = {};
  TensorShape down_shape = {};
  TensorShape gate_up_bias_shape = {};
  TensorShape down_bias_shape = {};
};

//! Where a backward (expert_mlp_backward, ExpertParallel::backward) writes the local experts' weight gradients, each in the layout of the
//! weight it belongs to (ExpertWeights), of element type G (fp32, or the weights' type). Written,
//! not accumulated: a caller that accumulates over micro-batches adds them into its own buffers.
template <float_element G>
struct ExpertWeightGrads {
  BatchedMatrixView<G> gate_up = {};  //!< [num_local_experts, gate_up_rows, hidden]
  BatchedMatrixView<G> down = {};     //!< [num_local_experts, hidden, intermediate]
  G* gate_up_bias = nullptr;          //!< [num_local_experts, gate_up_rows], or nullptr: not computed
  G* down_bias = nullptr;             //!< [num_local_experts, hidden], or nullptr: not computed
};

namespace detail {

//! Checks what a TensorView of one weight can say without the config (extents >= 0, memory for
//! its elements) and returns its shape; a view with no data and no elements is "no tensor".
template <class T, std::size_t Rank>
TensorShape weight_view_shape(std::string_view name, TensorView<T, Rank> const& view) {
  constexpr std::string_view where = "expert_weights";
  for (std::size_t d = 0; d < Rank; ++d)
    require(view.extents[d] >= 0, Errc::kInvalidArgument, where, fmt::format("{}.extents", name),
            format_list(view.extents), "every extent >= 0");
  require(view.data != nullptr || view.size() == 0, Errc::kInvalidArgument, where, fmt::format("{}.data", name),
          "nullptr",
          fmt::format("a pointer to the {} elements of a {} tensor", view.size(), format_list(view.extents)));
  return view.shape();
}

}  // namespace detail

//! @brief The checked construction of ExpertWeights: each weight as a view with its extents and
//! strides (element strides: torch's `.sizes()` and `.strides()`), so that the layer can refuse a
//! mismatch with a message naming the expected layout. The dtype follows the element type; the
//! number of local experts is `gate_up.extents[0]`.
//! @param gate_up       [local experts, gate_up_rows, hidden], contiguous (gate_up_rows = 2 *
//!                      intermediate when gated; gpt-oss's [E, H, 2I] gate_up_proj is the transpose)
//! @param down          [local experts, hidden, intermediate], contiguous (gpt-oss's down_proj
//!                      [E, I, H] is the transpose)
//! @param gate_up_bias  [local experts, gate_up_rows], or an empty view for none
//! @param down_bias     [local experts, hidden], or an empty view for none
//! @throws Error naming a negative extent, or a null pointer for a tensor with elements. The
//!         extents and strides are compared with the config where it is known (ExpertParallel's
//!         constructor, expert_mlp).
template <class T>
requires float_element<T>
[[nodiscard]] ExpertWeights expert_weights(
    TensorView<T, 3> const& gate_up, std::type_identity_t<TensorView<std::remove_const_t<T> const, 3>> const& down,
    std::type_identity_t<TensorView<std::remove_const_t<T> const, 2>> const& gate_up_bias = {},
    std::type_identity_t<TensorView<std::remove_const_t<T> const, 2>> const& down_bias = {}) {
  ExpertWeights w{.dtype = dtype_of_v<T>,
                  .gate_up = gate_up.data,
                  .down = down.data,
                  .gate_up_bias = gate_up_bias.data,
                  .down_bias = down_bias.data};
  w.gate_up_shape = detail::weight_view_shape("gate_up", gate_up);
  w.down_shape = detail::weight_view_shape("down", down);
  if (gate_up_bias.data != nullptr || gate_up_bias.size() != 0)
    w.gate_up_bias_shape = detail::weight_view_shape("gate_up_bias", gate_up_bias);
  if (down_bias.data != nullptr || down_bias.size() != 0)
    w.down_bias_shape = detail::weight_view_shape("down_bias", down_bias);
  detail::require(gate_up.extents[0] <= std::numeric_limits<std::int32_t>::max(), Errc::kInvalidArgument,
                  "expert_weights", "gate_up.extents[0] (local experts)", gate_up.extents[0], "< 2^31");
  w.num_local_experts = static_cast<std::int32_t>(gate_up.extents[0]);
  return w;
}

//! Pointer-only construction of ExpertWeights (the dtype follows T). Records no extents or
//! strides, so a tensor in another layout cannot be refused: prefer the TensorView overload.
template <float_element T>
[[nodiscard]] ExpertWeights expert_weights(std::int32_t num_local_experts, T const* gate_up, T const* down,
                                           T const* gate_up_bias = nullptr, T const* down_bias = nullptr) {
  return {.dtype = dtype_of_v<T>,
          .num_local_experts = num_local_experts,
          .gate_up = gate_up,
          .down = down,
          .gate_up_bias = gate_up_bias,
          .down_bias = down_bias};
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

//! Compares one recorded weight shape with the layout epx reads: these extents, dense row-major
//! (K-major: the reduction dimension moves fastest). `meaning` names the dimensions;
//! `transposed_hint` is added when the extents are the expected ones with the last two swapped.
inline void check_weight_shape(std::string_view where, std::string_view name, TensorShape const& shape,
                               std::span<std::int64_t const> expected, std::string_view meaning,
                               std::string_view transposed_hint = {}) {
  auto const rank = static_cast<std::int32_t>(expected.size());
  require(shape.rank == rank, Errc::kInvalidArgument, where, fmt::format("weights.{}_shape.rank", name), shape.rank,
          fmt::format("{} ({})", rank, meaning));
  auto const given = shape.extent_list();
  if (!std::equal(given.begin(), given.end(), expected.begin())) {
    bool const transposed = rank == 3 && given[0] == expected[0] && given[1] == expected[2] && given[2] == expected[1];
    throw_error(Errc::kShapeMismatch,
                fmt::format("{}: weights.{}.extents = {}, expected {} = {}, contiguous and K-major{}{}", where, name,
                            format_list(given), format_list(expected), meaning,
                            transposed && !transposed_hint.empty() ? " " : "", transposed ? transposed_hint : ""));
  }
  if (!is_row_major(given, shape.stride_list())) {
    std::array<std::int64_t, kMaxTensorRank> dense{};
    std::int64_t step = 1;
    for (auto d = static_cast<std::size_t>(rank); d-- > 0;) {
      dense[d] = step;
      step *= given[d];
    }
    throw_error(Errc::kInvalidArgument,
                fmt::format("{}: weights.{}.strides = {}, expected {} (contiguous and K-major: {} in row-major "
                            "order, the last dimension moving fastest; a transposed or sliced view has other "
                            "strides: make it contiguous first, e.g. torch's .contiguous())",
                            where, name, format_list(shape.stride_list()),
                            format_list({dense.data(), static_cast<std::size_t>(rank)}), meaning));
  }
}

//! Checks every weight whose shape was recorded (ExpertWeights built from TensorViews) against
//! the config: gate_up [L, gate_up_rows, H], down [L, H, I], biases [L, gate_up_rows] and [L, H],
//! all contiguous. Weights given as bare pointers have no shape and are not checked. A square
//! weight (gate_up_rows == hidden, or hidden == intermediate) stored the other way round has the
//! same extents and strides: no check can tell it apart.
inline void check_weight_shapes(std::string_view where, ExpertMlpConfig const& c, ExpertWeights const& w) {
  std::int64_t const experts = w.num_local_experts, rows = c.gate_up_rows(), hidden = c.hidden, inter = c.intermediate;
  std::string_view const gate_up_meaning = is_gated(c.activation)
                                               ? "[local experts, gate_up_rows (2 * intermediate), hidden]"
                                               : "[local experts, gate_up_rows (intermediate: not gated), hidden]";
  std::string_view const gate_up_bias_meaning = is_gated(c.activation)
                                                    ? "[local experts, gate_up_rows (2 * intermediate)]"
                                                    : "[local experts, gate_up_rows (intermediate: not gated)]";
  if (w.gate_up_shape.known())
    check_weight_shape(where, "gate_up", w.gate_up_shape, std::array{experts, rows, hidden}, gate_up_meaning,
                       "(gpt-oss's gate_up_proj is [E, H, 2I]: pass its transpose [E, 2I, H], made contiguous)");
  if (w.down_shape.known())
    check_weight_shape(where, "down", w.down_shape, std::array{experts, hidden, inter},
                       "[local experts, hidden, intermediate]",
                       "(gpt-oss's down_proj is [E, I, H]: pass its transpose [E, H, I], made contiguous)");
  if (w.gate_up_bias != nullptr && w.gate_up_bias_shape.known())
    check_weight_shape(where, "gate_up_bias", w.gate_up_bias_shape, std::array{experts, rows}, gate_up_bias_meaning);
  if (w.down_bias != nullptr && w.down_bias_shape.known())
    check_weight_shape(where, "down_bias", w.down_bias_shape, std::array{experts, hidden}, "[local experts, hidden]");
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
  check_weight_shapes(where, c, w);
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
  require(expert_offsets.size() == static_cast<std::size_t>(weights.num_local_experts) + 1, Errc::kShapeMismatch, where,
          "expert_offsets.size()", expert_offsets.size(),
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
