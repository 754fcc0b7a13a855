// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! Router losses and statistics on Host: values and logit gradients of the load-balancing,
//! sequence-wise auxiliary and z losses, per-expert token counts, and DeepSeek-V3's
//! correction-bias update. Definitions and sources: router/losses.hpp.

#include <epx/core/space.hpp>
#include <epx/router/losses.hpp>
#include <epx/router/router.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <vector>

namespace epx {
namespace detail {

//! One token's router quantities, in double: the probability p (see RouterLossConfig), the
//! derivative helpers of its scoring, and logsumexp of the logits.
struct TokenProbabilities {
  std::vector<double> logit, prob, softmax, sigmoid;
  double sigmoid_sum = 0.0;
  double logsumexp = 0.0;

  explicit TokenProbabilities(std::size_t num_experts)
      : logit(num_experts), prob(num_experts), softmax(num_experts), sigmoid(num_experts) {}

  template <class L>
  void compute(Scoring scoring, MatrixView<L const> logits, std::int64_t t) {
    std::size_t const n = logit.size();
    double max_logit = -std::numeric_limits<double>::infinity();
    for (std::size_t e = 0; e < n; ++e) {
      logit[e] = static_cast<double>(to_float(logits(t, static_cast<std::int64_t>(e))));
      max_logit = std::max(max_logit, logit[e]);
    }
    double sum = 0.0;
    for (std::size_t e = 0; e < n; ++e) {
      softmax[e] = std::exp(logit[e] - max_logit);
      sum += softmax[e];
    }
    for (std::size_t e = 0; e < n; ++e) softmax[e] /= sum;
    logsumexp = max_logit + std::log(sum);
    if (scoring == Scoring::kSigmoidTopK) {
      sigmoid_sum = 0.0;
      for (std::size_t e = 0; e < n; ++e) {
        sigmoid[e] = 1.0 / (1.0 + std::exp(-logit[e]));
        sigmoid_sum += sigmoid[e];
      }
      for (std::size_t e = 0; e < n; ++e) prob[e] = sigmoid[e] / sigmoid_sum;
    } else {
      prob = softmax;
    }
  }

