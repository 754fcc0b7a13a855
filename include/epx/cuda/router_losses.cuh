// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! Router losses and statistics on the GPU: router_losses and expert_token_counts, the twins of
//! host/router_losses.hpp's (semantics and sources: router/losses.hpp).
//!
//! router_losses: four launches on the caller's stream, nothing allocated, no host sync (graph
//! capturable). Math in double as the Host's, with the Host's formulas (router/losses.hpp's
//! router_balance_value, router_loss_prob_gradient, router_loss_backprop, router_z_gradient):
//!   1. token kernel, one warp per token in route()'s layout (router_lanes.hpp): logsumexp, the
//!      probabilities p (softmax or normalised sigmoid) into the workspace, lse² per token, and
//!      the slots counted per (sequence, expert) with integer atomics (exact);
//!   2. sequence kernel: per (sequence, expert) the sum of p over the sequence's tokens in a fixed
//!      order (router_loss_stripe_sum);
//!   3. values kernel, one block: per expert the sums over the sequences in sequence order (as
//!      the Host), per sequence its balance loss, the z-loss sum, each in a fixed order; the values;
//!   4. gradient kernel, one warp per token (skipped when every coefficient is 0): dL/dp through
//!      p, plus the z-loss's term, rounded once to float and added to d_logits.
//! No floating-point atomics: bitwise deterministic run to run. The sums over a token (max,
//! denominators, the backprop's dot product) are xor butterflies over the warp and the z-loss and
//! sequence_aux sums fixed trees, not the Host's sequential order, and the device's exp/log are
//! not glibc's: the values agree with the Host's to ~1e-15 relative, d_logits to a float ulp (plus
//! cancellation in p · (g - dot), as for route_backward).
//!
//! **Invalid input found on the device** (the Host throws for all three) is counted in the
//! caller's Status as route_backward and make_plan count (`invalid_ids` also in `dropped_slots`),
//! and the values are then unspecified but finite; nothing is read or written out of bounds:
//! - an id outside [0, num_experts) other than -1: counted nowhere (as -1), `invalid_ids` += 1 and
//!   `dropped_slots` += 1; the rest is computed as the Host computes it with that id -1;
//! - a token with a non-finite logit: its probabilities and lse² count as 0, its ids are counted
//!   nowhere (as -1), its d_logits row is left as it was, and `dropped_slots` += its slots that
//!   named an expert in [0, num_experts) (none of its (token, slot) pairs was computed). The
//!   other tokens' gradients are the Host's with that token's ids -1 (a token's gradient depends
//!   on the others' ids only, not on their logits);
//! - sequence_offsets that check_sequence_offsets would refuse: they are clamped into
//!   [0, num_tokens] (router_loss_sequence_range) for the values, `dropped_slots` +=
//!   num_tokens · top_k, and d_logits is left as it was (no gradient at all).
//! Status::ok() is false after any of them.
//!
//! expert_token_counts: integer atomics only: the counts are exact and the same run to run.

#include <epx/core/math.hpp>
#include <epx/core/status.hpp>
#include <epx/core/stream.hpp>
#include <epx/core/workspace.hpp>
#include <epx/cuda/element.cuh>
#include <epx/cuda/error.hpp>
#include <epx/cuda/launch.cuh>
#include <epx/cuda/nvtx.hpp>
#include <epx/cuda/router.cuh>
#include <epx/cuda/router_backward.cuh>
#include <epx/cuda/router_lanes.hpp>
#include <epx/cuda/tuning.cuh>
#include <epx/router/losses.hpp>
#include <epx/router/router.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <type_traits>

