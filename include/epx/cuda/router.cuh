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
#include <epx/cuda/launch.cuh>
#include <epx/cuda/nvtx.hpp>
#include <epx/cuda/router_lanes.hpp>
#include <epx/cuda/tuning.cuh>
#include <epx/router/router.hpp>

#include <algorithm>
#include <cfloat>
#include <climits>
#include <cstdint>

namespace epx {
namespace detail {

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
    int const first_expert = best.id * group_size;                   // a group is a run of consecutive experts
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      int const e = router_expert(lane, i);
      if (e >= first_expert && e < first_expert + group_size) expert_kept |= 1u << i;
    }
  }
  selectable &= expert_kept;
}

//! The route kernel's arguments.
template <class L>
struct RouteParams {
  L const* logits;  // [num_tokens, num_experts], ld apart
  std::int64_t ld;
  std::int64_t num_tokens;
  RouterConfig config;
  float const* bias;  // [num_experts] or nullptr
  std::int32_t* ids;  // [num_tokens, top_k], ld_ids apart
  std::int64_t ld_ids;
  float* weights;  // [num_tokens, top_k], ld_w apart
  std::int64_t ld_w;
  std::int32_t* tokens_per_expert;  // [num_experts] or nullptr
};

// The kernel's steps are the host's (host/router.hpp), one device function each, for one token per
// warp; register i of a lane holds expert router_expert(lane, i).

//! Step 1: the logits, and which experts may be chosen at all (not NaN, not -inf; +inf counts as
//! the largest finite float). Returns the selectable mask.
template <class L, int kPerLane>
__device__ __forceinline__ RouterLaneMask load_logits(RouteParams<L> const& p, std::int64_t t, int lane,
                                                      float (&logit)[kPerLane]) {
  RouterLaneMask selectable = 0;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    int const e = router_expert(lane, i);
    float l = e < p.config.num_experts ? device_to_float(p.logits[t * p.ld + e]) : -INFINITY;
    if (e < p.config.num_experts && !(isnan(l) || l == -INFINITY)) selectable |= 1u << i;
    if (l == INFINITY) l = FLT_MAX;
    logit[i] = l;
  }
  return selectable;
}

//! Step 2: scores (softmax over the selectable experts, the logit, or its sigmoid) and choice
//! values (score + bias); an expert whose choice is NaN becomes unselectable.
template <int kPerLane>
__device__ __forceinline__ void score_experts(RouterConfig const& config, float const* bias, int lane,
                                              float const (&logit)[kPerLane], float (&score)[kPerLane],
                                              float (&choice)[kPerLane], RouterLaneMask& selectable) {
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
    choice[i] = bias != nullptr && e < config.num_experts ? score[i] + bias[e] : score[i];
    if (isnan(choice[i])) selectable &= ~(1u << i);
  }
}

// Step 3, the group limit, is keep_groups above.

//! What step 4 leaves for step 5: the chosen slots (in their lanes' registers), and the running
//! max and slot-order sum of their scores, equal on every lane.
struct RouterChoice {
  RouterSlots slots;
  float max = -INFINITY;
  float sum = 0.0f;
  int count = 0;
};

//! Step 4: the top_k experts by choice, best first: each round the winner's lane retires it and
//! the slot's lane records it; slots left when nothing is selectable stay (-1, 0).
template <int kPerLane>
__device__ __forceinline__ RouterChoice choose_top_k(RouterConfig const& config, int lane,
                                                     float const (&choice)[kPerLane], float const (&score)[kPerLane],
                                                     RouterLaneMask selectable) {
  RouterChoice chosen;
  for (int j = 0; j < config.top_k; ++j) {
    RouterLaneBest const mine = router_lane_best<kPerLane>(lane, choice, score, selectable);
    RouterCandidate const best = warp_best(mine.candidate);
    if (best.id < 0) break;
    float const best_score = __shfl_sync(kRouterFullMask, mine.score, router_expert_lane(best.id));
    selectable = router_retire<kPerLane>(lane, best.id, selectable);
    chosen.slots.keep(lane, j, best.id, best_score);
    chosen.max = fmaxf(chosen.max, best_score);
    chosen.sum += best_score;
    ++chosen.count;
  }
  return chosen;
}

