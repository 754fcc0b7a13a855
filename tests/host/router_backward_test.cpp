// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// The router's backward and the router losses on Host: gradients against central finite
// differences of independent double-precision references (every scoring mode, renormalize,
// routed scaling, correction bias, group-limited selection; each loss alone and all together),
// values on hand-checked cases, counts and the correction-bias update, determinism, bad arguments.

#include "../common/finite_differences.hpp"
#include "../common/test_util.hpp"

#include <epx/host/router_backward.hpp>
#include <epx/host/router_losses.hpp>

#include <cstring>
#include <limits>
#include <string>
#include <utility>

using namespace epx;

namespace {

constexpr double kEps = 1e-4;           // the finite-difference step, in logit units
constexpr float kStableMargin = 1e-3f;  // no selection changes within this distance of the input

struct Routed {
  std::vector<std::int32_t> ids;
  std::vector<float> weights;
};

Routed run_route(RouterConfig const& c, std::vector<float> const& logits, std::vector<float> const& bias) {
  auto const num_tokens = static_cast<std::int64_t>(logits.size()) / c.num_experts;
  Routed r{std::vector<std::int32_t>(static_cast<std::size_t>(num_tokens * c.top_k)),
           std::vector<float>(static_cast<std::size_t>(num_tokens * c.top_k))};
  route(Host{}, c, MatrixView<float const>(logits.data(), num_tokens, c.num_experts), bias,
        MatrixView<std::int32_t>(r.ids.data(), num_tokens, c.top_k),
        MatrixView<float>(r.weights.data(), num_tokens, c.top_k));
  return r;
}

template <class L>
std::vector<float> run_backward(RouterConfig const& c, std::vector<L> const& logits,
                                std::vector<std::int32_t> const& ids, std::vector<float> const& d_weights) {
  auto const num_tokens = static_cast<std::int64_t>(logits.size()) / c.num_experts;
  std::vector<float> d_logits(logits.size(), 1234.5f);  // poisoned: every element must be written
  route_backward(Host{}, c, MatrixView<L const>(logits.data(), num_tokens, c.num_experts),
                 MatrixView<std::int32_t const>(ids.data(), num_tokens, c.top_k),
                 MatrixView<float const>(d_weights.data(), num_tokens, c.top_k),
                 MatrixView<float>(d_logits.data(), num_tokens, c.num_experts));
  return d_logits;
}

// One token's routing weights in double with the selection fixed at `ids`, written from the
// RouterConfig comment: scores, the chosen ones' weights, renormalisation, scaling. NaN and -inf
// logits take no part.
std::vector<double> reference_weights(RouterConfig const& c, double const* logit, std::int32_t const* ids) {
  auto const k = static_cast<std::size_t>(c.top_k);
  std::vector<double> w(k, 0.0);
  auto const ok = [](double l) { return !std::isnan(l) && l != -INFINITY; };
  if (c.scoring == Scoring::kSoftmaxTopK) {
    double den = 0.0;
    for (std::int32_t e = 0; e < c.num_experts; ++e)
      if (ok(logit[e])) den += std::exp(logit[e]);
    for (std::size_t j = 0; j < k; ++j)
      if (ids[j] >= 0) w[j] = std::exp(logit[ids[j]]) / den;
  } else if (c.scoring == Scoring::kSigmoidTopK) {
    for (std::size_t j = 0; j < k; ++j)
      if (ids[j] >= 0) w[j] = 1.0 / (1.0 + std::exp(-logit[ids[j]]));
  } else {
    double den = 0.0;
    for (std::size_t j = 0; j < k; ++j)
      if (ids[j] >= 0) den += std::exp(logit[ids[j]]);
    for (std::size_t j = 0; j < k; ++j)
      if (ids[j] >= 0) w[j] = std::exp(logit[ids[j]]) / den;
  }
  if (c.renormalize) {
    double s = 0.0;
    for (double x : w) s += x;
    for (double& x : w) x /= s + 1e-20;
  }
  for (double& x : w) x *= c.routed_scaling_factor;
  return w;
}

// J = sum over slots of d_weights · weight, the scalar whose logit gradient route_backward gives.
double weight_objective(RouterConfig const& c, std::vector<double> const& logits, std::vector<std::int32_t> const& ids,
                        std::vector<float> const& d_weights) {
  auto const e_count = static_cast<std::size_t>(c.num_experts), k = static_cast<std::size_t>(c.top_k);
  double j_sum = 0.0;
  for (std::size_t t = 0; t < logits.size() / e_count; ++t) {
    auto const w = reference_weights(c, &logits[t * e_count], &ids[t * k]);
    for (std::size_t j = 0; j < k; ++j)
      if (ids[t * k + j] >= 0) j_sum += double(d_weights[t * k + j]) * w[j];
  }
  return j_sum;
}

// Central differences of f over every finite element of x (non-finite elements get 0).
template <class F>
std::vector<double> finite_differences(std::vector<double> x, F&& f) {
  return test::central_differences(std::move(x), kEps, f);
}

std::vector<double> to_double(std::vector<float> const& v) { return std::vector<double>(v.begin(), v.end()); }

// Random logits whose selection does not change when any one logit moves by up to
// kStableMargin: each token is redrawn until route() chooses the same ids (in the same order)
// at every such perturbation, so ties are avoided and finite differences see one branch.
std::vector<float> stable_logits(RouterConfig const& c, std::int64_t num_tokens, std::vector<float> const& bias,
                                 std::mt19937_64& rng) {
  auto const e_count = static_cast<std::size_t>(c.num_experts);
  RouterConfig one = c;
  std::normal_distribution<float> dist(0.0f, 1.5f);
  std::vector<float> logits(static_cast<std::size_t>(num_tokens) * e_count);
  for (std::int64_t t = 0; t < num_tokens; ++t) {
    for (int attempt = 0;; ++attempt) {
      REQUIRE_MESSAGE(attempt < 1000, "could not draw a tie-free token");
      std::vector<float> row(e_count);
      for (auto& x : row) x = dist(rng);
      auto const base = run_route(one, row, bias).ids;
      bool stable = true;
      for (std::size_t e = 0; e < e_count && stable; ++e)
        for (float step : {kStableMargin, -kStableMargin}) {
          auto moved = row;
          moved[e] += step;
          if (run_route(one, moved, bias).ids != base) stable = false;
        }
      if (!stable) continue;
      std::copy(row.begin(), row.end(), logits.begin() + static_cast<std::ptrdiff_t>(t * c.num_experts));
      break;
    }
  }
  return logits;
}

std::string describe(RouterConfig const& c, bool with_bias) {
  return fmt::format("{} renormalize={} scaling={} groups={}/{} bias={}", to_string(c.scoring), c.renormalize,
                     c.routed_scaling_factor, c.topk_groups, c.num_groups, with_bias);
}

// ---- losses: an independent double reference ----

struct LossReference {
  double load_balancing = 0.0, sequence_aux = 0.0, z_loss = 0.0;
};

LossReference reference_losses(RouterConfig const& c, std::vector<double> const& logits,
                               std::vector<std::int32_t> const& ids, std::vector<std::int64_t> offsets) {
  auto const e_count = static_cast<std::size_t>(c.num_experts), k = static_cast<std::size_t>(c.top_k);
  auto const num_tokens = static_cast<std::int64_t>(logits.size() / e_count);
  auto prob = [&](std::int64_t t, std::size_t i) {
    double const* l = &logits[static_cast<std::size_t>(t) * e_count];
    double num = 0.0, den = 0.0;
    for (std::size_t e = 0; e < e_count; ++e) {
      double const v = c.scoring == Scoring::kSigmoidTopK ? 1.0 / (1.0 + std::exp(-l[e])) : std::exp(l[e]);
      den += v;
      if (e == i) num = v;
    }
    return num / den;
  };
  // E · sum_i f_i P_i over tokens [b, e).
  auto balance = [&](std::int64_t b, std::int64_t end) {
    double const n = static_cast<double>(end - b);
    double loss = 0.0;
    for (std::size_t i = 0; i < e_count; ++i) {
      double f = 0.0, p = 0.0;
      for (std::int64_t t = b; t < end; ++t) {
        for (std::size_t j = 0; j < k; ++j) f += ids[static_cast<std::size_t>(t) * k + j] == std::int32_t(i) ? 1 : 0;
        p += prob(t, i);
      }
      loss += (f / (n * double(k))) * (p / n);
    }
    return double(e_count) * loss;
  };
  LossReference r;
  if (num_tokens == 0) return r;
  r.load_balancing = balance(0, num_tokens);
  if (offsets.empty()) offsets = {0, num_tokens};
  int sequences = 0;
  for (std::size_t s = 0; s + 1 < offsets.size(); ++s)
    if (offsets[s + 1] > offsets[s]) r.sequence_aux += balance(offsets[s], offsets[s + 1]), ++sequences;
  r.sequence_aux /= sequences;
  for (std::int64_t t = 0; t < num_tokens; ++t) {
    double sum = 0.0;
    for (std::size_t e = 0; e < e_count; ++e) sum += std::exp(logits[static_cast<std::size_t>(t) * e_count + e]);
    r.z_loss += std::log(sum) * std::log(sum);
  }
  r.z_loss /= double(num_tokens);
  return r;
}

RouterLossValues run_losses(RouterConfig const& c, RouterLossConfig const& losses, std::vector<float> const& logits,
                            std::vector<std::int32_t> const& ids, std::vector<std::int64_t> const& offsets,
                            std::vector<float>& d_logits) {
  auto const num_tokens = static_cast<std::int64_t>(logits.size()) / c.num_experts;
  return router_losses(Host{}, c, losses, MatrixView<float const>(logits.data(), num_tokens, c.num_experts),
                       MatrixView<std::int32_t const>(ids.data(), num_tokens, c.top_k), offsets,
                       MatrixView<float>(d_logits.data(), num_tokens, c.num_experts));
}

}  // namespace

