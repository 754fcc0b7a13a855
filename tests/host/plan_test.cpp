// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// Plan (stable sort by expert), permute and unpermute against straightforward references; and the
// stage comparisons every execution space runs (../common/routing_cases.hpp), here the Host stages
// on padded and offset rows against the Host stages on contiguous ones.

#include "../common/host_backend.hpp"
#include "../common/routing_comparison.hpp"

#include <cmath>
#include <cstring>
#include <numeric>

using namespace epx;

namespace {

struct PlanRun {
  std::vector<std::byte> ws;
  RoutingPlan plan;
  Status status;
};

PlanRun run_plan(std::vector<std::int32_t> const& ids, std::int64_t num_tokens, std::int32_t top_k,
                 std::int32_t num_experts, ExpertRange range) {
  PlanRun r;
  r.ws.resize(plan_workspace_bytes(static_cast<std::int32_t>(num_tokens), top_k, range.count));
  r.plan = make_plan(Host{}, MatrixView<std::int32_t const>(ids.data(), num_tokens, top_k), num_experts, range,
                     Workspace(r.ws.data(), r.ws.size()), r.status);
  return r;
}

// The plan written as a std::stable_sort of the slots by expert id.
void check_plan_against_sort(std::vector<std::int32_t> const& ids, std::int64_t num_tokens, std::int32_t top_k,
                             std::int32_t num_experts, ExpertRange range) {
  auto const r = run_plan(ids, num_tokens, top_k, num_experts, range);
  std::vector<std::int32_t> slots;
  std::uint64_t invalid = 0;
  for (std::int32_t s = 0; s < static_cast<std::int32_t>(ids.size()); ++s) {
    auto const id = ids[static_cast<std::size_t>(s)];
    if (id != -1 && (id < 0 || id >= num_experts)) ++invalid;
    if (id >= 0 && id < num_experts && range.contains(id)) slots.push_back(s);
  }
  std::stable_sort(slots.begin(), slots.end(),
                   [&](int a, int b) { return ids[static_cast<std::size_t>(a)] < ids[static_cast<std::size_t>(b)]; });
  std::uint64_t without_expert = 0;  // tokens no slot of which names an expert in [0, num_experts)
  for (std::int64_t t = 0; t < num_tokens; ++t) {
    auto const row = ids.begin() + t * top_k;
    without_expert += std::none_of(row, row + top_k, [&](std::int32_t id) { return id >= 0 && id < num_experts; });
  }
  CHECK(r.status.invalid_ids == invalid);
  CHECK(r.status.dropped_slots == invalid);
  CHECK(r.status.tokens_without_expert == without_expert);
  REQUIRE(r.plan.expert_offsets.back() == static_cast<std::int32_t>(slots.size()));
  CHECK(std::equal(slots.begin(), slots.end(), r.plan.sorted_slots.begin()));
  for (std::size_t row = slots.size(); row < r.plan.sorted_slots.size(); ++row) CHECK(r.plan.sorted_slots[row] == -1);
  std::uint32_t max_count = 0;
  for (std::int32_t e = 0; e < range.count; ++e) {
    auto const count = std::count(ids.begin(), ids.end(), range.first + e);
    CHECK(r.plan.tokens_per_expert[static_cast<std::size_t>(e)] == count);
    CHECK(r.plan.expert_offsets[static_cast<std::size_t>(e) + 1] - r.plan.expert_offsets[static_cast<std::size_t>(e)] ==
          count);
    max_count = std::max(max_count, static_cast<std::uint32_t>(count));
  }
  CHECK(r.status.max_tokens_per_expert == max_count);
  for (std::size_t s = 0; s < ids.size(); ++s) {  // inverse permutation
    auto const row = r.plan.slot_rows[s];
    if (row >= 0)
      CHECK(r.plan.sorted_slots[static_cast<std::size_t>(row)] == static_cast<std::int32_t>(s));
    else
      CHECK(std::find(slots.begin(), slots.end(), static_cast<std::int32_t>(s)) == slots.end());
  }
}

}  // namespace