namespace epx {
namespace nvtx {
//! expert_token_counts: slots per expert.
struct ExpertTokenCounts {
  static constexpr char const* message = "expert_token_counts";
};
//! router_losses: the router losses' values and their gradient added to d_logits.
struct RouterLosses {
  static constexpr char const* message = "router_losses";
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

// ---- router_losses ----

//! router_losses' workspace: per token its probabilities [num_tokens, num_experts] and lse²
//! [num_tokens]; per (sequence, expert) the slot counts and the probability sums
//! [num_sequences, num_experts]; per expert the counts and probability sums over all tokens; the
//! number of non-empty sequences.
struct CudaRouterLossParts {
  std::span<double> prob;
  std::span<double> z;
  std::span<unsigned long long> seq_count;
  std::span<double> seq_prob;
  std::span<double> count;
  std::span<double> prob_sum;
  std::span<double> non_empty;
};

template <class Carver>
CudaRouterLossParts carve_router_losses(Carver& c, std::int32_t num_experts, std::int64_t num_tokens,
                                        std::int64_t num_sequences) {
  auto const e = static_cast<std::size_t>(num_experts);
  auto const t = static_cast<std::size_t>(num_tokens);
  auto const s = static_cast<std::size_t>(num_sequences);
  CudaRouterLossParts parts;
  parts.prob = c.template take<double>(t * e);
  parts.z = c.template take<double>(t);
  parts.seq_count = c.template take<unsigned long long>(s * e);
  parts.seq_prob = c.template take<double>(s * e);
  parts.count = c.template take<double>(e);
  parts.prob_sum = c.template take<double>(e);
  parts.non_empty = c.template take<double>(1);
  return parts;
}

//! The workspace's parts as the kernels take them (device pointers).
struct RouterLossScratch {
  double* prob;
  double* z;
  unsigned long long* seq_count;
  double* seq_prob;
  double* count;
  double* prob_sum;
  double* non_empty;
};

inline RouterLossScratch router_loss_scratch(CudaRouterLossParts const& parts) {
  return {parts.prob.data(),  parts.z.data(),        parts.seq_count.data(), parts.seq_prob.data(),
          parts.count.data(), parts.prob_sum.data(), parts.non_empty.data()};
}

//! The router_losses kernels' arguments.
template <class L>
struct RouterLossParams {
  L const* logits;  // [num_tokens, num_experts], ld apart
  std::int64_t ld;
  std::int64_t num_tokens;
  std::int32_t num_experts;
  std::int32_t top_k;
  bool sigmoid;             // Scoring::kSigmoidTopK: p = s / sum(s); softmax otherwise
  std::int32_t const* ids;  // [num_tokens, top_k], ld_ids apart
  std::int64_t ld_ids;
  std::int64_t const* offsets;  // [num_sequences + 1] or nullptr (one sequence)
  std::int64_t num_sequences;
  double lb, seq, z;  // the coefficients
  RouterLossScratch ws;
  float* d_logits;  // [num_tokens, num_experts], ld_d apart
  std::int64_t ld_d;
  RouterLossValues* values;
  Status* status;
};

//! One token's quantities in route()'s layout (expert router_expert(lane, i) in register i):
//! exp(logit - max) and sigmoid(logit) (0 past num_experts), their warp-wide sums, logsumexp.
template <int kPerLane>
struct LossToken {
  double ex[kPerLane];
  double sig[kPerLane];
  double ex_sum = 0.0, sig_sum = 0.0, lse = 0.0;
  bool finite = true;  // every logit of the token finite (the same on every lane)

  [[nodiscard]] __device__ double softmax(int i) const { return ex[i] / ex_sum; }
  [[nodiscard]] __device__ double prob(bool sigmoid, int i) const { return sigmoid ? sig[i] / sig_sum : softmax(i); }
};

//! Reads token row `row` and fills `tok` (the Host's TokenProbabilities::compute, in double; the
//! sums are warp butterflies). Every lane of the warp calls it; nothing else when !tok.finite.
template <class L, int kPerLane>
__device__ __forceinline__ void loss_token(L const* __restrict__ row, int num_experts, int lane, bool sigmoid,
                                           LossToken<kPerLane>& tok) {
  float logit[kPerLane];
  bool finite = true;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    int const e = router_expert(lane, i);
    logit[i] = e < num_experts ? device_to_float(row[e]) : 0.0f;
    finite = finite && isfinite(logit[i]);
  }
  tok.finite = __all_sync(kBackwardFullMask, finite);
  if (!tok.finite) return;
  double max_logit = -INFINITY;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i)
    if (router_expert(lane, i) < num_experts) max_logit = fmax(max_logit, static_cast<double>(logit[i]));
  max_logit = warp_max_double(max_logit);
  double ex_sum = 0.0, sig_sum = 0.0;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    bool const here = router_expert(lane, i) < num_experts;
    double const l = static_cast<double>(logit[i]);
    tok.ex[i] = here ? exp(l - max_logit) : 0.0;
    tok.sig[i] = here && sigmoid ? 1.0 / (1.0 + exp(-l)) : 0.0;
    ex_sum += tok.ex[i];
    sig_sum += tok.sig[i];
  }
  tok.ex_sum = warp_sum_double(ex_sum);
  tok.sig_sum = sigmoid ? warp_sum_double(sig_sum) : 0.0;
  tok.lse = max_logit + log(tok.ex_sum);
}

