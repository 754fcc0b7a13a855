// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! The router stage's protocol, shared by every backend: argument checks for
//! `epx::route(space, config, logits, correction_bias, topk_ids, topk_weights)`.
//! The semantics are written once, on RouterConfig.

#include <epx/core/dtype.hpp>
#include <epx/core/router_config.hpp>
#include <epx/core/views.hpp>

#include <cstdint>
#include <span>

namespace epx::detail {

//! Logit element types the router reads (math is always fp32).
template <class L>
concept router_logit = std::is_same_v < std::remove_cv_t<L>,
float > || std::is_same_v<std::remove_cv_t<L>, bfloat16>;

template <class L>
void check_route_args(RouterConfig const& config, MatrixView<L const> logits, std::span<float const> correction_bias,
                      MatrixView<std::int32_t> topk_ids, MatrixView<float> topk_weights) {
  constexpr std::string_view where = "route";
  validate(config, where);
  check_matrix(where, "logits", logits, -1, config.num_experts);
  check_matrix(where, "topk_ids", topk_ids, logits.rows, config.top_k);
  check_matrix(where, "topk_weights", topk_weights, logits.rows, config.top_k);
  require(correction_bias.empty() || correction_bias.size() == static_cast<std::size_t>(config.num_experts),
          Errc::kShapeMismatch, where, "correction_bias.size()", correction_bias.size(),
          fmt::format("0 (no bias) or num_experts = {}", config.num_experts));
}

}  // namespace epx::detail