TEST_CASE("route_backward: central finite differences for every scoring, renormalize, scaling, bias and groups") {
  EPX_TEST_SEEDED_RNG(rng);
  constexpr std::int64_t kTokens = 6;
  int configs = 0;
  for (Scoring scoring : {Scoring::kSoftmaxTopK, Scoring::kTopKSoftmax, Scoring::kSigmoidTopK})
    for (bool renormalize : {false, true})
      for (float scaling : {1.0f, 2.5f})
        for (bool with_bias : {false, true})
          for (std::int32_t groups : {1, 4}) {
            RouterConfig const c{.num_experts = 8,
                                 .top_k = 2,
                                 .scoring = scoring,
                                 .renormalize = renormalize,
                                 .num_groups = groups,
                                 .topk_groups = groups == 1 ? 1 : 2,
                                 .routed_scaling_factor = scaling};
            INFO(describe(c, with_bias));
            ++configs;
            auto const bias = with_bias ? test::random_vector<float>(8, rng, 0.3f) : std::vector<float>{};
            auto const logits = stable_logits(c, kTokens, bias, rng);
            auto const routed = run_route(c, logits, bias);
            auto const d_weights = test::random_vector<float>(routed.ids.size(), rng);

            // The reference is route()'s function: same weights at the input.
            std::vector<double> ref_w;
            for (std::int64_t t = 0; t < kTokens; ++t) {
              auto const w = reference_weights(c, &to_double(logits)[static_cast<std::size_t>(t) * 8],
                                               &routed.ids[static_cast<std::size_t>(t) * 2]);
              ref_w.insert(ref_w.end(), w.begin(), w.end());
            }
            CHECK(test::rel_error(routed.weights, ref_w) < 1e-6);
            // The finite-difference step does not change the selection (the margin is 10x the step).
            for (std::size_t i = 0; i < logits.size(); ++i)
              for (double step : {kEps, -kEps}) {
                auto moved = logits;
                moved[i] = static_cast<float>(double(moved[i]) + step);
                REQUIRE(run_route(c, moved, bias).ids == routed.ids);
              }

            auto const grad = run_backward(c, logits, routed.ids, d_weights);
            auto const fd = finite_differences(to_double(logits), [&](std::vector<double> const& x) {
              return weight_objective(c, x, routed.ids, d_weights);
            });
            CHECK(test::rel_error(grad, fd) < 1e-6);
            // Only the chosen logits move the weights unless the softmax spans all experts.
            if (scoring != Scoring::kSoftmaxTopK)
              for (std::int64_t t = 0; t < kTokens; ++t)
                for (std::int32_t e = 0; e < 8; ++e) {
                  bool chosen = false;
                  for (std::int32_t j = 0; j < 2; ++j) chosen |= routed.ids[static_cast<std::size_t>(t * 2 + j)] == e;
                  if (!chosen) CHECK(grad[static_cast<std::size_t>(t * 8 + e)] == 0.0f);
                }
          }
  CHECK(configs == 48);
}

