// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! permute_backward and unpermute_backward on the GPU: the twins of host/permute_backward.hpp, with
//! its semantics and argument checks (permute/permute_backward_args.hpp). No atomics; every result
//! is bitwise deterministic run to run.
//!   permute_backward:   each token's row is the sum of its slots' rows in slot order in fp32, as
//!                       the Host loop adds them: bitwise equal to the Host backend.
//!   unpermute_backward: d_expert_out = w * dy, one rounding: bitwise equal to the Host backend.
//!                       d_topk_weights: one block per token, each thread its chunks of the row in
//!                       order (one fused multiply-add per term), then a fixed tree over the
//!                       block (detail::unpermute_backward_dot says the order in plain C++). The
//!                       order depends on the row width and the element types only, not on
//!                       alignment, so it is deterministic; it is not the Host's sequential order,
//!                       so d_topk_weights differs from the Host's in the last bits.
//! The number of routed rows stays on the device (expert_offsets[count]): no sync, and (as for the
//! forward twins) the row-indexed matrices must have room for every slot.

#include <epx/core/stream.hpp>
#include <epx/cuda/element.cuh>
#include <epx/cuda/error.hpp>
#include <epx/cuda/launch.cuh>
#include <epx/cuda/nvtx.hpp>
#include <epx/cuda/row_blocks.hpp>
#include <epx/cuda/tuning.cuh>
#include <epx/permute/permute_backward_args.hpp>

#include <cstdint>
#include <limits>
#include <type_traits>