//! Pass 1, one warp per token: p and lse² into the workspace, slots counted per (sequence,
//! expert); invalid ids and non-finite tokens counted in Status.
template <class L, int kPerLane>
__global__ void __launch_bounds__(kMaxRouterWarps* kWarpLanes) router_loss_token_kernel(RouterLossParams<L> const p) {
  int const warp = static_cast<int>(threadIdx.x) / kWarpLanes, lane = static_cast<int>(threadIdx.x) % kWarpLanes;
  std::int64_t const t = blockIdx.x * std::int64_t{blockDim.x / kWarpLanes} + warp;
  if (t >= p.num_tokens) return;  // whole warps only
  int const num_experts = p.num_experts;
  std::int64_t const s = router_loss_sequence(p.offsets, p.num_sequences, t);

  LossToken<kPerLane> tok;
  loss_token<L, kPerLane>(p.logits + t * p.ld, num_experts, lane, p.sigmoid, tok);
  double* const prob = p.ws.prob + t * num_experts;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    int const e = router_expert(lane, i);
    if (e < num_experts) prob[e] = tok.finite ? tok.prob(p.sigmoid, i) : 0.0;
  }
  if (lane == 0) p.ws.z[t] = tok.finite ? tok.lse * tok.lse : 0.0;

  // Slots counted per (sequence, expert); a non-finite token's are dropped (counted nowhere).
  int invalid = 0, dropped = 0;
  unsigned long long* const counts = p.ws.seq_count + s * num_experts;
#pragma unroll
  for (int r = 0; r < kRouterSlotRegisters; ++r) {
    int const j = router_slot(lane, r);
    if (j >= p.top_k) continue;
    std::int32_t const id = p.ids[t * p.ld_ids + j];
    BackwardSlot const kind = backward_slot(id, num_experts);
    if (kind == BackwardSlot::kExpert) {
      if (tok.finite)
        atomicAdd(&counts[id], 1ull);
      else
        ++dropped;
    } else if (kind == BackwardSlot::kOutOfRange) {
      ++invalid;
    }
  }
  invalid = warp_sum_int(invalid);
  dropped = warp_sum_int(dropped) + invalid;  // an invalid id is a dropped slot too
  if (lane == 0) {
    if (invalid != 0)
      atomicAdd(reinterpret_cast<unsigned long long*>(&p.status->invalid_ids),
                static_cast<unsigned long long>(invalid));
    if (dropped != 0)
      atomicAdd(reinterpret_cast<unsigned long long*>(&p.status->dropped_slots),
                static_cast<unsigned long long>(dropped));
  }
}