  //! Turns g = dL/dp into dL/dlogit, in place.
  void backprop_prob(Scoring scoring, std::vector<double>& g) const {
    double dot = 0.0;
    for (std::size_t e = 0; e < g.size(); ++e) dot += g[e] * prob[e];
    bool const sigmoid_scoring = scoring == Scoring::kSigmoidTopK;
    for (std::size_t e = 0; e < g.size(); ++e)
      g[e] = router_loss_backprop(sigmoid_scoring, g[e], dot, prob[e], sigmoid[e], sigmoid_sum);
  }
};

}  // namespace detail

//! @brief Router loss values, and their weighted gradient added into d_logits (host reference).
//!
//! What each loss is, with sources: RouterLossConfig (router/losses.hpp). The counts come from
//! `topk_ids` (forward's selection, held constant); the probabilities from `logits` by
//! config.scoring. Every value is computed whatever the coefficients; a loss with coefficient 0
//! adds nothing to d_logits.
//!
//! @param[in]    config            the forward's RouterConfig (num_experts, top_k, scoring)
//! @param[in]    losses            the coefficients, finite and >= 0
//! @param[in]    logits            [num_tokens, num_experts] fp32 or bf16; every element finite
//! @param[in]    topk_ids          [num_tokens, top_k] the forward's ids; -1 slots count nowhere
//! @param[in]    sequence_offsets  [num_sequences + 1] token offsets of the sequences for
//!                                 sequence_aux (offsets[0] = 0, non-decreasing, last = num_tokens;
//!                                 empty sequences allowed and left out of the mean), or empty:
//!                                 all tokens form one sequence
//! @param[in,out] d_logits         [num_tokens, num_experts] fp32: the gradient is **added**
//!                                 (typically after route_backward wrote it)
//! @return the unweighted values and their weighted sum
//!
//! Math in double (each token's gradient summed in double, then added to d_logits once, rounded
//! to float). Deterministic. Synchronous; O(num_sequences · num_experts) host scratch.
//! Across ranks: the values are this rank's tokens' (the counts are not all-reduced); a
//! data-parallel trainer averages losses (and gradients) over its group as for any other loss.
template <detail::router_logit L>
RouterLossValues router_losses(Host, RouterConfig const& config, RouterLossConfig const& losses,
                               MatrixView<L> logits_in, MatrixView<std::int32_t const> topk_ids,
                               std::span<std::int64_t const> sequence_offsets, MatrixView<float> d_logits) {
  MatrixView<std::remove_const_t<L> const> const logits(logits_in);  // read only, mutable views welcome
  detail::check_router_loss_args(config, losses, logits, topk_ids, sequence_offsets, d_logits);
  constexpr std::string_view where = "router_losses";
  for (std::int64_t t = 0; t < logits.rows; ++t)
    for (std::int64_t e = 0; e < logits.cols; ++e) {
      float const l = to_float(logits(t, e));
      if (!std::isfinite(l))
        detail::throw_error(Errc::kInvalidArgument,
                            fmt::format("{}: logits[{}, {}] = {}, expected a finite number (the losses need every "
                                        "expert's probability)",
                                        where, t, e, l));
    }

  RouterLossValues values;
  std::int64_t const num_tokens = logits.rows;
  if (num_tokens == 0) return values;
  auto const num_experts = static_cast<std::size_t>(config.num_experts);
  double const slots_per_token = static_cast<double>(config.top_k);
  double const experts = static_cast<double>(config.num_experts);

  // Sequences: [offsets[s], offsets[s + 1]); none given means one.
  std::vector<std::int64_t> offsets(sequence_offsets.begin(), sequence_offsets.end());
  if (offsets.empty()) offsets = {0, num_tokens};
  std::size_t const num_sequences = offsets.size() - 1;
  std::size_t non_empty = 0;
  for (std::size_t s = 0; s < num_sequences; ++s) non_empty += offsets[s + 1] > offsets[s] ? 1 : 0;

  // Pass 1: counts c and probability sums per sequence, and over all tokens.
  std::vector<double> seq_count(num_sequences * num_experts, 0.0), seq_prob(num_sequences * num_experts, 0.0);
  std::vector<double> count(num_experts, 0.0), prob_sum(num_experts, 0.0);
  detail::TokenProbabilities token(num_experts);
  double z_sum = 0.0;
  for (std::size_t s = 0; s < num_sequences; ++s) {
    for (std::int64_t t = offsets[s]; t < offsets[s + 1]; ++t) {
      token.compute(config.scoring, logits, t);
      for (std::size_t e = 0; e < num_experts; ++e) seq_prob[s * num_experts + e] += token.prob[e];
      for (std::int64_t j = 0; j < topk_ids.cols; ++j)
        if (topk_ids(t, j) >= 0) seq_count[s * num_experts + static_cast<std::size_t>(topk_ids(t, j))] += 1.0;
      z_sum += token.logsumexp * token.logsumexp;
    }
    for (std::size_t e = 0; e < num_experts; ++e) {
      count[e] += seq_count[s * num_experts + e];
      prob_sum[e] += seq_prob[s * num_experts + e];
    }
  }

  // Values. L = E · sum_i (c_i / (n·k)) · (P_sum_i / n) over n tokens.
  auto const balance = [&](double const* c, double const* p, double n) {
    double acc = 0.0;
    for (std::size_t e = 0; e < num_experts; ++e) acc += c[e] * p[e];
    return detail::router_balance_value(experts, acc, n, slots_per_token);
  };
  auto const n_all = static_cast<double>(num_tokens);
  values.load_balancing = balance(count.data(), prob_sum.data(), n_all);
  for (std::size_t s = 0; s < num_sequences; ++s) {
    auto const n = static_cast<double>(offsets[s + 1] - offsets[s]);
    if (n > 0) values.sequence_aux += balance(&seq_count[s * num_experts], &seq_prob[s * num_experts], n);
  }
  values.sequence_aux /= static_cast<double>(non_empty);
  values.z_loss = z_sum / n_all;
  double const lb = losses.load_balancing, seq = losses.sequence_aux, z = losses.z_loss;
  values.total = lb * values.load_balancing + seq * values.sequence_aux + z * values.z_loss;
  if (lb == 0.0 && seq == 0.0 && z == 0.0) return values;

  // Pass 2: per token, dL/dp_i = lb · E·c_i/(T²k) + seq/S' · E·c_{s,i}/(T_s²k), through p; plus
  // the z-loss's z · 2·lse/T · softmax.
  std::vector<double> grad(num_experts);
  for (std::size_t s = 0; s < num_sequences; ++s) {
    auto const n = static_cast<double>(offsets[s + 1] - offsets[s]);
    for (std::int64_t t = offsets[s]; t < offsets[s + 1]; ++t) {
      token.compute(config.scoring, logits, t);
      for (std::size_t e = 0; e < num_experts; ++e)
        grad[e] = detail::router_loss_prob_gradient(lb, seq, experts, slots_per_token, count[e], n_all,
                                                    seq_count[s * num_experts + e], n, static_cast<double>(non_empty));
      token.backprop_prob(config.scoring, grad);
      for (std::size_t e = 0; e < num_experts; ++e) {
        grad[e] += detail::router_z_gradient(z, token.logsumexp, n_all, token.softmax[e]);
        d_logits(t, static_cast<std::int64_t>(e)) += static_cast<float>(grad[e]);
      }
    }
  }
  return values;
}

//! @brief Per-expert token counts for monitoring: counts[e] = the slots of topk_ids routed to
//! expert e (-1 slots counted nowhere). **Writes** counts (every element).
//!
//! Sum the counts over the ranks of a data-parallel/EP group (all-reduce) before comparing loads
//! or updating the correction bias: every rank must apply the same bias update.
//! Errors: counts.size() != num_experts, an id outside [0, num_experts) other than -1
//! (Errc::kInvalidExpertId). Synchronous; no scratch.
inline void expert_token_counts(Host, std::int32_t num_experts, MatrixView<std::int32_t const> topk_ids,
                                std::span<std::int64_t> counts) {
  constexpr std::string_view where = "expert_token_counts";
  detail::require(num_experts > 0, Errc::kInvalidArgument, where, "num_experts", num_experts, "> 0");
  detail::check_matrix(where, "topk_ids", topk_ids, -1, -1);
  detail::require(counts.size() == static_cast<std::size_t>(num_experts), Errc::kShapeMismatch, where, "counts.size()",
                  counts.size(), fmt::format("num_experts = {}", num_experts));
  detail::check_topk_id_range(where, topk_ids, num_experts);
  std::fill(counts.begin(), counts.end(), std::int64_t{0});
  for (std::int64_t t = 0; t < topk_ids.rows; ++t)
    for (std::int64_t j = 0; j < topk_ids.cols; ++j)
      if (topk_ids(t, j) >= 0) ++counts[static_cast<std::size_t>(topk_ids(t, j))];
}

//! @brief DeepSeek-V3's auxiliary-loss-free balancing step (sources: router/losses.hpp):
//! correction_bias[i] += update_rate · sign(mean_j counts[j] - counts[i]) — experts below the mean
//! load go up by update_rate, those above go down, those exactly at it stay. The sign is computed
//! exactly in integers, so the update is deterministic and the same on every rank given the same
//! (all-reduced) counts. Call it once per training step, outside autograd; the bias steers only
//! the selection (RouterConfig) and gets no gradient.
//!
//! Errors: counts.size() != correction_bias.size() or 0, a negative count, update_rate not finite
//! or < 0, a bias element that is (or would become) not finite — then nothing is written.
//! Synchronous; O(num_experts) host scratch.
inline void update_correction_bias(Host, std::span<std::int64_t const> counts, float update_rate,
                                   std::span<float> correction_bias) {
  constexpr std::string_view where = "update_correction_bias";
  detail::require(!counts.empty(), Errc::kInvalidArgument, where, "counts.size()", counts.size(), "num_experts > 0");
  detail::require(correction_bias.size() == counts.size(), Errc::kShapeMismatch, where, "correction_bias.size()",
                  correction_bias.size(), fmt::format("counts.size() = {}", counts.size()));
  detail::require(std::isfinite(update_rate) && update_rate >= 0.0f, Errc::kInvalidArgument, where, "update_rate",
                  update_rate, "a finite number >= 0");
  std::int64_t total = 0;
  for (std::size_t e = 0; e < counts.size(); ++e) {
    if (counts[e] < 0)
      detail::throw_error(Errc::kInvalidArgument,
                          fmt::format("{}: counts[{}] = {}, expected >= 0", where, e, counts[e]));
    total += counts[e];
  }
  auto const num_experts = static_cast<std::int32_t>(counts.size());
  std::vector<float> updated(counts.size());
  for (std::size_t e = 0; e < counts.size(); ++e) {
    int const direction = detail::correction_bias_direction(counts[e], total, num_experts);
    updated[e] = correction_bias[e] + static_cast<float>(direction) * update_rate;
    if (!std::isfinite(correction_bias[e]) || !std::isfinite(updated[e]))
      detail::throw_error(Errc::kInvalidArgument,
                          fmt::format("{}: correction_bias[{}] = {}, expected a finite number that stays finite "
                                      "after the update (update_rate = {})",
                                      where, e, correction_bias[e], update_rate));
  }
  std::copy(updated.begin(), updated.end(), correction_bias.begin());
}

}  // namespace epx
