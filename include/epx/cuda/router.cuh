// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! route on the GPU: one fused launch, one warp per token, every RouterConfig variant (semantics
//! on RouterConfig, as host/router.hpp). Each lane holds num_experts / 32 logits in registers;
//! softmax, group scores and the top-k are warp reductions; ties go to the lower expert id. The
//! warp layout (which lane and register hold an expert, a slot, a group) is router_lanes.hpp,
//! tested on the host. fp32 math from fp32 or bf16 logits; num_experts up to 512, top_k up to
//! kMaxTopK.
//!
//! Equality with the host: ids are equal except where two experts' selection scores are equal to
//! within the last bits (the device's expf and the softmax denominator's reduction order differ
//! from the host's in the last ulp); weights agree to fp32 rounding. Every other step (NaN/inf
//! logits, group scores and which groups may be kept, slot-order sums of the weights) follows the
//! host's operations one for one.

#include <epx/core/math.hpp>
#include <epx/core/stream.hpp>
#include <epx/cuda/element.cuh>
#include <epx/cuda/error.hpp>
#include <epx/cuda/nvtx.hpp>
#include <epx/cuda/router_lanes.hpp>
#include <epx/router/router.hpp>

#include <cfloat>
#include <climits>
#include <cstdint>

namespace epx {
namespace detail {

//! Tuning of the router launch: one warp per token, warps_per_block tokens per block.
struct RouterPolicy {
  int warps_per_block = 4;
};

inline constexpr int kMaxCudaRouterExperts = 512;
static_assert(kMaxCudaRouterExperts == 16 * kWarpLanes,
              "the launcher's largest instantiation holds 16 experts per lane");

inline constexpr unsigned kRouterFullMask = 0xffffffffu;

__device__ __forceinline__ RouterCandidate warp_best(RouterCandidate c) {
  return warp_butterfly(
      c,
      [](RouterCandidate v, int offset) {
        return RouterCandidate{__shfl_xor_sync(kRouterFullMask, v.value, offset),
                               __shfl_xor_sync(kRouterFullMask, v.id, offset)};
      },
      [](RouterCandidate mine, RouterCandidate other) { return router_pick(mine, other); });
}

__device__ __forceinline__ float warp_max(float v) {
  return warp_butterfly(
      v, [](float x, int offset) { return __shfl_xor_sync(kRouterFullMask, x, offset); },
      [](float a, float b) { return fmaxf(a, b); });
}

__device__ __forceinline__ float warp_sum(float v) {
  return warp_butterfly(
      v, [](float x, int offset) { return __shfl_xor_sync(kRouterFullMask, x, offset); },
      [](float a, float b) { return a + b; });
}

__device__ __forceinline__ int warp_min(int v) {
  return warp_butterfly(
      v, [](int x, int offset) { return __shfl_xor_sync(kRouterFullMask, x, offset); },
      [](int a, int b) { return a < b ? a : b; });
}

//! Sum of the chosen slots' weights in slot order (0.0f first, then slot 0, 1, ...), as the host
//! adds them: one broadcast per slot from its owner. Every lane gets the same sum.
__device__ __forceinline__ float slot_order_sum(RouterSlots const& slots, int num_chosen) {
  float sum = 0.0f;
  for (int j = 0; j < num_chosen; ++j) {
    float mine = 0.0f;
#pragma unroll
    for (int r = 0; r < kRouterSlotRegisters; ++r)
      if (r == router_slot_register(j)) mine = slots.weight[r];
    sum += __shfl_sync(kRouterFullMask, mine, router_slot_lane(j));
  }
  return sum;
}

//! Group-limited selection (num_groups > 1): clears the `selectable` bit of every expert outside
//! the topk_groups kept groups. Group g is scored once, by lane router_expert_lane(g) into its register
//! router_expert_register(g) (num_groups <= num_experts, so kPerLane registers hold them all), from
//! the choices staged in `stage` (router_group_stage_words(kPerLane) floats of this warp's own).
template <int kPerLane>
__device__ __forceinline__ void keep_groups(float* stage, RouterConfig const& config, int lane,
                                            float const (&choice)[kPerLane], RouterLaneMask& selectable) {
  int const num_experts = config.num_experts, num_groups = config.num_groups;
  int const group_size = num_experts / num_groups, stride = router_group_stride(group_size);
  float const unselectable = __int_as_float(0x7fc00000);  // NaN: never a member of a group's top 2
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    int const e = router_expert(lane, i);
    if (e < num_experts)
      stage[router_group_word(e, group_size)] = router_has<kPerLane>(selectable, i) ? choice[i] : unselectable;
  }
  __syncwarp();
  float group_score[kPerLane];
  bool any_nan = false;
#pragma unroll
  for (int r = 0; r < kPerLane; ++r) {
    int const g = router_expert(lane, r);
    RouterGroupTop2 top2;
    if (g < num_groups) {
      float const* row = stage + g * stride;
      for (int m = 0; m < group_size; ++m) {
        float const c = row[m];
        if (!isnan(c)) top2.add(c);
      }
    }
    group_score[r] = top2.score();  // -inf past num_groups: never competes
    any_nan = any_nan || isnan(group_score[r]);
  }
  // A NaN group score (+inf and -inf choices) changes which group the host's scan keeps; the
  // lowest competing group is only needed then.
  any_nan = __any_sync(kRouterFullMask, any_nan);
  RouterLaneMask group_kept = 0, expert_kept = 0;
  for (int round = 0; round < config.topk_groups; ++round) {
    int first_competing = INT_MAX;
    if (any_nan) {
#pragma unroll
      for (int r = 0; r < kPerLane; ++r) {
        int const g = router_expert(lane, r);
        if (!router_has<kPerLane>(group_kept, r) && group_score[r] != -INFINITY && g < first_competing)
          first_competing = g;
      }
      first_competing = warp_min(first_competing);
    }
    RouterCandidate mine{0.0f, -1};
#pragma unroll
    for (int r = 0; r < kPerLane; ++r)
      mine = router_pick(mine, router_group_candidate(group_score[r], router_expert(lane, r),
                                                      router_has<kPerLane>(group_kept, r), first_competing));
    RouterCandidate const best = warp_best(mine);
    if (best.id < 0) break;  // no group with a selectable member is left
#pragma unroll
    for (int r = 0; r < kPerLane; ++r)
      if (router_expert(lane, r) == best.id) group_kept |= 1u << r;  // groups sit where experts do
    int const first_expert = best.id * group_size;  // a group is a run of consecutive experts
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      int const e = router_expert(lane, i);
      if (e >= first_expert && e < first_expert + group_size) expert_kept |= 1u << i;
    }
  }
  selectable &= expert_kept;
}

