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
#include <epx/cuda/nvtx.hpp>
#include <epx/cuda/row_blocks.hpp>
#include <epx/permute/permute.hpp>

#include <cstdint>
#include <limits>

namespace epx {
namespace detail {

//! Tuning of the row-moving kernels.
struct PermutePolicy {
  int threads_per_block = 256;
  int max_blocks = 65535 * 8;  // grid-stride beyond this
};

//! Elements of T per 16-byte vector.
template <class T>
inline constexpr int kVectorElems = 16 / static_cast<int>(sizeof(T));

template <class T>
bool vector_friendly(void const* a, std::int64_t lda, void const* b, std::int64_t ldb, std::int64_t cols) {
  return rows_move_in_vectors(reinterpret_cast<std::uintptr_t>(a), lda, reinterpret_cast<std::uintptr_t>(b), ldb, cols,
                              sizeof(T));
}

// threadIdx.y picks a row of the block's rows, threadIdx.x walks the row's chunks (row_blocks.hpp);
// a chunk is 16 bytes (Vec = uint4) or one element (Vec = T).
template <class T, class Vec>
__global__ void permute_kernel(T const* __restrict__ x, std::int64_t ldx, T* __restrict__ x_perm, std::int64_t ldp,
                               std::int32_t const* __restrict__ sorted_slots,
                               std::int32_t const* __restrict__ num_rows_on_device, std::int64_t max_rows,
                               std::int32_t top_k, std::int32_t chunks_per_row) {
  std::int64_t const num_rows = min(std::int64_t{*num_rows_on_device}, max_rows);
  for (std::int64_t row = blockIdx.x * std::int64_t{blockDim.y} + threadIdx.y; row < num_rows;
       row += std::int64_t{gridDim.x} * blockDim.y) {
    std::int32_t const token = sorted_slots[row] / top_k;  // a slot index is an int32 (check_plan_args)
    auto const* src = reinterpret_cast<Vec const*>(x + token * ldx);
    auto* dst = reinterpret_cast<Vec*>(x_perm + row * ldp);
    for (std::int32_t chunk = threadIdx.x; chunk < chunks_per_row; chunk += blockDim.x) dst[chunk] = src[chunk];
  }
}

// One block per token, each thread a chunk of the row: slots summed in slot order in fp32, each
// term one fused multiply-add (add_weighted), exactly as the Host backend.
template <class T, class TOut, int kElems>
__global__ void unpermute_kernel(T const* __restrict__ expert_out, std::int64_t lde, float const* __restrict__ weights,
                                 std::int64_t ldw, std::int32_t const* __restrict__ slot_rows, std::int32_t top_k,
                                 TOut* __restrict__ y, std::int64_t ldy, std::int32_t chunks_per_row) {
  std::int64_t const t = blockIdx.x;
  for (std::int32_t chunk = threadIdx.x; chunk < chunks_per_row; chunk += blockDim.x) {
    float acc[kElems];
#pragma unroll
    for (int e = 0; e < kElems; ++e) acc[e] = 0.0f;
    for (std::int32_t j = 0; j < top_k; ++j) {
      std::int32_t const row = slot_rows[t * top_k + j];
      if (row < 0) continue;
      float const w = weights[t * ldw + j];
      T vals[kElems];
      T const* const src = expert_out + row * lde + std::int64_t{chunk} * kElems;
      if constexpr (kElems * sizeof(T) == 16) {
        *reinterpret_cast<uint4*>(vals) = *reinterpret_cast<uint4 const*>(src);
      } else {
#pragma unroll
        for (int e = 0; e < kElems; ++e) vals[e] = src[e];
      }
#pragma unroll
      for (int e = 0; e < kElems; ++e) acc[e] = add_weighted(acc[e], w, device_to_float(vals[e]));
    }
    TOut* const dst = y + t * ldy + std::int64_t{chunk} * kElems;
#pragma unroll
    for (int e = 0; e < kElems; ++e) dst[e] = device_from_float<TOut>(acc[e]);
  }
}

inline cudaStream_t cuda_stream(StreamRef stream, std::string_view where) {
  require(!stream.is_host(), Errc::kInvalidArgument, where, "stream", "StreamRef::host()",
          "a CUDA stream (these views hold device memory)");
  return reinterpret_cast<cudaStream_t>(stream.get());
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
  cudaStream_t const s = detail::cuda_stream(stream, where);
  // The routed rows are only known on the device: require room for every slot.
  detail::require(!plan.expert_offsets.empty(), Errc::kInvalidArgument, where, "plan.expert_offsets.size()", 0,
                  ">= 1 (a plan made by make_plan)");
  detail::check_permute_args(plan, plan.num_slots(), x, x_perm);
  std::int64_t const max_rows = plan.num_slots();
  detail::require(x.cols <= std::numeric_limits<std::int32_t>::max(), Errc::kUnsupported, where, "x.cols", x.cols,
                  "< 2^31 (chunk indices are int32)");
  if (max_rows == 0 || x.cols == 0) return;
  detail::PermutePolicy const policy;
  auto launch = [&]<class Vec>(Vec*) {
    auto const chunks = static_cast<std::int32_t>(x.cols * static_cast<std::int64_t>(sizeof(T)) /
                                                  static_cast<std::int64_t>(sizeof(Vec)));
    detail::RowBlock const block = detail::row_block(chunks, policy.threads_per_block);
    int const blocks = detail::row_grid(max_rows, block, policy.max_blocks);
    detail::permute_kernel<T, Vec><<<blocks, dim3(block.threads_x, block.rows_per_block), 0, s>>>(
        x.data, x.ld, x_perm.data, x_perm.ld, plan.sorted_slots.data(), plan.expert_offsets.data() + plan.experts.count,
        max_rows, plan.top_k, chunks);
  };
  if (detail::vector_friendly<T>(x.data, x.ld, x_perm.data, x_perm.ld, x.cols)) launch(static_cast<uint4*>(nullptr));
  else launch(static_cast<T*>(nullptr));
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
  cudaStream_t const s = detail::cuda_stream(stream, where);
  MatrixView<T const> const expert_out(expert_out_in);
  detail::check_unpermute_args(plan, plan.num_slots(), expert_out, topk_weights, y);
  detail::require(y.cols <= std::numeric_limits<std::int32_t>::max(), Errc::kUnsupported, where, "y.cols", y.cols,
                  "< 2^31 (chunk indices are int32)");
  if (plan.num_tokens == 0 || y.cols == 0) return;
  detail::PermutePolicy const policy;
  // Only expert_out is read in vectors; y is written element by element.
  bool const vec = detail::vector_friendly<T>(expert_out.data, expert_out.ld, expert_out.data, expert_out.ld, y.cols);
  if (vec) {
    constexpr int kElems = detail::kVectorElems<T>;
    auto const chunks = static_cast<std::int32_t>(y.cols / kElems);
    int const threads = detail::row_block(chunks, policy.threads_per_block).threads_x;  // one row per block
    detail::unpermute_kernel<T, TOut, kElems><<<plan.num_tokens, threads, 0, s>>>(
        expert_out.data, expert_out.ld, topk_weights.data, topk_weights.ld, plan.slot_rows.data(), plan.top_k, y.data,
        y.ld, chunks);
  } else {
    int const threads = detail::row_block(y.cols, policy.threads_per_block).threads_x;
    detail::unpermute_kernel<T, TOut, 1><<<plan.num_tokens, threads, 0, s>>>(
        expert_out.data, expert_out.ld, topk_weights.data, topk_weights.ld, plan.slot_rows.data(), plan.top_k, y.data,
        y.ld, static_cast<std::int32_t>(y.cols));
  }
  EPX_CUDA_CHECK_LAUNCH(unpermute_kernel);
}

}  // namespace epx
