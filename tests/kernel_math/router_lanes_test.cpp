// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// The CUDA router's warp layout (include/epx/cuda/router_lanes.hpp) on the host: 32 lanes
// emulated as arrays, __shfl_xor_sync as an array permutation, and the kernel's top-k rounds and
// group keep rounds run through the same functions the kernel calls. Checked against plain
// references: a stable sort by (choice desc, id asc), a sorted top-2 sum, and the host router's
// group scan; for every kPerLane 1..16 and every num_experts it holds (1..512, so 100 and 500 with
// a partly empty last register row), every group size, every top_k up to kMaxTopK.

#include "../common/test_util.hpp"

#include <epx/cuda/router_lanes.hpp>

#include <algorithm>
#include <array>
#include <bit>
#include <cfloat>
#include <cstring>
#include <limits>
#include <map>
#include <numeric>
#include <set>
#include <utility>

using namespace epx;
using namespace epx::detail;

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

//! Values of all 32 lanes at once.
template <class T>
using Lanes = std::array<T, kWarpLanes>;

//! __shfl_xor_sync over emulated lanes: lane l receives lane (l ^ offset)'s value.
template <class T>
Lanes<T> shfl_xor(Lanes<T> const& v, int offset) {
  Lanes<T> out{};
  for (int l = 0; l < kWarpLanes; ++l) out[static_cast<std::size_t>(l)] = v[static_cast<std::size_t>(l ^ offset)];
  return out;
}

//! warp_butterfly on emulated lanes with a per-lane merge.
template <class T, class Merge>
Lanes<T> butterfly(Lanes<T> const& v, Merge merge) {
  return warp_butterfly(
      v, [](Lanes<T> const& x, int offset) { return shfl_xor(x, offset); },
      [&](Lanes<T> const& mine, Lanes<T> const& other) {
        Lanes<T> out{};
        for (std::size_t l = 0; l < out.size(); ++l) out[l] = merge(mine[l], other[l]);
        return out;
      });
}

Lanes<RouterCandidate> warp_best(Lanes<RouterCandidate> const& v) {
  return butterfly(v, [](RouterCandidate a, RouterCandidate b) { return router_pick(a, b); });
}

bool same_bits(float a, float b) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  return std::bit_cast<std::uint32_t>(a) == std::bit_cast<std::uint32_t>(b);
}

std::size_t at(int i) { return static_cast<std::size_t>(i); }

//! One lane's kPerLane registers, as the kernel's functions take them (a C array by reference).
template <int kPerLane>
struct Registers {
  float v[kPerLane];
};

// Calls f(std::integral_constant<int, k>) for k = 1..16, every kPerLane the kernel layout allows.
template <class F>
void for_each_per_lane(F&& f) {
  [&]<int... k>(std::integer_sequence<int, k...>) { (f(std::integral_constant<int, k + 1>{}), ...); }
  (std::make_integer_sequence<int, 16>{});
}

}  // namespace

TEST_CASE("router lanes: every expert has exactly one (lane, register), loads are coalesced") {
  for (int per_lane = 1; per_lane <= 16; ++per_lane) {
    for (int num_experts = 1; num_experts <= kWarpLanes * per_lane; ++num_experts) {
      CAPTURE(per_lane);
      CAPTURE(num_experts);
      REQUIRE(router_registers(num_experts) <= per_lane);
      std::vector<int> owners(static_cast<std::size_t>(num_experts), 0);
      int empty = 0;
      for (int reg = 0; reg < per_lane; ++reg) {
        for (int lane = 0; lane < kWarpLanes; ++lane) {
          int const e = router_expert(lane, reg);
          // One register of the warp is one 32-wide run of consecutive experts (one coalesced load).
          REQUIRE(e == router_expert(0, reg) + lane);
          if (e >= num_experts) {
            ++empty;
            continue;
          }
          REQUIRE(e >= 0);
          ++owners[at(e)];
          REQUIRE(router_expert_lane(e) == lane);
          REQUIRE(router_expert_register(e) == reg);
        }
      }
      REQUIRE(std::all_of(owners.begin(), owners.end(), [](int n) { return n == 1; }));
      REQUIRE(empty == kWarpLanes * per_lane - num_experts);  // e.g. E = 100: 28 empty slots in the 4th row
    }
  }
  // The launcher's choice: the smallest register count that holds every expert.
  CHECK(router_registers(1) == 1);
  CHECK(router_registers(32) == 1);
  CHECK(router_registers(33) == 2);
  CHECK(router_registers(100) == 4);
  CHECK(router_registers(500) == 16);
  CHECK(router_registers(512) == 16);
}