TEST_CASE("route_backward: NaN and -inf experts get no gradient, -1 slots give none") {
  EPX_TEST_SEEDED_RNG(rng);
  float const nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  for (Scoring scoring : {Scoring::kSoftmaxTopK, Scoring::kTopKSoftmax, Scoring::kSigmoidTopK}) {
    RouterConfig const c{.num_experts = 4, .top_k = 3, .scoring = scoring, .renormalize = true};
    INFO(to_string(scoring));
    // Token 0 has two selectable experts (slot 2 gets -1); token 1 is ordinary.
    std::vector<float> logits = {0.3f, nan, -0.7f, -inf, 0.9f, -0.4f, 0.2f, 1.3f};
    auto const routed = run_route(c, logits, {});
    REQUIRE(routed.ids[2] == -1);
    auto d_weights = test::random_vector<float>(6, rng);
    auto const poisoned = d_weights;
    d_weights[2] = nan;  // ignored at a -1 slot
    auto const grad = run_backward(c, logits, routed.ids, d_weights);
    CHECK(grad[1] == 0.0f);
    CHECK(grad[3] == 0.0f);
    auto const fd = finite_differences(
        to_double(logits), [&](std::vector<double> const& x) { return weight_objective(c, x, routed.ids, poisoned); });
    CHECK(test::rel_error(grad, fd) < 1e-6);
  }
}

