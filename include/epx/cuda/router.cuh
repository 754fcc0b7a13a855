// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! route on the GPU: one fused launch, one warp per token, every RouterConfig variant (semantics
//! on RouterConfig, as host/router.hpp). Each lane holds num_experts / 32 logits in registers;
//! softmax, group scores and the top-k are warp reductions; ties go to the lower expert id.
//! fp32 math from fp32 or bf16 logits; num_experts up to 512, top_k up to kMaxTopK.
//!
//! Equality with the host: ids are equal except where two experts' selection scores are equal to
//! within the last bits (the device's expf and reduction order differ from the host's in the
//! last ulp); weights agree to fp32 rounding.

#include <epx/core/math.hpp>
#include <epx/core/stream.hpp>
#include <epx/cuda/element.cuh>
#include <epx/cuda/error.hpp>
#include <epx/router/router.hpp>

#include <cfloat>
#include <cstdint>

namespace epx {
namespace detail {

struct RouterPolicy {
  int warps_per_block = 4;
};

inline constexpr int kMaxCudaRouterExperts = 512;

//! (value, id) pairs ordered by value descending, then id ascending; id -1 = nothing.
struct Candidate {
  float value;
  int id;
};

__device__ __forceinline__ bool better(Candidate a, Candidate b) {
  if (a.id < 0) return false;
  if (b.id < 0) return true;
  return a.value > b.value || (a.value == b.value && a.id < b.id);
}

__device__ __forceinline__ Candidate warp_best(Candidate c) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    Candidate const other{__shfl_xor_sync(0xffffffffu, c.value, offset), __shfl_xor_sync(0xffffffffu, c.id, offset)};
    if (better(other, c)) c = other;
  }
  return c;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// kPerLane experts per lane: expert e = lane + 32 * i.
template <class L, int kPerLane, int kWarps>
__global__ void __launch_bounds__(kWarps * 32) route_kernel(L const* __restrict__ logits, std::int64_t ld,
                                                            std::int64_t num_tokens, RouterConfig config,
                                                            float const* __restrict__ bias,
                                                            std::int32_t* __restrict__ ids, std::int64_t ld_ids,
                                                            float* __restrict__ weights, std::int64_t ld_w,
                                                            std::int32_t* __restrict__ tokens_per_expert) {
  __shared__ float s_choice[kWarps][kPerLane * 32];
  __shared__ unsigned char s_ok[kWarps][kPerLane * 32];
  int const warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  std::int64_t const t = blockIdx.x * std::int64_t{kWarps} + warp;
  if (t >= num_tokens) return;
  int const num_experts = config.num_experts;

  float logit[kPerLane], score[kPerLane];
  bool ok[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    int const e = lane + 32 * i;
    float l = e < num_experts ? device_to_float(logits[t * ld + e]) : -INFINITY;
    ok[i] = e < num_experts && !(isnan(l) || l == -INFINITY);
    if (l == INFINITY) l = FLT_MAX;
    logit[i] = l;
  }
  // Scores.
  if (config.scoring == Scoring::kSoftmaxTopK) {
    float m = -INFINITY;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i)
      if (ok[i]) m = fmaxf(m, logit[i]);
    m = warp_max(m);
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      score[i] = ok[i] ? expf(logit[i] - m) : 0.0f;
      s += score[i];
    }
    s = warp_sum(s);
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) score[i] = ok[i] ? score[i] / s : 0.0f;
  } else if (config.scoring == Scoring::kSigmoidTopK) {
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) score[i] = 1.0f / (1.0f + expf(-logit[i]));
  } else {
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) score[i] = logit[i];
  }
  float choice[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    int const e = lane + 32 * i;
    choice[i] = bias != nullptr && e < num_experts ? score[i] + bias[e] : score[i];
    if (isnan(choice[i])) ok[i] = false;
  }
  // Group-limited selection: a group's score is the sum of its two best choices.
  if (config.num_groups > 1) {
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      s_choice[warp][lane + 32 * i] = choice[i];
      s_ok[warp][lane + 32 * i] = ok[i];
    }
    __syncwarp();
    int const group_size = num_experts / config.num_groups;
    // Each lane scores groups lane, lane + 32, ...; then topk_groups rounds of warp argmax.
    __shared__ unsigned char s_kept[kWarps][kPerLane * 32];  // num_groups <= num_experts <= kPerLane * 32
    for (int g = lane; g < config.num_groups; g += 32) s_kept[warp][g] = 0;
    __syncwarp();
    for (int round = 0; round < config.topk_groups; ++round) {
      Candidate best{0.0f, -1};
      for (int g = lane; g < config.num_groups; g += 32) {
        if (s_kept[warp][g]) continue;
        float first = -INFINITY, second = -INFINITY;
        int found = 0;
        for (int e = g * group_size; e < (g + 1) * group_size; ++e) {
          if (!s_ok[warp][e]) continue;
          ++found;
          float const c = s_choice[warp][e];
          if (c > first) {
            second = first;
            first = c;
          } else if (c > second) {
            second = c;
          }
        }
        if (found == 0) continue;  // a group with nothing selectable is never kept
        Candidate const mine{found == 1 ? first : first + second, g};
        if (better(mine, best)) best = mine;
      }
      best = warp_best(best);
      if (best.id < 0) break;
      if (lane == 0) s_kept[warp][best.id] = 1;
      __syncwarp();
    }
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      int const e = lane + 32 * i;
      if (e < num_experts && !s_kept[warp][e / group_size]) ok[i] = false;
    }
  }
  // Top-k, best first; the winner's lane retires it. Lane 0 keeps the slots.
  float chosen_score[kMaxTopK];
  int chosen_id[kMaxTopK];
  int const top_k = config.top_k;
  for (int j = 0; j < top_k; ++j) {
    Candidate mine{0.0f, -1};
    float mine_score = 0.0f;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      Candidate const c{choice[i], ok[i] ? lane + 32 * i : -1};
      if (better(c, mine)) {
        mine = c;
        mine_score = score[i];
      }
    }
    Candidate const best = warp_best(mine);
    int const owner = best.id >= 0 ? best.id % 32 : 0;
    float const best_score = __shfl_sync(0xffffffffu, mine_score, owner);
