// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// Router variants: hand-checked small cases, random inputs against an independent sort-based
// formula, the DeepSeek-V3 configuration, NaN/inf handling, and bad arguments.

#include "../common/test_util.hpp"

#include <limits>
#include <numeric>
#include <set>

using namespace epx;

namespace {

struct Routed {
  std::vector<std::int32_t> ids;
  std::vector<float> weights;
};

template <class L = float>
Routed run_route(RouterConfig const& c, std::vector<L> const& logits, std::vector<float> const& bias = {}) {
  auto const num_tokens = static_cast<std::int64_t>(logits.size()) / c.num_experts;
  Routed r{std::vector<std::int32_t>(static_cast<std::size_t>(num_tokens * c.top_k), 77),
           std::vector<float>(static_cast<std::size_t>(num_tokens * c.top_k), 77.0f)};
  route(Host{}, c, MatrixView<L const>(logits.data(), num_tokens, c.num_experts), bias,
        MatrixView<std::int32_t>(r.ids.data(), num_tokens, c.top_k),
        MatrixView<float>(r.weights.data(), num_tokens, c.top_k));
  return r;
}

// The spec of RouterConfig, written as sorts: score every expert, mask whole groups by sorting
// group sums, then sort the survivors by (choice desc, id asc) and take the first top_k.
Routed reference_route(RouterConfig const& c, std::vector<float> const& logits, std::vector<float> const& bias) {
  auto const e_count = static_cast<std::size_t>(c.num_experts);
  auto const num_tokens = logits.size() / e_count;
  Routed out;
  for (std::size_t t = 0; t < num_tokens; ++t) {
    std::vector<double> logit(e_count), score(e_count);
    std::vector<float> choice(e_count);
    std::vector<bool> ok(e_count);
    for (std::size_t e = 0; e < e_count; ++e) {
      float const l = logits[t * e_count + e];
      ok[e] = !std::isnan(l) && l != -INFINITY;
      logit[e] = l;
    }
    // Keys in float exactly as specified (so near-ties order the same); weights in double.
    std::vector<float> fscore(e_count);
    if (c.scoring == Scoring::kSoftmaxTopK) {
      float m = -INFINITY;
      for (std::size_t e = 0; e < e_count; ++e)
        if (ok[e]) m = std::max(m, float(logit[e]));
      float s = 0;
      for (std::size_t e = 0; e < e_count; ++e)
        if (ok[e]) s += std::exp(float(logit[e]) - m);
      double ds = 0;
      for (std::size_t e = 0; e < e_count; ++e)
        if (ok[e]) ds += std::exp(logit[e] - double(m));
      for (std::size_t e = 0; e < e_count; ++e) {
        fscore[e] = ok[e] ? std::exp(float(logit[e]) - m) / s : 0.0f;
        score[e] = ok[e] ? std::exp(logit[e] - double(m)) / ds : 0.0;
      }
    } else if (c.scoring == Scoring::kSigmoidTopK) {
      for (std::size_t e = 0; e < e_count; ++e) {
        fscore[e] = 1.0f / (1.0f + std::exp(-float(logit[e])));
        score[e] = 1.0 / (1.0 + std::exp(-logit[e]));
      }
    } else {
      for (std::size_t e = 0; e < e_count; ++e) fscore[e] = float(logit[e]), score[e] = logit[e];
    }
    for (std::size_t e = 0; e < e_count; ++e)  // unselectable experts sort last (NaN would break the sort)
      choice[e] = !ok[e] ? -INFINITY : (bias.empty() ? fscore[e] : fscore[e] + bias[e]);
    if (c.num_groups > 1) {
      auto const gsize = e_count / static_cast<std::size_t>(c.num_groups);
      std::vector<std::pair<float, int>> groups;
      for (int g = 0; g < c.num_groups; ++g) {
        std::vector<float> members;
        for (std::size_t e = g * gsize; e < (g + 1) * gsize; ++e)
          if (ok[e]) members.push_back(choice[e]);
        std::sort(members.rbegin(), members.rend());
        if (members.empty()) continue;
        groups.emplace_back(members.size() == 1 ? members[0] : members[0] + members[1], g);
      }
      std::stable_sort(groups.begin(), groups.end(), [](auto a, auto b) { return a.first > b.first; });
      std::set<int> kept;
      for (std::size_t i = 0; i < groups.size() && i < static_cast<std::size_t>(c.topk_groups); ++i)
        kept.insert(groups[i].second);
      for (std::size_t e = 0; e < e_count; ++e)
        if (!kept.count(static_cast<int>(e / gsize))) ok[e] = false;
    }
    std::vector<int> order(e_count);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return choice[a] > choice[b]; });
    std::vector<std::int32_t> ids;
    std::vector<double> w;
    for (int e : order)
      if (ok[static_cast<std::size_t>(e)] && ids.size() < static_cast<std::size_t>(c.top_k)) {
        ids.push_back(e);
        w.push_back(score[static_cast<std::size_t>(e)]);
      }
    if (c.scoring == Scoring::kTopKSoftmax && !w.empty()) {
      double const m = *std::max_element(w.begin(), w.end());
      double s = 0;
      for (auto& x : w) s += (x = std::exp(x - m));
      for (auto& x : w) x /= s;
    }
    if (c.renormalize) {
      double const s = std::accumulate(w.begin(), w.end(), 0.0) + 1e-20;
      for (auto& x : w) x /= s;
    }
    for (std::size_t j = 0; j < static_cast<std::size_t>(c.top_k); ++j) {
      out.ids.push_back(j < ids.size() ? ids[j] : -1);
      out.weights.push_back(j < w.size() ? static_cast<float>(w[j] * c.routed_scaling_factor) : 0.0f);
    }
  }
  return out;
}

