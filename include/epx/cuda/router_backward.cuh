// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! route_backward on the GPU: the twin of host/router_backward.hpp (semantics, ties and the math
//! are documented there), one fused launch, one warp per token in route()'s layout
//! (router_lanes.hpp: expert e in lane e % 32, register e / 32; slot j in lane j % 32, register
//! j / 32). Every scoring, renormalize, routed_scaling_factor; the group limit and the correction
//! bias act only through the ids, as on the Host.
//!
//! Math in double, as the Host's, rounded once to float. The reductions over a token (the softmax
//! max and denominator, the slot sums of renormalize and of the softmax's dot product) are fixed
//! xor-butterfly trees over the warp, not the Host's sequential order, and the device's exp is not
//! glibc's: both differ from the Host in the last bits of the double, so d_logits agrees with the
//! Host's to about one float ulp (the test's bound: 2 ulp of the value plus 2^-40 of the row's
//! largest gradient, for cancellations). No atomics on floating point: bitwise deterministic.
//!
//! **Invalid ids.** The Host throws for an id outside [0, num_experts) other than -1, an id repeated
//! within a token, or the id of an unselectable expert (NaN or -inf logit): route() never writes
//! them. A kernel cannot throw, so here such a token is *rejected*: its whole d_logits row is
//! written 0, and it is counted in the caller's device Status (make_plan's convention):
//! `invalid_ids` += its out-of-range ids, `dropped_slots` += its slots that named anything other
//! than -1 (in range or not). Status::ok() is false after any rejected token. Only integer atomics
//! touch the Status (one per rejected token), so it too is deterministic.

#include <epx/core/math.hpp>
#include <epx/core/status.hpp>
#include <epx/core/stream.hpp>
#include <epx/cuda/element.cuh>
#include <epx/cuda/error.hpp>
#include <epx/cuda/launch.cuh>
#include <epx/cuda/nvtx.hpp>
#include <epx/cuda/router.cuh>
#include <epx/cuda/router_lanes.hpp>
#include <epx/cuda/tuning.cuh>
#include <epx/router/route_backward_args.hpp>
#include <epx/router/router.hpp>

#include <algorithm>
#include <cfloat>
#include <cstdint>
#include <type_traits>