//! Step 5: the weights (kTopKSoftmax: softmax over the chosen; renormalised by their slot-order
//! sum; scaled), written with the ids, and the per-expert counts.
template <class L>
__device__ __forceinline__ void write_weights(RouteParams<L> const& p, std::int64_t t, int lane, RouterChoice& chosen) {
  RouterConfig const& config = p.config;
  RouterSlots& slots = chosen.slots;
  if (config.scoring == Scoring::kTopKSoftmax) {
#pragma unroll
    for (int r = 0; r < kRouterSlotRegisters; ++r)
      if (slots.id[r] >= 0) slots.weight[r] = expf(slots.weight[r] - chosen.max);
    float const sum = slot_order_sum(slots, chosen.count);
#pragma unroll
    for (int r = 0; r < kRouterSlotRegisters; ++r)
      if (slots.id[r] >= 0) slots.weight[r] /= sum;
    if (config.renormalize) chosen.sum = slot_order_sum(slots, chosen.count);
  }
#pragma unroll
  for (int r = 0; r < kRouterSlotRegisters; ++r) {
    int const j = router_slot(lane, r);
    if (j >= config.top_k) continue;
    float w = slots.weight[r];
    if (config.renormalize) w /= (chosen.sum + 1e-20f);
    p.ids[t * p.ld_ids + j] = slots.id[r];
    p.weights[t * p.ld_w + j] = w * config.routed_scaling_factor;
    if (p.tokens_per_expert != nullptr && slots.id[r] >= 0) atomicAdd(&p.tokens_per_expert[slots.id[r]], 1);
  }
}

//! One warp per token (blockDim.x / 32 tokens per block, at most kMaxRouterWarps). The dynamic
//! shared memory holds each warp's group stage (router_group_stage_words(kPerLane) floats) when the
//! configuration has groups, nothing otherwise.
template <class L, int kPerLane>
__global__ void __launch_bounds__(kMaxRouterWarps* kWarpLanes) route_kernel(RouteParams<L> const p) {
  extern __shared__ float router_stage[];
  int const warp = static_cast<int>(threadIdx.x) / kWarpLanes, lane = static_cast<int>(threadIdx.x) % kWarpLanes;
  std::int64_t const t = blockIdx.x * std::int64_t{blockDim.x / kWarpLanes} + warp;
  if (t >= p.num_tokens) return;  // whole warps only: nothing below synchronises the block
  float logit[kPerLane], score[kPerLane], choice[kPerLane];
  RouterLaneMask selectable = load_logits<L, kPerLane>(p, t, lane, logit);
  score_experts<kPerLane>(p.config, p.bias, lane, logit, score, choice, selectable);
  if (p.config.num_groups > 1)
    keep_groups<kPerLane>(router_stage + warp * router_group_stage_words(kPerLane), p.config, lane, choice, selectable);
  RouterChoice chosen = choose_top_k<kPerLane>(p.config, lane, choice, score, selectable);
  write_weights(p, t, lane, chosen);
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
  detail::CudaStream const s(stream, where);
  detail::require(config.num_experts <= detail::kMaxCudaRouterExperts, Errc::kUnsupported, where, "num_experts",
                  config.num_experts, fmt::format("<= {} on CUDA", detail::kMaxCudaRouterExperts));
  if (logits.rows == 0) return;
  auto const policy = detail::policy_for<detail::RouterPolicy>(detail::current_device_traits());
  int const warps = std::clamp(policy.warps_per_block, 1, detail::kMaxRouterWarps);
  auto const blocks = static_cast<unsigned>(ceil_div<std::int64_t>(logits.rows, warps));
  detail::RouteParams<Logit> const params{.logits = logits.data,
                                          .ld = logits.ld,
                                          .num_tokens = logits.rows,
                                          .config = config,
                                          .bias = correction_bias.empty() ? nullptr : correction_bias.data(),
                                          .ids = topk_ids.data,
                                          .ld_ids = topk_ids.ld,
                                          .weights = topk_weights.data,
                                          .ld_w = topk_weights.ld,
                                          .tokens_per_expert = tokens_per_expert};
  auto launch = [&]<int kPerLane>(std::integral_constant<int, kPerLane>) {
    std::size_t const stage_bytes =
        config.num_groups > 1
            ? static_cast<std::size_t>(warps) * detail::router_group_stage_words(kPerLane) * sizeof(float)
            : 0;
    detail::route_kernel<Logit, kPerLane><<<blocks, warps * detail::kWarpLanes, stage_bytes, s.get()>>>(params);
  };
  detail::with_router_registers(config.num_experts, launch);
  EPX_CUDA_CHECK_LAUNCH(route_kernel);
}

}  // namespace epx
