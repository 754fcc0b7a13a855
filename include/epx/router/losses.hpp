// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! The router losses and statistics, shared by every backend: what each loss is (written once,
//! here, on RouterLossConfig), the correction-bias update rule, and the argument checks of
//! `router_losses`, `expert_token_counts` and `update_correction_bias`. Host implementation:
//! host/router_losses.hpp; CUDA: cuda/router_losses.cuh.
//!
//! Sources (the definitions below follow them; where they differ, the comment says which is kept):
//! - Switch Transformer load-balancing loss: Fedus, Zoph, Shazeer, "Switch Transformers",
//!   arXiv:2101.03961, §2.2 eq. (4)-(6): loss = alpha * N * sum_i f_i * P_i. Top-k form with f_i
//!   over the T·k slots: KempnerForge `SoftmaxTopKRouter` (kempnerforge/model/router.py,
//!   github.com/KempnerInstitute/KempnerForge): f = tokens_per_expert / (num_tokens * top_k).
//! - Sequence-wise auxiliary loss: DeepSeek-V3 technical report, arXiv:2412.19437, §2.1.2
//!   "Complementary Sequence-Wise Auxiliary Loss", eq. (17)-(20): per sequence of T tokens,
//!   f_i = N_r / (K_r T) · (slots of the sequence routed to i), s'_{i,t} = s_{i,t} / sum_j s_{j,t},
//!   P_i = 1/T sum_t s'_{i,t}, L = alpha sum_i f_i P_i. The mean over the sequences of a batch is
//!   DeepSeek's `MoEGate` with `seq_aux` (modeling_deepseek.py on the Hugging Face hub:
//!   `(ce * scores.mean(dim=1)).sum(dim=1).mean() * alpha`). That code averages the raw sigmoid
//!   scores; epx keeps the paper's normalised s' (a probability, so the loss is 1 at balance).
//! - Router z-loss: Zoph et al., "ST-MoE", arXiv:2202.08906, §3.1 eq. (5):
//!   1/B sum_t (log sum_i exp(x_{t,i}))^2; KempnerForge: `(torch.logsumexp(logits, -1) ** 2).mean()`.
//! - Auxiliary-loss-free balancing: Wang et al., "Auxiliary-Loss-Free Load Balancing Strategy for
//!   Mixture-of-Experts", arXiv:2408.15664, Algorithm 1: e_i = mean_j c_j - c_i,
//!   b_i = b_i + u · sign(e_i); used by DeepSeek-V3 (arXiv:2412.19437 §2.1.2, "bias update speed"
//!   gamma). (KempnerForge's `SigmoidTopKRouter` uses a proportional EMA variant instead.)

#include <epx/config.hpp>
#include <epx/core/router_config.hpp>
#include <epx/core/views.hpp>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>

