// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! Host arithmetic of the AllToAll dispatch, shared by every backend: from the count table every
//! rank gathers, how many rows go where, and how received rows regroup from rank-major to
//! expert-major order.
//!
//! The count table has one row per rank q: (num_tokens_q, capacity_q, capacity_rows_q,
//! tokens_per_expert_q[E]): the tokens q passes, the tokens its memory holds, the rows its memory
//! holds for its experts, and how many of its slots go to each expert.
//! Every rank sees the whole table, so every rank reaches the same verdict on capacity errors
//! and throws the same Error: no rank is left waiting in a collective.

#include <epx/config.hpp>
#include <epx/core/placement.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

namespace epx::detail {

//! The head of a rank's count-table row: what the rank passes and what its memory holds.
struct CountRowHead {
  std::int64_t num_tokens = 0;
  std::int64_t capacity = 0;       //!< tokens its workspace (and SavedState) hold
  std::int64_t capacity_rows = 0;  //!< rows they hold for its experts (recv_capacity_rows)
};

inline constexpr std::size_t kCountTableHeader = 3;  // CountRowHead's words

//! Entry `i` of one rank's count-table row: its CountRowHead, then `counts` (zeros when the rank
//! made no plan: `counts == nullptr`). One definition for the host loop and the device kernel.
EPX_HOST_DEVICE constexpr std::int64_t count_table_entry(std::int64_t i, std::int32_t const* counts,
                                                         std::int32_t num_counts, CountRowHead const& head) {
  if (i == 0) return head.num_tokens;
  if (i == 1) return head.capacity;
  if (i == 2) return head.capacity_rows;
  std::int64_t const e = i - static_cast<std::int64_t>(kCountTableHeader);
  return counts != nullptr && e < num_counts ? counts[e] : 0;
}

//! A run of rows copied between the AllToAll receive buffer (rank-major) and the experts' input
//! (expert-major): rank-major rows [src_row, src_row + num_rows) <-> expert-major rows
//! [dst_row, dst_row + num_rows). A layout's segments tile the rank-major rows in order, so
//! src_row is also the prefix sum of the earlier segments' rows (make_all_to_all_layout).
struct RowSegment {
  std::int64_t src_row = 0;
  std::int64_t dst_row = 0;
  std::int64_t num_rows = 0;
};

//! The segment holding rank-major `row`: the last one with src_row <= row (a binary search over
//! segments that tile [0, total rows) in order, as a layout's do). The device regroup calls it
//! once per row, so that one flat grid covers every row however uneven the segments are.
EPX_HOST_DEVICE constexpr int segment_of_row(RowSegment const* segments, int num_segments, std::int64_t row) {
  int lo = 0, hi = num_segments - 1;  // invariant: segments[lo].src_row <= row
  while (lo < hi) {
    int const mid = lo + (hi - lo + 1) / 2;
    if (segments[mid].src_row <= row)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

//! The expert-major row of rank-major `row`, which segment `s` holds.
EPX_HOST_DEVICE constexpr std::int64_t expert_major_row(RowSegment const& s, std::int64_t row) {
  return s.dst_row + (row - s.src_row);
}

struct AllToAllLayout {
  std::vector<std::size_t> send_rows;       // [R] rows this rank sends to each rank
  std::vector<std::size_t> recv_rows;       // [R] rows this rank receives from each rank
  std::vector<std::int32_t> local_offsets;  // [L + 1] received rows of each local expert, expert-major
  std::vector<RowSegment> regroup;          // rank-major received row -> expert-major row
  std::int64_t num_recv_rows = 0;
  std::uint32_t max_rows_per_local_expert = 0;
};

//! Rows a rank sized for `capacity` tokens holds for its experts: the dropless worst case, every
//! token of every rank (capacity * num_ranks * top_k), or with 0 < `factor` < num_ranks that many
//! balanced shares, ceil(factor * capacity * top_k) (MoeConfig::received_rows_factor). Monotone
//! in `capacity`, so the tokens a memory holds can be found by bisection.
inline std::int64_t recv_capacity_rows(std::int64_t capacity, std::int32_t num_ranks, std::int32_t top_k,
                                       double factor = 0) {
  std::int64_t const worst = capacity * num_ranks * top_k;
  if (!(factor > 0) || factor >= static_cast<double>(num_ranks)) return worst;
  auto const rows = static_cast<std::int64_t>(std::ceil(factor * static_cast<double>(capacity * top_k)));
  return std::min(rows, worst);
}

inline std::span<std::int64_t const> table_row(std::span<std::int64_t const> table, std::int32_t num_experts,
                                               std::int32_t rank) {
  auto const width = kCountTableHeader + static_cast<std::size_t>(num_experts);
  return table.subspan(static_cast<std::size_t>(rank) * width, width);
}

//! rows / share rounded up to 3 decimals: a received_rows_factor that holds `rows` (printed as is).
inline double factor_at_least(std::int64_t rows, std::int64_t share) {
  return std::ceil(static_cast<double>(rows) * 1000.0 / static_cast<double>(share)) / 1000.0;
}

//! Throws Errc::kWorkspaceTooSmall, identically on every rank, when some rank's tokens or
//! received rows exceed what its memory holds (every rank reads the same table).
inline void check_count_table(std::span<std::int64_t const> table, ExpertPlacement const& placement,
                              std::int32_t top_k) {
  std::int32_t const num_ranks = placement.num_ranks(), num_experts = placement.num_experts();
  // The most tokens any rank passes: what every rank's memory must be sized for at least, so the
  // factor hint below holds for any memory sized that way (not only for the one that threw).
  std::int64_t largest = 0;
  for (std::int32_t q = 0; q < num_ranks; ++q) largest = std::max(largest, table_row(table, num_experts, q)[0]);
  for (std::int32_t q = 0; q < num_ranks; ++q) {
    auto const row = table_row(table, num_experts, q);
    if (row[0] > row[1])
      throw_error(Errc::kWorkspaceTooSmall,
                  fmt::format("forward: rank {}: num_tokens = {}, expected <= {} (the tokens its workspace holds); "
                              "size every rank's workspace with workspace_bytes(max_tokens) for the largest "
                              "num_tokens any rank passes",
                              q, row[0], row[1]));
    std::int64_t received = 0;
    for (std::int32_t p = 0; p < num_ranks; ++p) {
      auto const counts = table_row(table, num_experts, p).subspan(kCountTableHeader);
      for (std::int32_t e = placement.first_expert(q); e < placement.first_expert(q) + placement.num_local_experts(q);
           ++e)
        received += counts[static_cast<std::size_t>(e)];
    }
    std::int64_t const capacity = row[2];
    if (received <= capacity) continue;
    std::int64_t const share = row[1] * top_k;  // a balanced share of q's capacity: capacity * top_k rows
    // A factor below the worst case, and one that would hold these rows: name the factor needed.
    std::int64_t const worst = recv_capacity_rows(row[1], num_ranks, top_k);
    if (capacity < worst && received <= worst)
      throw_error(Errc::kWorkspaceTooSmall,
                  fmt::format("forward: rank {} would receive {} rows, expected <= {} (what its memory for {} tokens "
                              "holds for its experts: MoeConfig::received_rows_factor = {:.4g} shares of {} rows); "
                              "nothing was dropped: set received_rows_factor >= {} on every rank (with memory for "
                              "at least the {} tokens the largest rank passes; 0: the dropless worst case), or size "
                              "its memory for more tokens",
                              q, received, capacity, row[1], static_cast<double>(capacity) / static_cast<double>(share),
                              share, factor_at_least(received, largest * top_k), largest));
    throw_error(Errc::kWorkspaceTooSmall,
                fmt::format("forward: rank {} would receive {} rows, expected <= {} (what its workspace for {} "
                            "tokens holds); size every rank's workspace with workspace_bytes(max_tokens) for the "
                            "largest num_tokens any rank passes",
                            q, received, capacity, row[1]));
  }
}

//! The send/receive sizes and the regrouping of `rank`, from the gathered count table.
inline AllToAllLayout make_all_to_all_layout(std::span<std::int64_t const> table, ExpertPlacement const& placement,
                                             std::int32_t rank) {
  std::int32_t const num_ranks = placement.num_ranks(), num_experts = placement.num_experts();
  std::int32_t const first = placement.first_expert(rank), num_local = placement.num_local_experts(rank);
  auto count = [&](std::int32_t q, std::int32_t e) {
    return table_row(table, num_experts, q)[kCountTableHeader + static_cast<std::size_t>(e)];
  };
  AllToAllLayout out;
  out.send_rows.assign(static_cast<std::size_t>(num_ranks), 0);
  out.recv_rows.assign(static_cast<std::size_t>(num_ranks), 0);
  for (std::int32_t p = 0; p < num_ranks; ++p) {
    for (std::int32_t e = placement.first_expert(p); e < placement.first_expert(p) + placement.num_local_experts(p);
         ++e)
      out.send_rows[static_cast<std::size_t>(p)] += static_cast<std::size_t>(count(rank, e));
    for (std::int32_t l = 0; l < num_local; ++l)
      out.recv_rows[static_cast<std::size_t>(p)] += static_cast<std::size_t>(count(p, first + l));
  }
  // Expert-major offsets: local expert l holds the rows from rank 0, then rank 1, ...
  out.local_offsets.assign(static_cast<std::size_t>(num_local) + 1, 0);
  for (std::int32_t l = 0; l < num_local; ++l) {
    std::int64_t rows = 0;
    for (std::int32_t q = 0; q < num_ranks; ++q) rows += count(q, first + l);
    out.local_offsets[static_cast<std::size_t>(l) + 1] =
        out.local_offsets[static_cast<std::size_t>(l)] + static_cast<std::int32_t>(rows);
    out.max_rows_per_local_expert = std::max(out.max_rows_per_local_expert, static_cast<std::uint32_t>(rows));
  }
  out.num_recv_rows = out.local_offsets.back();
  // Rank-major: the block from rank q holds q's rows for local experts 0, 1, ... in order.
  std::int64_t src = 0;
  for (std::int32_t q = 0; q < num_ranks; ++q) {
    for (std::int32_t l = 0; l < num_local; ++l) {
      std::int64_t const rows = count(q, first + l);
      std::int64_t dst = out.local_offsets[static_cast<std::size_t>(l)];
      for (std::int32_t q2 = 0; q2 < q; ++q2) dst += count(q2, first + l);
      if (rows > 0) out.regroup.push_back({src, dst, rows});
      src += rows;
    }
  }
  return out;
}

}  // namespace epx::detail