//! Pass 2: block (32, kRouterLossStripes) per (sequence, 32 experts), grid-striding over them;
//! lane x sums expert 32·tile + x over the sequence in router_loss_stripe_sum's order.
template <class L>
__global__ void __launch_bounds__(kWarpLanes* kRouterLossStripes)
    router_loss_sequence_kernel(RouterLossParams<L> const p) {
  __shared__ double stripes[kRouterLossStripes][kWarpLanes];
  int const x = static_cast<int>(threadIdx.x), y = static_cast<int>(threadIdx.y);
  std::int64_t const tiles = ceil_div<std::int64_t>(p.num_experts, kWarpLanes);
  std::int64_t const items = p.num_sequences * tiles;
  double const* const prob = p.ws.prob;
  for (std::int64_t item = blockIdx.x; item < items; item += gridDim.x) {  // the same for the whole block
    std::int64_t const s = item / tiles;
    std::int64_t const e = (item - s * tiles) * kWarpLanes + x;
    RouterLossTokenRange const range = router_loss_sequence_range(p.offsets, p.num_tokens, s);
    double sum = 0.0;
    if (e < p.num_experts)
      sum = router_loss_stripe_sum(range, y, [&](std::int64_t t) { return prob[t * p.num_experts + e]; });
    stripes[y][x] = sum;
    __syncthreads();
    if (y == 0 && e < p.num_experts) {
      double total = 0.0;
#pragma unroll
      for (int r = 0; r < kRouterLossStripes; ++r) total += stripes[r][x];
      p.ws.seq_prob[s * p.num_experts + e] = total;
    }
    __syncthreads();  // stripes is reused by the next item
  }
}

//! v[0] = the sum of v[0, kRouterLossValueThreads) in the fixed tree of router/losses.hpp. Every
//! thread of the block calls it.
template <class T>
__device__ __forceinline__ T loss_block_tree(T* v) {
  for (int h = kRouterLossValueThreads / 2; h > 0; h /= 2) {
    __syncthreads();
    if (static_cast<int>(threadIdx.x) < h) v[threadIdx.x] += v[threadIdx.x + h];
  }
  __syncthreads();
  return v[0];
}

//! Pass 3, one block of kRouterLossValueThreads: per expert the counts and probability sums over
//! the sequences (sequence order, as the Host); per sequence its balance loss; the values.
template <class L>
__global__ void __launch_bounds__(kRouterLossValueThreads) router_loss_values_kernel(RouterLossParams<L> const p) {
  __shared__ double seq_sums[kRouterLossValueThreads];
  __shared__ double z_sums[kRouterLossValueThreads];
  __shared__ unsigned long long counters[2][kRouterLossValueThreads];  // non-empty sequences, bad offsets
  int const tid = static_cast<int>(threadIdx.x);
  std::int64_t const num_experts = p.num_experts, num_sequences = p.num_sequences;
  double const experts = static_cast<double>(p.num_experts), slots_per_token = static_cast<double>(p.top_k);
  unsigned long long const* const seq_count = p.ws.seq_count;
  double const* const seq_prob = p.ws.seq_prob;

  for (std::int64_t e = tid; e < num_experts; e += kRouterLossValueThreads) {
    unsigned long long c = 0;
    double sum = 0.0;
    for (std::int64_t s = 0; s < num_sequences; ++s) {
      c += seq_count[s * num_experts + e];
      sum += seq_prob[s * num_experts + e];
    }
    p.ws.count[e] = static_cast<double>(c);
    p.ws.prob_sum[e] = sum;
  }
  double seq_sum = 0.0, z_sum = 0.0;
  unsigned long long non_empty = 0, bad_offsets = 0;
  for (std::int64_t s = tid; s < num_sequences; s += kRouterLossValueThreads) {
    RouterLossTokenRange const range = router_loss_sequence_range(p.offsets, p.num_tokens, s);
    if (range.end == range.begin) continue;
    double acc = 0.0;
    for (std::int64_t e = 0; e < num_experts; ++e)
      acc += static_cast<double>(seq_count[s * num_experts + e]) * seq_prob[s * num_experts + e];
    seq_sum += router_balance_value(experts, acc, static_cast<double>(range.end - range.begin), slots_per_token);
    ++non_empty;
  }
  if (p.offsets != nullptr)
    for (std::int64_t i = tid; i <= num_sequences; i += kRouterLossValueThreads)
      bad_offsets += router_loss_offset_ok(p.offsets, num_sequences, p.num_tokens, i) ? 0 : 1;
  for (std::int64_t t = tid; t < p.num_tokens; t += kRouterLossValueThreads) z_sum += p.ws.z[t];
  seq_sums[tid] = seq_sum;
  z_sums[tid] = z_sum;
  counters[0][tid] = non_empty;
  counters[1][tid] = bad_offsets;
  seq_sum = loss_block_tree(seq_sums);
  z_sum = loss_block_tree(z_sums);
  non_empty = loss_block_tree(counters[0]);
  bad_offsets = loss_block_tree(counters[1]);  // its barriers also publish count and prob_sum
  if (tid != 0) return;
  double acc = 0.0;
  for (std::int64_t e = 0; e < num_experts; ++e) acc += p.ws.count[e] * p.ws.prob_sum[e];
  auto const n_all = static_cast<double>(p.num_tokens);
  RouterLossValues v;
  v.load_balancing = router_balance_value(experts, acc, n_all, slots_per_token);
  v.sequence_aux = non_empty != 0 ? seq_sum / static_cast<double>(non_empty) : 0.0;  // 0: bad offsets only
  v.z_loss = z_sum / n_all;
  v.total = p.lb * v.load_balancing + p.seq * v.sequence_aux + p.z * v.z_loss;
  *p.values = v;
  p.ws.non_empty[0] = bad_offsets != 0 ? 0.0 : static_cast<double>(non_empty);  // 0: the gradient kernel adds nothing
  if (bad_offsets != 0)
    atomicAdd(reinterpret_cast<unsigned long long*>(&p.status->dropped_slots),
              static_cast<unsigned long long>(p.num_tokens) * static_cast<unsigned long long>(p.top_k));
}

