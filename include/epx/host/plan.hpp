// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

#include <epx/core/space.hpp>
#include <epx/core/status.hpp>
#include <epx/permute/plan.hpp>

#include <algorithm>
#include <cstdint>

namespace epx {

//! @brief Sorts the (token, slot) pairs of `topk_ids` by expert, stably (host reference: a
//! counting sort, so rows of one expert keep slot order).
//!
//! @param[in]  topk_ids     [num_tokens, top_k] global expert ids; -1 = no expert
//! @param[in]  num_experts  all experts of the layer (ids outside [0, num_experts) other than -1
//!                          are invalid: dropped and counted in `status`)
//! @param[in]  experts      the experts to sort onto; slots routed elsewhere get no row
//! @param[in]  workspace    at least plan_workspace_bytes(num_tokens, top_k, experts.count) bytes
//! @param[in,out] status    invalid_ids, dropped_slots and tokens_without_expert (tokens with no
//!                          valid id in any slot, whatever `experts` is) are added,
//!                          max_tokens_per_expert folded
//! @return the plan, whose arrays live in `workspace`
inline RoutingPlan make_plan(Host, MatrixView<std::int32_t const> topk_ids, std::int32_t num_experts,
                             ExpertRange experts, Workspace workspace, Status& status) {
  constexpr std::string_view where = "make_plan";
  detail::check_plan_args(where, topk_ids, num_experts, experts);
  auto const num_tokens = static_cast<std::int32_t>(topk_ids.rows);
  auto const top_k = static_cast<std::int32_t>(topk_ids.cols);
  RoutingPlan plan = detail::carve_layout(
      workspace, where, [&](auto& c) { return detail::carve_plan(c, num_tokens, top_k, num_experts, experts); });

  // Pass 1: count rows per expert of the range, the slots dropped for invalid ids, and the tokens
  // with no valid id at all (over every expert, not only the range: the same on every rank).
  std::fill(plan.tokens_per_expert.begin(), plan.tokens_per_expert.end(), 0);
  for (std::int32_t t = 0; t < num_tokens; ++t) {
    bool found_expert = false;
    for (std::int32_t j = 0; j < top_k; ++j) {
      std::int32_t const id = topk_ids(t, j);
      if (id == -1) continue;
      if (id < 0 || id >= num_experts) {
        ++status.invalid_ids;
        ++status.dropped_slots;
        continue;
      }
      found_expert = true;
      if (experts.contains(id)) ++plan.tokens_per_expert[static_cast<std::size_t>(id - experts.first)];
    }
    if (!found_expert) ++status.tokens_without_expert;
  }
  plan.expert_offsets[0] = 0;
  for (std::size_t e = 0; e < plan.tokens_per_expert.size(); ++e) {
    plan.expert_offsets[e + 1] = plan.expert_offsets[e] + plan.tokens_per_expert[e];
    status.max_tokens_per_expert =
        std::max(status.max_tokens_per_expert, static_cast<std::uint32_t>(plan.tokens_per_expert[e]));
  }
  // Pass 2: place each slot after the earlier slots of its expert (stable), and record the inverse.
  std::fill(plan.tokens_per_expert.begin(), plan.tokens_per_expert.end(), 0);  // reused as cursors
  std::fill(plan.sorted_slots.begin(), plan.sorted_slots.end(), -1);
  for (std::int32_t t = 0; t < num_tokens; ++t) {
    for (std::int32_t j = 0; j < top_k; ++j) {
      std::int32_t const slot = t * top_k + j;
      std::int32_t const id = topk_ids(t, j);
      if (id < 0 || id >= num_experts || !experts.contains(id)) {
        plan.slot_rows[static_cast<std::size_t>(slot)] = -1;
        continue;
      }
      auto const e = static_cast<std::size_t>(id - experts.first);
      std::int32_t const row = plan.expert_offsets[e] + plan.tokens_per_expert[e]++;
      plan.sorted_slots[static_cast<std::size_t>(row)] = slot;
      plan.slot_rows[static_cast<std::size_t>(slot)] = row;
    }
  }
  return plan;
}

}  // namespace epx