TEST_CASE("router lanes: slots 0..kMaxTopK-1 have exactly one (lane, slot register)") {
  std::set<std::pair<int, int>> seen;
  for (int slot = 0; slot < kMaxTopK; ++slot) {
    int const lane = router_slot_lane(slot), reg = router_slot_register(slot);
    CAPTURE(slot);
    REQUIRE(lane >= 0);
    REQUIRE(lane < kWarpLanes);
    REQUIRE(reg >= 0);
    REQUIRE(reg < kRouterSlotRegisters);
    REQUIRE(router_slot(lane, reg) == slot);
    REQUIRE(seen.insert({lane, reg}).second);
  }
  // RouterSlots::keep records a slot in exactly its owner's register and nowhere else.
  for (int slot = 0; slot < kMaxTopK; ++slot) {
    Lanes<RouterSlots> lanes{};
    for (int l = 0; l < kWarpLanes; ++l) lanes[at(l)].keep(l, slot, 1000 + slot, 0.5f);
    for (int l = 0; l < kWarpLanes; ++l)
      for (int r = 0; r < kRouterSlotRegisters; ++r) {
        bool const owner = router_slot(l, r) == slot;
        CHECK(lanes[at(l)].id[r] == (owner ? 1000 + slot : -1));
        CHECK(lanes[at(l)].weight[r] == (owner ? 0.5f : 0.0f));
      }
  }
}

TEST_CASE("router lanes: the xor butterfly gives every lane the reduction over all 32 lanes") {
  EPX_TEST_SEEDED_RNG(rng);
  Lanes<unsigned> bits{};
  for (int l = 0; l < kWarpLanes; ++l) bits[at(l)] = 1u << l;
  auto const ored = butterfly(bits, [](unsigned a, unsigned b) { return a | b; });
  for (unsigned v : ored) CHECK(v == 0xffffffffu);  // every lane heard from every lane

  std::uniform_int_distribution<int> small(-1000, 1000);
  for (int trial = 0; trial < 200; ++trial) {
    Lanes<int> v{};
    for (auto& x : v) x = small(rng);
    int const want = *std::min_element(v.begin(), v.end());
    for (int got : butterfly(v, [](int a, int b) { return a < b ? a : b; })) REQUIRE(got == want);
  }
}

TEST_CASE("router lanes: argmax ties go to the lower id, nothing (-1) loses to everything") {
  CHECK(router_better({1.0f, 7}, {1.0f, 9}));
  CHECK_FALSE(router_better({1.0f, 9}, {1.0f, 7}));
  CHECK(router_better({2.0f, 9}, {1.0f, 7}));
  CHECK(router_better({-kInf, 3}, {5.0f, -1}));
  CHECK_FALSE(router_better({5.0f, -1}, {-kInf, 3}));
  CHECK_FALSE(router_better({5.0f, -1}, {5.0f, -1}));
  CHECK(router_better({-kInf, 2}, {-kInf, 3}));
  CHECK(router_better({kInf, 3}, {FLT_MAX, 0}));

  // A whole warp of equal values: the lowest lane's id wins, on every lane.
  Lanes<RouterCandidate> tie{};
  for (int l = 0; l < kWarpLanes; ++l) tie[at(l)] = {0.25f, 31 - l + 64};
  for (auto const& c : warp_best(tie)) CHECK(c.id == 64);
}

namespace {

// A token's choices for one (kPerLane, num_experts): values from a small set (many exact ties),
// some unselectable, some +-inf.
struct Token {
  std::vector<float> choice, score;
  std::vector<bool> selectable;
};

Token random_token(int num_experts, std::mt19937_64& rng) {
  std::uniform_int_distribution<int> pick(0, 19);
  Token t;
  for (int e = 0; e < num_experts; ++e) {
    int const p = pick(rng);
    float const v = p == 0 ? kInf : p == 1 ? -kInf : static_cast<float>(pick(rng) % 6) * 0.5f - 1.0f;
    t.choice.push_back(v);
    t.score.push_back(static_cast<float>(e) + 0.5f);  // tells which expert a weight came from
    t.selectable.push_back(pick(rng) >= 3);
  }
  return t;
}

// The plain reference: selectable experts sorted by (choice desc, id asc), the first top_k.
std::vector<int> sorted_top_k(Token const& t, int top_k) {
  std::vector<int> order;
  for (int e = 0; e < static_cast<int>(t.choice.size()); ++e)
    if (t.selectable[at(e)]) order.push_back(e);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return t.choice[at(a)] > t.choice[at(b)]; });
  order.resize(static_cast<std::size_t>(top_k), -1);
  return order;
}

