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

namespace epx::detail {

//! The two partial derivatives of activate() at one column, for the backward pass.
struct ActivationGrad {
  float d_gate = 0.0f;  //!< d activate / d gate
  float d_up = 0.0f;    //!< d activate / d up (0 for kReLU, which reads no up)
};

//! @brief d activate(kind, gate, up, p) / d gate and / d up, in fp32 with the math functions
//! activate() uses (host and device alike).
//!
//! Where the activation has a kink the derivative is the one PyTorch's autograd gives, so that a
//! model trained with epx matches its reference:
//! - kReLU at gate == 0: d_gate = 0 (relu'(0) = 0).
//! - kClampedSwiGLU (gpt-oss: gate.clamp(max=limit), up.clamp(-limit, limit)): a clamped input gets
//!   no gradient, d_gate = 0 for gate > limit and d_up = 0 for |up| > limit. At the clamp edge itself
//!   (gate == limit, up == +-limit) the gradient passes, as torch.clamp's backward lets through
//!   inputs with min <= x <= max: the derivative there is the one from inside the interval.
EPX_HOST_DEVICE inline ActivationGrad activation_grad(Activation kind, float gate, float up, ClampedSwiGLUParams p) {
  switch (kind) {
    case Activation::kSwiGLU: {
      // silu'(g) = s + g s (1 - s), s = sigmoid(g)
      float const s = sigmoid(gate);
      return {s * (1.0f + gate * (1.0f - s)) * up, gate * s};
    }
    case Activation::kGeGLU: {
      // gelu'(g) = Phi(g) + g phi(g), phi the standard normal density
      float const cdf = 0.5f * (1.0f + ::erff(gate * 0.70710678118654752f));
      float const pdf = 0.39894228040143268f * ::expf(-0.5f * gate * gate);
      return {(cdf + gate * pdf) * up, gate * cdf};
    }
    case Activation::kGeGLUTanh: {
      // gelu(g) = 0.5 g (1 + tanh(c (g + 0.044715 g^3))): product and chain rule
      float const g2 = gate * gate;
      float const t = ::tanhf(0.79788456080286536f * (gate + 0.044715f * g2 * gate));
      float const d_inner = 0.79788456080286536f * (1.0f + 3.0f * 0.044715f * g2);
      return {(0.5f * (1.0f + t) + 0.5f * gate * (1.0f - t * t) * d_inner) * up, 0.5f * gate * (1.0f + t)};
    }
    case Activation::kReLU: return {gate > 0.0f ? 1.0f : 0.0f, 0.0f};
    case Activation::kClampedSwiGLU: {
      // (u + 1) g sigmoid(alpha g) with g = min(gate, limit), u = clamp(up, -limit, limit)
      float const g = gate < p.limit ? gate : p.limit;
      float const u = up < -p.limit ? -p.limit : (up > p.limit ? p.limit : up);
      float const s = sigmoid(p.alpha * g);
      float const d_gate = gate <= p.limit ? (u + 1.0f) * s * (1.0f + p.alpha * g * (1.0f - s)) : 0.0f;
      float const d_up = up >= -p.limit && up <= p.limit ? g * s : 0.0f;
      return {d_gate, d_up};
    }
  }
  return {};
}

}  // namespace epx::detail