TEST_CASE("route_backward and router_losses: bf16 logits give the results of their float values, bitwise") {
  EPX_TEST_SEEDED_RNG(rng);
  RouterConfig const c{.num_experts = 8, .top_k = 2, .scoring = Scoring::kSoftmaxTopK, .renormalize = true};
  auto const logits16 = test::random_vector<bfloat16>(6 * 8, rng, 1.5f);
  std::vector<float> logits(logits16.size());
  for (std::size_t i = 0; i < logits.size(); ++i) logits[i] = to_float(logits16[i]);
  auto const ids = run_route(c, logits, {}).ids;
  auto const d_weights = test::random_vector<float>(ids.size(), rng);
  auto const from_float = run_backward(c, logits, ids, d_weights);
  CHECK(run_backward(c, logits16, ids, d_weights) == from_float);

  // Mutable views are welcome where the call only reads.
  auto mutable_logits = logits16;
  auto mutable_ids = ids;
  auto mutable_d_weights = d_weights;
  std::vector<float> d_logits(logits.size());
  route_backward(Host{}, c, MatrixView<bfloat16>(mutable_logits.data(), 6, 8),
                 MatrixView<std::int32_t>(mutable_ids.data(), 6, 2), MatrixView<float>(mutable_d_weights.data(), 6, 2),
                 MatrixView<float>(d_logits.data(), 6, 8));
  CHECK(d_logits == from_float);

  RouterLossConfig const losses{.load_balancing = 0.5f, .sequence_aux = 0.25f, .z_loss = 0.125f};
  std::vector<float> d16(logits.size(), 0.0f), d32(logits.size(), 0.0f);
  auto const v16 =
      router_losses(Host{}, c, losses, MatrixView<bfloat16>(mutable_logits.data(), 6, 8),
                    MatrixView<std::int32_t>(mutable_ids.data(), 6, 2), {}, MatrixView<float>(d16.data(), 6, 8));
  auto const v32 = run_losses(c, losses, logits, ids, {}, d32);
  CHECK(std::memcmp(&v16, &v32, sizeof(RouterLossValues)) == 0);
  CHECK(d16 == d32);
}