// The kernel's step 4 with kPerLane registers, lane by lane: returns slot ids and weights.
template <int kPerLane>
std::pair<std::vector<int>, std::vector<float>> emulate_top_k(Token const& t, int top_k) {
  int const num_experts = static_cast<int>(t.choice.size());
  Lanes<Registers<kPerLane>> choice{}, score{};
  Lanes<RouterLaneMask> selectable{};
  for (int l = 0; l < kWarpLanes; ++l)
    for (int i = 0; i < kPerLane; ++i) {
      int const e = router_expert(l, i);
      bool const ok = e < num_experts && t.selectable[at(e)];
      choice[at(l)].v[i] = e < num_experts ? t.choice[at(e)] : -kInf;
      score[at(l)].v[i] = e < num_experts ? t.score[at(e)] : 0.0f;
      if (ok) selectable[at(l)] |= 1u << i;
    }
  Lanes<RouterSlots> slots{};
  for (int j = 0; j < top_k; ++j) {
    Lanes<RouterCandidate> mine{};
    Lanes<float> mine_score{};
    for (int l = 0; l < kWarpLanes; ++l) {
      RouterLaneBest const b = router_lane_best<kPerLane>(l, choice[at(l)].v, score[at(l)].v, selectable[at(l)]);
      mine[at(l)] = b.candidate;
      mine_score[at(l)] = b.score;
    }
    auto const best = warp_best(mine);
    for (auto const& b : best) REQUIRE((b.id == best[0].id && same_bits(b.value, best[0].value)));
    int const id = best[0].id;
    if (id < 0) break;
    REQUIRE(id < num_experts);
    float const best_score = mine_score[at(router_expert_lane(id))];  // the kernel's __shfl_sync from the owner
    for (int l = 0; l < kWarpLanes; ++l) {
      selectable[at(l)] = router_retire<kPerLane>(l, id, selectable[at(l)]);
      slots[at(l)].keep(l, j, id, best_score);
    }
  }
  std::vector<int> ids;
  std::vector<float> weights;
  for (int j = 0; j < top_k; ++j) {
    auto const& s = slots[at(router_slot_lane(j))];
    ids.push_back(s.id[router_slot_register(j)]);
    weights.push_back(s.weight[router_slot_register(j)]);
  }
  return {ids, weights};
}

}  // namespace

TEST_CASE("router lanes: the warp top-k picks what a stable sort picks, for every kPerLane and num_experts") {
  EPX_TEST_SEEDED_RNG(rng);
  std::int64_t checked = 0;
  for_each_per_lane([&]<int kPerLane>(std::integral_constant<int, kPerLane>) {
    for (int num_experts = 1; num_experts <= kWarpLanes * kPerLane; ++num_experts) {
      int const max_k = std::min(num_experts, int{kMaxTopK});
      std::uniform_int_distribution<int> pick_k(1, max_k);
      for (int top_k : {pick_k(rng), max_k}) {
        auto const token = random_token(num_experts, rng);
        auto const [ids, weights] = emulate_top_k<kPerLane>(token, top_k);
        auto const want = sorted_top_k(token, top_k);
        INFO("kPerLane " << kPerLane << ", num_experts " << num_experts << ", top_k " << top_k);
        REQUIRE(ids == want);
        for (int j = 0; j < top_k; ++j)
          REQUIRE(weights[at(j)] == (want[at(j)] < 0 ? 0.0f : token.score[at(want[at(j)])]));
        ++checked;
      }
    }
  });
  CHECK(checked == 2 * 32 * (16 * 17 / 2));  // every (kPerLane, num_experts) pair, twice
}

