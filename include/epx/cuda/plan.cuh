// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! make_plan on the GPU: a key pre-pass, one cub::DeviceRadixSort::SortPairs over only the key
//! bits needed, and offsets plus the inverse permutation taken from the sorted keys. Stream
//! ordered, no allocation, no host synchronisation. The twin of host/plan.hpp: same RoutingPlan
//! (arrays in device memory), same stable order, same counters.

#include <epx/core/math.hpp>
#include <epx/core/status.hpp>
#include <epx/core/stream.hpp>
#include <epx/cuda/error.hpp>
#include <epx/cuda/launch.cuh>
#include <epx/cuda/nvtx.hpp>
#include <epx/cuda/tuning.cuh>
#include <epx/parallel/forward_control.hpp>
#include <epx/permute/plan.hpp>

#include <cub/device/device_radix_sort.cuh>

#include <cstdint>

namespace epx {
namespace detail {

//! True when no slot of one token's row of topk_ids holds an id in [0, num_experts).
__device__ inline bool token_has_no_expert(std::int32_t const* __restrict__ row, std::int32_t top_k,
                                           std::int32_t num_experts) {
  for (std::int32_t j = 0; j < top_k; ++j)
    if (row[j] >= 0 && row[j] < num_experts) return false;
  return true;
}

//! Keys: local expert (id - first) for slots routed to the range, `count` (one past the last
//! local expert) for everything else; values: the slot index. Invalid ids are counted, and so are
//! the tokens with no valid id (the thread of a token's slot 0 reads its row; over every expert,
//! not only the range, so that every rank of an AllGather layer counts the same).
//! A template over the id type only so that a program's several translation units may include
//! this header (a non-template __global__ function is defined in each: a link error); likewise below.
template <class Id>
__global__ void plan_keys_kernel(Id const* __restrict__ ids, std::int64_t ld, std::int32_t num_tokens,
                                 std::int32_t top_k, std::int32_t num_experts, ExpertRange range,
                                 std::uint32_t* __restrict__ keys, std::int32_t* __restrict__ slots,
                                 Status* __restrict__ status) {
  // Slot indices fit an int32 (check_plan_args): 32-bit division, not 64-bit (~3x fewer instructions).
  auto const n = static_cast<std::uint32_t>(num_tokens) * static_cast<std::uint32_t>(top_k);
  std::uint32_t tokens_without_expert = 0;  // this thread's, summed per warp after the loop
  for (std::uint32_t s = grid_thread<std::uint32_t>(); s < n; s += grid_threads<std::uint32_t>()) {
    std::uint32_t const t = s / static_cast<std::uint32_t>(top_k), j = s - t * static_cast<std::uint32_t>(top_k);
    std::int32_t const id = ids[std::int64_t{t} * ld + j];
    bool const invalid = is_invalid_expert_id(id, num_experts);
    if (invalid) {
      atomicAdd(reinterpret_cast<unsigned long long*>(&status->invalid_ids), 1ull);
      atomicAdd(reinterpret_cast<unsigned long long*>(&status->dropped_slots), 1ull);
    }
    if (j == 0 && token_has_no_expert(ids + std::int64_t{t} * ld, top_k, num_experts)) ++tokens_without_expert;
    bool const here = !invalid && id != -1 && id >= range.first && id < range.first + range.count;
    keys[s] = here ? static_cast<std::uint32_t>(id - range.first) : static_cast<std::uint32_t>(range.count);
    slots[s] = static_cast<std::int32_t>(s);
  }
  // One atomic per warp, not per token: a batch padded with thousands of all -1 tokens would
  // otherwise queue thousands of atomics on one address. Every lane of every warp gets here (no
  // early exit, whole warps: PlanPolicy in tuning.cuh), so the full-mask shuffles are well defined.
  for (int offset = 16; offset > 0; offset /= 2)
    tokens_without_expert += __shfl_xor_sync(0xffffffffu, tokens_without_expert, offset);
  if (tokens_without_expert != 0 && threadIdx.x % 32 == 0)
    atomicAdd(reinterpret_cast<unsigned long long*>(&status->tokens_without_expert),
              static_cast<unsigned long long>(tokens_without_expert));
}

//! From the sorted keys: expert_offsets (every boundary writes the offsets of the experts it
//! opens, so empty experts are covered), sorted_slots (-1 past the routed rows) and slot_rows.
template <class Key>
__global__ void plan_offsets_kernel(Key const* __restrict__ sorted_keys, std::int32_t* __restrict__ sorted_slots,
                                    std::int64_t n, std::int32_t count, std::int32_t* __restrict__ expert_offsets,
                                    std::int32_t* __restrict__ slot_rows) {
  if (n == 0) {  // no slots: every offset is 0
    for (std::int32_t e = threadIdx.x; e <= count; e += blockDim.x)
      if (blockIdx.x == 0) expert_offsets[e] = 0;
    return;
  }
  for (std::int64_t p = grid_thread<std::int64_t>(); p < n; p += grid_threads<std::int64_t>()) {
    auto const key = static_cast<std::int32_t>(sorted_keys[p]);
    auto const prev = p == 0 ? -1 : static_cast<std::int32_t>(sorted_keys[p - 1]);
    for (std::int32_t e = prev + 1; e <= key; ++e) expert_offsets[e] = static_cast<std::int32_t>(p);
    if (p == n - 1)
      for (std::int32_t e = key + 1; e <= count; ++e) expert_offsets[e] = static_cast<std::int32_t>(n);
    std::int32_t const slot = sorted_slots[p];
    bool const routed = key < count;
    slot_rows[slot] = routed ? static_cast<std::int32_t>(p) : -1;
    if (!routed) sorted_slots[p] = -1;
  }
}

template <class Offset>
__global__ void plan_counts_kernel(Offset const* __restrict__ expert_offsets, std::int32_t count,
                                   std::int32_t* __restrict__ tokens_per_expert, Status* __restrict__ status) {
  for (std::int32_t e = grid_thread<std::int32_t>(); e < count; e += grid_threads<std::int32_t>()) {
    std::int32_t const rows = expert_offsets[e + 1] - expert_offsets[e];
    tokens_per_expert[e] = rows;
    atomicMax(&status->max_tokens_per_expert, static_cast<std::uint32_t>(rows));
  }
}

//! The device plan's layout: the RoutingPlan arrays, the sort's keys and CUB's temporary storage.
struct CudaPlanParts {
  RoutingPlan plan;
  std::span<std::uint32_t> keys_in, keys_out;
  std::span<std::int32_t> slots_in;
  std::span<std::byte> sort_temp;
};

inline int plan_end_bit(std::int32_t count) { return std::max(1, bit_width(static_cast<std::uint64_t>(count))); }

//! Bytes of CUB's radix sort temporary storage for n items. Asks CUB (a host-side query, which
//! reads the current device's properties: call it with the device the plan will run on current).
inline std::size_t cub_sort_temp_bytes(std::int64_t n, std::int32_t count) {
  std::size_t bytes = 0;
  EPX_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
      nullptr, bytes, static_cast<std::uint32_t const*>(nullptr), static_cast<std::uint32_t*>(nullptr),
      static_cast<std::int32_t const*>(nullptr), static_cast<std::int32_t*>(nullptr), static_cast<int>(n), 0,
      plan_end_bit(count)));
  return bytes;
}