TEST_CASE("route_backward and router_losses: two runs are bitwise equal") {
  EPX_TEST_SEEDED_RNG(rng);
  RouterConfig const c{.num_experts = 16,
                       .top_k = 4,
                       .scoring = Scoring::kSigmoidTopK,
                       .renormalize = true,
                       .num_groups = 4,
                       .topk_groups = 2,
                       .routed_scaling_factor = 2.5f};
  auto const logits = test::random_vector<float>(64 * 16, rng, 2.0f);
  auto const bias = test::random_vector<float>(16, rng, 0.1f);
  auto const ids = run_route(c, logits, bias).ids;
  auto const d_weights = test::random_vector<float>(ids.size(), rng);
  RouterLossConfig const losses{.load_balancing = 0.01f, .sequence_aux = 1e-4f, .z_loss = 1e-3f};
  std::vector<std::int64_t> const offsets = {0, 20, 20, 64};
  auto run = [&] {
    auto d = run_backward(c, logits, ids, d_weights);
    auto v = run_losses(c, losses, logits, ids, offsets, d);
    return std::pair{d, v};
  };
  auto const [d1, v1] = run();
  auto const [d2, v2] = run();
  REQUIRE(d1.size() == d2.size());
  CHECK(std::memcmp(d1.data(), d2.data(), d1.size() * sizeof(float)) == 0);
  CHECK(std::memcmp(&v1, &v2, sizeof(RouterLossValues)) == 0);
}

TEST_CASE("router_losses: values and gradients against central finite differences, each loss alone and together") {
  EPX_TEST_SEEDED_RNG(rng);
  constexpr std::int64_t kTokens = 6;
  for (Scoring scoring : {Scoring::kSoftmaxTopK, Scoring::kTopKSoftmax, Scoring::kSigmoidTopK}) {
    RouterConfig const c{.num_experts = 8,
                         .top_k = 2,
                         .scoring = scoring,
                         .renormalize = true,
                         .num_groups = scoring == Scoring::kSigmoidTopK ? 4 : 1,
                         .topk_groups = scoring == Scoring::kSigmoidTopK ? 2 : 1};
    auto const logits = test::random_vector<float>(kTokens * 8, rng, 1.5f);
    auto ids = run_route(c, logits, test::random_vector<float>(8, rng, 0.2f)).ids;
    ids[3] = -1;  // a slot the router could not fill counts nowhere
    for (auto const& offsets : {std::vector<std::int64_t>{}, std::vector<std::int64_t>{0, 2, 2, 6}})
      for (int which = 0; which < 4; ++which) {  // load_balancing, sequence_aux, z_loss, all
        RouterLossConfig losses{};
        if (which == 0 || which == 3) losses.load_balancing = 0.7f;
        if (which == 1 || which == 3) losses.sequence_aux = 1.3f;
        if (which == 2 || which == 3) losses.z_loss = 0.4f;
        INFO(to_string(scoring) << " offsets=" << offsets.size() << " loss=" << which);
        std::vector<float> d_logits(logits.size(), 0.0f);
        auto const v = run_losses(c, losses, logits, ids, offsets, d_logits);
        auto const ref = reference_losses(c, to_double(logits), ids, offsets);
        CHECK(v.load_balancing == doctest::Approx(ref.load_balancing).epsilon(1e-12));
        CHECK(v.sequence_aux == doctest::Approx(ref.sequence_aux).epsilon(1e-12));
        CHECK(v.z_loss == doctest::Approx(ref.z_loss).epsilon(1e-12));
        double const total = losses.load_balancing * ref.load_balancing + losses.sequence_aux * ref.sequence_aux +
                             losses.z_loss * ref.z_loss;
        CHECK(v.total == doctest::Approx(total).epsilon(1e-12));
        auto const fd = finite_differences(to_double(logits), [&](std::vector<double> const& x) {
          auto const r = reference_losses(c, x, ids, offsets);
          return losses.load_balancing * r.load_balancing + losses.sequence_aux * r.sequence_aux +
                 losses.z_loss * r.z_loss;
        });
        CHECK(test::rel_error(d_logits, fd) < 1e-6);

        // The gradient is added: on top of route_backward's it is that plus the same numbers.
        auto const base = test::random_vector<float>(logits.size(), rng);
        auto added = base;
        run_losses(c, losses, logits, ids, offsets, added);
        bool all_added = true;
        for (std::size_t i = 0; i < base.size(); ++i) all_added &= added[i] == base[i] + d_logits[i];
        CHECK(all_added);
      }
  }
}