namespace epx {

//! The coefficients of the router losses; 0 switches a loss's gradient off (its value is still
//! computed, for monitoring). Semantics (Host and CUDA alike), for T tokens, E experts,
//! top_k = k:
//!
//! - p[t, i], the router probability of expert i for token t: softmax over all E logits of the
//!   token (Scoring::kSoftmaxTopK and kTopKSoftmax), or sigmoid(logit_i) / sum_j sigmoid(logit_j)
//!   (kSigmoidTopK; DeepSeek-V3's s'). The correction bias never enters p.
//! - c[i]: the slots (t, j) with topk_ids[t, j] == i — the ids forward chose (the correction bias
//!   and the group limit included), -1 slots counted nowhere. Counts are piecewise constant in the
//!   logits: no gradient flows through them.
//! 1. load_balancing (Switch / Mixtral): L_lb = E · sum_i f_i · P_i with f_i = c[i] / (T·k) (the
//!    fraction of slots, -1 slots included in T·k) and P_i = 1/T · sum_t p[t, i]. 1 at balance.
//! 2. sequence_aux (DeepSeek-V3): the tokens form sequences, sequence s holding tokens
//!    [offsets[s], offsets[s+1]); per non-empty sequence of T_s tokens, L_s = E · sum_i f_i · P_i
//!    with f_i, P_i as in 1 over that sequence's tokens only; L_seq = the mean of L_s over the
//!    non-empty sequences. No offsets means one sequence of all tokens, and then L_seq == L_lb.
//! 3. z_loss (ST-MoE): L_z = 1/T · sum_t (logsumexp_i logits[t, i])^2.
//!
//! With T = 0 every value is 0. The gradient of
//! load_balancing·L_lb + sequence_aux·L_seq + z_loss·L_z with respect to the logits is **added**
//! to d_logits, so that it combines with `route_backward`'s (which writes d_logits): call
//! route_backward first, then router_losses.
struct RouterLossConfig {
  float load_balancing = 0.0f;  //!< Switch Transformer's alpha (typically 1e-2)
  float sequence_aux = 0.0f;    //!< DeepSeek-V3's alpha (1e-4 in DeepSeek-V3)
  float z_loss = 0.0f;          //!< ST-MoE's z-loss coefficient (typically 1e-3)
};

//! What `router_losses` returns: each loss unweighted (for logging), and `total`, the weighted sum
//! whose gradient was added to d_logits.
struct RouterLossValues {
  double load_balancing = 0.0;
  double sequence_aux = 0.0;
  double z_loss = 0.0;
  double total = 0.0;  //!< load_balancing·L_lb + sequence_aux·L_seq + z_loss·L_z (coefficients)
};

namespace detail {

//! Throws an Error naming the first coefficient of `c` that is negative or not finite.
inline void validate(RouterLossConfig const& c, std::string_view where = "RouterLossConfig") {
  auto check = [&](std::string_view name, float v) {
    require(std::isfinite(v) && v >= 0.0f, Errc::kInvalidArgument, where, name, v, "a finite number >= 0");
  };
  check("losses.load_balancing", c.load_balancing);
  check("losses.sequence_aux", c.sequence_aux);
  check("losses.z_loss", c.z_loss);
}

//! The size of sequence offsets: 0 (one sequence) or num_sequences + 1 >= 2 (what a backend
//! whose offsets live in device memory can check without reading them).
inline void check_sequence_offsets_size(std::string_view where, std::size_t size) {
  require(size == 0 || size >= 2, Errc::kShapeMismatch, where, "sequence_offsets.size()", size,
          "0 (one sequence) or num_sequences + 1 >= 2");
}

//! Sequence offsets: empty (one sequence), or [num_sequences + 1] with offsets[0] = 0,
//! non-decreasing, offsets.back() = num_tokens. Empty sequences are allowed.
inline void check_sequence_offsets(std::string_view where, std::span<std::int64_t const> offsets,
                                   std::int64_t num_tokens) {
  if (offsets.empty()) return;
  check_sequence_offsets_size(where, offsets.size());
  require(offsets.front() == 0, Errc::kInvalidArgument, where, "sequence_offsets[0]", offsets.front(), "0");
  for (std::size_t s = 1; s < offsets.size(); ++s)
    if (offsets[s] < offsets[s - 1])
      throw_error(Errc::kInvalidArgument,
                  fmt::format("{}: sequence_offsets[{}] = {}, expected >= sequence_offsets[{}] = {} (non-decreasing)",
                              where, s, offsets[s], s - 1, offsets[s - 1]));
  if (offsets.back() != num_tokens)
    throw_error(Errc::kInvalidArgument,
                fmt::format("{}: sequence_offsets[{}] = {}, expected num_tokens = {} (logits.rows)", where,
                            offsets.size() - 1, offsets.back(), num_tokens));
}

//! Every id is -1 or in [0, num_experts); else Errc::kInvalidExpertId naming the slot.
inline void check_topk_id_range(std::string_view where, MatrixView<std::int32_t const> topk_ids,
                                std::int32_t num_experts) {
  for (std::int64_t t = 0; t < topk_ids.rows; ++t)
    for (std::int64_t j = 0; j < topk_ids.cols; ++j) {
      std::int32_t const id = topk_ids(t, j);
      if (id != -1 && (id < 0 || id >= num_experts))
        throw_error(Errc::kInvalidExpertId,
                    fmt::format("{}: topk_ids[{}, {}] = {}, expected -1 or in [0, num_experts = "
                                "{})",
                                where, t, j, id, num_experts));
    }
}

//! router_losses' checks that read no element: the config, the coefficients, the shapes and the
//! size of sequence_offsets (every backend; the CUDA one can check no more on the host).
template <class L>
void check_router_loss_shapes(RouterConfig const& config, RouterLossConfig const& losses, MatrixView<L const> logits,
                              MatrixView<std::int32_t const> topk_ids, std::size_t sequence_offsets_size,
                              MatrixView<float> d_logits) {
  constexpr std::string_view where = "router_losses";
  validate(config, where);
  validate(losses, where);
  check_matrix(where, "logits", logits, -1, config.num_experts);
  check_matrix(where, "topk_ids", topk_ids, logits.rows, config.top_k);
  check_matrix(where, "d_logits", d_logits, logits.rows, config.num_experts);
  check_sequence_offsets_size(where, sequence_offsets_size);
}

//! router_losses' checks on host memory: the shapes, then the offsets' and the ids' values.
template <class L>
void check_router_loss_args(RouterConfig const& config, RouterLossConfig const& losses, MatrixView<L const> logits,
                            MatrixView<std::int32_t const> topk_ids, std::span<std::int64_t const> sequence_offsets,
                            MatrixView<float> d_logits) {
  constexpr std::string_view where = "router_losses";
  check_router_loss_shapes(config, losses, logits, topk_ids, sequence_offsets.size(), d_logits);
  check_sequence_offsets(where, sequence_offsets, logits.rows);
  check_topk_id_range(where, topk_ids, config.num_experts);
}

// ---- The formulas every backend evaluates, operation for operation (so the Host's bits are the
// ---- definition and the CUDA kernels differ only by their sums' order, exp/log and FMA) ----

//! One balance loss from its per-expert sum acc = sum_i c_i · P_sum_i over n tokens:
//! E · acc / (n² · k) (= E · sum_i f_i · P_i with f_i = c_i / (n·k), P_i = P_sum_i / n).
EPX_HOST_DEVICE constexpr double router_balance_value(double experts, double acc, double n,
                                                      double slots_per_token) noexcept {
  return experts * acc / (n * n * slots_per_token);
}

//! dL/dp_i of one token of a sequence of n tokens (of n_all in all, non_empty sequences):
//! lb · E·c_i/(n_all²·k) + seq/non_empty · E·c_{s,i}/(n²·k).
EPX_HOST_DEVICE constexpr double router_loss_prob_gradient(double lb, double seq, double experts,
                                                           double slots_per_token, double count, double n_all,
                                                           double seq_count, double n, double non_empty) noexcept {
  return lb * experts * count / (n_all * n_all * slots_per_token) +
         seq / non_empty * experts * seq_count / (n * n * slots_per_token);
}

//! g = dL/dp_i through p to dL/dlogit_i, given dot = sum_j g_j · p_j: p = softmax(logit) gives
//! p_i · (g - dot); p = s / sum(s) with s = sigmoid(logit) (kSigmoidTopK) gives
//! (g - dot) / sum(s) · s_i · (1 - s_i).
EPX_HOST_DEVICE constexpr double router_loss_backprop(bool sigmoid_scoring, double g, double dot, double prob,
                                                      double sigmoid, double sigmoid_sum) noexcept {
  return sigmoid_scoring ? (g - dot) / sigmoid_sum * sigmoid * (1.0 - sigmoid) : prob * (g - dot);
}

//! The z-loss's gradient of one logit, z · 2·lse/n_all · softmax_i (lse: its token's logsumexp).
EPX_HOST_DEVICE constexpr double router_z_gradient(double z, double logsumexp, double n_all, double softmax) noexcept {
  return z * 2.0 * logsumexp / n_all * softmax;
}

// ---- The CUDA kernels' index math (cuda/router_losses.cuh), as plain C++ the host tests check ----

//! Whether entry i in [0, num_sequences] of sequence_offsets is what check_sequence_offsets
//! accepts there: offsets[0] = 0, offsets[i] >= offsets[i - 1], offsets[num_sequences] = num_tokens.
EPX_HOST_DEVICE constexpr bool router_loss_offset_ok(std::int64_t const* offsets, std::int64_t num_sequences,
                                                     std::int64_t num_tokens, std::int64_t i) noexcept {
  if (i == 0) return offsets[0] == 0;
  return offsets[i] >= offsets[i - 1] && (i < num_sequences || offsets[i] == num_tokens);
}

//! The sequence of token t: the last s in [0, num_sequences) with offsets[s] <= t (so empty
//! sequences before it are skipped); 0 without offsets (nullptr). Reads offsets[1, num_sequences)
//! only and returns a sequence in [0, num_sequences) whatever they hold (invalid offsets give a
//! wrong sequence, never an out-of-range one).
EPX_HOST_DEVICE constexpr std::int64_t router_loss_sequence(std::int64_t const* offsets, std::int64_t num_sequences,
                                                            std::int64_t t) noexcept {
  if (offsets == nullptr) return 0;
  std::int64_t lo = 1, hi = num_sequences;  // the first s in [1, num_sequences) with offsets[s] > t
  while (lo < hi) {
    std::int64_t const mid = lo + (hi - lo) / 2;
    if (offsets[mid] <= t)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo - 1;
}

//! Tokens [begin, end) of sequence s: the offsets clamped into [0, num_tokens] with end >= begin,
//! so that invalid offsets never index past the tokens; all tokens without offsets.
struct RouterLossTokenRange {
  std::int64_t begin = 0;
  std::int64_t end = 0;
};

EPX_HOST_DEVICE constexpr RouterLossTokenRange router_loss_sequence_range(std::int64_t const* offsets,
                                                                          std::int64_t num_tokens,
                                                                          std::int64_t s) noexcept {
  if (offsets == nullptr) return {0, num_tokens};
  std::int64_t const first = offsets[s], last = offsets[s + 1];
  std::int64_t const begin = first < 0 ? 0 : (first > num_tokens ? num_tokens : first);
  return {begin, last < begin ? begin : (last > num_tokens ? num_tokens : last)};
}

//! The sequence-sum kernel's order: a sequence's tokens are dealt to kRouterLossStripes stripes
//! (token begin + i to stripe i % kRouterLossStripes); a stripe sums its tokens into four
//! accumulators in turn (four loads in flight), then (a0 + a1) + (a2 + a3); the stripes' sums are
//! added in stripe order. A fixed order: deterministic, independent of the launch.
inline constexpr int kRouterLossStripes = 8;

template <class Load>
EPX_HOST_DEVICE constexpr double router_loss_stripe_sum(RouterLossTokenRange range, int stripe, Load&& load) {
  double a0 = 0.0, a1 = 0.0, a2 = 0.0, a3 = 0.0;
  constexpr std::int64_t r = kRouterLossStripes;
  for (std::int64_t t = range.begin + stripe; t < range.end; t += 4 * r) {
    a0 += load(t);
    if (t + r < range.end) a1 += load(t + r);
    if (t + 2 * r < range.end) a2 += load(t + 2 * r);
    if (t + 3 * r < range.end) a3 += load(t + 3 * r);
  }
  return (a0 + a1) + (a2 + a3);
}

//! The values kernel's block: its threads deal the sequences and the tokens out round-robin, each
//! sums its share in order, then a fixed tree v[i] += v[i + h] for h = n/2, ..., 1 (a power of two).
inline constexpr int kRouterLossValueThreads = 256;
static_assert((kRouterLossValueThreads & (kRouterLossValueThreads - 1)) == 0, "a power of two");

//! DeepSeek's update direction for expert i: sign(mean_j c_j - c_i) in {-1, 0, +1}, computed
//! exactly in integers (mean = total / num_experts, so sign(total - c_i · num_experts)).
EPX_HOST_DEVICE constexpr int correction_bias_direction(std::int64_t count, std::int64_t total,
                                                        std::int32_t num_experts) noexcept {
  std::int64_t const scaled = count * num_experts;
  return scaled < total ? 1 : (scaled > total ? -1 : 0);
}

}  // namespace detail
}  // namespace epx