TEST_CASE("router lanes: group staging is a bijection, its reads never share a bank") {
  // One shared-memory access of 32 lanes costs one pass per distinct word in its busiest bank.
  auto conflict = [](std::vector<int> const& words) {
    std::map<int, std::set<int>> banks;
    for (int w : words) banks[w % 32].insert(w);
    std::size_t worst = 0;
    for (auto const& [bank, distinct] : banks) worst = std::max(worst, distinct.size());
    return static_cast<int>(worst);
  };
  int configs = 0, two_way_stores = 0;
  for (int num_experts = 2; num_experts <= 512; ++num_experts) {
    int const per_lane = router_registers(num_experts);
    for (int num_groups = 2; num_groups <= num_experts; ++num_groups) {
      if (num_experts % num_groups != 0) continue;
      int const group_size = num_experts / num_groups;
      CAPTURE(num_experts);
      CAPTURE(num_groups);
      ++configs;
      int const stride = router_group_stride(group_size);
      REQUIRE(stride % 2 == 1);
      REQUIRE(stride >= group_size);
      REQUIRE(router_group_words(num_experts, group_size) <= router_group_stage_words(per_lane));
      std::set<int> used;
      for (int e = 0; e < num_experts; ++e) {
        int const w = router_group_word(e, group_size);
        REQUIRE(w >= 0);
        REQUIRE(w < router_group_words(num_experts, group_size));
        REQUIRE(used.insert(w).second);
        REQUIRE(router_group(e, group_size) * group_size <= e);
        REQUIRE(e < (router_group(e, group_size) + 1) * group_size);
        // The kernel reads member m of group g at g * stride + m.
        REQUIRE(w == router_group(e, group_size) * stride + e % group_size);
      }
      // Reads: lane g scores groups router_expert(lane, r); all lanes read member m together.
      for (int r = 0; r < per_lane; ++r)
        for (int m = 0; m < group_size; ++m) {
          std::vector<int> words;
          for (int lane = 0; lane < kWarpLanes; ++lane) {
            int const g = router_expert(lane, r);
            if (g < num_groups) words.push_back(g * stride + m);
          }
          if (!words.empty()) REQUIRE(conflict(words) == 1);
        }
      // Stores: register i of all lanes at once; one padding word in a 32-word run at most.
      int worst_store = 1;
      for (int i = 0; i < per_lane; ++i) {
        std::vector<int> words;
        for (int lane = 0; lane < kWarpLanes; ++lane) {
          int const e = router_expert(lane, i);
          if (e < num_experts) words.push_back(router_group_word(e, group_size));
        }
        worst_store = std::max(worst_store, conflict(words));
      }
      REQUIRE(worst_store <= 2);
      if (group_size % 2 == 1 || group_size % 32 == 0) REQUIRE(worst_store == 1);
      two_way_stores += worst_store == 2;
    }
  }
  INFO(two_way_stores << " of " << configs << " configurations have a 2-way conflicted store");
  CHECK(configs > 2000);
  // DeepSeek-V3 (256 experts, 8 groups): conflict-free both ways, checked above; its stage fits.
  CHECK(router_group_words(256, 32) == 8 * 33);
}

TEST_CASE("router lanes: a group's score is the sorted top-2 sum, whatever the member order") {
  EPX_TEST_SEEDED_RNG(rng);
  std::array<float, 8> const values{kInf, -kInf, FLT_MAX, -FLT_MAX, 1.5f, 1.5f, -0.25f, 0.0f};
  std::uniform_int_distribution<std::size_t> pick(0, values.size() - 1);
  std::uniform_int_distribution<int> count(0, 6);
  for (int trial = 0; trial < 5000; ++trial) {
    std::vector<float> members(static_cast<std::size_t>(count(rng)));
    for (auto& m : members) m = values[pick(rng)];
    std::vector<float> sorted = members;
    std::sort(sorted.begin(), sorted.end(), std::greater<>());
    float const want = sorted.empty() ? -kInf : sorted.size() == 1 ? sorted[0] : sorted[0] + sorted[1];
    for (int order = 0; order < 3; ++order) {
      std::shuffle(members.begin(), members.end(), rng);
      RouterGroupTop2 top2;
      for (float m : members) top2.add(m);
      INFO("members " << members.size() << " want " << want << " got " << top2.score());
      REQUIRE(same_bits(top2.score(), want));
    }
  }
  CHECK(RouterGroupTop2{}.score() == -kInf);
}

