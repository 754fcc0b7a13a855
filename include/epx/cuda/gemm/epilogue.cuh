// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! What the grouped GEMM does with its fp32 accumulators, shared by every mainloop (tensor-core
//! and SIMT). Every mainloop hands the epilogue pairs of adjacent product columns (p, p + 1) of one
//! row, p even: that is how mma.sync (and wgmma) lay out accumulators, one register pair per
//! thread, so a gated activation needs no data exchange when the gate and up of one channel are
//! adjacent product columns.
//!
//! Gated GEMMs (gate_up with SwiGLU, GeGLU, clamped SwiGLU) therefore run over *paired* columns:
//! product column 2i is gate channel i and 2i + 1 is up channel i. Interleaved weights are already
//! in that order; concatenated weights (gate rows [0, I), up rows [I, 2I)) are read in it by
//! `weight_row`, so no repacking is needed.

#include <epx/config.hpp>
#include <epx/cuda/element.cuh>
#include <epx/gemm/activation.hpp>

#include <cstdint>

namespace epx::detail {

//! The weight row that product column p reads: gated GEMMs run over paired columns (2i = gate i,
//! 2i + 1 = up i); concatenated weights keep gate rows in [0, n/2) and up rows in [n/2, n).
EPX_HOST_DEVICE inline int paired_weight_row(int p, int n, bool gated, bool concatenated) {
  if (!gated || !concatenated) return p;
  return (p & 1) != 0 ? (n >> 1) + (p >> 1) : (p >> 1);
}

template <class TC, class TBias>
struct GemmEpilogue {
  TC* c = nullptr;                  //!< [rows, n] (or [rows, n / 2] when gated)
  std::int64_t ldc = 0;
  TBias const* bias = nullptr;      //!< [groups, n] indexed by weight row, or nullptr
  float const* row_scale = nullptr; //!< [rows] or nullptr: the stored row is multiplied by it (after the bias)
  int n = 0;                        //!< product columns = weight rows per group
  bool concatenated = false;        //!< gated only: weight rows are [gate | up], not interleaved
  bool relu = false;                //!< not gated: apply ReLU (the non-gated expert MLP)
  bool paired_stores = false;       //!< c and ldc allow storing (p, p + 1) as one aligned access
  Activation activation = Activation::kSwiGLU;
  ClampedSwiGLUParams clamped = {};

  //! The weight row that product column p reads.
  [[nodiscard]] __device__ __forceinline__ int weight_row(int p, bool gated) const {
    return paired_weight_row(p, n, gated, concatenated);
  }

  [[nodiscard]] __device__ __forceinline__ float bias_at(int group, int wrow) const {
    return bias == nullptr ? 0.0f : device_to_float(bias[static_cast<std::int64_t>(group) * n + wrow]);
  }

  //! Stores product columns p (even, < n) and p + 1 (if < n) of `row` from accumulators v0, v1.
  template <bool kGated>
  __device__ __forceinline__ void store_pair(int group, std::int64_t row, int p, float v0, float v1) const {
    TC* const out = c + row * ldc;
    if constexpr (kGated) {
      float const gate = v0 + bias_at(group, weight_row(p, true));
      float const up = v1 + bias_at(group, weight_row(p + 1, true));
      out[p >> 1] = device_from_float<TC>(activate(activation, gate, up, clamped));
    } else {
      float const scale = row_scale == nullptr ? 1.0f : row_scale[row];
      v0 += bias_at(group, p);
      if (relu) v0 = v0 > 0.0f ? v0 : 0.0f;
      TC const c0 = device_from_float<TC>(v0 * scale);
      if (p + 1 >= n) {
        out[p] = c0;
        return;
      }
      v1 += bias_at(group, p + 1);
      if (relu) v1 = v1 > 0.0f ? v1 : 0.0f;
      TC const c1 = device_from_float<TC>(v1 * scale);
      if (paired_stores) {
        store_two(out + p, c0, c1);
      } else {
        out[p] = c0;
        out[p + 1] = c1;
      }
    }
  }

 private:
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