template <class Carver>
CudaPlanParts carve_cuda_plan(Carver& c, std::int32_t num_tokens, std::int32_t top_k, std::int32_t num_experts,
                              ExpertRange experts, std::size_t sort_temp_bytes) {
  auto const n = static_cast<std::size_t>(num_tokens) * static_cast<std::size_t>(top_k);
  CudaPlanParts parts;
  parts.plan = carve_plan(c, num_tokens, top_k, num_experts, experts);
  parts.keys_in = c.template take<std::uint32_t>(n);
  parts.keys_out = c.template take<std::uint32_t>(n);
  parts.slots_in = c.template take<std::int32_t>(n);
  parts.sort_temp = c.template take<std::byte>(sort_temp_bytes);
  return parts;
}

}  // namespace detail

//! Device workspace bytes of make_plan(StreamRef, ...) for this many tokens. Host arithmetic plus
//! CUB's size query, which reads the current device's properties (no allocation, no sync).
[[nodiscard]] inline std::size_t cuda_plan_workspace_bytes(std::int32_t num_tokens, std::int32_t top_k,
                                                           std::int32_t num_experts_in_range) {
  std::size_t const temp = detail::cub_sort_temp_bytes(std::int64_t{num_tokens} * top_k, num_experts_in_range);
  return detail::layout_bytes([&](auto& c) {
    return detail::carve_cuda_plan(c, num_tokens, top_k, num_experts_in_range, ExpertRange{0, num_experts_in_range},
                                   temp);
  });
}