namespace epx {
namespace nvtx {
//! route_backward: the router logits' gradient.
struct RouteBackward {
  static constexpr char const* message = "route_backward";
};
}  // namespace nvtx

namespace detail {

inline constexpr unsigned kBackwardFullMask = 0xffffffffu;

__device__ __forceinline__ double warp_sum_double(double v) {
  return warp_butterfly(
      v, [](double x, int offset) { return __shfl_xor_sync(kBackwardFullMask, x, offset); },
      [](double a, double b) { return a + b; });
}

__device__ __forceinline__ double warp_max_double(double v) {
  return warp_butterfly(
      v, [](double x, int offset) { return __shfl_xor_sync(kBackwardFullMask, x, offset); },
      [](double a, double b) { return fmax(a, b); });
}

__device__ __forceinline__ int warp_sum_int(int v) {
  return warp_butterfly(
      v, [](int x, int offset) { return __shfl_xor_sync(kBackwardFullMask, x, offset); },
      [](int a, int b) { return a + b; });
}

//! A logit as route() reads it: selectable unless NaN or -inf; +inf as the largest finite float.
template <class L>
__device__ __forceinline__ float backward_logit(L v, bool& selectable) {
  float l = device_to_float(v);
  selectable = !(isnan(l) || l == -INFINITY);
  if (l == INFINITY) l = FLT_MAX;
  return l;
}

//! The route_backward kernel's arguments.
template <class L>
struct RouteBackwardParams {
  L const* logits;  // [num_tokens, num_experts], ld apart
  std::int64_t ld;
  std::int64_t num_tokens;
  RouterConfig config;
  std::int32_t const* ids;  // [num_tokens, top_k], ld_ids apart
  std::int64_t ld_ids;
  float const* d_weights;  // [num_tokens, top_k], ld_dw apart
  std::int64_t ld_dw;
  float* d_logits;  // [num_tokens, num_experts], ld_d apart
  std::int64_t ld_d;
  Status* status;
};

//! One warp per token (blockDim.x / 32 tokens per block). The Host's steps 1-5, each a few lines:
//! slots in their lanes, experts in theirs; each slot's value is broadcast once to its expert's
//! owner, which also finds repeated ids; the owners write the row.
template <class L, int kPerLane>
__global__ void __launch_bounds__(kMaxRouterWarps* kWarpLanes) route_backward_kernel(RouteBackwardParams<L> const p) {
  int const warp = static_cast<int>(threadIdx.x) / kWarpLanes, lane = static_cast<int>(threadIdx.x) % kWarpLanes;
  std::int64_t const t = blockIdx.x * std::int64_t{blockDim.x / kWarpLanes} + warp;
  if (t >= p.num_tokens) return;  // whole warps only: the shuffles below involve one warp each
  RouterConfig const& c = p.config;
  int const num_experts = c.num_experts, top_k = c.top_k;
  L const* const logits = p.logits + t * p.ld;

  // 1. This lane's slots: id (-1 when empty or rejected), logit, scaled gradient; what is wrong.
  int id[kRouterSlotRegisters];
  double slot_logit[kRouterSlotRegisters], d_weight[kRouterSlotRegisters], weight[kRouterSlotRegisters];
  bool bad = false;
  int out_of_range = 0, named = 0;
  double const scale = static_cast<double>(c.routed_scaling_factor);
#pragma unroll
  for (int r = 0; r < kRouterSlotRegisters; ++r) {
    id[r] = -1;
    slot_logit[r] = 0.0;
    d_weight[r] = 0.0;
    weight[r] = 0.0;
    int const j = router_slot(lane, r);
    if (j >= top_k) continue;
    std::int32_t const v = p.ids[t * p.ld_ids + j];
    BackwardSlot const kind = backward_slot(v, num_experts);
    if (kind == BackwardSlot::kEmpty) continue;
    ++named;
    if (kind == BackwardSlot::kOutOfRange) {
      ++out_of_range;
      bad = true;
      continue;
    }
    bool selectable = false;
    float const l = backward_logit(logits[v], selectable);
    if (!selectable) {  // route() never chooses it
      bad = true;
      continue;
    }
    id[r] = v;
    slot_logit[r] = static_cast<double>(l);
    d_weight[r] = scale * static_cast<double>(p.d_weights[t * p.ld_dw + j]);
  }

  // 2. This lane's experts as route() reads them (unselectable ones as 0).
  float logit[kPerLane];
  RouterLaneMask selectable = 0;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    int const e = router_expert(lane, i);
    bool ok = false;
    float const l = e < num_experts ? backward_logit(logits[e], ok) : 0.0f;
    logit[i] = ok ? l : 0.0f;
    if (ok) selectable |= 1u << i;
  }

