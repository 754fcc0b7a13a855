// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! permute and unpermute on the GPU: the twins of host/permute.hpp. Rows move in 16-byte vectors
//! when the row width, the leading dimensions and the pointers allow it, element by element
//! otherwise. The number of routed rows stays on the device (expert_offsets[count]): no sync.
//! unpermute sums each token's slots in slot order in fp32, one fused multiply-add per term
//! (detail::add_weighted, as the Host backend), so it is bitwise deterministic and bitwise equal to
//! the Host backend.

#include <epx/core/math.hpp>
#include <epx/core/stream.hpp>
#include <epx/cuda/element.cuh>
#include <epx/cuda/error.hpp>
#include <epx/cuda/launch.cuh>
#include <epx/cuda/nvtx.hpp>
#include <epx/cuda/row_blocks.hpp>
#include <epx/cuda/tuning.cuh>
#include <epx/permute/permute.hpp>

#include <cstdint>
#include <limits>

namespace epx {
namespace detail {

//! permute_kernel's arguments.
template <class T>
struct PermuteParams {
  T const* x;  // [num_tokens, cols], ldx apart
  std::int64_t ldx;
  T* x_perm;  // [max_rows, cols], ldp apart
  std::int64_t ldp;
  std::int32_t const* sorted_slots;        // [max_rows] the plan's
  std::int32_t const* num_rows_on_device;  // the plan's expert_offsets[count]: the routed rows
  std::int64_t max_rows;                   // num_tokens * top_k
  std::int32_t top_k;
  std::int32_t chunks_per_row;  // of Vec
};

// threadIdx.y picks a row of the block's rows, threadIdx.x walks the row's chunks (row_blocks.hpp);
// a chunk is 16 bytes (Vec = uint4) or one element (Vec = T).
template <class T, class Vec>
__global__ void permute_kernel(PermuteParams<T> const p) {
  std::int64_t const num_rows = min(std::int64_t{*p.num_rows_on_device}, p.max_rows);
  for (std::int64_t row = grid_row<std::int64_t>(); row < num_rows; row += grid_rows<std::int64_t>()) {
    std::int32_t const token = p.sorted_slots[row] / p.top_k;  // a slot index is an int32 (check_plan_args)
    auto const* src = reinterpret_cast<Vec const*>(p.x + token * p.ldx);
    auto* dst = reinterpret_cast<Vec*>(p.x_perm + row * p.ldp);
    for (std::int32_t chunk = threadIdx.x; chunk < p.chunks_per_row; chunk += blockDim.x) dst[chunk] = src[chunk];
  }
}

//! unpermute_kernel's arguments.
template <class T, class TOut>
struct UnpermuteParams {
  T const* expert_out;  // [rows, cols], lde apart
  std::int64_t lde;
  float const* weights;  // [num_tokens, top_k], ldw apart
  std::int64_t ldw;
  std::int32_t const* slot_rows;  // [num_tokens * top_k] the plan's
  std::int32_t top_k;
  TOut* y;  // [num_tokens, cols], ldy apart
  std::int64_t ldy;
  std::int32_t chunks_per_row;  // of kElems elements
};

// One block per token, each thread a chunk of the row: slots summed in slot order in fp32, each
// term one fused multiply-add (add_weighted), exactly as the Host backend.
template <class T, class TOut, int kElems>
__global__ void unpermute_kernel(UnpermuteParams<T, TOut> const p) {
  std::int64_t const t = blockIdx.x;
  for (std::int32_t chunk = threadIdx.x; chunk < p.chunks_per_row; chunk += blockDim.x) {
    float acc[kElems];
#pragma unroll
    for (int e = 0; e < kElems; ++e) acc[e] = 0.0f;
    for (std::int32_t j = 0; j < p.top_k; ++j) {
      std::int32_t const row = p.slot_rows[t * p.top_k + j];
      if (row < 0) continue;
      float const w = p.weights[t * p.ldw + j];
      T vals[kElems];
      T const* const src = p.expert_out + row * p.lde + std::int64_t{chunk} * kElems;
      if constexpr (kElems * sizeof(T) == 16) {
        *reinterpret_cast<uint4*>(vals) = *reinterpret_cast<uint4 const*>(src);
      } else {
#pragma unroll
        for (int e = 0; e < kElems; ++e) vals[e] = src[e];
      }
#pragma unroll
      for (int e = 0; e < kElems; ++e) acc[e] = add_weighted(acc[e], w, device_to_float(vals[e]));
    }
    TOut* const dst = p.y + t * p.ldy + std::int64_t{chunk} * kElems;
#pragma unroll
    for (int e = 0; e < kElems; ++e) dst[e] = device_from_float<TOut>(acc[e]);
  }
}

}  // namespace detail

//! @brief permute on the GPU (semantics of host/permute.hpp).
//! @param[in]  plan    from make_plan(StreamRef, ...), on the same stream
//! @param[in]  x       [num_tokens, hidden] device memory
//! @param[out] x_perm  [>= num_tokens * top_k, hidden] device memory (the routed-row count lives on
//!                     the device, so room for every slot is required); rows past the routed rows
//!                     are left untouched.
template <float_element T>
void permute(StreamRef stream, RoutingPlan const& plan, std::type_identity_t<MatrixView<T const>> x,
             MatrixView<T> x_perm) {
  EPX_NVTX_RANGE(Permute);
  constexpr std::string_view where = "permute";
  detail::CudaStream const s(stream, where);
  // The routed rows are only known on the device: require room for every slot.
  detail::require(!plan.expert_offsets.empty(), Errc::kInvalidArgument, where, "plan.expert_offsets.size()", 0,
                  ">= 1 (a plan made by make_plan)");
  detail::check_permute_args(plan, plan.num_slots(), x, x_perm);
  std::int64_t const max_rows = plan.num_slots();
  detail::require(x.cols <= std::numeric_limits<std::int32_t>::max(), Errc::kUnsupported, where, "x.cols", x.cols,
                  "< 2^31 (chunk indices are int32)");
  if (max_rows == 0 || x.cols == 0) return;
  auto const policy = detail::policy_for<detail::RowPolicy>(detail::current_device_traits());
  auto launch = [&]<class Vec>(Vec*) {
    auto const chunks = static_cast<std::int32_t>(x.cols * static_cast<std::int64_t>(sizeof(T)) /
                                                  static_cast<std::int64_t>(sizeof(Vec)));
    detail::RowBlock const block = detail::row_block(chunks, policy.threads_per_block);
    int const blocks = detail::grid_blocks(max_rows, block.rows_per_block, policy.max_blocks);
    detail::PermuteParams<T> const params{.x = x.data,
                                          .ldx = x.ld,
                                          .x_perm = x_perm.data,
                                          .ldp = x_perm.ld,
                                          .sorted_slots = plan.sorted_slots.data(),
                                          .num_rows_on_device = plan.expert_offsets.data() + plan.experts.count,
                                          .max_rows = max_rows,
                                          .top_k = plan.top_k,
                                          .chunks_per_row = chunks};
    detail::permute_kernel<T, Vec><<<blocks, dim3(block.threads_x, block.rows_per_block), 0, s.get()>>>(params);
  };
  if (detail::vector_friendly<T>(x.data, x.ld, x_perm.data, x_perm.ld, x.cols))
    launch(static_cast<uint4*>(nullptr));
  else
    launch(static_cast<T*>(nullptr));
  EPX_CUDA_CHECK_LAUNCH(permute_kernel);
}

//! @brief unpermute on the GPU (semantics of host/permute.hpp): every row of y written, slots
//! summed in slot order in fp32, one fused multiply-add per term: bitwise deterministic and equal
//! to the Host backend.
//! @param[in]  expert_out    [>= num_tokens * top_k, hidden] device memory (room for every slot: the
//!                           routed-row count lives on the device)
//! @param[in]  topk_weights  [num_tokens, top_k] device memory
//! @param[out] y             [num_tokens, hidden] device memory (fp32 for partial sums, or T)
template <class TIn, float_element TOut>
requires float_element<TIn>
void unpermute(StreamRef stream, RoutingPlan const& plan, MatrixView<TIn> expert_out_in,
               MatrixView<float const> topk_weights, MatrixView<TOut> y) {
  EPX_NVTX_RANGE(Unpermute);
  using T = std::remove_const_t<TIn>;
  constexpr std::string_view where = "unpermute";
  detail::CudaStream const s(stream, where);
  MatrixView<T const> const expert_out(expert_out_in);
  detail::check_unpermute_args(plan, plan.num_slots(), expert_out, topk_weights, y);
  detail::require(y.cols <= std::numeric_limits<std::int32_t>::max(), Errc::kUnsupported, where, "y.cols", y.cols,
                  "< 2^31 (chunk indices are int32)");
  if (plan.num_tokens == 0 || y.cols == 0) return;
  auto const policy = detail::policy_for<detail::RowPolicy>(detail::current_device_traits());
  auto launch = [&]<int kElems>(std::integral_constant<int, kElems>) {
    auto const chunks = static_cast<std::int32_t>(y.cols / kElems);
    int const threads = detail::row_block(chunks, policy.threads_per_block).threads_x;  // one row per block
    detail::UnpermuteParams<T, TOut> const params{.expert_out = expert_out.data,
                                                  .lde = expert_out.ld,
                                                  .weights = topk_weights.data,
                                                  .ldw = topk_weights.ld,
                                                  .slot_rows = plan.slot_rows.data(),
                                                  .top_k = plan.top_k,
                                                  .y = y.data,
                                                  .ldy = y.ld,
                                                  .chunks_per_row = chunks};
    detail::unpermute_kernel<T, TOut, kElems><<<plan.num_tokens, threads, 0, s.get()>>>(params);
  };
  // Only expert_out is read in vectors; y is written element by element.
  if (detail::vector_friendly<T>(expert_out.data, expert_out.ld, expert_out.data, expert_out.ld, y.cols))
    launch(std::integral_constant<int, detail::kVectorElems<T>>{});
  else
    launch(std::integral_constant<int, 1>{});
  EPX_CUDA_CHECK_LAUNCH(unpermute_kernel);
}

}  // namespace epx