template <class L, int kPerLane, int kWarps>
__global__ void __launch_bounds__(kWarps * kWarpLanes) route_kernel(L const* __restrict__ logits, std::int64_t ld,
                                                                    std::int64_t num_tokens, RouterConfig config,
                                                                    float const* __restrict__ bias,
                                                                    std::int32_t* __restrict__ ids,
                                                                    std::int64_t ld_ids, float* __restrict__ weights,
                                                                    std::int64_t ld_w,
                                                                    std::int32_t* __restrict__ tokens_per_expert) {
  __shared__ float s_stage[kWarps][router_group_stage_words(kPerLane)];
  int const warp = static_cast<int>(threadIdx.x) / kWarpLanes, lane = static_cast<int>(threadIdx.x) % kWarpLanes;
  std::int64_t const t = blockIdx.x * std::int64_t{kWarps} + warp;
  if (t >= num_tokens) return;  // whole warps only: nothing below synchronises the block
  int const num_experts = config.num_experts;

  // 1. Logits and which experts may be chosen at all.
  float logit[kPerLane], score[kPerLane], choice[kPerLane];
  RouterLaneMask selectable = 0;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    int const e = router_expert(lane, i);
    float l = e < num_experts ? device_to_float(logits[t * ld + e]) : -INFINITY;
    if (e < num_experts && !(isnan(l) || l == -INFINITY)) selectable |= 1u << i;
    if (l == INFINITY) l = FLT_MAX;
    logit[i] = l;
  }
  // 2. Scores and selection values.
  if (config.scoring == Scoring::kSoftmaxTopK) {
    float m = -INFINITY;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i)
      if (router_has<kPerLane>(selectable, i)) m = fmaxf(m, logit[i]);
    m = warp_max(m);
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      score[i] = router_has<kPerLane>(selectable, i) ? expf(logit[i] - m) : 0.0f;
      s += score[i];
    }
    s = warp_sum(s);
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) score[i] = router_has<kPerLane>(selectable, i) ? score[i] / s : 0.0f;
  } else if (config.scoring == Scoring::kSigmoidTopK) {
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) score[i] = 1.0f / (1.0f + expf(-logit[i]));
  } else {
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) score[i] = logit[i];
  }
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    int const e = router_expert(lane, i);
    choice[i] = bias != nullptr && e < num_experts ? score[i] + bias[e] : score[i];
    if (isnan(choice[i])) selectable &= ~(1u << i);
  }
  // 3. Group-limited selection.
  if (config.num_groups > 1) keep_groups<kPerLane>(s_stage[warp], config, lane, choice, selectable);
  // 4. Top-k, best first: each round the winner's lane retires it and the slot's lane records it.
  // The running max and slot-order sum are what step 5 needs, equal on every lane.
  RouterSlots slots;
  float chosen_max = -INFINITY, chosen_sum = 0.0f;
  int num_chosen = 0;
  for (int j = 0; j < config.top_k; ++j) {
    RouterLaneBest const mine = router_lane_best<kPerLane>(lane, choice, score, selectable);
    RouterCandidate const best = warp_best(mine.candidate);
    if (best.id < 0) break;  // nothing selectable is left: the remaining slots stay (-1, 0)
    float const best_score = __shfl_sync(kRouterFullMask, mine.score, router_expert_lane(best.id));
    selectable = router_retire<kPerLane>(lane, best.id, selectable);
    slots.keep(lane, j, best.id, best_score);
    chosen_max = fmaxf(chosen_max, best_score);
    chosen_sum += best_score;
    ++num_chosen;
  }
  // 5. Weights, summed in slot order as on the host.
  if (config.scoring == Scoring::kTopKSoftmax) {
#pragma unroll
    for (int r = 0; r < kRouterSlotRegisters; ++r)
      if (slots.id[r] >= 0) slots.weight[r] = expf(slots.weight[r] - chosen_max);
    float const sum = slot_order_sum(slots, num_chosen);
#pragma unroll
    for (int r = 0; r < kRouterSlotRegisters; ++r)
      if (slots.id[r] >= 0) slots.weight[r] /= sum;
    if (config.renormalize) chosen_sum = slot_order_sum(slots, num_chosen);
  }