  // 3. The forward's weights before renormalize and scaling.
  double max_logit = -INFINITY, sum = 0.0;
  if (c.scoring == Scoring::kSoftmaxTopK) {
#pragma unroll
    for (int i = 0; i < kPerLane; ++i)
      if (router_has<kPerLane>(selectable, i)) max_logit = fmax(max_logit, static_cast<double>(logit[i]));
    max_logit = warp_max_double(max_logit);
#pragma unroll
    for (int i = 0; i < kPerLane; ++i)
      if (router_has<kPerLane>(selectable, i)) sum += exp(static_cast<double>(logit[i]) - max_logit);
    sum = warp_sum_double(sum);
#pragma unroll
    for (int r = 0; r < kRouterSlotRegisters; ++r)
      if (id[r] >= 0) weight[r] = exp(slot_logit[r] - max_logit) / sum;
  } else if (c.scoring == Scoring::kSigmoidTopK) {
#pragma unroll
    for (int r = 0; r < kRouterSlotRegisters; ++r)
      if (id[r] >= 0) weight[r] = 1.0 / (1.0 + exp(-slot_logit[r]));
  } else {
    double m = -INFINITY, s = 0.0;
#pragma unroll
    for (int r = 0; r < kRouterSlotRegisters; ++r)
      if (id[r] >= 0) m = fmax(m, slot_logit[r]);
    m = warp_max_double(m);
#pragma unroll
    for (int r = 0; r < kRouterSlotRegisters; ++r)
      if (id[r] >= 0) {
        weight[r] = exp(slot_logit[r] - m);
        s += weight[r];
      }
    s = warp_sum_double(s);
#pragma unroll
    for (int r = 0; r < kRouterSlotRegisters; ++r)
      if (id[r] >= 0) weight[r] /= s;
  }

  // 4. Back through routed_scaling_factor (in d_weight already) and renormalize.
  if (c.renormalize) {
    double s = 0.0, dot = 0.0;
#pragma unroll
    for (int r = 0; r < kRouterSlotRegisters; ++r) {
      s += weight[r];
      dot += d_weight[r] * weight[r];
    }
    s = warp_sum_double(s) + 1e-20;
    dot = warp_sum_double(dot);
#pragma unroll
    for (int r = 0; r < kRouterSlotRegisters; ++r)
      if (id[r] >= 0) d_weight[r] = (d_weight[r] - dot / s) / s;
  }

  // 5. Back through the scoring: each slot's value for its expert's owner (softmax: dp, the
  //    owner forms p · (dp - dot) for every selectable expert; otherwise the logit's gradient).
  double dot = 0.0;
  if (c.scoring != Scoring::kSigmoidTopK) {
#pragma unroll
    for (int r = 0; r < kRouterSlotRegisters; ++r) dot += d_weight[r] * weight[r];
    dot = warp_sum_double(dot);
  }
  double value[kRouterSlotRegisters];
#pragma unroll
  for (int r = 0; r < kRouterSlotRegisters; ++r)
    value[r] = c.scoring == Scoring::kSoftmaxTopK   ? d_weight[r]
               : c.scoring == Scoring::kSigmoidTopK ? d_weight[r] * weight[r] * (1.0 - weight[r])
                                                    : weight[r] * (d_weight[r] - dot);

  double mine[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) mine[i] = 0.0;
  BackwardChosen chosen;
  for (int j = 0; j < top_k; ++j) {
    bool const high = router_slot_register(j) == 1;
    int const e = __shfl_sync(kBackwardFullMask, high ? id[1] : id[0], router_slot_lane(j));
    double const v = __shfl_sync(kBackwardFullMask, high ? value[1] : value[0], router_slot_lane(j));
    if (e < 0) continue;  // the same on every lane
    if (backward_mark_chosen(lane, e, chosen)) {
#pragma unroll
      for (int i = 0; i < kPerLane; ++i)
        if (i == router_expert_register(e)) mine[i] = v;
    }
  }
  bad = __any_sync(kBackwardFullMask, bad || chosen.repeated);

  float* const row = p.d_logits + t * p.ld_d;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    int const e = router_expert(lane, i);
    if (e >= num_experts) continue;
    double g = 0.0;
    if (!bad) {
      if (c.scoring == Scoring::kSoftmaxTopK) {
        if (router_has<kPerLane>(selectable, i)) {
          double const prob = exp(static_cast<double>(logit[i]) - max_logit) / sum;
          g = prob * (mine[i] - dot);
        }
      } else if (router_has<kPerLane>(chosen.mask, i)) {
        g = mine[i];
      }
    }
    row[e] = static_cast<float>(g);
  }
  if (bad) {
    int const invalid = warp_sum_int(out_of_range), dropped = warp_sum_int(named);
    BackwardRejected const rejected = backward_rejected(invalid, dropped, true);
    if (lane == 0) {
      if (rejected.invalid_ids != 0)
        atomicAdd(reinterpret_cast<unsigned long long*>(&p.status->invalid_ids),
                  static_cast<unsigned long long>(rejected.invalid_ids));
      if (rejected.dropped_slots != 0)
        atomicAdd(reinterpret_cast<unsigned long long*>(&p.status->dropped_slots),
                  static_cast<unsigned long long>(rejected.dropped_slots));
    }
  }
}

}  // namespace detail

