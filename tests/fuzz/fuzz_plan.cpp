// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// make_plan(Host): arbitrary ids (-1, huge, negative) and expert ranges. Invariants: every slot
// with an id in the range is routed exactly once, rows are sorted by expert and stable, the
// inverse permutation agrees, and invalid ids are counted exactly.

#include "fuzz_input.hpp"

extern "C" int LLVMFuzzerTestOneInput(std::uint8_t const* data, std::size_t size) {
  using namespace epx;
  fuzz::ByteReader in(data, size);
  auto const num_experts = static_cast<std::int32_t>(in.in_range(1, 300));
  auto const top_k = static_cast<std::int32_t>(in.in_range(1, 9));
  auto const num_tokens = static_cast<std::int32_t>(in.in_range(0, 40));
  auto const first = static_cast<std::int32_t>(in.in_range(0, num_experts));
  auto const count = static_cast<std::int32_t>(in.in_range(0, num_experts - first));
  ExpertRange const range{first, count};
  std::vector<std::int32_t> ids(static_cast<std::size_t>(num_tokens) * static_cast<std::size_t>(top_k));
  for (auto& id : ids) id = in.any_id(num_experts);

  std::vector<std::byte> ws(plan_workspace_bytes(num_tokens, top_k, count));
  Status status;
  RoutingPlan const plan = make_plan(Host{}, MatrixView<std::int32_t const>(ids.data(), num_tokens, top_k), num_experts,
                                     range, Workspace(ws.data(), ws.size()), status);
  std::uint64_t invalid = 0;
  std::int32_t routed = 0;
  for (std::size_t s = 0; s < ids.size(); ++s) {
    auto const id = ids[s];
    bool const is_invalid = id != -1 && (id < 0 || id >= num_experts);
    invalid += is_invalid;
    bool const here = !is_invalid && id != -1 && range.contains(id);
    auto const row = plan.slot_rows[s];
    EPX_FUZZ_CHECK((row >= 0) == here);
    if (!here) continue;
    ++routed;
    EPX_FUZZ_CHECK(row < plan.expert_offsets.back());
    EPX_FUZZ_CHECK(plan.sorted_slots[static_cast<std::size_t>(row)] == static_cast<std::int32_t>(s));
    auto const e = static_cast<std::size_t>(id - range.first);
    EPX_FUZZ_CHECK(row >= plan.expert_offsets[e] && row < plan.expert_offsets[e + 1]);
  }
  EPX_FUZZ_CHECK(status.invalid_ids == invalid && status.dropped_slots == invalid);
  EPX_FUZZ_CHECK(plan.expert_offsets.back() == routed);
  for (std::int32_t row = 1; row < routed; ++row) {  // sorted by expert, then by slot (stable)
    auto const a = plan.sorted_slots[static_cast<std::size_t>(row) - 1],
               b = plan.sorted_slots[static_cast<std::size_t>(row)];
    auto const ea = ids[static_cast<std::size_t>(a)], eb = ids[static_cast<std::size_t>(b)];
    EPX_FUZZ_CHECK(ea < eb || (ea == eb && a < b));
  }
  return 0;
}