TEST_CASE("router_losses: hand-checked values at perfect balance; one sequence equals load balancing") {
  // Equal logits (0.5): p = 1/E for every scoring; each expert gets the same number of slots.
  RouterConfig const c{.num_experts = 4, .top_k = 2, .scoring = Scoring::kSoftmaxTopK};
  std::vector<float> const logits(4 * 4, 0.5f);
  std::vector<std::int32_t> const ids = {0, 1, 2, 3, 1, 0, 3, 2};
  std::vector<float> d_logits(logits.size(), 0.0f);
  auto const v =
      run_losses(c, {.load_balancing = 1.0f, .sequence_aux = 1.0f, .z_loss = 1.0f}, logits, ids, {}, d_logits);
  CHECK(v.load_balancing == doctest::Approx(1.0).epsilon(1e-15));
  CHECK(v.sequence_aux == v.load_balancing);
  double const lse = 0.5 + std::log(4.0);
  CHECK(v.z_loss == doctest::Approx(lse * lse).epsilon(1e-15));

  // Random logits and ids: with no offsets (one sequence) or the offsets {0, T}, the sequence-wise
  // loss is the load-balancing loss, value and gradient.
  EPX_TEST_SEEDED_RNG(rng);
  auto const random_logits = test::random_vector<float>(6 * 4, rng);
  std::vector<std::int32_t> random_ids(12);
  for (std::size_t i = 0; i < random_ids.size(); ++i) random_ids[i] = static_cast<std::int32_t>(rng() % 4);
  std::vector<float> d1(random_logits.size(), 0.0f), d2(random_logits.size(), 0.0f);
  auto const one = run_losses(c, {.sequence_aux = 1.0f}, random_logits, random_ids, {}, d1);
  auto const whole = run_losses(c, {.sequence_aux = 1.0f}, random_logits, random_ids, {0, 6}, d2);
  CHECK(one.sequence_aux == one.load_balancing);
  CHECK(whole.sequence_aux == one.sequence_aux);
  CHECK(d1 == d2);
}

TEST_CASE("router_losses: no tokens give zero values and touch nothing") {
  RouterConfig const c{.num_experts = 4, .top_k = 2};
  std::vector<float> logits;
  std::vector<std::int32_t> ids;
  std::vector<float> d_logits;
  auto const v =
      run_losses(c, {.load_balancing = 1.0f, .sequence_aux = 1.0f, .z_loss = 1.0f}, logits, ids, {0, 0}, d_logits);
  CHECK(v.load_balancing == 0.0);
  CHECK(v.sequence_aux == 0.0);
  CHECK(v.z_loss == 0.0);
  CHECK(v.total == 0.0);
}

TEST_CASE("expert_token_counts: slots per expert, -1 counted nowhere") {
  EPX_TEST_SEEDED_RNG(rng);
  auto const ids = test::random_ids(37, 3, 10, rng, 0.2);
  std::vector<std::int64_t> counts(10, -5), expected(10, 0);
  for (auto id : ids)
    if (id >= 0) ++expected[static_cast<std::size_t>(id)];
  expert_token_counts(Host{}, 10, MatrixView<std::int32_t const>(ids.data(), 37, 3), counts);
  CHECK(counts == expected);
  std::int64_t total = 0;
  for (auto n : counts) total += n;
  CHECK(total > 0);
}

