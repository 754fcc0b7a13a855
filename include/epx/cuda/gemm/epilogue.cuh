// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! What the grouped GEMM does with its fp32 accumulators, shared by every mainloop (tensor-core
//! and SIMT). Every mainloop hands the epilogue pairs of adjacent product columns (p, p + 1) of one
//! row, p even: that is how mma.sync lays out accumulators, one register pair per thread, so a
//! gated activation needs no data exchange when the gate and up of one channel are adjacent product
//! columns (paired_columns.hpp).
//!
//! The epilogue's operation is a template parameter (EpilogueKind), so a kernel carries exactly
//! one activation inline instead of a run-time switch over five per element pair; the launcher
//! picks the kernel. A mainloop loads a column pair's biases once (columns()) and a row's scale
//! once (row_factor()), then stores each of its rows with store().

#include <epx/config.hpp>
#include <epx/cuda/element.cuh>
#include <epx/gemm/paired_columns.hpp>
#include <epx/gemm/activation.hpp>

#include <cstdint>

namespace epx::detail {

//! The epilogue's operation, fixed per kernel instantiation.
enum class EpilogueKind : std::uint8_t {
  kLinear,         //!< (acc + bias) * row_scale: grouped_gemm, the expert MLP's down projection
  kReLU,           //!< relu(acc + bias) * row_scale: the non-gated expert MLP's first GEMM
  kSwiGLU,         //!< gated (paired columns, one output per pair), Activation::kSwiGLU
  kGeGLU,          //!< gated, Activation::kGeGLU
  kGeGLUTanh,      //!< gated, Activation::kGeGLUTanh
  kClampedSwiGLU,  //!< gated, Activation::kClampedSwiGLU
};

EPX_HOST_DEVICE constexpr bool epilogue_is_gated(EpilogueKind kind) noexcept {
  return kind != EpilogueKind::kLinear && kind != EpilogueKind::kReLU;
}

//! The activation of a gated kind.
EPX_HOST_DEVICE constexpr Activation gated_activation(EpilogueKind kind) noexcept {
  switch (kind) {
    case EpilogueKind::kGeGLU: return Activation::kGeGLU;
    case EpilogueKind::kGeGLUTanh: return Activation::kGeGLUTanh;
    case EpilogueKind::kClampedSwiGLU: return Activation::kClampedSwiGLU;
    default: return Activation::kSwiGLU;
  }
}

//! The epilogue of the expert MLP's first GEMM for `activation`.
constexpr EpilogueKind first_gemm_epilogue(Activation activation) noexcept {
  switch (activation) {
    case Activation::kSwiGLU: return EpilogueKind::kSwiGLU;
    case Activation::kGeGLU: return EpilogueKind::kGeGLU;
    case Activation::kGeGLUTanh: return EpilogueKind::kGeGLUTanh;
    case Activation::kReLU: return EpilogueKind::kReLU;
    case Activation::kClampedSwiGLU: return EpilogueKind::kClampedSwiGLU;
  }
  return EpilogueKind::kSwiGLU;
}

template <class TC, class TBias>
struct GemmEpilogue {
  TC* c = nullptr;  //!< [rows, n] (or [rows, n / 2] when gated)
  std::int64_t ldc = 0;
  TBias const* bias = nullptr;  //!< [groups, n] indexed by weight row, or nullptr
  float const* row_scale =
      nullptr;                 //!< [rows] or nullptr: the stored row is multiplied by it (after the bias); not gated
  int n = 0;                   //!< product columns = weight rows per group
  bool concatenated = false;   //!< gated only: weight rows are [gate | up], not interleaved
  bool paired_stores = false;  //!< c and ldc allow storing (p, p + 1) as one aligned access
  ClampedSwiGLUParams clamped = {};

  //! Product columns p (even, < n) and p + 1 of one group, with their biases (0 without bias;
  //! p + 1's is 0 when p + 1 == n).
  struct Columns {
    int p;
    float bias0;
    float bias1;
  };

  //! The weight row that product column p reads.
  [[nodiscard]] __device__ __forceinline__ int weight_row(int p, bool gated) const {
    return paired_weight_row(p, n, gated, concatenated);
  }

  template <EpilogueKind kKind>
  [[nodiscard]] __device__ __forceinline__ Columns columns(int group, int p) const {
    Columns col{p, 0.0f, 0.0f};
    if (bias == nullptr) return col;
    TBias const* const b = bias + static_cast<std::int64_t>(group) * n;
    constexpr bool kGated = epilogue_is_gated(kKind);
    col.bias0 = device_to_float(b[weight_row(p, kGated)]);
    if (kGated || p + 1 < n) col.bias1 = device_to_float(b[weight_row(p + 1, kGated)]);
    return col;
  }

  //! The factor of `row` (its row scale, 1 without; gated outputs are not scaled).
  template <EpilogueKind kKind>
  [[nodiscard]] __device__ __forceinline__ float row_factor(std::int64_t row) const {
    if constexpr (epilogue_is_gated(kKind))
      return 1.0f;
    else
      return row_scale == nullptr ? 1.0f : row_scale[row];
  }

  //! Stores columns `col` of `row` from accumulators v0 (column p) and v1 (p + 1).
  template <EpilogueKind kKind>
  __device__ __forceinline__ void store(std::int64_t row, Columns const& col, float factor, float v0, float v1) const {
    TC* const out = c + row * ldc;
    if constexpr (epilogue_is_gated(kKind)) {
      (void)factor;
      out[col.p >> 1] =
          device_from_float<TC>(activate(gated_activation(kKind), v0 + col.bias0, v1 + col.bias1, clamped));
    } else {
      TC const c0 = device_from_float<TC>(finish<kKind>(v0 + col.bias0) * factor);
      if (col.p + 1 >= n) {
        out[col.p] = c0;
        return;
      }
      TC const c1 = device_from_float<TC>(finish<kKind>(v1 + col.bias1) * factor);
      if (paired_stores) {
        store_two(out + col.p, c0, c1);
      } else {
        out[col.p] = c0;
        out[col.p + 1] = c1;
      }
    }
  }

 private:
  template <EpilogueKind kKind>
  __device__ __forceinline__ static float finish(float v) {
    if constexpr (kKind == EpilogueKind::kReLU)
      return v > 0.0f ? v : 0.0f;
    else
      return v;
  }

  __device__ __forceinline__ static void store_two(TC* dst, TC c0, TC c1) {
    if constexpr (sizeof(TC) == 2) {
      std::uint32_t const packed = std::uint32_t{c0.bits} | (std::uint32_t{c1.bits} << 16);
      *reinterpret_cast<std::uint32_t*>(dst) = packed;
    } else {
      *reinterpret_cast<float2*>(dst) = make_float2(c0, c1);
    }
  }
};

}  // namespace epx::detail