void check_against_reference(RouterConfig const& c, std::vector<float> const& logits, std::vector<float> const& bias) {
  auto const got = run_route(c, logits, bias);
  auto const want = reference_route(c, logits, bias);
  REQUIRE(got.ids == want.ids);
  for (std::size_t i = 0; i < got.weights.size(); ++i)
    REQUIRE_MESSAGE(std::abs(got.weights[i] - want.weights[i]) <= 2e-6 * std::max(1.0f, std::abs(want.weights[i])),
                    "slot " << i << ": " << got.weights[i] << " vs " << want.weights[i]);
}

}  // namespace

TEST_CASE("Router::route: softmax then top-k on a hand-checked case") {
  RouterConfig c{.num_experts = 4, .top_k = 2};
  auto r = run_route(c, std::vector<float>{1, 2, 3, 4});
  CHECK(r.ids == std::vector<std::int32_t>{3, 2});
  CHECK(r.weights[0] == doctest::Approx(0.6439142598879722).epsilon(1e-6));  // e^0 / (e^-3 + e^-2 + e^-1 + 1)
  CHECK(r.weights[1] == doctest::Approx(0.2368828180899769).epsilon(1e-6));
  c.renormalize = true;
  r = run_route(c, std::vector<float>{1, 2, 3, 4});
  CHECK(r.weights[0] == doctest::Approx(0.7310585786300049).epsilon(1e-6));  // sigmoid(1)
  CHECK(r.weights[1] == doctest::Approx(0.2689414213699951).epsilon(1e-6));
}

TEST_CASE("Router::route: top-k then softmax over the chosen logits") {
  auto const r =
      run_route({.num_experts = 4, .top_k = 2, .scoring = Scoring::kTopKSoftmax}, std::vector<float>{4, 1, 3, 2});
  CHECK(r.ids == std::vector<std::int32_t>{0, 2});
  CHECK(r.weights[0] == doctest::Approx(0.7310585786300049).epsilon(1e-6));
  CHECK(r.weights[1] == doctest::Approx(0.2689414213699951).epsilon(1e-6));
}

TEST_CASE("Router::route: ties go to the lower expert id") {
  auto const r = run_route({.num_experts = 4, .top_k = 3}, std::vector<float>{0.5f, 0.5f, 0.5f, 0.5f});
  CHECK(r.ids == std::vector<std::int32_t>{0, 1, 2});
  for (float w : r.weights) CHECK(w == doctest::Approx(0.25f));
}

TEST_CASE("Router::route: NaN and -inf are never chosen and do not poison other tokens") {
  RouterConfig const c{.num_experts = 4, .top_k = 2};
  auto const r = run_route(c, std::vector<float>{NAN, 1, 2, -INFINITY,  // token 0
                                                 1, 2, 3, 4,            // token 1
                                                 NAN, NAN, NAN, NAN,    // token 2: nothing selectable
                                                 NAN, 5, NAN, NAN});    // token 3: one expert only
  CHECK(r.ids == std::vector<std::int32_t>{2, 1, 3, 2, -1, -1, 1, -1});
  CHECK(r.weights[0] == doctest::Approx(0.7310585786300049).epsilon(1e-6));
  CHECK(r.weights[2] == doctest::Approx(0.6439142598879722).epsilon(1e-6));
  CHECK(r.weights[4] == 0.0f);
  CHECK(r.weights[5] == 0.0f);
  CHECK(r.weights[6] == 1.0f);
  CHECK(r.weights[7] == 0.0f);
  for (float w : r.weights) CHECK(std::isfinite(w));
}

