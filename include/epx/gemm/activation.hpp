// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! The expert activations, written once for host loops and CUDA epilogues alike.

#include <epx/config.hpp>

#include <cmath>
#include <cstdint>
#include <string_view>

namespace epx {

//! The activation between the two expert GEMMs. Gated kinds read a gate and an up value per
//! output column (gate_up has 2 * intermediate rows); kReLU is a plain MLP (intermediate rows).
enum class Activation : std::uint8_t {
  kSwiGLU,         //!< silu(gate) * up                                   (Qwen3-MoE, Mixtral, DeepSeek-V3)
  kGeGLU,          //!< gelu(gate) * up, exact erf gelu
  kGeGLUTanh,      //!< gelu(gate) * up, tanh approximation
  kReLU,           //!< relu(h), not gated
  kClampedSwiGLU,  //!< gate <= limit, up in [-limit, limit]; (up + 1) * gate * sigmoid(alpha * gate) (gpt-oss)
};

constexpr std::string_view to_string(Activation a) noexcept {
  switch (a) {
    case Activation::kSwiGLU: return "swiglu";
    case Activation::kGeGLU: return "geglu";
    case Activation::kGeGLUTanh: return "geglu-tanh";
    case Activation::kReLU: return "relu";
    case Activation::kClampedSwiGLU: return "clamped-swiglu";
  }
  return "?";
}

constexpr bool is_gated(Activation a) noexcept { return a != Activation::kReLU; }

//! Parameters of the clamped SwiGLU (gpt-oss defaults).
struct ClampedSwiGLUParams {
  float alpha = 1.702f;
  float limit = 7.0f;
};

namespace detail {

EPX_HOST_DEVICE inline float sigmoid(float x) { return 1.0f / (1.0f + ::expf(-x)); }

//! The activation of one output column; `up` is ignored for kReLU.
EPX_HOST_DEVICE inline float activate(Activation kind, float gate, float up, ClampedSwiGLUParams p) {
  switch (kind) {
    case Activation::kSwiGLU: return gate * sigmoid(gate) * up;
    case Activation::kGeGLU: return 0.5f * gate * (1.0f + ::erff(gate * 0.70710678118654752f)) * up;
    case Activation::kGeGLUTanh: {
      float const inner = 0.79788456080286536f * (gate + 0.044715f * gate * gate * gate);
      return 0.5f * gate * (1.0f + ::tanhf(inner)) * up;
    }
    case Activation::kReLU: return gate > 0.0f ? gate : 0.0f;
    case Activation::kClampedSwiGLU: {
      float const g = gate < p.limit ? gate : p.limit;
      float const u = up < -p.limit ? -p.limit : (up > p.limit ? p.limit : up);
      return (u + 1.0f) * g * sigmoid(p.alpha * g);
    }
  }
  return 0.0f;
}

}  // namespace detail
}  // namespace epx