TEST_CASE("Plan::make_plan: equals a stable sort of the slots by expert") {
  EPX_TEST_SEEDED_RNG(rng);
  for (auto [e, k, t] : {std::tuple{1, 1, 5}, std::tuple{8, 2, 64}, std::tuple{130, 8, 37}, std::tuple{16, 4, 1}}) {
    CAPTURE(e);
    CAPTURE(t);
    auto ids = test::random_ids(t, k, e, rng, 0.2);
    std::uniform_int_distribution<std::size_t> pick(0, ids.size() - 1);
    ids[pick(rng)] = e;        // invalid: one past the end
    ids[pick(rng)] = -5;       // invalid: negative other than -1
    ids[pick(rng)] = 1 << 30;  // invalid: huge
    check_plan_against_sort(ids, t, k, e, {0, e});
    check_plan_against_sort(ids, t, k, e, {e / 3, e - e / 3 - e / 4});  // a rank's local range
  }
}

TEST_CASE("Plan::make_plan: tokens with no valid id are counted, whatever the expert range") {
  // Random routing, then whole rows of -1 (padding, or what the router gives a token whose logits
  // are all NaN), rows of -1 and invalid ids, and rows with a single valid slot (not counted).
  EPX_TEST_SEEDED_RNG(rng);
  for (auto const& shape : {std::tuple{8, 1, 40}, std::tuple{16, 4, 64}, std::tuple{130, 8, 37}}) {
    auto const [e, k, t] = shape;
    CAPTURE(std::get<0>(shape));  // not the bindings: clang 14 cannot CAPTURE them
    CAPTURE(std::get<1>(shape));
    auto ids = test::random_ids(t, k, e, rng, 0.3);
    std::uniform_int_distribution<std::int64_t> pick_token(0, t - 1);
    std::uniform_int_distribution<std::int32_t> pick_slot(0, k - 1);
    std::vector<std::int64_t> const padded{pick_token(rng), pick_token(rng)}, mixed{pick_token(rng)},
        one_left{pick_token(rng)};
    for (auto tok : padded) std::fill_n(ids.begin() + tok * k, k, -1);
    for (auto tok : mixed) {
      std::fill_n(ids.begin() + tok * k, k, -1);
      ids[static_cast<std::size_t>(tok * k + pick_slot(rng))] = e + 2;  // invalid: counted there too
    }
    for (auto tok : one_left) {
      std::fill_n(ids.begin() + tok * k, k, -1);
      ids[static_cast<std::size_t>(tok * k + pick_slot(rng))] = e - 1;
    }
    check_plan_against_sort(ids, t, k, e, {0, e});
    check_plan_against_sort(ids, t, k, e, {e / 2, e - e / 2});  // another rank's range: the same count
    check_plan_against_sort(ids, t, k, e, {e, 0});
  }
  // Fully known small case: tokens 0 and 2 have no expert, token 1 has one.
  std::vector<std::int32_t> const ids{-1, -1, -1, 5, 9, -1};
  auto const r = run_plan(ids, 3, 2, 8, {0, 4});
  CHECK(r.status.tokens_without_expert == 2);
  CHECK(r.status.invalid_ids == 1);
  auto const all_padding = run_plan(std::vector<std::int32_t>(12, -1), 4, 3, 8, {0, 8});
  CHECK(all_padding.status.tokens_without_expert == 4);
  CHECK(all_padding.status.ok());  // padding is not an error: see Status::ok()
}

