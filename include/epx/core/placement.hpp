// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

#include <epx/core/error.hpp>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <span>
#include <vector>

namespace epx {

//! A contiguous range of global expert ids: [first, first + count).
struct ExpertRange {
  std::int32_t first = 0;
  std::int32_t count = 0;

  [[nodiscard]] constexpr bool contains(std::int64_t expert_idx) const noexcept {
    return expert_idx >= first && expert_idx < std::int64_t{first} + count;
  }
  [[nodiscard]] constexpr std::int32_t end() const noexcept { return first + count; }
};

//! Which rank owns which global experts: rank r owns the contiguous range
//! [first_expert(r), first_expert(r) + num_local_experts(r)). Ranges may differ in size (E need
//! not divide the EP size) and may be empty (more ranks than experts).
class ExpertPlacement {
 public:
  ExpertPlacement() = default;

  //! Experts spread as evenly as possible: the first `num_experts % num_ranks` ranks own one more.
  static ExpertPlacement contiguous(std::int32_t num_experts, std::int32_t num_ranks) {
    detail::require(num_experts > 0, Errc::kInvalidArgument, "ExpertPlacement::contiguous", "num_experts", num_experts,
                    "> 0");
    detail::require(num_ranks > 0, Errc::kInvalidArgument, "ExpertPlacement::contiguous", "num_ranks", num_ranks,
                    "> 0");
    std::vector<std::int32_t> counts(static_cast<std::size_t>(num_ranks), num_experts / num_ranks);
    for (std::int32_t r = 0; r < num_experts % num_ranks; ++r) ++counts[static_cast<std::size_t>(r)];
    return from_counts(counts);
  }

  //! Rank r owns `experts_per_rank[r]` experts, in rank order.
  static ExpertPlacement from_counts(std::span<std::int32_t const> experts_per_rank) {
    detail::require(!experts_per_rank.empty(), Errc::kInvalidArgument, "ExpertPlacement::from_counts",
                    "experts_per_rank.size()", experts_per_rank.size(), "> 0");
    ExpertPlacement p;
    p.first_.assign(1, 0);
    for (std::size_t r = 0; r < experts_per_rank.size(); ++r) {
      detail::require(experts_per_rank[r] >= 0, Errc::kInvalidArgument, "ExpertPlacement::from_counts",
                      fmt::format("experts_per_rank[{}]", r), experts_per_rank[r], ">= 0");
      detail::require(std::int64_t{p.first_.back()} + experts_per_rank[r] <= std::numeric_limits<std::int32_t>::max(),
                      Errc::kInvalidArgument, "ExpertPlacement::from_counts", "sum(experts_per_rank)",
                      std::int64_t{p.first_.back()} + experts_per_rank[r], "< 2^31");
      p.first_.push_back(p.first_.back() + experts_per_rank[r]);
    }
    detail::require(p.first_.back() > 0, Errc::kInvalidArgument, "ExpertPlacement::from_counts",
                    "sum(experts_per_rank)", p.first_.back(), "> 0");
    return p;
  }

  [[nodiscard]] std::int32_t num_experts() const noexcept { return first_.empty() ? 0 : first_.back(); }
  [[nodiscard]] std::int32_t num_ranks() const noexcept { return static_cast<std::int32_t>(first_.size()) - 1; }
  [[nodiscard]] bool empty() const noexcept { return first_.empty(); }

  [[nodiscard]] std::int32_t first_expert(std::int32_t rank) const { return first_.at(check_rank(rank)); }
  [[nodiscard]] std::int32_t num_local_experts(std::int32_t rank) const {
    auto const r = check_rank(rank);
    return first_.at(r + 1) - first_.at(r);
  }
  [[nodiscard]] ExpertRange local_range(std::int32_t rank) const {
    return {first_expert(rank), num_local_experts(rank)};
  }
  //! Largest number of experts on any rank.
  [[nodiscard]] std::int32_t max_local_experts() const {
    std::int32_t m = 0;
    for (std::int32_t r = 0; r < num_ranks(); ++r) m = std::max(m, num_local_experts(r));
    return m;
  }

  //! The rank that owns global expert `expert_idx`.
  [[nodiscard]] std::int32_t rank_of(std::int32_t expert_idx) const {
    detail::require(expert_idx >= 0 && expert_idx < num_experts(), Errc::kInvalidArgument, "ExpertPlacement::rank_of",
                    "expert_idx", expert_idx, fmt::format("in [0, {})", num_experts()));
    // upper_bound skips empty ranks: the owner is the last rank whose first expert is <= id.
    auto it = std::upper_bound(first_.begin(), first_.end(), expert_idx);
    return static_cast<std::int32_t>(it - first_.begin()) - 1;
  }

  //! Rank r's first expert, for r in [0, num_ranks()], with first_expert(num_ranks()) == E.
  [[nodiscard]] std::span<std::int32_t const> offsets() const noexcept { return first_; }

  friend bool operator==(ExpertPlacement const&, ExpertPlacement const&) = default;

 private:
  std::size_t check_rank(std::int32_t rank) const {
    detail::require(!empty(), Errc::kInvalidArgument, "ExpertPlacement", "placement", "empty",
                    "one built by ExpertPlacement::contiguous or ::from_counts");
    detail::require(rank >= 0 && rank < num_ranks(), Errc::kInvalidArgument, "ExpertPlacement", "rank", rank,
                    fmt::format("in [0, {})", num_ranks()));
    return static_cast<std::size_t>(rank);
  }

  std::vector<std::int32_t> first_;  // [num_ranks + 1]
};

}  // namespace epx
