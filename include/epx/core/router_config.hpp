// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

#include <epx/core/error.hpp>

#include <cmath>
#include <cstdint>
#include <string_view>

namespace epx {

//! How router logits become scores, and in which order scoring and top-k happen.
enum class Scoring : std::uint8_t {
  kSoftmaxTopK,  //!< softmax over all experts, then top-k (Qwen3-MoE, Mixtral)
  kTopKSoftmax,  //!< top-k on the logits, then softmax over the k chosen (gpt-oss)
  kSigmoidTopK,  //!< sigmoid per expert, then top-k (DeepSeek-V3)
};

constexpr std::string_view to_string(Scoring s) noexcept {
  switch (s) {
    case Scoring::kSoftmaxTopK: return "softmax-topk";
    case Scoring::kTopKSoftmax: return "topk-softmax";
    case Scoring::kSigmoidTopK: return "sigmoid-topk";
  }
  return "?";
}

//! Everything the router needs besides the data. Semantics (host and CUDA alike):
//!
//! 1. score[e]: softmax(logits)[e], logits[e], or sigmoid(logits[e]) per `scoring`.
//! 2. choice[e] = score[e] + correction_bias[e] when a bias is given (selection only).
//! 3. With num_groups > 1: experts form num_groups equal consecutive groups; a group's score is
//!    the sum of its two largest choice values; the `topk_groups` best groups are kept and experts
//!    of the other groups are never chosen.
//! 4. The top_k experts by choice are chosen, best first; ties go to the lower expert id.
//! 5. weight = score of the chosen expert (kTopKSoftmax: softmax over the k chosen logits);
//!    with `renormalize`, weights are divided by (their sum + 1e-20); then multiplied by
//!    `routed_scaling_factor`.
//!
//! A logit that is NaN or -inf makes its expert unselectable for that token; +inf counts as the
//! largest finite float. When fewer than top_k experts are selectable, the remaining slots get
//! id -1 and weight 0. All math is fp32.
struct RouterConfig {
  std::int32_t num_experts = 0;
  std::int32_t top_k = 0;
  Scoring scoring = Scoring::kSoftmaxTopK;
  bool renormalize = false;
  std::int32_t num_groups = 1;   //!< group-limited top-k: experts per group = num_experts / num_groups
  std::int32_t topk_groups = 1;  //!< groups kept per token (<= num_groups)
  float routed_scaling_factor = 1.0f;
};

//! The largest top_k the router accepts (slot bookkeeping is sized by it on the device).
inline constexpr std::int32_t kMaxTopK = 64;

namespace detail {

//! Throws an Error naming the first field of `c` that is out of range.
inline void validate(RouterConfig const& c, std::string_view where = "RouterConfig") {
  require(c.num_experts > 0, Errc::kInvalidArgument, where, "num_experts", c.num_experts, "> 0");
  require(c.top_k >= 1 && c.top_k <= c.num_experts && c.top_k <= kMaxTopK, Errc::kInvalidArgument, where, "top_k",
          c.top_k, fmt::format("in [1, min(num_experts = {}, {})]", c.num_experts, kMaxTopK));
  require(c.num_groups >= 1 && c.num_experts % c.num_groups == 0, Errc::kInvalidArgument, where, "num_groups",
          c.num_groups, fmt::format(">= 1 and dividing num_experts = {}", c.num_experts));
  require(c.topk_groups >= 1 && c.topk_groups <= c.num_groups, Errc::kInvalidArgument, where, "topk_groups",
          c.topk_groups, fmt::format("in [1, num_groups = {}]", c.num_groups));
  std::int64_t const reachable = std::int64_t{c.topk_groups} * (c.num_experts / c.num_groups);
  require(reachable >= c.top_k, Errc::kInvalidArgument, where, "topk_groups * (num_experts / num_groups)", reachable,
          fmt::format(">= top_k = {} (the kept groups must hold top_k experts)", c.top_k));
  require(std::isfinite(c.routed_scaling_factor), Errc::kInvalidArgument, where, "routed_scaling_factor",
          c.routed_scaling_factor, "a finite number");
}

}  // namespace detail
}  // namespace epx
