// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! The router's backward on Host: the gradient of the logits given the gradient of the routing
//! weights `route` wrote. The semantics of the forward are on RouterConfig (core/router_config.hpp);
//! the losses that add to the same gradient are in router/losses.hpp.

#include <epx/core/space.hpp>
#include <epx/router/losses.hpp>
#include <epx/router/route_backward_args.hpp>
#include <epx/router/router.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace epx {

//! @brief The gradient of the router logits through `route`'s weights (host reference).
//!
//! route() is, per token, a selection (which experts, in which order) followed by a smooth map
//! from the logits to the k weights. The selection is piecewise constant in the logits, so the
//! gradient flows only through the weights of the slots forward chose, with the selection held
//! at `topk_ids`:
//! - kSoftmaxTopK: weight_j = p[id_j], p = softmax over all selectable experts, so every
//!   selectable logit of the token gets a gradient (through the softmax's denominator), chosen or
//!   not;
//! - kSigmoidTopK: weight_j = sigmoid(logit[id_j]): only the chosen logits get one;
//! - kTopKSoftmax: weight_j = softmax over the chosen logits: only the chosen logits get one;
//! - renormalize divides by (sum of the weights + 1e-20) and routed_scaling_factor multiplies, as
//!   in the forward, and both are differentiated.
//! The group limit and the correction bias act only through the selection: they get no gradient
//! and are not needed here (the ids carry their effect), which is why this call takes no bias.
//! Unselectable experts (NaN or -inf logit) and -1 slots get and give no gradient; a +inf logit
//! is differentiated at the largest finite float, as the forward computes with it.
//!
//! **Ties.** Where two choice values (or two group values) tie, route() is discontinuous: an
//! infinitesimal change of a logit can swap which expert (or which slot order) wins. The gradient
//! returned is the one-sided gradient of the branch forward took — the derivative of the weights
//! with the selection frozen at `topk_ids` — as autograd frameworks do for torch.topk.
//!
//! Math: recomputed from the logits in double per token, rounded once to float. Deterministic:
//! the same inputs give bitwise the same d_logits.
//!
//! @param[in]  config          the forward's RouterConfig
//! @param[in]  logits          [num_tokens, num_experts] the forward's logits (fp32 or bf16)
//! @param[in]  topk_ids        [num_tokens, top_k] what route() wrote for these logits
//! @param[in]  d_topk_weights  [num_tokens, top_k] gradient of the loss w.r.t. topk_weights
//!                             (ignored at -1 slots)
//! @param[out] d_logits        [num_tokens, num_experts] fp32: **written** (every element; 0 where
//!                             no gradient flows). Router losses add to it afterwards
//!                             (router_losses in host/router_losses.hpp).
//!
//! Errors: the shapes; an id outside [0, num_experts) other than -1 (Errc::kInvalidExpertId); an
//! id repeated within a token, or the id of an unselectable expert (Errc::kInvalidArgument) —
//! route() never writes either, so such ids did not come from a forward over these logits.
//! Synchronous on the calling thread; O(num_experts) host scratch, no workspace.
template <class L>
requires detail::router_logit<L>
void route_backward(Host, RouterConfig const& config, MatrixView<L> logits_in, MatrixView<std::int32_t const> topk_ids,
                    MatrixView<float const> d_topk_weights, MatrixView<float> d_logits) {
  MatrixView<std::remove_const_t<L> const> const logits(logits_in);  // read only, mutable views welcome
  constexpr std::string_view where = "route_backward";
  detail::check_route_backward_args(config, logits, topk_ids, d_topk_weights, d_logits);
  detail::check_topk_id_range(where, topk_ids, config.num_experts);

  auto const num_experts = static_cast<std::size_t>(config.num_experts);
  auto const top_k = static_cast<std::size_t>(config.top_k);
  std::vector<double> logit(num_experts), prob(num_experts), grad(num_experts), dprob(num_experts);
  std::vector<char> selectable(num_experts), chosen(num_experts);
  std::vector<double> weight(top_k), d_weight(top_k);

  for (std::int64_t t = 0; t < logits.rows; ++t) {
    // 1. The logits as route() reads them.
    for (std::size_t e = 0; e < num_experts; ++e) {
      float l = to_float(logits(t, static_cast<std::int64_t>(e)));
      selectable[e] = !(std::isnan(l) || l == -std::numeric_limits<float>::infinity());
      if (l == std::numeric_limits<float>::infinity()) l = std::numeric_limits<float>::max();
      logit[e] = selectable[e] ? static_cast<double>(l) : 0.0;
      chosen[e] = 0;
      grad[e] = 0.0;
    }
    // 2. The forward's ids: each valid one selectable and used once.
    for (std::size_t j = 0; j < top_k; ++j) {
      std::int32_t const id = topk_ids(t, static_cast<std::int64_t>(j));
      if (id < 0) continue;
      auto const e = static_cast<std::size_t>(id);
      if (!selectable[e])
        detail::throw_error(Errc::kInvalidArgument,
                            fmt::format("{}: topk_ids[{}, {}] = {}, expected an expert whose logit is neither NaN nor "
                                        "-inf (logits[{}, {}] = {}: route never chooses it)",
                                        where, t, j, id, t, id, to_float(logits(t, id))));
      if (chosen[e])
        detail::throw_error(Errc::kInvalidArgument,
                            fmt::format("{}: topk_ids[{}, {}] = {}, expected an id not already in an earlier slot of "
                                        "token {} (route never repeats one)",
                                        where, t, j, id, t));
      chosen[e] = 1;
    }
    auto const valid = [&](std::size_t j) { return topk_ids(t, static_cast<std::int64_t>(j)) >= 0; };
    auto const id_of = [&](std::size_t j) {
      return static_cast<std::size_t>(topk_ids(t, static_cast<std::int64_t>(j)));
    };

    // 3. Forward weights before renormalisation and scaling.
    if (config.scoring == Scoring::kSoftmaxTopK) {
      double max_logit = -std::numeric_limits<double>::infinity();
      for (std::size_t e = 0; e < num_experts; ++e)
        if (selectable[e]) max_logit = std::max(max_logit, logit[e]);
      double sum = 0.0;
      for (std::size_t e = 0; e < num_experts; ++e) {
        prob[e] = selectable[e] ? std::exp(logit[e] - max_logit) : 0.0;
        sum += prob[e];
      }
      for (std::size_t e = 0; e < num_experts; ++e) prob[e] /= sum;
      for (std::size_t j = 0; j < top_k; ++j) weight[j] = valid(j) ? prob[id_of(j)] : 0.0;
    } else if (config.scoring == Scoring::kSigmoidTopK) {
      for (std::size_t j = 0; j < top_k; ++j) weight[j] = valid(j) ? 1.0 / (1.0 + std::exp(-logit[id_of(j)])) : 0.0;
    } else {
      double max_logit = -std::numeric_limits<double>::infinity();
      for (std::size_t j = 0; j < top_k; ++j)
        if (valid(j)) max_logit = std::max(max_logit, logit[id_of(j)]);
      double sum = 0.0;
      for (std::size_t j = 0; j < top_k; ++j) {
        weight[j] = valid(j) ? std::exp(logit[id_of(j)] - max_logit) : 0.0;
        sum += weight[j];
      }
      for (std::size_t j = 0; j < top_k; ++j)
        if (valid(j)) weight[j] /= sum;
    }

    // 4. Back through routed_scaling_factor and renormalize: out_j = c · w_j / (sum_i w_i + eps)
    //    gives dL/dw_j = (c · g_j - sum_i c · g_i · w_i / s) / s with s = sum_i w_i + eps.
    double const scale = static_cast<double>(config.routed_scaling_factor);
    for (std::size_t j = 0; j < top_k; ++j)
      d_weight[j] = valid(j) ? scale * static_cast<double>(d_topk_weights(t, static_cast<std::int64_t>(j))) : 0.0;
    if (config.renormalize) {
      double s = 0.0, dot = 0.0;
      for (std::size_t j = 0; j < top_k; ++j) s += weight[j];
      s += 1e-20;
      for (std::size_t j = 0; j < top_k; ++j) dot += d_weight[j] * weight[j];
      for (std::size_t j = 0; j < top_k; ++j)
        if (valid(j)) d_weight[j] = (d_weight[j] - dot / s) / s;
    }

    // 5. Back through the scoring.
    if (config.scoring == Scoring::kSoftmaxTopK) {
      // d logit_e = p_e · (dp_e - sum_i dp_i · p_i), dp nonzero only at the chosen experts.
      for (std::size_t e = 0; e < num_experts; ++e) dprob[e] = 0.0;
      for (std::size_t j = 0; j < top_k; ++j)
        if (valid(j)) dprob[id_of(j)] = d_weight[j];
      double dot = 0.0;
      for (std::size_t e = 0; e < num_experts; ++e) dot += dprob[e] * prob[e];
      for (std::size_t e = 0; e < num_experts; ++e)
        if (selectable[e]) grad[e] = prob[e] * (dprob[e] - dot);
    } else if (config.scoring == Scoring::kSigmoidTopK) {
      for (std::size_t j = 0; j < top_k; ++j)
        if (valid(j)) grad[id_of(j)] = d_weight[j] * weight[j] * (1.0 - weight[j]);
    } else {
      double dot = 0.0;
      for (std::size_t j = 0; j < top_k; ++j) dot += d_weight[j] * weight[j];
      for (std::size_t j = 0; j < top_k; ++j)
        if (valid(j)) grad[id_of(j)] = weight[j] * (d_weight[j] - dot);
    }
    for (std::size_t e = 0; e < num_experts; ++e)
      d_logits(t, static_cast<std::int64_t>(e)) = static_cast<float>(grad[e]);
  }
}

}  // namespace epx