//! @brief route_backward on the GPU (semantics: host/router_backward.hpp; equality with the Host
//! and invalid ids: this header's note).
//! @param[in]  stream          the caller's stream; nothing syncs, no workspace
//! @param[in]  config          the forward's RouterConfig (num_experts <= 512 on CUDA)
//! @param[in]  logits          [num_tokens, num_experts] device memory, fp32 or bf16: the forward's
//! @param[in]  topk_ids        [num_tokens, top_k] device memory: what route() wrote for them
//! @param[in]  d_topk_weights  [num_tokens, top_k] device memory (ignored at -1 slots)
//! @param[out] d_logits        [num_tokens, num_experts] device memory, fp32: **written** (every
//!                             element; 0 where no gradient flows and in rejected tokens' rows)
//! @param[in,out] status       device memory: invalid_ids and dropped_slots are added to for
//!                             rejected tokens (zero it first for per-call counts)
//! Errors (thrown before any launch): the shapes and config (as the Host's), num_experts > 512
//! (Errc::kUnsupported), a host StreamRef, a null status.
template <class L>
requires detail::router_logit<L>
void route_backward(StreamRef stream, RouterConfig const& config, MatrixView<L> logits_in,
                    MatrixView<std::int32_t const> topk_ids, MatrixView<float const> d_topk_weights,
                    MatrixView<float> d_logits, Status* status) {
  EPX_NVTX_RANGE(RouteBackward);
  using Logit = std::remove_const_t<L>;
  constexpr std::string_view where = "route_backward";
  MatrixView<Logit const> const logits(logits_in);
  detail::check_route_backward_args(config, logits, topk_ids, d_topk_weights, d_logits);
  detail::CudaStream const s(stream, where);
  detail::require(config.num_experts <= detail::kMaxCudaRouterExperts, Errc::kUnsupported, where, "num_experts",
                  config.num_experts, fmt::format("<= {} on CUDA", detail::kMaxCudaRouterExperts));
  detail::require(status != nullptr, Errc::kInvalidArgument, where, "status", "nullptr",
                  "a device pointer to an epx::Status");
  if (logits.rows == 0) return;
  auto const policy = detail::policy_for<detail::RouterPolicy>(detail::current_device_traits());
  int const warps = std::clamp(policy.warps_per_block, 1, detail::kMaxRouterWarps);
  auto const blocks = static_cast<unsigned>(ceil_div<std::int64_t>(logits.rows, warps));
  detail::RouteBackwardParams<Logit> const params{.logits = logits.data,
                                                  .ld = logits.ld,
                                                  .num_tokens = logits.rows,
                                                  .config = config,
                                                  .ids = topk_ids.data,
                                                  .ld_ids = topk_ids.ld,
                                                  .d_weights = d_topk_weights.data,
                                                  .ld_dw = d_topk_weights.ld,
                                                  .d_logits = d_logits.data,
                                                  .ld_d = d_logits.ld,
                                                  .status = status};
  auto launch = [&]<int kPerLane>(std::integral_constant<int, kPerLane>) {
    detail::route_backward_kernel<Logit, kPerLane><<<blocks, warps * detail::kWarpLanes, 0, s.get()>>>(params);
  };
  detail::with_router_registers(config.num_experts, launch);
  EPX_CUDA_CHECK_LAUNCH(route_backward_kernel);
}

}  // namespace epx