TEST_CASE("Plan::make_plan: zero tokens and an empty expert range") {
  std::vector<std::int32_t> const none;
  auto const r = run_plan(none, 0, 4, 8, {0, 8});
  CHECK(r.plan.expert_offsets.back() == 0);
  CHECK(r.status.ok());
  std::vector<std::int32_t> const ids{0, 1, 2, 3};
  auto const empty = run_plan(ids, 2, 2, 4, {4, 0});
  CHECK(empty.plan.expert_offsets.size() == 1);
  for (auto row : empty.plan.slot_rows) CHECK(row == -1);
}

TEST_CASE("Plan::make_plan: bad arguments are named") {
  std::vector<std::int32_t> ids(8, 0);
  std::vector<std::byte> ws(16);
  Status st;
  MatrixView<std::int32_t const> iv(ids.data(), 4, 2);
  CHECK_THROWS_WITH_AS(make_plan(Host{}, iv, 8, {0, 8}, Workspace(ws.data(), ws.size()), st),
                       doctest::Contains("make_plan: workspace.size() = 16 bytes, expected at least"), Error);
  std::vector<std::byte> big(plan_workspace_bytes(4, 2, 8));
  CHECK_THROWS_WITH_AS(make_plan(Host{}, iv, 8, {6, 4}, Workspace(big.data(), big.size()), st),
                       doctest::Contains("experts = [6, 10), expected a range inside [0, num_experts = 8)"), Error);
  CHECK_THROWS_WITH_AS(make_plan(Host{}, iv, 0, {0, 0}, Workspace(big.data(), big.size()), st),
                       doctest::Contains("num_experts = 0"), Error);
}

TEST_CASE("Permute::permute: rows land in expert order") {
  EPX_TEST_SEEDED_RNG(rng);
  std::int64_t const t = 50, h = 24;
  std::int32_t const k = 3, e = 9;
  auto const ids = test::random_ids(t, k, e, rng, 0.2);
  auto const x = test::random_vector<bfloat16>(static_cast<std::size_t>(t * h), rng);
  auto const r = run_plan(ids, t, k, e, {0, e});
  std::int64_t const rows = r.plan.expert_offsets.back();
  std::vector<bfloat16> x_perm(static_cast<std::size_t>(rows * h));
  permute(Host{}, r.plan, MatrixView<bfloat16 const>(x.data(), t, h), MatrixView<bfloat16>(x_perm.data(), rows, h));
  std::int64_t row = 0;
  for (std::int32_t expert = 0; expert < e; ++expert)
    for (std::int64_t s = 0; s < t * k; ++s)
      if (ids[static_cast<std::size_t>(s)] == expert) {
        auto const token = s / k;
        CHECK(std::memcmp(x_perm.data() + row * h, x.data() + token * h, h * sizeof(bfloat16)) == 0);
        ++row;
      }
  CHECK(row == rows);
  CHECK_THROWS_WITH_AS(permute(Host{}, r.plan, MatrixView<bfloat16 const>(x.data(), t, h),
                               MatrixView<bfloat16>(x_perm.data(), rows - 1, h)),
                       doctest::Contains("x_perm.rows"), Error);
}