//! Pass 4, one warp per token: dL/dp (router_loss_prob_gradient) through p (router_loss_backprop)
//! plus the z-loss's term (router_z_gradient), rounded once to float and added to d_logits.
//! Tokens with a non-finite logit are left as they are, and so is all of d_logits when the offsets
//! are invalid (the values kernel then wrote non_empty = 0).
template <class L, int kPerLane>
__global__ void __launch_bounds__(kMaxRouterWarps* kWarpLanes)
    router_loss_gradient_kernel(RouterLossParams<L> const p) {
  int const warp = static_cast<int>(threadIdx.x) / kWarpLanes, lane = static_cast<int>(threadIdx.x) % kWarpLanes;
  std::int64_t const t = blockIdx.x * std::int64_t{blockDim.x / kWarpLanes} + warp;
  if (t >= p.num_tokens) return;  // whole warps only
  double const non_empty = p.ws.non_empty[0];
  if (non_empty == 0.0) return;  // invalid offsets (counted in Status): the same for the whole grid
  int const num_experts = p.num_experts;
  LossToken<kPerLane> tok;
  loss_token<L, kPerLane>(p.logits + t * p.ld, num_experts, lane, p.sigmoid, tok);
  if (!tok.finite) return;  // the same on every lane
  std::int64_t const s = router_loss_sequence(p.offsets, p.num_sequences, t);
  RouterLossTokenRange const range = router_loss_sequence_range(p.offsets, p.num_tokens, s);
  auto const n = static_cast<double>(range.end - range.begin), n_all = static_cast<double>(p.num_tokens);
  double const experts = static_cast<double>(num_experts), slots_per_token = static_cast<double>(p.top_k);
  // n > 0 for valid offsets (the token is in its sequence); the guard keeps 0/0 out regardless.
  double const seq = n > 0.0 ? p.seq : 0.0, seq_n = n > 0.0 ? n : 1.0;
  unsigned long long const* const seq_count = p.ws.seq_count + s * num_experts;
  double g[kPerLane];
  double dot = 0.0;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    int const e = router_expert(lane, i);
    g[i] = 0.0;
    if (e >= num_experts) continue;
    g[i] = router_loss_prob_gradient(p.lb, seq, experts, slots_per_token, p.ws.count[e], n_all,
                                     static_cast<double>(seq_count[e]), seq_n, non_empty);
    dot += g[i] * tok.prob(p.sigmoid, i);
  }
  dot = warp_sum_double(dot);
  float* const row = p.d_logits + t * p.ld_d;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    int const e = router_expert(lane, i);
    if (e >= num_experts) continue;
    double const grad = router_loss_backprop(p.sigmoid, g[i], dot, tok.prob(p.sigmoid, i), tok.sig[i], tok.sig_sum) +
                        router_z_gradient(p.z, tok.lse, n_all, tok.softmax(i));
    row[e] += static_cast<float>(grad);
  }
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