#pragma unroll
  for (int r = 0; r < kRouterSlotRegisters; ++r) {
    int const j = router_slot(lane, r);
    if (j >= config.top_k) continue;
    float w = slots.weight[r];
    if (config.renormalize) w /= (chosen_sum + 1e-20f);
    ids[t * ld_ids + j] = slots.id[r];
    weights[t * ld_w + j] = w * config.routed_scaling_factor;
    if (tokens_per_expert != nullptr && slots.id[r] >= 0) atomicAdd(&tokens_per_expert[slots.id[r]], 1);
  }
}

}  // namespace detail

//! @brief route on the GPU (semantics on RouterConfig; see this header's note on equality).
//! @param[in]  logits             [num_tokens, num_experts] device memory, fp32 or bf16
//! @param[in]  correction_bias    [num_experts] device memory, or empty; its values are not checked
//!                                on the device (a NaN makes that expert unselectable)
//! @param[out] topk_ids, topk_weights  [num_tokens, top_k] device memory
//! @param[in,out] tokens_per_expert [num_experts] device counts that each chosen slot increments,
//!                                or nullptr. Zero it first for per-call counts.
template <class L>
  requires detail::router_logit<L>
void route(StreamRef stream, RouterConfig const& config, MatrixView<L> logits_in,
           std::span<float const> correction_bias, MatrixView<std::int32_t> topk_ids, MatrixView<float> topk_weights,
           std::int32_t* tokens_per_expert = nullptr) {
  EPX_NVTX_RANGE(Route);
  using Logit = std::remove_const_t<L>;
  constexpr std::string_view where = "route";
  MatrixView<Logit const> const logits(logits_in);
  detail::check_route_args(config, logits, correction_bias, topk_ids, topk_weights);
  detail::require(!stream.is_host(), Errc::kInvalidArgument, where, "stream", "StreamRef::host()",
                  "a CUDA stream (device memory in, device memory out)");
  detail::require(config.num_experts <= detail::kMaxCudaRouterExperts, Errc::kUnsupported, where,
                  "num_experts", config.num_experts,
                  fmt::format("<= {} on CUDA", detail::kMaxCudaRouterExperts));
  if (logits.rows == 0) return;
  auto* s = reinterpret_cast<cudaStream_t>(stream.get());
  constexpr detail::RouterPolicy kPolicy{};
  constexpr int kWarps = kPolicy.warps_per_block;
  auto const blocks = static_cast<unsigned>(ceil_div<std::int64_t>(logits.rows, kWarps));
  float const* bias = correction_bias.empty() ? nullptr : correction_bias.data();
  auto launch = [&]<int kPerLane>(std::integral_constant<int, kPerLane>) {
    detail::route_kernel<Logit, kPerLane, kWarps><<<blocks, kWarps * detail::kWarpLanes, 0, s>>>(
        logits.data, logits.ld, logits.rows, config, bias, topk_ids.data, topk_ids.ld, topk_weights.data,
        topk_weights.ld, tokens_per_expert);
  };
  int const per_lane = detail::router_registers(config.num_experts);
  if (per_lane <= 1) launch(std::integral_constant<int, 1>{});
  else if (per_lane <= 2) launch(std::integral_constant<int, 2>{});
  else if (per_lane <= 4) launch(std::integral_constant<int, 4>{});
  else if (per_lane <= 8) launch(std::integral_constant<int, 8>{});
  else launch(std::integral_constant<int, 16>{});
  EPX_CUDA_CHECK_LAUNCH(route_kernel);
}

}  // namespace epx