TEST_CASE("Permute::unpermute: weighted sum in slot order, deterministic, every row written") {
  EPX_TEST_SEEDED_RNG(rng);
  std::int64_t const t = 40, h = 16;
  std::int32_t const k = 4, e = 6;
  auto ids = test::random_ids(t, k, e, rng, 0.3);
  for (std::int32_t j = 0; j < k; ++j) ids[static_cast<std::size_t>(7 * k + j)] = -1;  // a token with nothing
  auto const weights = test::random_weights(ids.size(), rng);
  auto const r = run_plan(ids, t, k, e, {0, e});
  std::int64_t const rows = r.plan.expert_offsets.back();
  auto const expert_out = test::random_vector<float>(static_cast<std::size_t>(rows * h), rng);
  std::vector<float> y(static_cast<std::size_t>(t * h), 999.0f), y2(y.size(), -1.0f);
  auto run = [&](std::vector<float>& out) {
    unpermute(Host{}, r.plan, MatrixView<float const>(expert_out.data(), rows, h),
              MatrixView<float const>(weights.data(), t, k), MatrixView<float>(out.data(), t, h));
  };
  run(y);
  run(y2);
  CHECK(std::memcmp(y.data(), y2.data(), y.size() * sizeof(float)) == 0);
  std::vector<double> want(y.size(), 0.0);
  for (std::int64_t s = 0; s < t * k; ++s) {
    auto const row = r.plan.slot_rows[static_cast<std::size_t>(s)];
    if (row < 0) continue;
    for (std::int64_t c = 0; c < h; ++c)
      want[static_cast<std::size_t>((s / k) * h + c)] +=
          double(weights[static_cast<std::size_t>(s)]) * expert_out[static_cast<std::size_t>(row * h + c)];
  }
  CHECK(test::rel_error(y, want) <= 1e-6);
  for (std::int64_t c = 0; c < h; ++c) CHECK(y[static_cast<std::size_t>(7 * h + c)] == 0.0f);
  // bf16 output rounds once from the fp32 sum.
  std::vector<bfloat16> yb(y.size());
  std::vector<bfloat16> eb(expert_out.size());
  for (std::size_t i = 0; i < eb.size(); ++i) eb[i] = bfloat16(expert_out[i]);
  unpermute(Host{}, r.plan, MatrixView<bfloat16 const>(eb.data(), rows, h),
            MatrixView<float const>(weights.data(), t, k), MatrixView<bfloat16>(yb.data(), t, h));
  CHECK(test::rel_error(yb, want) <= 1e-2);
  CHECK_THROWS_WITH_AS(unpermute(Host{}, r.plan, MatrixView<float const>(expert_out.data(), rows, h),
                                 MatrixView<float const>(weights.data(), t, k - 1), MatrixView<float>(y.data(), t, h)),
                       doctest::Contains("topk_weights.cols = 3, expected 4"), Error);
}

TEST_CASE("Permute::unpermute: each term is one fused multiply-add, so CUDA and Host agree bit for bit") {
  // The CUDA unpermute adds each term with one rounding (nvcc contracts, and epx says __fmaf_rn).
  // The host must do the same whatever its compiler flags; a product rounded before the sum
  // differs in the last bit for a large share of random inputs (checked below, so this test
  // cannot pass by accident).
  EPX_TEST_SEEDED_RNG(rng);
  std::int64_t const t = 64, h = 96;
  std::int32_t const k = 8, e = 16;
  auto const ids = test::random_ids(t, k, e, rng, 0.1);
  auto const weights = test::random_weights(ids.size(), rng);
  auto const r = run_plan(ids, t, k, e, {0, e});
  std::int64_t const rows = r.plan.expert_offsets.back();
  auto const expert_out = test::random_vector<float>(static_cast<std::size_t>(rows * h), rng);
  std::vector<float> y(static_cast<std::size_t>(t * h), 999.0f);
  unpermute(Host{}, r.plan, MatrixView<float const>(expert_out.data(), rows, h),
            MatrixView<float const>(weights.data(), t, k), MatrixView<float>(y.data(), t, h));
  std::size_t fused_differs_from_separate = 0;
  for (std::int64_t tok = 0; tok < t; ++tok)
    for (std::int64_t c = 0; c < h; ++c) {
      float fused = 0.0f;
      volatile float separate = 0.0f;  // volatile: each product is rounded on its own, never contracted
      for (std::int32_t j = 0; j < k; ++j) {
        auto const row = r.plan.slot_rows[static_cast<std::size_t>(tok * k + j)];
        if (row < 0) continue;
        float const w = weights[static_cast<std::size_t>(tok * k + j)];
        float const v = expert_out[static_cast<std::size_t>(row * h + c)];
        fused = std::fma(w, v, fused);
        volatile float const product = w * v;
        separate = separate + product;
      }
      float const got = y[static_cast<std::size_t>(tok * h + c)];
      CHECK(std::memcmp(&got, &fused, sizeof(float)) == 0);
      if (fused != separate) ++fused_differs_from_separate;
    }
  CHECK(fused_differs_from_separate > static_cast<std::size_t>(t * h / 20));
}