//! Device workspace bytes of router_losses(StreamRef, ...): num_tokens, and num_sequences =
//! sequence_offsets.size() - 1 (1 without offsets). About 8·(num_tokens + 2·num_sequences)·
//! num_experts bytes. Pure host arithmetic.
[[nodiscard]] inline std::size_t cuda_router_losses_workspace_bytes(std::int32_t num_experts, std::int64_t num_tokens,
                                                                    std::int64_t num_sequences) {
  constexpr std::string_view where = "cuda_router_losses_workspace_bytes";
  detail::require(num_experts > 0, Errc::kInvalidArgument, where, "num_experts", num_experts, "> 0");
  detail::require(num_tokens >= 0, Errc::kInvalidArgument, where, "num_tokens", num_tokens, ">= 0");
  detail::require(num_sequences >= 1, Errc::kInvalidArgument, where, "num_sequences", num_sequences,
                  ">= 1 (sequence_offsets.size() - 1, or 1 without offsets)");
  return detail::layout_bytes(
      [&](auto& c) { return detail::carve_router_losses(c, num_experts, num_tokens, num_sequences); });
}

//! @brief router_losses on the GPU (semantics: host/router_losses.hpp and RouterLossConfig;
//! determinism, equality with the Host and invalid input: this header's note). The values are
//! **written** to `*values` on the device; the weighted gradient is **added** to d_logits.
//!
//! @param[in]    stream            the caller's stream; nothing syncs, nothing is allocated
//! @param[in]    config            the forward's RouterConfig (num_experts <= 512 on CUDA)
//! @param[in]    losses            the coefficients, finite and >= 0
//! @param[in]    logits            [num_tokens, num_experts] device memory, fp32 or bf16
//! @param[in]    topk_ids          [num_tokens, top_k] device memory: the forward's ids
//! @param[in]    sequence_offsets  [num_sequences + 1] device memory (as the Host's), or empty: one
//!                                 sequence
//! @param[in,out] d_logits         [num_tokens, num_experts] device memory, fp32: the gradient is
//!                                 added (untouched when every coefficient is 0, num_tokens = 0, or
//!                                 the offsets are invalid; a non-finite token's row too)
//! @param[out]   values            device memory: one RouterLossValues (all 0 for num_tokens = 0)
//! @param[in]    workspace         device memory, >= cuda_router_losses_workspace_bytes(num_experts,
//!                                 num_tokens, num_sequences)
//! @param[in,out] status           device memory: invalid_ids and dropped_slots are added to for
//!                                 invalid input (zero it first for per-call counts)
//! Errors (thrown before any launch): the shapes, config and coefficients (the Host's messages),
//! sequence_offsets.size() == 1, num_experts > 512 (Errc::kUnsupported), a host StreamRef, a null
//! values or status, a workspace too small.
template <class L>
requires detail::router_logit<L>
void router_losses(StreamRef stream, RouterConfig const& config, RouterLossConfig const& losses,
                   MatrixView<L> logits_in, MatrixView<std::int32_t const> topk_ids,
                   std::span<std::int64_t const> sequence_offsets, MatrixView<float> d_logits, RouterLossValues* values,
                   Workspace workspace, Status* status) {
  EPX_NVTX_RANGE(RouterLosses);
  using Logit = std::remove_const_t<L>;
  constexpr std::string_view where = "router_losses";
  MatrixView<Logit const> const logits(logits_in);
  detail::check_router_loss_shapes(config, losses, logits, topk_ids, sequence_offsets.size(), d_logits);
  detail::CudaStream const s(stream, where);
  detail::require(config.num_experts <= detail::kMaxCudaRouterExperts, Errc::kUnsupported, where, "num_experts",
                  config.num_experts, fmt::format("<= {} on CUDA", detail::kMaxCudaRouterExperts));
  detail::require(values != nullptr, Errc::kInvalidArgument, where, "values", "nullptr",
                  "a device pointer to an epx::RouterLossValues");
  detail::require(status != nullptr, Errc::kInvalidArgument, where, "status", "nullptr",
                  "a device pointer to an epx::Status");
  std::int64_t const num_tokens = logits.rows;
  std::int64_t const num_sequences =
      sequence_offsets.empty() ? 1 : static_cast<std::int64_t>(sequence_offsets.size()) - 1;
  auto const parts = detail::carve_layout(workspace, where, [&](auto& c) {
    return detail::carve_router_losses(c, config.num_experts, num_tokens, num_sequences);
  });
  if (num_tokens == 0) {
    EPX_CUDA_CHECK(cudaMemsetAsync(values, 0, sizeof(RouterLossValues), s.get()));
    return;
  }
  EPX_CUDA_CHECK(cudaMemsetAsync(parts.seq_count.data(), 0, parts.seq_count.size_bytes(), s.get()));
  detail::RouterLossParams<Logit> const params{.logits = logits.data,
                                               .ld = logits.ld,
                                               .num_tokens = num_tokens,
                                               .num_experts = config.num_experts,
                                               .top_k = config.top_k,
                                               .sigmoid = config.scoring == Scoring::kSigmoidTopK,
                                               .ids = topk_ids.data,
                                               .ld_ids = topk_ids.ld,
                                               .offsets = sequence_offsets.empty() ? nullptr : sequence_offsets.data(),
                                               .num_sequences = num_sequences,
                                               .lb = static_cast<double>(losses.load_balancing),
                                               .seq = static_cast<double>(losses.sequence_aux),
                                               .z = static_cast<double>(losses.z_loss),
                                               .ws = detail::router_loss_scratch(parts),
                                               .d_logits = d_logits.data,
                                               .ld_d = d_logits.ld,
                                               .values = values,
                                               .status = status};
  auto const policy = detail::policy_for<detail::RouterPolicy>(detail::current_device_traits());
  int const warps = std::clamp(policy.warps_per_block, 1, detail::kMaxRouterWarps);
  auto const token_blocks = static_cast<unsigned>(ceil_div<std::int64_t>(num_tokens, warps));
  detail::with_router_registers(config.num_experts, [&]<int kPerLane>(std::integral_constant<int, kPerLane>) {
    detail::router_loss_token_kernel<Logit, kPerLane><<<token_blocks, warps * detail::kWarpLanes, 0, s.get()>>>(params);
  });
  EPX_CUDA_CHECK_LAUNCH(router_loss_token_kernel);
  std::int64_t const items = num_sequences * ceil_div<std::int64_t>(config.num_experts, detail::kWarpLanes);
  auto const sequence_blocks = static_cast<unsigned>(std::min<std::int64_t>(items, detail::kMaxGridStrideBlocks));
  detail::router_loss_sequence_kernel<Logit>
      <<<sequence_blocks, dim3(detail::kWarpLanes, detail::kRouterLossStripes), 0, s.get()>>>(params);
  EPX_CUDA_CHECK_LAUNCH(router_loss_sequence_kernel);
  detail::router_loss_values_kernel<Logit><<<1, detail::kRouterLossValueThreads, 0, s.get()>>>(params);
  EPX_CUDA_CHECK_LAUNCH(router_loss_values_kernel);
  if (losses.load_balancing == 0.0f && losses.sequence_aux == 0.0f && losses.z_loss == 0.0f) return;
  detail::with_router_registers(config.num_experts, [&]<int kPerLane>(std::integral_constant<int, kPerLane>) {
    detail::router_loss_gradient_kernel<Logit, kPerLane>
        <<<token_blocks, warps * detail::kWarpLanes, 0, s.get()>>>(params);
  });
  EPX_CUDA_CHECK_LAUNCH(router_loss_gradient_kernel);
}

}  // namespace epx
