// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! Router statistics on the GPU: expert_token_counts, the twin of host/router_losses.hpp's (the
//! losses themselves are Host only for now). Integer atomics only: the counts are exact and the
//! same run to run.

#include <epx/core/status.hpp>
#include <epx/core/stream.hpp>
#include <epx/cuda/error.hpp>
#include <epx/cuda/launch.cuh>
#include <epx/cuda/nvtx.hpp>
#include <epx/cuda/tuning.cuh>
#include <epx/router/losses.hpp>

#include <cstdint>
#include <span>

namespace epx {
namespace nvtx {
//! expert_token_counts: slots per expert.
struct ExpertTokenCounts {
  static constexpr char const* message = "expert_token_counts";
};
}  // namespace nvtx

namespace detail {

//! Grid-stride over the slots: one integer atomic per slot with an id in [0, num_experts); ids that
//! are neither that nor -1 summed per warp, one atomic per warp. Every thread of every (whole)
//! warp reaches the shuffles: no early exit.
template <class Id>  // a template only so that several translation units may include this header
__global__ void expert_token_counts_kernel(Id const* __restrict__ ids, std::int64_t ld, std::int64_t rows,
                                           std::int64_t cols, std::int32_t num_experts,
                                           unsigned long long* __restrict__ counts, Status* __restrict__ status) {
  std::int64_t const n = rows * cols;
  unsigned long long invalid = 0;
  for (std::int64_t s = grid_thread<std::int64_t>(); s < n; s += grid_threads<std::int64_t>()) {
    std::int64_t const t = s / cols, j = s - t * cols;
    std::int32_t const id = ids[t * ld + j];
    if (id >= 0 && id < num_experts)
      atomicAdd(&counts[id], 1ull);
    else if (id != -1)
      ++invalid;
  }
  for (int offset = 16; offset > 0; offset /= 2) invalid += __shfl_xor_sync(0xffffffffu, invalid, offset);
  if (invalid != 0 && threadIdx.x % 32 == 0)
    atomicAdd(reinterpret_cast<unsigned long long*>(&status->invalid_ids), invalid);
}

}  // namespace detail

//! @brief expert_token_counts on the GPU (semantics: host/router_losses.hpp): counts[e] = the slots
//! of topk_ids routed to expert e, -1 slots counted nowhere. **Writes** counts (every element).
//!
//! @param[in]  stream      the caller's stream; nothing syncs
//! @param[in]  topk_ids    [num_tokens, top_k] device memory
//! @param[out] counts      [num_experts] device memory
//! @param[in,out] status   device memory: an id outside [0, num_experts) other than -1 (which the
//!                         Host throws for) is counted nowhere and added to status->invalid_ids
//! Errors (thrown before any launch): num_experts <= 0, counts.size() != num_experts, a bad
//! topk_ids view, a host StreamRef, a null status.
inline void expert_token_counts(StreamRef stream, std::int32_t num_experts, MatrixView<std::int32_t const> topk_ids,
                                std::span<std::int64_t> counts, Status* status) {
  EPX_NVTX_RANGE(ExpertTokenCounts);
  constexpr std::string_view where = "expert_token_counts";
  detail::require(num_experts > 0, Errc::kInvalidArgument, where, "num_experts", num_experts, "> 0");
  detail::check_matrix(where, "topk_ids", topk_ids, -1, -1);
  detail::require(counts.size() == static_cast<std::size_t>(num_experts), Errc::kShapeMismatch, where, "counts.size()",
                  counts.size(), fmt::format("num_experts = {}", num_experts));
  detail::CudaStream const s(stream, where);
  detail::require(status != nullptr, Errc::kInvalidArgument, where, "status", "nullptr",
                  "a device pointer to an epx::Status");
  EPX_CUDA_CHECK(cudaMemsetAsync(counts.data(), 0, counts.size_bytes(), s.get()));
  std::int64_t const n = topk_ids.rows * topk_ids.cols;
  if (n == 0) return;
  auto const policy = detail::policy_for<detail::PlanPolicy>(detail::current_device_traits());
  int const blocks = detail::grid_blocks(n, policy.threads_per_block, policy.max_blocks);
  detail::expert_token_counts_kernel<std::int32_t><<<blocks, policy.threads_per_block, 0, s.get()>>>(
      topk_ids.data, topk_ids.ld, topk_ids.rows, topk_ids.cols, num_experts,
      reinterpret_cast<unsigned long long*>(counts.data()), status);
  EPX_CUDA_CHECK_LAUNCH(expert_token_counts_kernel);
}

}  // namespace epx
