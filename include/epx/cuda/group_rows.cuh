// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! Row kernels over rows grouped by expert, with the groups' row ranges in device memory (blocks
//! stride over the rows of [offsets[0], offsets[groups]); the row count never reaches the host):
//! the activation between two GEMMs that write their product to memory (the cuBLAS and CUTLASS
//! paths; epx's own kernel fuses it), the finish of the down GEMM (bias, row scale, rounding), and
//! the activation's backward (the CUDA expert_mlp_backward).

#include <epx/core/math.hpp>
#include <epx/cuda/element.cuh>
#include <epx/cuda/error.hpp>
#include <epx/cuda/gemm/tile_walk.hpp>
#include <epx/cuda/launch.cuh>
#include <epx/cuda/tuning.cuh>
#include <epx/gemm/activation.hpp>
#include <epx/gemm/expert_mlp.hpp>
#include <epx/gemm/paired_columns.hpp>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <span>

namespace epx::detail {

//! The group of `row` among offsets[0..groups] (rows of empty groups never match).
__device__ __forceinline__ int group_of_row(std::int32_t const* offsets, int groups, std::int64_t row) {
  int lo = 0, hi = groups - 1;
  while (lo < hi) {  // last g with offsets[g] <= row
    int const mid = (lo + hi + 1) / 2;
    if (offsets[mid] <= row)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

//! group_activation_kernel's arguments: h of type H (T on the cuBLAS path, fp32 on CUTLASS's).
template <class T, class H = T>
struct GroupActivationParams {
  H const* h;  // [rows, gate_up_rows] the gate_up product, ldh apart
  std::int64_t ldh;
  T* a;  // [rows, intermediate] activated, lda apart
  std::int64_t lda;
  T const* bias;                // [groups, gate_up_rows] or nullptr
  std::int32_t const* offsets;  // [groups + 1] device
  int groups;
  std::int64_t num_rows;  // rows of h and a (the clamp of the offsets)
  int intermediate;
  bool gated;
  bool interleaved;
  Activation activation;
  ClampedSwiGLUParams clamped;
  H* h_biased = nullptr;  // where h + bias goes back (ldh apart; may be h itself), or nullptr
};

//! a[r, i] = activation(h[r, gate], h[r, up]) (+ gate_up bias of the row's expert) in fp32, one
//! rounding to T, for the rows of [offsets[0], offsets[groups]): blocks stride over rows (the
//! row count stays on the device), threads over the columns. With `h_biased`, the biased gate and
//! up values are written there too (a training forward keeping h with its bias, as the Host's
//! expert_mlp_gate_up gives it); each thread writes only the columns it read.
template <class T, class H>
__global__ void group_activation_kernel(GroupActivationParams<T, H> const p) {
  GroupRows const range = grouped_row_range(p.offsets, p.groups, p.num_rows);
  for (std::int64_t row = range.begin + blockIdx.x; row < range.end; row += gridDim.x) {
    int const g = group_of_row(p.offsets, p.groups, row);
    int const inter = p.intermediate;
    int const width = p.gated ? 2 * inter : inter;
    for (int i = static_cast<int>(threadIdx.x); i < inter; i += static_cast<int>(blockDim.x)) {
      int const gate_col = p.gated ? gate_column(i, inter, !p.interleaved) : i;
      int const up_col = up_column(i, inter, !p.interleaved);  // read only when gated
      float gate = device_to_float(p.h[row * p.ldh + gate_col]);
      float up = 0.0f;
      if (p.bias != nullptr) gate += device_to_float(p.bias[static_cast<std::int64_t>(g) * width + gate_col]);
      if (p.gated) {
        up = device_to_float(p.h[row * p.ldh + up_col]);
        if (p.bias != nullptr) up += device_to_float(p.bias[static_cast<std::int64_t>(g) * width + up_col]);
      }
      p.a[row * p.lda + i] = device_from_float<T>(activate(p.activation, gate, up, p.clamped));
      if (p.h_biased != nullptr) {
        p.h_biased[row * p.ldh + gate_col] = device_from_float<H>(gate);
        if (p.gated) p.h_biased[row * p.ldh + up_col] = device_from_float<H>(up);
      }
    }
  }
}

//! out[r, :] = T((in[r, :] + down bias of the row's expert) * row_scale[r]), one rounding, for the
//! rows of [offsets[0], offsets[groups]) (blocks stride over rows). `in` may be `out` (cuBLAS: T in
//! place) or an fp32 buffer (CUTLASS).
template <class T, class TIn>
__global__ void group_finish_kernel(TIn const* in, std::int64_t ldi, T* out, std::int64_t ldo, T const* bias,
                                    float const* row_scale, std::int32_t const* offsets, int groups, int hidden,
                                    std::int64_t num_rows) {
  GroupRows const range = grouped_row_range(offsets, groups, num_rows);
  for (std::int64_t row = range.begin + blockIdx.x; row < range.end; row += gridDim.x) {
    int const g = group_of_row(offsets, groups, row);
    float const scale = row_scale == nullptr ? 1.0f : row_scale[row];
    for (int c = static_cast<int>(threadIdx.x); c < hidden; c += static_cast<int>(blockDim.x)) {
      float v = device_to_float(in[row * ldi + c]);
      if (bias != nullptr) v += device_to_float(bias[static_cast<std::int64_t>(g) * hidden + c]);
      out[row * ldo + c] = device_from_float<T>(v * scale);
    }
  }
}

//! Threads of a one-row-per-block kernel over `cols` columns: whole warps, at most the policy's.
inline int group_row_threads(int cols) {
  auto const policy = policy_for<CublasPolicy>(current_device_traits());
  return std::min(policy.max_threads_per_block, static_cast<int>(align_up(cols, 32)));
}

//! Launches group_activation_kernel over at most `max_rows` rows (the grid strides beyond);
//! `h_biased`: where h + bias goes back (h's leading dimension), or nullptr.
template <class T, class H>
void launch_group_activation(ExpertMlpConfig const& mlp, T const* bias, std::span<std::int32_t const> device_offsets,
                             int groups, std::int64_t max_rows, MatrixView<H const> h, MatrixView<T> act,
                             cudaStream_t s, H* h_biased = nullptr) {
  if (max_rows == 0) return;
  GroupActivationParams<T, H> const params{.h = h.data,
                                           .ldh = h.ld,
                                           .a = act.data,
                                           .lda = act.ld,
                                           .bias = bias,
                                           .offsets = device_offsets.data(),
                                           .groups = groups,
                                           .num_rows = std::min(h.rows, act.rows),
                                           .intermediate = mlp.intermediate,
                                           .gated = is_gated(mlp.activation),
                                           .interleaved = mlp.gate_up_layout == GateUpLayout::kInterleaved,
                                           .activation = mlp.activation,
                                           .clamped = mlp.clamped_swiglu,
                                           .h_biased = h_biased};
  auto const blocks = static_cast<unsigned>(std::min<std::int64_t>(max_rows, kMaxGridStrideBlocks));
  group_activation_kernel<T, H><<<blocks, group_row_threads(mlp.intermediate), 0, s>>>(params);
  EPX_CUDA_CHECK_LAUNCH(group_activation_kernel);
}

//! group_activation_backward_kernel's arguments (H: h's type, fp32; D: d_h's, fp32 for the SIMT
//! gradient GEMMs, T for CUTLASS's; B: the gate_up bias's, T).
template <class H, class D, class B>
struct GroupActivationBackwardParams {
  H const* h;  // [rows, gate_up_rows] forward's gate_up product, ldh apart
  std::int64_t ldh;
  B const* bias;     // [groups, gate_up_rows] added to h (CUTLASS's h is without it), or nullptr
  float const* d_a;  // [rows, intermediate] the gradient of the activation's output, ld_da apart
  std::int64_t ld_da;
  D* d_h;  // [rows, gate_up_rows] written: the gradient of h, ld_dh apart
  std::int64_t ld_dh;
  std::int32_t const* offsets;  // [groups + 1] device
  int groups;
  std::int64_t num_rows;  // rows of h, d_a and d_h (the clamp of the offsets)
  int intermediate;
  bool gated;
  bool interleaved;
  Activation activation;
  ClampedSwiGLUParams clamped;
};

//! d_h[r, gate] = d_a[r, i] * d(activation)/d(gate), d_h[r, up] = d_a[r, i] * d(activation)/d(up)
//! (activation_grad: the Host's derivatives, kinks included, at h + bias) for the rows of
//! [offsets[0], offsets[groups]); each element one product, as the Host reference computes it,
//! rounded once to D.
template <class H, class D, class B>
__global__ void group_activation_backward_kernel(GroupActivationBackwardParams<H, D, B> const p) {
  GroupRows const range = grouped_row_range(p.offsets, p.groups, p.num_rows);
  for (std::int64_t row = range.begin + blockIdx.x; row < range.end; row += gridDim.x) {
    int const inter = p.intermediate;
    int const width = p.gated ? 2 * inter : inter;
    B const* const bias = p.bias == nullptr
                              ? nullptr
                              : p.bias + static_cast<std::int64_t>(group_of_row(p.offsets, p.groups, row)) * width;
    for (int i = static_cast<int>(threadIdx.x); i < inter; i += static_cast<int>(blockDim.x)) {
      int const gate_col = p.gated ? gate_column(i, inter, !p.interleaved) : i;
      int const up_col = up_column(i, inter, !p.interleaved);  // read only when gated
      float gate = device_to_float(p.h[row * p.ldh + gate_col]);
      float up = p.gated ? device_to_float(p.h[row * p.ldh + up_col]) : 0.0f;
      if (bias != nullptr) {
        gate += device_to_float(bias[gate_col]);
        if (p.gated) up += device_to_float(bias[up_col]);
      }
      float const d_a = p.d_a[row * p.ld_da + i];
      ActivationGrad const g = activation_grad(p.activation, gate, up, p.clamped);
      p.d_h[row * p.ld_dh + gate_col] = device_from_float<D>(__fmul_rn(d_a, g.d_gate));
      if (p.gated) p.d_h[row * p.ld_dh + up_col] = device_from_float<D>(__fmul_rn(d_a, g.d_up));
    }
  }
}

//! Launches group_activation_backward_kernel over at most `max_rows` rows (the grid strides beyond).
//! `bias`: the gate_up bias to add to h first (when h is the GEMM's product without it), or nullptr.
template <class D, class B = D>
void launch_group_activation_backward(ExpertMlpConfig const& mlp, std::span<std::int32_t const> device_offsets,
                                      int groups, std::int64_t max_rows, MatrixView<float const> h,
                                      MatrixView<float const> d_a, MatrixView<D> d_h, cudaStream_t s,
                                      B const* bias = nullptr) {
  if (max_rows == 0 || groups == 0) return;
  GroupActivationBackwardParams<float, D, B> const params{
      .h = h.data,
      .ldh = h.ld,
      .bias = bias,
      .d_a = d_a.data,
      .ld_da = d_a.ld,
      .d_h = d_h.data,
      .ld_dh = d_h.ld,
      .offsets = device_offsets.data(),
      .groups = groups,
      .num_rows = std::min({h.rows, d_a.rows, d_h.rows}),
      .intermediate = mlp.intermediate,
      .gated = is_gated(mlp.activation),
      .interleaved = mlp.gate_up_layout == GateUpLayout::kInterleaved,
      .activation = mlp.activation,
      .clamped = mlp.clamped_swiglu};
  auto const blocks = static_cast<unsigned>(std::min<std::int64_t>(max_rows, kMaxGridStrideBlocks));
  group_activation_backward_kernel<float, D, B><<<blocks, group_row_threads(mlp.intermediate), 0, s>>>(params);
  EPX_CUDA_CHECK_LAUNCH(group_activation_backward_kernel);
}

//! out[g, c] = the sum over the rows r of group g of in[r, c], in fp32 in row order, rounded once
//! to TOut (0 for a group without rows): a bias gradient. Block (x, g): one column per thread;
//! rows clamped as group_rows does. No atomics: the same bits every run.
template <class TIn, class TOut>
__global__ void group_column_sums_kernel(TIn const* in, std::int64_t ld, std::int32_t const* offsets,
                                         std::int64_t num_rows, int cols, TOut* out) {
  int const g = static_cast<int>(blockIdx.y);
  int const c = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (c >= cols) return;
  GroupRows const r = group_rows(offsets, g, num_rows);
  float acc = 0.0f;
  for (std::int64_t row = r.begin; row < r.end; ++row) acc = __fadd_rn(acc, device_to_float(in[row * ld + c]));
  out[static_cast<std::int64_t>(g) * cols + c] = device_from_float<TOut>(acc);
}

//! Launches group_column_sums_kernel for `groups` groups (each group written).
template <class TIn, class TOut>
void launch_group_column_sums(MatrixView<TIn const> in, std::span<std::int32_t const> device_offsets, int groups,
                              TOut* out, cudaStream_t s) {
  if (groups == 0 || in.cols == 0) return;
  constexpr int kThreads = 256;
  dim3 const grid(static_cast<unsigned>((in.cols + kThreads - 1) / kThreads), static_cast<unsigned>(groups));
  group_column_sums_kernel<TIn, TOut>
      <<<grid, kThreads, 0, s>>>(in.data, in.ld, device_offsets.data(), in.rows, static_cast<int>(in.cols), out);
  EPX_CUDA_CHECK_LAUNCH(group_column_sums_kernel);
}

}  // namespace epx::detail