TEST_CASE("Router::route: +inf counts as the largest finite logit") {
  auto const r = run_route({.num_experts = 4, .top_k = 2}, std::vector<float>{0, INFINITY, 1, INFINITY});
  CHECK(r.ids == std::vector<std::int32_t>{1, 3});
  CHECK(r.weights[0] == doctest::Approx(0.5f));
  CHECK(r.weights[1] == doctest::Approx(0.5f));
}

TEST_CASE("Router::route: sigmoid with a correction bias that changes selection only") {
  RouterConfig const c{.num_experts = 4,
                       .top_k = 2,
                       .scoring = Scoring::kSigmoidTopK,
                       .renormalize = true,
                       .routed_scaling_factor = 2.5f};
  auto const r = run_route(c, std::vector<float>{2, 1, 0, -1}, {0.0f, 0.0f, 1.0f, 2.0f});
  CHECK(r.ids == std::vector<std::int32_t>{3, 2});      // choices 2.27, 1.5 beat 0.88, 0.73
  double const s3 = 1 / (1 + std::exp(1.0)), s2 = 0.5;  // unbiased scores
  CHECK(r.weights[0] == doctest::Approx(2.5 * s3 / (s3 + s2)).epsilon(1e-6));
  CHECK(r.weights[1] == doctest::Approx(2.5 * s2 / (s3 + s2)).epsilon(1e-6));
}

TEST_CASE("Router::route: group-limited top-k keeps the groups with the best top-2 sums") {
  // 8 experts in 4 groups of 2; choices set through the bias on sigmoid(0) = 0.5.
  RouterConfig const c{
      .num_experts = 8, .top_k = 2, .scoring = Scoring::kSigmoidTopK, .num_groups = 4, .topk_groups = 2};
  std::vector<float> const choice{0.9f, 0.0f, 0.5f, 0.5f, 0.45f, 0.45f, 0.1f, 0.1f};
  std::vector<float> bias(8);
  for (std::size_t e = 0; e < 8; ++e) bias[e] = choice[e] - 0.5f;
  auto const r = run_route(c, std::vector<float>(8, 0.0f), bias);
  // group sums 0.9, 1.0, 0.9, 0.2: groups 1 and 0 (the tie with group 2 goes to the lower id).
  CHECK(r.ids == std::vector<std::int32_t>{0, 2});
  CHECK(r.weights[0] == doctest::Approx(0.5f));
}

TEST_CASE("Router::route: experts of dropped groups are never chosen even when kept ones score negative") {
  RouterConfig const c{
      .num_experts = 6, .top_k = 2, .scoring = Scoring::kSigmoidTopK, .num_groups = 3, .topk_groups = 1};
  std::vector<float> const choice{-0.1f, -0.2f, -5.0f, 3.0f, -0.3f, -0.4f};  // sums -0.3, -2, -0.7
  std::vector<float> bias(6);
  for (std::size_t e = 0; e < 6; ++e) bias[e] = choice[e] - 0.5f;
  auto const r = run_route(c, std::vector<float>(6, 0.0f), bias);
  CHECK(r.ids == std::vector<std::int32_t>{0, 1});
}

TEST_CASE("Router::route: every variant matches the reference on random logits") {
  EPX_TEST_SEEDED_RNG(rng);
  for (auto scoring : {Scoring::kSoftmaxTopK, Scoring::kTopKSoftmax, Scoring::kSigmoidTopK})
    for (bool renormalize : {false, true})
      for (auto [e, k, g, tg] : {std::tuple{8, 2, 1, 1}, std::tuple{128, 8, 1, 1}, std::tuple{64, 4, 8, 3},
                                 std::tuple{384, 16, 4, 2}, std::tuple{16, 16, 1, 1}})
        for (bool with_bias : {false, true}) {
          RouterConfig const c{.num_experts = e,
                               .top_k = k,
                               .scoring = scoring,
                               .renormalize = renormalize,
                               .num_groups = g,
                               .topk_groups = tg,
                               .routed_scaling_factor = with_bias ? 1.5f : 1.0f};
          CAPTURE(to_string(scoring));
          CAPTURE(renormalize);
          CAPTURE(e);
          CAPTURE(g);
          CAPTURE(with_bias);
          auto logits = test::random_vector<float>(static_cast<std::size_t>(e) * 33, rng, 2.0f);
          logits[5] = NAN;  // a few unselectable experts
          logits[static_cast<std::size_t>(e) + 1] = -INFINITY;
          auto const bias =
              with_bias ? test::random_vector<float>(static_cast<std::size_t>(e), rng, 0.1f) : std::vector<float>{};
          check_against_reference(c, logits, bias);
        }
}