TEST_CASE("Stages::host: read-only inputs accept mutable views and a null bias") {
  EPX_TEST_SEEDED_RNG(rng);
  std::int64_t const t = 5, h = 8;
  std::int32_t const k = 2, e = 4;
  auto logits = test::random_vector<float>(static_cast<std::size_t>(t * e), rng);
  std::vector<std::int32_t> ids(static_cast<std::size_t>(t * k));
  std::vector<float> w(ids.size());
  route(Host{}, RouterConfig{.num_experts = e, .top_k = k}, MatrixView(logits.data(), t, e), {},
        MatrixView(ids.data(), t, k), MatrixView(w.data(), t, k));
  auto r = run_plan(ids, t, k, e, {0, e});
  auto x = test::random_vector<float>(static_cast<std::size_t>(t * h), rng);
  std::vector<float> x_perm(static_cast<std::size_t>(t * k * h)), out(x_perm.size()), y(x.size());
  permute(Host{}, r.plan, MatrixView(x.data(), t, h), MatrixView(x_perm.data(), t * k, h));
  auto b = test::random_vector<float>(static_cast<std::size_t>(e * h * h), rng);
  grouped_gemm(Host{}, MatrixView(x_perm.data(), t * k, h), BatchedMatrixView<float>{b.data(), e, h, h}, nullptr,
               r.plan.expert_offsets, MatrixView(out.data(), t * k, h));
  unpermute(Host{}, r.plan, MatrixView(out.data(), t * k, h), MatrixView<float const>(w.data(), t, k),
            MatrixView(y.data(), t, h));
  // y[t] = sum_j w * (x[t] · b[e]ᵀ): check one element by hand.
  double want = 0;
  for (std::int32_t j = 0; j < k; ++j) {
    auto const id = ids[static_cast<std::size_t>(j)];
    double dot = 0;
    for (std::int64_t i = 0; i < h; ++i)
      dot += double(x[static_cast<std::size_t>(i)]) * b[static_cast<std::size_t>((id * h + 0) * h + i)];
    want += double(w[static_cast<std::size_t>(j)]) * dot;
  }
  CHECK(y[0] == doctest::Approx(want).epsilon(1e-5));
}

TEST_CASE("Plan::make_plan: an expert range whose end overflows int32 is refused") {
  std::vector<std::int32_t> ids{0, 1};
  std::vector<std::byte> ws(1 << 12);
  Status st;
  CHECK_THROWS_WITH_AS(
      make_plan(Host{}, MatrixView<std::int32_t const>(ids.data(), 1, 2), 8,
                ExpertRange{4, std::numeric_limits<std::int32_t>::max()}, Workspace(ws.data(), ws.size()), st),
      doctest::Contains("experts = [4, 2147483651), expected a range inside [0, num_experts = 8)"), Error);
}

namespace epx::test {
using HostStageF32 = StageCase<HostBackend, float>;
using HostStageBF16 = StageCase<HostBackend, bfloat16>;
using HostStageF16 = StageCase<HostBackend, half>;
}  // namespace epx::test

TYPE_TO_STRING_AS("float", epx::test::HostStageF32);
TYPE_TO_STRING_AS("bf16", epx::test::HostStageBF16);
TYPE_TO_STRING_AS("fp16", epx::test::HostStageF16);
TYPE_TO_STRING_AS("Host", epx::test::HostBackend);
#define EPX_STAGE_CASES epx::test::HostStageF32, epx::test::HostStageBF16, epx::test::HostStageF16
#define EPX_STAGE_BACKENDS epx::test::HostBackend
#include "../common/routing_cases.hpp"