#pragma unroll
    for (int i = 0; i < kPerLane; ++i)
      if (lane + 32 * i == best.id) ok[i] = false;
    chosen_id[j] = best.id;
    chosen_score[j] = best.id >= 0 ? best_score : 0.0f;
  }
  if (lane != 0) return;
  // Weights, in slot order as on the host.
  if (config.scoring == Scoring::kTopKSoftmax) {
    float m = -INFINITY;
    for (int j = 0; j < top_k; ++j)
      if (chosen_id[j] >= 0) m = fmaxf(m, chosen_score[j]);
    float s = 0.0f;
    for (int j = 0; j < top_k; ++j) {
      if (chosen_id[j] < 0) continue;
      chosen_score[j] = expf(chosen_score[j] - m);
      s += chosen_score[j];
    }
    for (int j = 0; j < top_k; ++j)
      if (chosen_id[j] >= 0) chosen_score[j] /= s;
  }
  if (config.renormalize) {
    float s = 0.0f;
    for (int j = 0; j < top_k; ++j) s += chosen_score[j];
    for (int j = 0; j < top_k; ++j) chosen_score[j] /= (s + 1e-20f);
  }
  for (int j = 0; j < top_k; ++j) {
    ids[t * ld_ids + j] = chosen_id[j];
    weights[t * ld_w + j] = chosen_score[j] * config.routed_scaling_factor;
    if (tokens_per_expert != nullptr && chosen_id[j] >= 0) atomicAdd(&tokens_per_expert[chosen_id[j]], 1);
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
  constexpr int kWarps = 4;
  auto const blocks = static_cast<unsigned>(ceil_div<std::int64_t>(logits.rows, kWarps));
  float const* bias = correction_bias.empty() ? nullptr : correction_bias.data();
  auto launch = [&]<int kPerLane>(std::integral_constant<int, kPerLane>) {
    detail::route_kernel<Logit, kPerLane, kWarps><<<blocks, kWarps * 32, 0, s>>>(
        logits.data, logits.ld, logits.rows, config, bias, topk_ids.data, topk_ids.ld, topk_weights.data,
        topk_weights.ld, tokens_per_expert);
  };
  int const per_lane = ceil_div(config.num_experts, 32);
  if (per_lane <= 1) launch(std::integral_constant<int, 1>{});
  else if (per_lane <= 2) launch(std::integral_constant<int, 2>{});
  else if (per_lane <= 4) launch(std::integral_constant<int, 4>{});
  else if (per_lane <= 8) launch(std::integral_constant<int, 8>{});
  else launch(std::integral_constant<int, 16>{});
  EPX_CUDA_CHECK_LAUNCH(route_kernel);
}

}  // namespace epx