TEST_CASE("update_correction_bias: b_i += u · sign(mean load - load_i), exactly") {
  // Mean 3: expert 0 is above (down), 1 below (up), 2 and 3 at the mean (unchanged).
  std::vector<float> bias = {0.25f, -0.5f, 1.0f, 0.0f};
  update_correction_bias(Host{}, std::vector<std::int64_t>{5, 1, 3, 3}, 0.125f, bias);
  CHECK(bias == std::vector<float>{0.125f, -0.375f, 1.0f, 0.0f});
  // A mean that is not an integer (1.5): nobody sits at it.
  std::vector<float> two = {0.0f, 0.0f};
  update_correction_bias(Host{}, std::vector<std::int64_t>{1, 2}, 0.001f, two);
  CHECK(two == std::vector<float>{0.001f, -0.001f});

  EPX_TEST_SEEDED_RNG(rng);
  std::vector<std::int64_t> counts(64);
  for (auto& n : counts) n = static_cast<std::int64_t>(rng() % 100);
  auto const start = test::random_vector<float>(64, rng, 0.1f);
  double mean = 0.0;
  for (auto n : counts) mean += double(n) / 64.0;
  auto b1 = start, b2 = start;
  update_correction_bias(Host{}, counts, 1e-3f, b1);
  update_correction_bias(Host{}, counts, 1e-3f, b2);
  CHECK(std::memcmp(b1.data(), b2.data(), b1.size() * sizeof(float)) == 0);
  for (std::size_t e = 0; e < 64; ++e) {
    INFO("expert " << e << " count " << counts[e] << " mean " << mean);
    float const expected = double(counts[e]) < mean   ? start[e] + 1e-3f
                           : double(counts[e]) > mean ? start[e] - 1e-3f
                                                      : start[e];
    CHECK(b1[e] == expected);
  }
}

