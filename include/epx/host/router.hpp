// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

#include <epx/core/space.hpp>
#include <epx/router/router.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <vector>

namespace epx {

//! @brief Routes each token to its top_k experts (host reference; semantics on RouterConfig).
//!
//! @param[in]  config           scoring, top_k, groups, renormalisation, scaling
//! @param[in]  logits           [num_tokens, num_experts] router logits (fp32 or bf16)
//! @param[in]  correction_bias  [num_experts] selection-only bias, or empty; must be finite
//! @param[out] topk_ids         [num_tokens, top_k] global expert ids, best first; -1 when fewer
//!                              than top_k experts are selectable
//! @param[out] topk_weights     [num_tokens, top_k] routing weights (0 for -1 slots)
//!
//! Synchronous on the calling thread; uses O(num_experts) host scratch, no workspace.
template <class L>
requires detail::router_logit<L>
void route(Host, RouterConfig const& config, MatrixView<L> logits_in, std::span<float const> correction_bias,
           MatrixView<std::int32_t> topk_ids, MatrixView<float> topk_weights) {
  MatrixView<std::remove_const_t<L> const> const logits(logits_in);  // read only, mutable views welcome
  detail::check_route_args(config, logits, correction_bias, topk_ids, topk_weights);
  for (std::size_t e = 0; e < correction_bias.size(); ++e)
    detail::require(std::isfinite(correction_bias[e]), Errc::kInvalidArgument, "route",
                    fmt::format("correction_bias[{}]", e), correction_bias[e], "a finite number");

  auto const num_experts = static_cast<std::size_t>(config.num_experts);
  auto const top_k = config.top_k;
  auto const group_size = num_experts / static_cast<std::size_t>(config.num_groups);
  constexpr float kLowest = -std::numeric_limits<float>::infinity();

  std::vector<float> logit(num_experts), score(num_experts), choice(num_experts);
  std::vector<char> selectable(num_experts), group_kept(static_cast<std::size_t>(config.num_groups));
  std::vector<float> group_score(static_cast<std::size_t>(config.num_groups));

  for (std::int64_t t = 0; t < logits.rows; ++t) {
    // 1. Logits and which experts may be chosen at all.
    for (std::size_t e = 0; e < num_experts; ++e) {
      float l = to_float(logits(t, static_cast<std::int64_t>(e)));
      selectable[e] = !(std::isnan(l) || l == kLowest);
      if (l == std::numeric_limits<float>::infinity()) l = std::numeric_limits<float>::max();
      logit[e] = l;
    }
    // 2. Scores.
    if (config.scoring == Scoring::kSoftmaxTopK) {
      float max_logit = kLowest;
      for (std::size_t e = 0; e < num_experts; ++e)
        if (selectable[e]) max_logit = std::max(max_logit, logit[e]);
      float sum = 0.0f;
      for (std::size_t e = 0; e < num_experts; ++e) {
        score[e] = selectable[e] ? std::exp(logit[e] - max_logit) : 0.0f;
        sum += score[e];
      }
      for (std::size_t e = 0; e < num_experts; ++e) score[e] = selectable[e] ? score[e] / sum : 0.0f;
    } else if (config.scoring == Scoring::kSigmoidTopK) {
      for (std::size_t e = 0; e < num_experts; ++e) score[e] = 1.0f / (1.0f + std::exp(-logit[e]));
    } else {
      for (std::size_t e = 0; e < num_experts; ++e) score[e] = logit[e];
    }
    for (std::size_t e = 0; e < num_experts; ++e) {
      choice[e] = correction_bias.empty() ? score[e] : score[e] + correction_bias[e];
      if (std::isnan(choice[e])) selectable[e] = 0;
    }
    // 3. Group-limited selection: keep the topk_groups groups with the best top-2 sums.
    if (config.num_groups > 1) {
      for (std::size_t g = 0; g < group_score.size(); ++g) {
        float best = kLowest, second = kLowest;
        int found = 0;
        for (std::size_t e = g * group_size; e < (g + 1) * group_size; ++e) {
          if (!selectable[e]) continue;
          ++found;
          if (choice[e] > best) {
            second = best;
            best = choice[e];
          } else if (choice[e] > second) {
            second = choice[e];
          }
        }
        group_score[g] = found == 0 ? kLowest : (found == 1 ? best : best + second);
        group_kept[g] = 0;
      }
      for (std::int32_t pick = 0; pick < config.topk_groups; ++pick) {
        std::ptrdiff_t best_g = -1;
        for (std::size_t g = 0; g < group_score.size(); ++g) {
          if (group_kept[g] || group_score[g] == kLowest) continue;  // empty groups are never kept
          if (best_g < 0 || group_score[g] > group_score[static_cast<std::size_t>(best_g)])
            best_g = static_cast<std::ptrdiff_t>(g);
        }
        if (best_g < 0) break;
        group_kept[static_cast<std::size_t>(best_g)] = 1;
      }
      for (std::size_t e = 0; e < num_experts; ++e)
        if (!group_kept[e / group_size]) selectable[e] = 0;
    }
    // 4. Top-k by choice, best first, ties to the lower id (strict > keeps the first seen).
    float weight_sum = 0.0f;
    for (std::int32_t j = 0; j < top_k; ++j) {
      std::ptrdiff_t best = -1;
      for (std::size_t e = 0; e < num_experts; ++e)
        if (selectable[e] && (best < 0 || choice[e] > choice[static_cast<std::size_t>(best)]))
          best = static_cast<std::ptrdiff_t>(e);
      if (best < 0) {
        topk_ids(t, j) = -1;
        topk_weights(t, j) = 0.0f;
        continue;
      }
      auto const b = static_cast<std::size_t>(best);
      selectable[b] = 0;
      topk_ids(t, j) = static_cast<std::int32_t>(b);
      topk_weights(t, j) = score[b];
    }
    // 5. Weights.
    if (config.scoring == Scoring::kTopKSoftmax) {
      float max_logit = kLowest;
      for (std::int32_t j = 0; j < top_k; ++j)
        if (topk_ids(t, j) >= 0) max_logit = std::max(max_logit, topk_weights(t, j));
      float sum = 0.0f;
      for (std::int32_t j = 0; j < top_k; ++j) {
        if (topk_ids(t, j) < 0) continue;
        topk_weights(t, j) = std::exp(topk_weights(t, j) - max_logit);
        sum += topk_weights(t, j);
      }
      for (std::int32_t j = 0; j < top_k; ++j)
        if (topk_ids(t, j) >= 0) topk_weights(t, j) /= sum;
    }
    if (config.renormalize) {
      for (std::int32_t j = 0; j < top_k; ++j) weight_sum += topk_weights(t, j);
      for (std::int32_t j = 0; j < top_k; ++j) topk_weights(t, j) /= (weight_sum + 1e-20f);
    }
    if (config.routed_scaling_factor != 1.0f)
      for (std::int32_t j = 0; j < top_k; ++j) topk_weights(t, j) *= config.routed_scaling_factor;
  }
}

}  // namespace epx