namespace epx {
namespace nvtx {
//! permute_backward: each token's gradient summed from its routed rows.
struct PermuteBackward {
  static constexpr char const* message = "permute_backward";
};
//! unpermute_backward: the routed rows' and the weights' gradients.
struct UnpermuteBackward {
  static constexpr char const* message = "unpermute_backward";
};
}  // namespace nvtx

namespace detail {

//! `N` elements at `src` into `v`: one 16- or 8-byte load when `kWhole` (the caller checked the
//! alignment: chunks_load_whole), element by element otherwise.
template <bool kWhole, class T, int N>
__device__ __forceinline__ void load_chunk(T const* src, T (&v)[N]) {
  constexpr auto bytes = N * sizeof(T);
  if constexpr (kWhole && bytes == 16) {
    *reinterpret_cast<uint4*>(v) = *reinterpret_cast<uint4 const*>(src);
  } else if constexpr (kWhole && bytes == 8) {
    *reinterpret_cast<uint2*>(v) = *reinterpret_cast<uint2 const*>(src);
  } else {
#pragma unroll
    for (int e = 0; e < N; ++e) v[e] = src[e];
  }
}

//! permute_backward_kernel's arguments.
template <class T, class TDx>
struct PermuteBackwardParams {
  T const* d_x_perm;  // [>= rows, cols], ldp apart
  std::int64_t ldp;
  TDx* dx;  // [num_tokens, cols], ldx apart
  std::int64_t ldx;
  std::int32_t const* slot_rows;  // [num_tokens * top_k] the plan's
  std::int64_t num_tokens;
  std::int32_t top_k;
  std::int32_t chunks_per_row;  // of kElems elements
};

// threadIdx.y picks a token of the block's, threadIdx.x walks the row's chunks (row_blocks.hpp); the
// grid strides over tokens. Each element: its slots' rows added in slot order in fp32, as the Host.
template <class T, class TDx, int kElems, bool kWhole>
__global__ void permute_backward_kernel(PermuteBackwardParams<T, TDx> const p) {
  for (std::int64_t t = grid_row<std::int64_t>(); t < p.num_tokens; t += grid_rows<std::int64_t>()) {
    for (std::int32_t chunk = threadIdx.x; chunk < p.chunks_per_row; chunk += blockDim.x) {
      std::int64_t const col = std::int64_t{chunk} * kElems;
      float acc[kElems];
#pragma unroll
      for (int e = 0; e < kElems; ++e) acc[e] = 0.0f;
      for (std::int32_t j = 0; j < p.top_k; ++j) {
        std::int32_t const row = p.slot_rows[t * p.top_k + j];
        if (row < 0) continue;
        alignas(16) T vals[kElems];
        load_chunk<kWhole>(p.d_x_perm + row * p.ldp + col, vals);
#pragma unroll
        for (int e = 0; e < kElems; ++e) acc[e] = __fadd_rn(acc[e], device_to_float(vals[e]));
      }
      TDx* const dst = p.dx + t * p.ldx + col;
#pragma unroll
      for (int e = 0; e < kElems; ++e) dst[e] = device_from_float<TDx>(acc[e]);
    }
  }
}

//! unpermute_backward_kernel's arguments.
template <class TOut, class TDy, class TG>
struct UnpermuteBackwardParams {
  TOut const* expert_out;  // [>= rows, cols], lde apart
  std::int64_t lde;
  float const* weights;  // [num_tokens, top_k], ldw apart
  std::int64_t ldw;
  TDy const* dy;  // [num_tokens, cols], ldy apart
  std::int64_t ldy;
  TG* d_expert_out;  // [>= rows, cols], ldg apart
  std::int64_t ldg;
  float* d_weights;  // [num_tokens, top_k], ldd apart
  std::int64_t ldd;
  std::int32_t const* slot_rows;  // [num_tokens * top_k] the plan's
  std::int32_t top_k;
  std::int32_t chunks_per_row;  // of kElems elements
};

//! The warp's sum in lane 0: warp_tree_sum (permute_backward_args.hpp) on the device.
__device__ __forceinline__ float device_warp_tree_sum(float v) {
#pragma unroll
  for (int offset = 16; offset >= 1; offset /= 2) v = __fadd_rn(v, __shfl_down_sync(0xffffffffu, v, offset));
  return v;
}

// One block per token (blockDim.x whole warps, a power of two, at most 1024); slot by slot in order:
// each thread writes its chunks' row gradient and sums its part of the dot product in order, then
// the block's fixed tree (unpermute_backward_dot). A slot's row is the same for the whole block, so
// the barriers are reached by every thread.
template <class TOut, class TDy, class TG, int kElems, bool kWhole>
__global__ void unpermute_backward_kernel(UnpermuteBackwardParams<TOut, TDy, TG> const p) {
  __shared__ float warp_sums[32];
  std::int64_t const t = blockIdx.x;
  int const lane = static_cast<int>(threadIdx.x % 32), warp = static_cast<int>(threadIdx.x / 32);
  int const warps = static_cast<int>(blockDim.x / 32);
  TDy const* const dyt = p.dy + t * p.ldy;
  for (std::int32_t j = 0; j < p.top_k; ++j) {
    std::int32_t const row = p.slot_rows[t * p.top_k + j];
    if (row < 0) {  // the same for every thread of the block
      if (threadIdx.x == 0) p.d_weights[t * p.ldd + j] = 0.0f;
      continue;
    }
    float const w = p.weights[t * p.ldw + j];
    TOut const* const src = p.expert_out + row * p.lde;
    TG* const dst = p.d_expert_out + row * p.ldg;
    float dot = 0.0f;
    for (std::int32_t chunk = threadIdx.x; chunk < p.chunks_per_row; chunk += blockDim.x) {
      std::int64_t const col = std::int64_t{chunk} * kElems;
      alignas(16) TDy g[kElems];
      alignas(16) TOut x[kElems];
      load_chunk<kWhole>(dyt + col, g);
      load_chunk<kWhole>(src + col, x);
#pragma unroll
      for (int e = 0; e < kElems; ++e) {
        float const gf = device_to_float(g[e]);
        dst[col + e] = device_from_float<TG>(__fmul_rn(w, gf));
        dot = add_weighted(dot, gf, device_to_float(x[e]));
      }
    }
    dot = device_warp_tree_sum(dot);
    if (warps > 1) {
      if (lane == 0) warp_sums[warp] = dot;
      __syncthreads();
      if (warp == 0) dot = device_warp_tree_sum(lane < warps ? warp_sums[lane] : 0.0f);
      __syncthreads();  // warp_sums is reused by the next slot
    }
    if (threadIdx.x == 0) p.d_weights[t * p.ldd + j] = dot;
  }
}

}  // namespace detail

//! @brief permute_backward on the GPU (semantics of host/permute_backward.hpp): every row of dx
//! written, each the sum of its token's routed rows of d_x_perm in slot order with fp32
//! accumulation (zeros for a token with no routed slot): bitwise deterministic and equal to the
//! Host backend.
//! @param[in]  plan      the plan forward's permute used, from make_plan(StreamRef, ...) on this stream
//! @param[in]  d_x_perm  [>= num_tokens * top_k, hidden] device memory: dL/dx_perm (room for every
//!                       slot: the routed-row count lives on the device); rows past the routed
//!                       rows are not read
//! @param[out] dx        [num_tokens, hidden] device memory: dL/dx; fp32, or the element type (one
//!                       rounding at the end)
template <class TIn, float_element TDx>
requires float_element<TIn>
void permute_backward(StreamRef stream, RoutingPlan const& plan, MatrixView<TIn> d_x_perm_in, MatrixView<TDx> dx) {
  EPX_NVTX_RANGE(PermuteBackward);
  using T = std::remove_const_t<TIn>;
  constexpr std::string_view where = "permute_backward";
  detail::CudaStream const s(stream, where);
  MatrixView<T const> const d_x_perm(d_x_perm_in);
  detail::require(!plan.expert_offsets.empty(), Errc::kInvalidArgument, where, "plan.expert_offsets.size()", 0,
                  ">= 1 (a plan made by make_plan)");
  detail::check_permute_backward_args(plan, plan.num_slots(), d_x_perm, dx);
  detail::require(dx.cols <= std::numeric_limits<std::int32_t>::max(), Errc::kUnsupported, where, "dx.cols", dx.cols,
                  "< 2^31 (chunk indices are int32)");
  if (plan.num_tokens == 0 || dx.cols == 0) return;
  auto const policy = detail::policy_for<detail::RowPolicy>(detail::current_device_traits());
  auto launch = [&]<int kElems>(std::integral_constant<int, kElems>) {
    auto const chunks = static_cast<std::int32_t>(dx.cols / kElems);
    detail::RowBlock const block = detail::row_block(chunks, policy.threads_per_block);
    int const blocks = detail::grid_blocks(plan.num_tokens, block.rows_per_block, policy.max_blocks);
    detail::PermuteBackwardParams<T, std::remove_cv_t<TDx>> const params{.d_x_perm = d_x_perm.data,
                                                                         .ldp = d_x_perm.ld,
                                                                         .dx = dx.data,
                                                                         .ldx = dx.ld,
                                                                         .slot_rows = plan.slot_rows.data(),
                                                                         .num_tokens = plan.num_tokens,
                                                                         .top_k = plan.top_k,
                                                                         .chunks_per_row = chunks};
    constexpr bool kWhole = kElems > 1;  // vector_friendly: every chunk a 16-byte aligned vector
    detail::permute_backward_kernel<T, std::remove_cv_t<TDx>, kElems, kWhole>
        <<<blocks, dim3(block.threads_x, block.rows_per_block), 0, s.get()>>>(params);
  };
  // Only d_x_perm is read in vectors; dx is written element by element.
  if (detail::vector_friendly<T>(d_x_perm.data, d_x_perm.ld, d_x_perm.data, d_x_perm.ld, dx.cols))
    launch(std::integral_constant<int, detail::kVectorElems<T>>{});
  else
    launch(std::integral_constant<int, 1>{});
  EPX_CUDA_CHECK_LAUNCH(permute_backward_kernel);
}

//! @brief unpermute_backward on the GPU (semantics of host/permute_backward.hpp).
//! d_expert_out is bitwise equal to the Host backend's; d_topk_weights is bitwise deterministic but
//! summed in a fixed blocked order (detail::unpermute_backward_dot), not the Host's sequential one,
//! so it differs from the Host's in the last bits.
//! @param[in]  plan            the plan forward's unpermute used, from make_plan(StreamRef, ...)
//! @param[in]  expert_out      [>= num_tokens * top_k, hidden] device memory: forward's input (room
//!                             for every slot: the routed-row count lives on the device)
//! @param[in]  topk_weights    [num_tokens, top_k] device memory: forward's weights
//! @param[in]  dy              [num_tokens, hidden] device memory: dL/dy
//! @param[out] d_expert_out    [>= num_tokens * top_k, hidden] device memory: dL/dexpert_out; rows
//!                             past the plan's routed rows are left untouched. fp32, or the element type
//! @param[out] d_topk_weights  [num_tokens, top_k] device memory, every entry written; 0 for a slot
//!                             without a row in this plan
//! No output may alias an input.
template <class TOutIn, class TDyIn, float_element TG>
requires float_element<TOutIn> && float_element<TDyIn>
void unpermute_backward(StreamRef stream, RoutingPlan const& plan, MatrixView<TOutIn> expert_out_in,
                        MatrixView<float const> topk_weights, MatrixView<TDyIn> dy_in, MatrixView<TG> d_expert_out,
                        MatrixView<float> d_topk_weights) {
  EPX_NVTX_RANGE(UnpermuteBackward);
  using TOut = std::remove_const_t<TOutIn>;
  using TDy = std::remove_const_t<TDyIn>;
  using TGrad = std::remove_cv_t<TG>;
  constexpr std::string_view where = "unpermute_backward";
  detail::CudaStream const s(stream, where);
  MatrixView<TOut const> const expert_out(expert_out_in);
  MatrixView<TDy const> const dy(dy_in);
  detail::require(!plan.expert_offsets.empty(), Errc::kInvalidArgument, where, "plan.expert_offsets.size()", 0,
                  ">= 1 (a plan made by make_plan)");
  detail::check_unpermute_backward_args(plan, plan.num_slots(), expert_out, topk_weights, dy, d_expert_out,
                                        d_topk_weights);
  detail::require(dy.cols <= std::numeric_limits<std::int32_t>::max(), Errc::kUnsupported, where, "dy.cols", dy.cols,
                  "< 2^31 (chunk indices are int32)");
  // Every d_topk_weights entry is written even for hidden == 0 (then 0), so only no tokens returns early.
  if (plan.num_tokens == 0) return;
  auto const policy = detail::policy_for<detail::RowPolicy>(detail::current_device_traits());
  int const chunk_elems = detail::backward_chunk_elems(dy.cols, sizeof(TOut), sizeof(TDy));
  auto const chunks = static_cast<std::int32_t>(dy.cols / chunk_elems);
  int const threads = detail::row_block(chunks, policy.threads_per_block).threads_x;  // one token per block
  detail::UnpermuteBackwardParams<TOut, TDy, TGrad> const params{.expert_out = expert_out.data,
                                                                 .lde = expert_out.ld,
                                                                 .weights = topk_weights.data,
                                                                 .ldw = topk_weights.ld,
                                                                 .dy = dy.data,
                                                                 .ldy = dy.ld,
                                                                 .d_expert_out = d_expert_out.data,
                                                                 .ldg = d_expert_out.ld,
                                                                 .d_weights = d_topk_weights.data,
                                                                 .ldd = d_topk_weights.ld,
                                                                 .slot_rows = plan.slot_rows.data(),
                                                                 .top_k = plan.top_k,
                                                                 .chunks_per_row = chunks};
  constexpr int kChunk = 16 / static_cast<int>(sizeof(TOut) > sizeof(TDy) ? sizeof(TOut) : sizeof(TDy));
  auto launch = [&]<int kElems, bool kWhole>(std::integral_constant<int, kElems>, std::bool_constant<kWhole>) {
    detail::unpermute_backward_kernel<TOut, TDy, TGrad, kElems, kWhole>
        <<<plan.num_tokens, threads, 0, s.get()>>>(params);
  };
  // The chunking (and so the dot's order) follows from the shape; alignment only picks the loads.
  if (chunk_elems == 1)
    launch(std::integral_constant<int, 1>{}, std::false_type{});
  else if (detail::chunks_load_whole(reinterpret_cast<std::uintptr_t>(expert_out.data), expert_out.ld, kChunk,
                                     sizeof(TOut)) &&
           detail::chunks_load_whole(reinterpret_cast<std::uintptr_t>(dy.data), dy.ld, kChunk, sizeof(TDy)))
    launch(std::integral_constant<int, kChunk>{}, std::true_type{});
  else
    launch(std::integral_constant<int, kChunk>{}, std::false_type{});
  EPX_CUDA_CHECK_LAUNCH(unpermute_backward_kernel);
}

}  // namespace epx
