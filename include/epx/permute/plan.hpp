// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! The plan stage's protocol, shared by every backend: what a RoutingPlan holds, how much
//! workspace it takes, and the argument checks of `epx::make_plan`.

#include <epx/core/placement.hpp>
#include <epx/core/views.hpp>
#include <epx/core/workspace.hpp>

#include <cstdint>
#include <limits>
#include <span>

namespace epx {

//! The routing of num_tokens x top_k (token, slot) pairs onto a range of experts: a stable sort of
//! the slots by expert id. Slot s = token * top_k + j. Every array lives in the workspace the plan
//! was made in (host or device memory, per the execution space) and is valid while it is.
//!
//! Slots whose id is -1, or a valid id outside `experts` (a remote expert), or an invalid id
//! (counted in Status) have no row: `slot_rows[s] == -1`.
struct RoutingPlan {
  std::int32_t num_tokens = 0;
  std::int32_t top_k = 0;
  std::int32_t num_experts = 0;  //!< all experts of the layer: ids in [0, num_experts) are valid
  ExpertRange experts;           //!< the experts this plan sorts onto (all, or one rank's)

  std::span<std::int32_t> tokens_per_expert = {};  //!< [experts.count] rows per expert
  std::span<std::int32_t> expert_offsets = {};     //!< [experts.count + 1] first row of each expert; back() = rows
  std::span<std::int32_t> sorted_slots = {};       //!< [num_tokens * top_k] slot of each row; -1 past the rows
  std::span<std::int32_t> slot_rows = {};          //!< [num_tokens * top_k] row of each slot, or -1 (the inverse)

  [[nodiscard]] std::int64_t num_slots() const noexcept { return std::int64_t{num_tokens} * top_k; }
};

namespace detail {

//! Carves a plan's arrays; shared by sizing (`plan_workspace_bytes`) and `make_plan`.
template <class Carver>
RoutingPlan carve_plan(Carver& carver, std::int32_t num_tokens, std::int32_t top_k, std::int32_t num_experts,
                       ExpertRange experts) {
  auto const num_slots = static_cast<std::size_t>(num_tokens) * static_cast<std::size_t>(top_k);
  RoutingPlan plan{.num_tokens = num_tokens, .top_k = top_k, .num_experts = num_experts, .experts = experts};
  plan.tokens_per_expert = carver.template take<std::int32_t>(static_cast<std::size_t>(experts.count));
  plan.expert_offsets = carver.template take<std::int32_t>(static_cast<std::size_t>(experts.count) + 1);
  plan.sorted_slots = carver.template take<std::int32_t>(num_slots);
  plan.slot_rows = carver.template take<std::int32_t>(num_slots);
  return plan;
}

inline void check_plan_args(std::string_view where, MatrixView<std::int32_t const> topk_ids, std::int32_t num_experts,
                            ExpertRange experts) {
  check_matrix(where, "topk_ids", topk_ids, -1, -1);
  require(num_experts > 0, Errc::kInvalidArgument, where, "num_experts", num_experts, "> 0");
  require(topk_ids.cols >= 1, Errc::kInvalidArgument, where, "topk_ids.cols (top_k)", topk_ids.cols, ">= 1");
  require(experts.first >= 0 && experts.count >= 0 && std::int64_t{experts.first} + experts.count <= num_experts,
          Errc::kInvalidArgument, where, "experts",
          fmt::format("[{}, {})", experts.first, std::int64_t{experts.first} + experts.count),
          fmt::format("a range inside [0, num_experts = {})", num_experts));
  // Row indices are int32 on every backend; products with hidden are computed in 64 bits.
  require(topk_ids.rows * topk_ids.cols < std::numeric_limits<std::int32_t>::max(), Errc::kInvalidArgument, where,
          "num_tokens * top_k", topk_ids.rows * topk_ids.cols, "< 2^31 - 1");
}

}  // namespace detail

//! Workspace bytes `make_plan` needs for this many tokens (pure host arithmetic).
[[nodiscard]] inline std::size_t plan_workspace_bytes(std::int32_t num_tokens, std::int32_t top_k,
                                                      std::int32_t num_experts_in_range) {
  return detail::layout_bytes([&](auto& c) {
    return detail::carve_plan(c, num_tokens, top_k, num_experts_in_range, ExpertRange{0, num_experts_in_range});
  });
}

}  // namespace epx