namespace {

// host/router.hpp's keep rounds over group scores, as that file writes them.
std::vector<int> host_keep_order(std::vector<float> const& group_score, int topk_groups) {
  std::vector<char> kept(group_score.size(), 0);
  std::vector<int> order;
  for (int pick = 0; pick < topk_groups; ++pick) {
    std::ptrdiff_t best_g = -1;
    for (std::size_t g = 0; g < group_score.size(); ++g) {
      if (kept[g] || group_score[g] == -kInf) continue;
      if (best_g < 0 || group_score[g] > group_score[static_cast<std::size_t>(best_g)])
        best_g = static_cast<std::ptrdiff_t>(g);
    }
    if (best_g < 0) break;
    kept[static_cast<std::size_t>(best_g)] = 1;
    order.push_back(static_cast<int>(best_g));
  }
  return order;
}

// The kernel's keep rounds (keep_groups in cuda/router.cuh) on emulated lanes.
template <int kPerLane>
std::vector<int> emulate_keep_order(std::vector<float> const& scores, int topk_groups) {
  int const num_groups = static_cast<int>(scores.size());
  Lanes<std::array<float, kPerLane>> group_score{};
  Lanes<RouterLaneMask> kept{};
  bool any_nan = false;
  for (int l = 0; l < kWarpLanes; ++l)
    for (int r = 0; r < kPerLane; ++r) {
      int const g = router_expert(l, r);
      group_score[at(l)][at(r)] = g < num_groups ? scores[at(g)] : -kInf;
      any_nan = any_nan || std::isnan(group_score[at(l)][at(r)]);
    }
  std::vector<int> order;
  for (int round = 0; round < topk_groups; ++round) {
    Lanes<int> first{};
    first.fill(std::numeric_limits<int>::max());
    if (any_nan) {
      for (int l = 0; l < kWarpLanes; ++l)
        for (int r = 0; r < kPerLane; ++r) {
          int const g = router_expert(l, r);
          if (!router_has<kPerLane>(kept[at(l)], r) && group_score[at(l)][at(r)] != -kInf && g < first[at(l)])
            first[at(l)] = g;
        }
      first = butterfly(first, [](int a, int b) { return a < b ? a : b; });
    }
    Lanes<RouterCandidate> mine{};
    for (int l = 0; l < kWarpLanes; ++l) {
      mine[at(l)] = {0.0f, -1};
      for (int r = 0; r < kPerLane; ++r)
        mine[at(l)] =
            router_pick(mine[at(l)], router_group_candidate(group_score[at(l)][at(r)], router_expert(l, r),
                                                            router_has<kPerLane>(kept[at(l)], r), first[at(l)]));
    }
    auto const best = warp_best(mine);
    int const id = best[0].id;
    for (auto const& b : best) REQUIRE(b.id == id);
    if (id < 0) break;
    for (int l = 0; l < kWarpLanes; ++l)
      for (int r = 0; r < kPerLane; ++r)
        if (router_expert(l, r) == id) kept[at(l)] |= 1u << r;
    order.push_back(id);
  }
  return order;
}

}  // namespace

TEST_CASE("router lanes: the warp keeps the groups the host's scan keeps, incl. -inf and NaN scores") {
  EPX_TEST_SEEDED_RNG(rng);
  std::array<float, 7> const values{kInf, -kInf, kNaN, 2.0f, 2.0f, -1.0f, FLT_MAX};
  std::uniform_int_distribution<std::size_t> pick(0, values.size() - 1);
  int with_nan = 0;
  for_each_per_lane([&]<int kPerLane>(std::integral_constant<int, kPerLane>) {
    for (int trial = 0; trial < 300; ++trial) {
      std::uniform_int_distribution<int> groups(2, kWarpLanes * kPerLane);
      int const num_groups = trial < 2 ? (trial == 0 ? 2 : kWarpLanes * kPerLane) : groups(rng);
      std::vector<float> scores(static_cast<std::size_t>(num_groups));
      // Sparse specials in some trials, so that a NaN is sometimes not the first competing group.
      bool const sparse = trial % 2 == 0;
      std::uniform_int_distribution<int> coin(0, 9);
      for (auto& s : scores) s = sparse && coin(rng) != 0 ? static_cast<float>(coin(rng)) : values[pick(rng)];
      int const topk_groups = std::uniform_int_distribution<int>(1, num_groups)(rng);
      with_nan += std::any_of(scores.begin(), scores.end(), [](float s) { return std::isnan(s); });
      INFO("kPerLane " << kPerLane << ", num_groups " << num_groups << ", topk_groups " << topk_groups);
      REQUIRE(emulate_keep_order<kPerLane>(scores, topk_groups) == host_keep_order(scores, topk_groups));
    }
  });
  CHECK(with_nan > 1000);

  // The edge cases by hand: a NaN that is not the lowest competing group is passed over; once the
  // groups before it are kept, it is kept before any number.
  CHECK(host_keep_order({1.0f, kNaN, 3.0f}, 3) == std::vector<int>{2, 0, 1});
  CHECK(emulate_keep_order<1>({1.0f, kNaN, 3.0f}, 3) == std::vector<int>{2, 0, 1});
  CHECK(emulate_keep_order<1>({kNaN, 5.0f, kInf}, 2) == std::vector<int>{0, 2});
  CHECK(emulate_keep_order<1>({-kInf, 5.0f, -kInf}, 3) == std::vector<int>{1});  // -inf groups are never kept
}
