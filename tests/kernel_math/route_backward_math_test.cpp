// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// The CUDA route_backward's per-slot and per-expert bookkeeping (include/epx/router/
// route_backward_args.hpp) on the host: 32 lanes emulated as arrays. Each slot's id is broadcast to
// every lane and only its owner records it; checked against plain references: the set of chosen
// experts, one owner per id, a repeated id found exactly when the slots repeat one, the slot kinds
// against the routing-id contract (is_invalid_expert_id), and a rejected token's Status counts.

#include "../common/test_util.hpp"

#include <epx/parallel/forward_control.hpp>
#include <epx/router/route_backward_args.hpp>

#include <array>
#include <climits>
#include <set>
#include <vector>

using namespace epx;
using namespace epx::detail;

TEST_CASE("route_backward kernel math: slot kinds follow the routing-id contract") {
  for (std::int32_t e : {1, 2, 33, 512})
    for (std::int32_t id : {INT_MIN, -100, -2, -1, 0, 1, e - 1, e, e + 1, 1000, INT_MAX}) {
      CAPTURE(e);
      CAPTURE(id);
      BackwardSlot const kind = backward_slot(id, e);
      CHECK((kind == BackwardSlot::kEmpty) == (id == -1));
      CHECK((kind == BackwardSlot::kOutOfRange) == is_invalid_expert_id(id, e));
      CHECK((kind == BackwardSlot::kExpert) == (id >= 0 && id < e));
    }
}

TEST_CASE("route_backward kernel math: owners mark the chosen experts and find repeated ids") {
  EPX_TEST_SEEDED_RNG(rng);
  for (std::int32_t e : {1, 5, 32, 33, 100, 256, 500, 512})
    for (std::int32_t k : {1, 2, 8, 33, 64})
      for (bool repeat : {false, true})
        for (int trial = 0; trial < 20; ++trial) {
          CAPTURE(e);
          CAPTURE(k);
          CAPTURE(repeat);
          // The slots: distinct ids (or -1) when not `repeat`; random ids with repeats allowed else.
          std::vector<std::int32_t> pool(static_cast<std::size_t>(e));
          for (std::int32_t x = 0; x < e; ++x) pool[static_cast<std::size_t>(x)] = x;
          std::shuffle(pool.begin(), pool.end(), rng);
          std::vector<std::int32_t> ids(static_cast<std::size_t>(k), -1);
          std::uniform_int_distribution<std::int32_t> any(-1, e - 1);
          for (std::int32_t j = 0; j < k; ++j) {
            if (repeat)
              ids[static_cast<std::size_t>(j)] = any(rng);
            else if (j < e && rng() % 5 != 0)
              ids[static_cast<std::size_t>(j)] = pool[static_cast<std::size_t>(j)];
          }
          std::set<std::int32_t> distinct;
          bool has_repeat = false;
          for (auto id : ids)
            if (id >= 0 && !distinct.insert(id).second) has_repeat = true;
          if (!repeat) REQUIRE_FALSE(has_repeat);

          std::array<BackwardChosen, kWarpLanes> lanes{};
          for (auto id : ids) {
            if (id < 0) continue;
            int owners = 0;
            for (int lane = 0; lane < kWarpLanes; ++lane)
              owners += backward_mark_chosen(lane, id, lanes[static_cast<std::size_t>(lane)]) ? 1 : 0;
            CHECK(owners == 1);
          }
          bool repeated = false;
          std::set<std::int32_t> marked;
          for (int lane = 0; lane < kWarpLanes; ++lane) {
            auto const& c = lanes[static_cast<std::size_t>(lane)];
            repeated = repeated || c.repeated;
            for (int reg = 0; reg < 16; ++reg)
              if ((c.mask >> reg) & 1u) marked.insert(router_expert(lane, reg));
            CHECK((c.mask >> router_registers(e)) == 0u);  // no bit past this E's registers
          }
          CHECK(marked == distinct);
          CHECK(repeated == has_repeat);
        }
}

TEST_CASE("route_backward kernel math: a rejected token's Status counts") {
  BackwardRejected const accepted = backward_rejected(0, 5, false);
  CHECK(accepted.invalid_ids == 0);
  CHECK(accepted.dropped_slots == 0);
  BackwardRejected const rejected = backward_rejected(2, 7, true);
  CHECK(rejected.invalid_ids == 2);
  CHECK(rejected.dropped_slots == 7);
}