//! @brief make_plan on the GPU (semantics of host/plan.hpp; same stable order, same counters).
//! @param[in]  stream       the caller's stream; all work is ordered on it, nothing syncs
//! @param[in]  topk_ids     [num_tokens, top_k] device memory
//! @param[in]  workspace    device memory, at least cuda_plan_workspace_bytes(num_tokens, top_k, experts.count)
//! @param[out] status       device memory; invalid_ids, dropped_slots and tokens_without_expert are
//!                          added to, max_tokens_per_expert is folded with atomicMax (zero it
//!                          before the first call)
//! @return the plan; its arrays live in `workspace` and are valid once the stream reaches them
inline RoutingPlan make_plan(StreamRef stream, MatrixView<std::int32_t const> topk_ids, std::int32_t num_experts,
                             ExpertRange experts, Workspace workspace, Status* status) {
  EPX_NVTX_RANGE(Plan);  // CUB's sort adds its own range inside, in NVTX domain "CCCL"
  constexpr std::string_view where = "make_plan";
  detail::check_plan_args(where, topk_ids, num_experts, experts);
  detail::CudaStream const stream_on(stream, where);
  detail::require(status != nullptr, Errc::kInvalidArgument, where, "status", "nullptr",
                  "a device pointer to an epx::Status");
  auto const num_tokens = static_cast<std::int32_t>(topk_ids.rows);
  auto const top_k = static_cast<std::int32_t>(topk_ids.cols);
  std::int64_t const n = std::int64_t{num_tokens} * top_k;
  std::size_t const temp_bytes = detail::cub_sort_temp_bytes(n, experts.count);
  auto parts = detail::carve_layout(workspace, where, [&](auto& c) {
    return detail::carve_cuda_plan(c, num_tokens, top_k, num_experts, experts, temp_bytes);
  });
  cudaStream_t const s = stream_on.get();
  auto const policy = detail::policy_for<detail::PlanPolicy>(detail::current_device_traits());
  int const blocks = detail::grid_blocks(n, policy.threads_per_block, policy.max_blocks);
  if (n > 0) {
    detail::plan_keys_kernel<std::int32_t>
        <<<blocks, policy.threads_per_block, 0, s>>>(topk_ids.data, topk_ids.ld, num_tokens, top_k, num_experts,
                                                     experts, parts.keys_in.data(), parts.slots_in.data(), status);
    EPX_CUDA_CHECK_LAUNCH(plan_keys_kernel);
    std::size_t temp = parts.sort_temp.size();
    EPX_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
        parts.sort_temp.data(), temp, parts.keys_in.data(), parts.keys_out.data(), parts.slots_in.data(),
        parts.plan.sorted_slots.data(), static_cast<int>(n), 0, detail::plan_end_bit(experts.count), s));
  }
  detail::plan_offsets_kernel<std::uint32_t><<<blocks, policy.threads_per_block, 0, s>>>(
      parts.keys_out.data(), parts.plan.sorted_slots.data(), n, experts.count, parts.plan.expert_offsets.data(),
      parts.plan.slot_rows.data());
  EPX_CUDA_CHECK_LAUNCH(plan_offsets_kernel);
  if (experts.count > 0) {
    int const count_blocks = detail::grid_blocks(experts.count, policy.threads_per_block, policy.max_blocks);
    detail::plan_counts_kernel<std::int32_t><<<count_blocks, policy.threads_per_block, 0, s>>>(
        parts.plan.expert_offsets.data(), experts.count, parts.plan.tokens_per_expert.data(), status);
    EPX_CUDA_CHECK_LAUNCH(plan_counts_kernel);
  }
  return parts.plan;
}

}  // namespace epx