TEST_CASE("Router::route: renormalize after top-k softmax changes nothing but the last bits") {
  // docs/api.md: with kTopKSoftmax the weights already sum to one, so renormalize (dividing by the
  // sum + 1e-20) keeps the ids and moves weights by a few ulps at most: gpt-oss leaves it off.
  EPX_TEST_SEEDED_RNG(rng);
  for (std::int32_t k : {1, 2, 4, 8}) {
    RouterConfig c{.num_experts = 32, .top_k = k, .scoring = Scoring::kTopKSoftmax};
    auto const logits = test::random_vector<float>(static_cast<std::size_t>(200 * c.num_experts), rng, 3.0f);
    auto const plain = run_route(c, logits, {});
    c.renormalize = true;
    auto const renormalized = run_route(c, logits, {});
    CHECK(plain.ids == renormalized.ids);
    for (std::size_t i = 0; i < plain.weights.size(); ++i)
      CHECK(std::abs(plain.weights[i] - renormalized.weights[i]) <=
            8 * std::numeric_limits<float>::epsilon() * plain.weights[i]);
  }
}

TEST_CASE("Router::route: the DeepSeek-V3 configuration") {
  EPX_TEST_SEEDED_RNG(rng);
  RouterConfig const c{.num_experts = 256,
                       .top_k = 8,
                       .scoring = Scoring::kSigmoidTopK,
                       .renormalize = true,
                       .num_groups = 8,
                       .topk_groups = 4,
                       .routed_scaling_factor = 2.5f};
  auto const logits = test::random_vector<float>(256 * 64, rng, 2.0f);
  auto const bias = test::random_vector<float>(256, rng, 0.5f);
  check_against_reference(c, logits, bias);
  auto const r = run_route(c, logits, bias);
  for (std::size_t t = 0; t < 64; ++t) {
    std::set<int> groups;
    float sum = 0;
    for (std::size_t j = 0; j < 8; ++j) {
      groups.insert(r.ids[t * 8 + j] / 32);
      sum += r.weights[t * 8 + j];
    }
    CHECK(groups.size() <= 4);
    CHECK(sum == doctest::Approx(2.5f).epsilon(1e-5));
  }
}

TEST_CASE("Router::route: bf16 logits route like their fp32 values") {
  EPX_TEST_SEEDED_RNG(rng);
  RouterConfig const c{.num_experts = 64, .top_k = 6, .renormalize = true};
  auto const lb = test::random_vector<bfloat16>(64 * 40, rng, 2.0f);
  std::vector<float> lf(lb.size());
  for (std::size_t i = 0; i < lb.size(); ++i) lf[i] = static_cast<float>(lb[i]);
  auto const a = run_route(c, lb), b = run_route(c, lf);
  CHECK(a.ids == b.ids);
  CHECK(a.weights == b.weights);
}

TEST_CASE("Router::route: bad arguments are named") {
  std::vector<float> logits(4 * 8, 1.0f);
  std::vector<std::int32_t> ids(4 * 2);
  std::vector<float> w(4 * 2);
  MatrixView<float const> lv(logits.data(), 4, 8);
  MatrixView<std::int32_t> iv(ids.data(), 4, 2);
  MatrixView<float> wv(w.data(), 4, 2);
  RouterConfig const c{.num_experts = 8, .top_k = 2};
  CHECK_THROWS_WITH_AS(route(Host{}, RouterConfig{.num_experts = 8, .top_k = 9}, lv, {}, iv, wv),
                       doctest::Contains("route: top_k = 9"), Error);
  CHECK_THROWS_WITH_AS(route(Host{}, RouterConfig{.num_experts = 8, .top_k = 2, .num_groups = 3}, lv, {}, iv, wv),
                       doctest::Contains("num_groups = 3"), Error);
  CHECK_THROWS_WITH_AS(route(Host{}, RouterConfig{.num_experts = 7, .top_k = 2}, lv, {}, iv, wv),
                       doctest::Contains("logits.cols = 8, expected 7"), Error);
  CHECK_THROWS_WITH_AS(route(Host{}, c, lv, {}, MatrixView<std::int32_t>(ids.data(), 3, 2), wv),
                       doctest::Contains("topk_ids.rows = 3, expected 4"), Error);
  std::vector<float> bias(7, 0.0f);
  CHECK_THROWS_WITH_AS(route(Host{}, c, lv, bias, iv, wv), doctest::Contains("correction_bias.size() = 7"), Error);
  bias.assign(8, 0.0f);
  bias[3] = NAN;
  CHECK_THROWS_WITH_AS(route(Host{}, c, lv, bias, iv, wv), doctest::Contains("correction_bias[3] = nan"), Error);
}