TEST_CASE("route_backward, router_losses, expert_token_counts, update_correction_bias: errors name the parameter") {
  RouterConfig const c{.num_experts = 4, .top_k = 2};
  std::vector<float> const logits = {0.1f, 0.5f, -0.3f, 0.9f, 0.2f, -0.8f, 0.4f, 0.6f};
  std::vector<std::int32_t> ids = {3, 1, 3, 2};
  std::vector<float> const d_weights = {0.5f, -0.25f, 1.0f, 0.75f};
  std::vector<float> d_logits(8);
  MatrixView<float const> const lv(logits.data(), 2, 4);
  MatrixView<float const> const dwv(d_weights.data(), 2, 2);
  MatrixView<float> const dlv(d_logits.data(), 2, 4);
  auto idv = [&] { return MatrixView<std::int32_t const>(ids.data(), 2, 2); };

  // route_backward
  test::check_throws(Errc::kInvalidArgument, "route_backward: top_k = 0",
                     [&] { route_backward(Host{}, RouterConfig{.num_experts = 4, .top_k = 0}, lv, idv(), dwv, dlv); });
  test::check_throws(Errc::kShapeMismatch, "route_backward: d_logits.cols = 3, expected 4",
                     [&] { route_backward(Host{}, c, lv, idv(), dwv, MatrixView<float>(d_logits.data(), 2, 3)); });
  test::check_throws(Errc::kShapeMismatch, "route_backward: d_topk_weights.rows = 1, expected 2", [&] {
    route_backward(Host{}, c, lv, idv(), MatrixView<float const>(d_weights.data(), 1, 2), dlv);
  });
  test::check_throws(Errc::kShapeMismatch, "route_backward: topk_ids.cols = 1, expected 2", [&] {
    route_backward(Host{}, c, lv, MatrixView<std::int32_t const>(ids.data(), 2, 1), dwv, dlv);
  });
  ids = {3, 1, 4, 2};
  test::check_throws(Errc::kInvalidExpertId,
                     "route_backward: topk_ids[1, 0] = 4, expected -1 or in [0, num_experts = 4)",
                     [&] { route_backward(Host{}, c, lv, idv(), dwv, dlv); });
  ids = {3, 3, 0, 2};
  test::check_throws(Errc::kInvalidArgument, "route_backward: topk_ids[0, 1] = 3, expected an id not already",
                     [&] { route_backward(Host{}, c, lv, idv(), dwv, dlv); });
  ids = {3, 1, 0, 2};
  auto nan_logits = logits;
  nan_logits[4] = std::numeric_limits<float>::quiet_NaN();
  test::check_throws(Errc::kInvalidArgument, "route_backward: topk_ids[1, 0] = 0, expected an expert whose logit", [&] {
    route_backward(Host{}, c, MatrixView<float const>(nan_logits.data(), 2, 4), idv(), dwv, dlv);
  });

  // router_losses
  auto losses = [&](RouterLossConfig const& l, std::vector<std::int64_t> const& offsets, MatrixView<float const> lgv) {
    router_losses(Host{}, c, l, lgv, idv(), offsets, dlv);
  };
  test::check_throws(Errc::kInvalidArgument, "router_losses: losses.z_loss = -1, expected a finite number >= 0",
                     [&] { losses({.z_loss = -1.0f}, {}, lv); });
  test::check_throws(Errc::kInvalidArgument, "router_losses: losses.load_balancing = nan",
                     [&] { losses({.load_balancing = std::numeric_limits<float>::quiet_NaN()}, {}, lv); });
  test::check_throws(Errc::kShapeMismatch, "router_losses: sequence_offsets.size() = 1", [&] { losses({}, {0}, lv); });
  test::check_throws(Errc::kInvalidArgument, "router_losses: sequence_offsets[0] = 1, expected 0", [&] {
    losses({}, {1, 2}, lv);
  });
  test::check_throws(Errc::kInvalidArgument, "router_losses: sequence_offsets[2] = 0, expected >= sequence_offsets[1]",
                     [&] {
                       losses({}, {0, 1, 0, 2}, lv);
                     });
  test::check_throws(Errc::kInvalidArgument, "router_losses: sequence_offsets[1] = 3, expected num_tokens = 2", [&] {
    losses({}, {0, 3}, lv);
  });
  test::check_throws(Errc::kInvalidArgument, "router_losses: logits[1, 0] = nan, expected a finite number",
                     [&] { losses({}, {}, MatrixView<float const>(nan_logits.data(), 2, 4)); });
  test::check_throws(Errc::kShapeMismatch, "router_losses: d_logits.rows = 1, expected 2",
                     [&] { router_losses(Host{}, c, {}, lv, idv(), {}, MatrixView<float>(d_logits.data(), 1, 4)); });
  ids = {3, 1, 0, -2};
  test::check_throws(Errc::kInvalidExpertId, "router_losses: topk_ids[1, 1] = -2", [&] { losses({}, {}, lv); });

  // expert_token_counts
  std::vector<std::int64_t> counts(3);
  ids = {3, 1, 0, 2};
  test::check_throws(Errc::kShapeMismatch, "expert_token_counts: counts.size() = 3, expected num_experts = 4",
                     [&] { expert_token_counts(Host{}, 4, idv(), counts); });
  test::check_throws(Errc::kInvalidExpertId,
                     "expert_token_counts: topk_ids[0, 0] = 3, expected -1 or in [0, num_experts = 3)",
                     [&] { expert_token_counts(Host{}, 3, idv(), counts); });

  // update_correction_bias: nothing is written on error
  std::vector<float> bias = {0.5f, 0.25f};
  std::vector<std::int64_t> const two = {1, 2};
  test::check_throws(Errc::kInvalidArgument,
                     "update_correction_bias: update_rate = -0.5, expected a finite number >= 0",
                     [&] { update_correction_bias(Host{}, two, -0.5f, bias); });
  test::check_throws(Errc::kInvalidArgument, "update_correction_bias: update_rate = inf",
                     [&] { update_correction_bias(Host{}, two, std::numeric_limits<float>::infinity(), bias); });
  test::check_throws(Errc::kShapeMismatch,
                     "update_correction_bias: correction_bias.size() = 2, expected counts.size() = 3", [&] {
                       update_correction_bias(Host{}, std::vector<std::int64_t>{1, 2, 3}, 0.1f, bias);
                     });
  test::check_throws(Errc::kInvalidArgument, "update_correction_bias: counts[1] = -2, expected >= 0", [&] {
    update_correction_bias(Host{}, std::vector<std::int64_t>{1, -2}, 0.1f, bias);
  });
  std::vector<float> big = {0.0f, std::numeric_limits<float>::max()};
  test::check_throws(Errc::kInvalidArgument, "update_correction_bias: correction_bias[1] = ", [&] {
    update_correction_bias(Host{}, std::vector<std::int64_t>{2, 1}, 3e38f, big);
  });
  CHECK(big == std::vector<float>{0.0f, std::numeric_limits<float>::max()});
  CHECK(bias == std::vector<float>{0.5f, 0.25f});
}
