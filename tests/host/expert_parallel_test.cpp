// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// ExpertParallel<Grouped, AllToAll | AllGather, Host> over LocalGroup ranks must reproduce the
// dense single-rank MoE computed by an independent naive loop.

#include "../common/test_util.hpp"

#include <map>

using namespace epx;
using epx::test::GlobalWeights;

namespace {

// kWithoutExpert: some tokens get all -1 (padding) and one gets -1 and an invalid id; from
// logits, some tokens get all-NaN logits (the router gives them all -1).
enum class Routing { kRandom, kHotExpert, kWithInvalid, kWithoutExpert };

struct Scenario {
  std::int32_t num_experts = 16;
  std::int32_t top_k = 4;
  ExpertMlpConfig mlp{.hidden = 32, .intermediate = 24};
  std::vector<std::int64_t> tokens_per_rank = {};  // AllToAll: per rank; AllGather: [0] for all
  std::vector<std::int32_t> experts_per_rank = {};  // empty: contiguous
  Routing routing = Routing::kRandom;
  bool bias = false;
  bool from_logits = false;
};

template <class T>
double tolerance() {
  return std::is_same_v<T, float> ? 1e-5 : 1e-2;
}

struct RankData {
  std::vector<float> logits = {};
  std::vector<std::int32_t> ids = {};
  std::vector<float> weights = {};
};

template <class T>
std::vector<std::int32_t> make_ids(Scenario const& s, std::int64_t num_tokens, std::mt19937_64& rng) {
  auto ids = test::random_ids(num_tokens, s.top_k, s.num_experts, rng);
  if (s.routing == Routing::kHotExpert)  // every token sends slot 0 to expert 3 (and keeps distinct ids)
    for (std::int64_t t = 0; t < num_tokens; ++t) {
      auto* row = ids.data() + t * s.top_k;
      for (std::int32_t j = 1; j < s.top_k; ++j)
        if (row[j] == 3) row[j] = row[0] == 3 ? -1 : row[0];
      row[0] = 3;
    }
  if (s.routing == Routing::kWithInvalid && !ids.empty()) {
    ids[0] = s.num_experts + 5;
    ids[ids.size() / 2] = -7;
  }
  if (s.routing == Routing::kWithoutExpert && num_tokens > 0) {
    std::uniform_int_distribution<std::int64_t> pick(0, num_tokens - 1);
    for (std::int64_t t : {pick(rng), pick(rng), num_tokens - 1})
      std::fill_n(ids.begin() + t * s.top_k, s.top_k, -1);
    std::int64_t const mixed = pick(rng);  // -1 everywhere but one invalid id: no expert either
    std::fill_n(ids.begin() + mixed * s.top_k, s.top_k, -1);
    ids[static_cast<std::size_t>(mixed * s.top_k)] = s.num_experts + 1;
  }
  return ids;
}

// Router logits for `num_tokens` tokens; kWithoutExpert makes whole rows NaN.
std::vector<float> make_logits(Scenario const& s, std::int64_t num_tokens, std::mt19937_64& rng) {
  auto logits = test::random_vector<float>(static_cast<std::size_t>(num_tokens * s.num_experts), rng);
  if (s.routing == Routing::kWithoutExpert && num_tokens > 0) {
    // Token 0 and a random one of the others all NaN; the last (when it is another) every logit
    // but one NaN: it keeps that expert (fewer than top_k), so it is not counted.
    std::int64_t const last = num_tokens - 1;
    std::uniform_int_distribution<std::int64_t> pick(0, std::max<std::int64_t>(last - 1, 0));
    for (std::int64_t t : {pick(rng), std::int64_t{0}})
      std::fill_n(logits.begin() + t * s.num_experts, s.num_experts, NAN);
    if (last > 0) {
      std::fill_n(logits.begin() + last * s.num_experts, s.num_experts, NAN);
      logits[static_cast<std::size_t>(last * s.num_experts + s.num_experts / 2)] = 1.0f;
    }
  }
  return logits;
}

// Tokens none of whose slots names an expert in [0, num_experts): their output row is zero.
std::uint64_t count_tokens_without_expert(std::vector<std::int32_t> const& ids, std::int32_t top_k,
                                          std::int32_t num_experts) {
  std::uint64_t n = 0;
  for (std::size_t t = 0; t * static_cast<std::size_t>(top_k) < ids.size(); ++t) {
    auto const row = ids.begin() + static_cast<std::ptrdiff_t>(t * static_cast<std::size_t>(top_k));
    n += std::none_of(row, row + top_k, [&](std::int32_t id) { return id >= 0 && id < num_experts; });
  }
  return n;
}

// Runs the scenario on `num_ranks` LocalGroup ranks; returns each rank's y.
template <class Dispatch, class T>
std::vector<std::vector<T>> run_ep(int num_ranks, Scenario const& s, GlobalWeights<T> const& gw,
                                   std::vector<std::vector<T>> const& xs, std::vector<RankData> const& routing,
                                   std::vector<Status>* statuses = nullptr) {
  LocalGroup group(num_ranks, {.timeout = std::chrono::seconds(30)});
  std::vector<std::vector<T>> ys(static_cast<std::size_t>(num_ranks));
  std::vector<Status> st(static_cast<std::size_t>(num_ranks));
  std::int64_t max_tokens = 0;
  for (auto const& x : xs) max_tokens = std::max<std::int64_t>(max_tokens, static_cast<std::int64_t>(x.size()) / s.mlp.hidden);
  ExpertPlacement placement = s.experts_per_rank.empty() ? ExpertPlacement::contiguous(s.num_experts, num_ranks)
                                                         : ExpertPlacement::from_counts(s.experts_per_rank);
  group.run([&](int rank, Communicator& comm) {
    auto const r = static_cast<std::size_t>(rank);
    ExpertParallel<Grouped, Dispatch, Host> ep(
        MoeConfig{.router = {.num_experts = s.num_experts, .top_k = s.top_k, .renormalize = true},
                  .mlp = s.mlp,
                  .weights = gw.local(placement.local_range(rank)),
                  .placement = placement,
                  .on_invalid_ids = InvalidIds::kDropAndCount},
        comm);
    std::vector<std::byte> ws(ep.workspace_bytes(max_tokens));
    auto const& x = xs[r];
    std::int64_t const num_tokens = static_cast<std::int64_t>(x.size()) / s.mlp.hidden;
    ys[r].assign(x.size(), from_float<T>(12345.0f));  // poisoned: every row must be written
    MatrixView<T const> xv(x.data(), num_tokens, s.mlp.hidden);
    MatrixView<T> yv(ys[r].data(), num_tokens, s.mlp.hidden);
    if (s.from_logits)
      st[r] = ep.forward(MatrixView<float const>(routing[r].logits.data(), num_tokens, s.num_experts), xv, yv,
                         Workspace(ws.data(), ws.size()));
    else
      st[r] = ep.forward(MatrixView<std::int32_t const>(routing[r].ids.data(), num_tokens, s.top_k),
                         MatrixView<float const>(routing[r].weights.data(), num_tokens, s.top_k), xv, yv,
                         Workspace(ws.data(), ws.size()));
  });
  if (statuses) *statuses = st;
  return ys;
}

// Checks every rank's output against the dense reference of its own tokens.
template <class Dispatch, class T>
void check_scenario(int num_ranks, Scenario const& s, std::mt19937_64& rng) {
  constexpr bool kAllToAll = std::is_same_v<Dispatch, AllToAll>;
  CAPTURE(num_ranks);
  auto const gw = GlobalWeights<T>::random(s.num_experts, s.mlp, s.bias, rng);
  std::vector<std::vector<T>> xs(static_cast<std::size_t>(num_ranks));
  std::vector<RankData> routing(static_cast<std::size_t>(num_ranks));
  for (int r = 0; r < num_ranks; ++r) {
    auto const ur = static_cast<std::size_t>(r);
    if (!kAllToAll && r > 0) {  // AllGather: the same tokens everywhere
      xs[ur] = xs[0];
      routing[ur] = routing[0];
      continue;
    }
    std::int64_t const num_tokens = s.tokens_per_rank[kAllToAll ? ur % s.tokens_per_rank.size() : 0];
    xs[ur] = test::random_vector<T>(static_cast<std::size_t>(num_tokens * s.mlp.hidden), rng);
    if (s.from_logits) {
      routing[ur].logits = make_logits(s, num_tokens, rng);
      routing[ur].ids.resize(static_cast<std::size_t>(num_tokens * s.top_k));
      routing[ur].weights.resize(routing[ur].ids.size());
      route(Host{}, RouterConfig{.num_experts = s.num_experts, .top_k = s.top_k, .renormalize = true},
            MatrixView<float const>(routing[ur].logits.data(), num_tokens, s.num_experts), {},
            MatrixView<std::int32_t>(routing[ur].ids.data(), num_tokens, s.top_k),
            MatrixView<float>(routing[ur].weights.data(), num_tokens, s.top_k));
    } else {
      routing[ur].ids = make_ids<T>(s, num_tokens, rng);
      routing[ur].weights = test::random_weights(routing[ur].ids.size(), rng);
    }
  }
  std::vector<Status> statuses;
  auto const ys = run_ep<Dispatch, T>(num_ranks, s, gw, xs, routing, &statuses);
  for (int r = 0; r < num_ranks; ++r) {
    CAPTURE(r);
    auto const ur = static_cast<std::size_t>(r);
    std::int64_t const num_tokens = static_cast<std::int64_t>(xs[ur].size()) / s.mlp.hidden;
    auto const expected = test::dense_moe(gw, xs[ur], routing[ur].ids, routing[ur].weights, num_tokens, s.top_k);
    bool const all_zero = std::all_of(expected.begin(), expected.end(), [](double v) { return v == 0.0; });
    if (all_zero)  // every slot of this rank was -1 (or invalid): its outputs must be exact zeros
      for (auto v : ys[ur]) CHECK(to_float(v) == 0.0f);
    else
      CHECK(test::rel_error(ys[ur], expected) <= tolerance<T>());
    if (s.routing == Routing::kWithInvalid && num_tokens > 0) {
      CHECK(statuses[ur].invalid_ids == 2);
      CHECK(statuses[ur].dropped_slots == 2);
    } else if (s.routing == Routing::kWithoutExpert && !s.from_logits && num_tokens > 0) {
      CHECK(statuses[ur].invalid_ids == 1);
    } else {
      CHECK(statuses[ur].invalid_ids == 0);
    }
    // Tokens that found no expert: counted, and their rows exactly zero.
    auto const without = count_tokens_without_expert(routing[ur].ids, s.top_k, s.num_experts);
    CHECK(statuses[ur].tokens_without_expert == without);
    if (s.routing == Routing::kWithoutExpert && num_tokens > 0) CHECK(without >= 1);
    for (std::int64_t t = 0; t < num_tokens; ++t) {
      auto const row = routing[ur].ids.begin() + t * s.top_k;
      if (std::none_of(row, row + s.top_k, [&](std::int32_t id) { return id >= 0 && id < s.num_experts; }))
        for (std::int32_t c = 0; c < s.mlp.hidden; ++c)
          CHECK(to_float(ys[ur][static_cast<std::size_t>(t * s.mlp.hidden + c)]) == 0.0f);
    }
    // ok() is about slots dropped, not tokens without expert (Status::ok()).
    CHECK(statuses[ur].ok() == (statuses[ur].invalid_ids == 0 && statuses[ur].dropped_slots == 0));
    if (!kAllToAll) {  // the same tokens on every rank: the same counters
      CHECK(statuses[ur].tokens_without_expert == statuses[0].tokens_without_expert);
      CHECK(statuses[ur].invalid_ids == statuses[0].invalid_ids);
    }
  }
}

template <class Dispatch, class T>
void check_all_rank_counts(Scenario s, std::mt19937_64& rng) {
  for (int num_ranks : {1, 2, 3, 4, 8}) {
    if (!s.experts_per_rank.empty() && static_cast<int>(s.experts_per_rank.size()) != num_ranks) continue;
    check_scenario<Dispatch, T>(num_ranks, s, rng);
  }
}

}  // namespace

TEST_CASE_TEMPLATE("ExpertParallel::forward: N ranks equal the dense MoE (fp32)", Dispatch, AllToAll, AllGather) {
  EPX_TEST_SEEDED_RNG(rng);
  check_all_rank_counts<Dispatch, float>({.tokens_per_rank = {13, 0, 29, 7}}, rng);
}

TEST_CASE_TEMPLATE("ExpertParallel::forward: N ranks equal the dense MoE (bf16 and fp16)", Dispatch, AllToAll,
                   AllGather) {
  EPX_TEST_SEEDED_RNG(rng);
  Scenario const s{.tokens_per_rank = {17, 5, 0, 11}, .bias = true};
  check_all_rank_counts<Dispatch, bfloat16>(s, rng);
  check_all_rank_counts<Dispatch, half>(s, rng);
}

TEST_CASE_TEMPLATE("ExpertParallel::forward: uneven placement of 10 experts over 4 ranks", Dispatch, AllToAll,
                   AllGather) {
  EPX_TEST_SEEDED_RNG(rng);
  check_scenario<Dispatch, float>(4, {.num_experts = 10, .top_k = 3, .tokens_per_rank = {9, 14, 3, 21}}, rng);
  // Explicit, lopsided placement with an empty rank.
  check_scenario<Dispatch, float>(
      4, {.num_experts = 10, .top_k = 3, .tokens_per_rank = {9, 14, 3, 21}, .experts_per_rank = {6, 0, 1, 3}}, rng);
}

TEST_CASE_TEMPLATE("ExpertParallel::forward: more ranks than experts", Dispatch, AllToAll, AllGather) {
  EPX_TEST_SEEDED_RNG(rng);
  check_scenario<Dispatch, float>(8, {.num_experts = 4, .top_k = 2, .tokens_per_rank = {6, 1, 0, 9}}, rng);
}

TEST_CASE_TEMPLATE("ExpertParallel::forward: one hot expert takes every token", Dispatch, AllToAll, AllGather) {
  EPX_TEST_SEEDED_RNG(rng);
  check_all_rank_counts<Dispatch, float>({.tokens_per_rank = {31, 8}, .routing = Routing::kHotExpert}, rng);
}

TEST_CASE_TEMPLATE("ExpertParallel::forward: zero tokens everywhere still makes every collective", Dispatch, AllToAll,
                   AllGather) {
  EPX_TEST_SEEDED_RNG(rng);
  check_all_rank_counts<Dispatch, float>({.tokens_per_rank = {0}}, rng);
}

TEST_CASE_TEMPLATE("ExpertParallel::forward: experts that receive no tokens", Dispatch, AllToAll, AllGather) {
  EPX_TEST_SEEDED_RNG(rng);
  // 64 experts, 2 tokens of top-2: most experts get nothing.
  check_all_rank_counts<Dispatch, float>({.num_experts = 64, .top_k = 2, .tokens_per_rank = {2, 1}}, rng);
}

TEST_CASE_TEMPLATE("ExpertParallel::forward: from router logits", Dispatch, AllToAll, AllGather) {
  EPX_TEST_SEEDED_RNG(rng);
  check_all_rank_counts<Dispatch, bfloat16>({.num_experts = 32, .top_k = 8, .tokens_per_rank = {20, 3, 12},
                                             .from_logits = true}, rng);
}

TEST_CASE_TEMPLATE("ExpertParallel::forward: every activation and gate/up layout", Dispatch, AllToAll, AllGather) {
  EPX_TEST_SEEDED_RNG(rng);
  for (auto act : {Activation::kSwiGLU, Activation::kGeGLU, Activation::kGeGLUTanh, Activation::kReLU,
                   Activation::kClampedSwiGLU})
    for (auto layout : {GateUpLayout::kConcatenated, GateUpLayout::kInterleaved}) {
      CAPTURE(to_string(act));
      CAPTURE(static_cast<int>(layout));
      Scenario s{.tokens_per_rank = {11, 6, 0}, .bias = true};
      s.mlp.activation = act;
      s.mlp.gate_up_layout = layout;
      s.mlp.clamped_swiglu = {.alpha = 1.702f, .limit = 0.5f};  // a low limit so the clamp matters
      check_scenario<Dispatch, float>(3, s, rng);
    }
}

TEST_CASE_TEMPLATE("ExpertParallel::forward: invalid ids are dropped and counted", Dispatch, AllToAll, AllGather) {
  EPX_TEST_SEEDED_RNG(rng);
  check_scenario<Dispatch, float>(3, {.tokens_per_rank = {10, 4, 7}, .routing = Routing::kWithInvalid}, rng);
}

TEST_CASE_TEMPLATE("ExpertParallel::forward: tokens without expert are counted in Status (given ids)", Dispatch,
                   AllToAll, AllGather) {
  EPX_TEST_SEEDED_RNG(rng);
  check_all_rank_counts<Dispatch, float>({.tokens_per_rank = {12, 5, 9}, .routing = Routing::kWithoutExpert}, rng);
  check_scenario<Dispatch, bfloat16>(
      3, {.num_experts = 10, .top_k = 1, .tokens_per_rank = {14, 6, 1}, .routing = Routing::kWithoutExpert}, rng);
}

TEST_CASE_TEMPLATE("ExpertParallel::forward: tokens without expert are counted in Status (all-NaN logits)", Dispatch,
                   AllToAll, AllGather) {
  EPX_TEST_SEEDED_RNG(rng);
  check_all_rank_counts<Dispatch, float>(
      {.num_experts = 16, .top_k = 4, .tokens_per_rank = {11, 3, 8}, .routing = Routing::kWithoutExpert,
       .from_logits = true},
      rng);
}

TEST_CASE_TEMPLATE("ExpertParallel::forward: given top-k is used as given: unsorted, duplicated, not renormalised",
                   Dispatch, AllToAll, AllGather) {
  // docs/api.md promises: caller-given weights are used as they are (renormalize and
  // routed_scaling_factor apply only to the router's own weights), ids need not be sorted, and an
  // id repeated in one token's row is applied once per slot.
  EPX_TEST_SEEDED_RNG(rng);
  std::int32_t const e = 8, k = 4;
  std::int64_t const t = 37;
  ExpertMlpConfig const mlp{.hidden = 24, .intermediate = 16};
  auto const gw = GlobalWeights<float>::random(e, mlp, true, rng);
  auto const x = test::random_vector<float>(static_cast<std::size_t>(t * mlp.hidden), rng);
  auto ids = test::random_ids(t, k, e, rng, 0.0);
  for (std::int64_t tok = 0; tok < t; tok += 3) ids[static_cast<std::size_t>(tok * k + 2)] = ids[static_cast<std::size_t>(tok * k)];
  std::vector<float> weights(ids.size());
  std::uniform_real_distribution<float> w(0.5f, 3.0f);  // far from summing to 1
  for (auto& v : weights) v = w(rng);
  auto const expected = test::dense_moe(gw, x, ids, weights, t, k);
  int const ranks = 2;
  std::vector<std::vector<float>> ys(ranks, std::vector<float>(x.size(), 999.0f));
  LocalGroup group(ranks, {.timeout = std::chrono::seconds(30)});
  auto const placement = ExpertPlacement::contiguous(e, ranks);
  group.run([&](int rank, Communicator& comm) {
    ExpertParallel<Grouped, Dispatch, Host> ep(
        MoeConfig{.router = {.num_experts = e, .top_k = k, .renormalize = true, .routed_scaling_factor = 2.5f},
                  .mlp = mlp,
                  .weights = gw.local(placement.local_range(rank)),
                  .placement = placement},
        comm);
    std::vector<std::byte> ws(ep.workspace_bytes(t));
    auto& y = ys[static_cast<std::size_t>(rank)];
    (void)ep.forward(MatrixView<std::int32_t const>(ids.data(), t, k), MatrixView<float const>(weights.data(), t, k),
                     MatrixView<float const>(x.data(), t, mlp.hidden), MatrixView<float>(y.data(), t, mlp.hidden),
                     Workspace(ws.data(), ws.size()));
  });
  for (auto const& y : ys) CHECK(test::rel_error(y, expected) <= 1e-5);
}

TEST_CASE("ExpertParallel::forward: AllToAll gives the same bits for every rank count and every run") {
  EPX_TEST_SEEDED_RNG(rng);
  Scenario const s{.num_experts = 12, .top_k = 3, .tokens_per_rank = {16}};
  auto const gw = GlobalWeights<bfloat16>::random(s.num_experts, s.mlp, true, rng);
  auto const x = test::random_vector<bfloat16>(static_cast<std::size_t>(16 * s.mlp.hidden), rng);
  RankData data{.ids = test::random_ids(16, s.top_k, s.num_experts, rng)};
  data.weights = test::random_weights(data.ids.size(), rng);
  auto const single = run_ep<AllToAll, bfloat16>(1, s, gw, {x}, {data})[0];
  auto const again = run_ep<AllToAll, bfloat16>(1, s, gw, {x}, {data})[0];
  CHECK(std::memcmp(single.data(), again.data(), single.size() * sizeof(bfloat16)) == 0);
  // Rank 0 holds the tokens; the other ranks hold none but own experts.
  for (int n : {2, 3, 4}) {
    std::vector<std::vector<bfloat16>> xs(static_cast<std::size_t>(n));
    std::vector<RankData> rd(static_cast<std::size_t>(n));
    xs[0] = x;
    rd[0] = data;
    auto const ys = run_ep<AllToAll, bfloat16>(n, s, gw, xs, rd);
    CAPTURE(n);
    CHECK(std::memcmp(ys[0].data(), single.data(), single.size() * sizeof(bfloat16)) == 0);
  }
}

namespace {

struct SmallLayer {
  Scenario s{.num_experts = 8, .top_k = 2, .mlp = {.hidden = 16, .intermediate = 8}};
  std::mt19937_64 rng{1234};
  GlobalWeights<float> gw = GlobalWeights<float>::random(8, s.mlp, false, rng);

  template <class Dispatch = AllToAll>
  ExpertParallel<Grouped, Dispatch, Host> make(Communicator& comm, InvalidIds policy = InvalidIds::kThrow) const {
    auto const placement = ExpertPlacement::contiguous(8, comm.size());
    return ExpertParallel<Grouped, Dispatch, Host>(
        MoeConfig{.router = {.num_experts = 8, .top_k = 2}, .mlp = s.mlp,
                  .weights = gw.local(placement.local_range(comm.rank())), .on_invalid_ids = policy},
        comm);
  }
};

}  // namespace

TEST_CASE("ExpertParallel::ExpertParallel: bad configurations are named") {
  SmallLayer layer;
  LocalGroup group(2, {.timeout = std::chrono::seconds(5)});
  auto& comm = group.communicator(0);
  auto config = [&] {
    return MoeConfig{.router = {.num_experts = 8, .top_k = 2}, .mlp = layer.s.mlp, .weights = layer.gw.local({0, 4})};
  };
  using EP = ExpertParallel<Grouped, AllToAll, Host>;
  CHECK_NOTHROW(EP(config(), comm));
  auto c = config();
  c.router.top_k = 9;
  CHECK_THROWS_WITH_AS(EP(c, comm), doctest::Contains("top_k = 9"), Error);
  c = config();
  c.weights = layer.gw.local({0, 3});
  CHECK_THROWS_WITH_AS(EP(c, comm), doctest::Contains("weights.num_local_experts = 3, expected placement.num_local_experts(rank 0) = 4"), Error);
  c = config();
  c.placement = ExpertPlacement::contiguous(8, 3);
  CHECK_THROWS_WITH_AS(EP(c, comm), doctest::Contains("placement.num_ranks() = 3, expected the communicator's size = 2"), Error);
  c = config();
  c.router.num_groups = 3;
  CHECK_THROWS_WITH_AS(EP(c, comm), doctest::Contains("num_groups = 3, expected >= 1 and dividing num_experts = 8"), Error);
  c = config();
  c.weights.down = nullptr;
  CHECK_THROWS_WITH_AS(EP(c, comm), doctest::Contains("weights.down = nullptr, expected the [4, 16, 8] down weights"), Error);
  c = config();
  c.mlp.hidden = 0;
  CHECK_THROWS_WITH_AS(EP(c, comm), doctest::Contains("hidden = 0"), Error);
}

TEST_CASE("ExpertParallel::forward: bad shapes, element types and workspace are named") {
  SmallLayer layer;
  LocalGroup group(1, {.timeout = std::chrono::seconds(5)});
  auto ep = layer.make(group.communicator(0));
  std::int64_t const t = 6;
  auto x = test::random_vector<float>(t * 16, layer.rng);
  std::vector<float> y(x.size());
  auto ids = test::random_ids(t, 2, 8, layer.rng);
  auto w = test::random_weights(ids.size(), layer.rng);
  std::vector<std::byte> ws(ep.workspace_bytes(t));
  auto call = [&](std::int64_t id_rows, std::int64_t x_cols, std::int64_t y_rows, std::size_t ws_bytes) {
    return ep.forward(MatrixView<std::int32_t const>(ids.data(), id_rows, 2), MatrixView<float const>(w.data(), id_rows, 2),
                      MatrixView<float const>(x.data(), t, x_cols), MatrixView<float>(y.data(), y_rows, x_cols),
                      Workspace(ws.data(), ws_bytes));
  };
  CHECK_NOTHROW(call(t, 16, t, ws.size()));
  CHECK_THROWS_WITH_AS(call(t - 1, 16, t, ws.size()), doctest::Contains("topk_ids.rows = 5, expected 6"), Error);
  CHECK_THROWS_WITH_AS(call(t, 15, t, ws.size()), doctest::Contains("x.cols = 15, expected 16"), Error);
  CHECK_THROWS_WITH_AS(call(t, 16, t - 2, ws.size()), doctest::Contains("y.rows = 4, expected 6"), Error);
  CHECK_THROWS_WITH_AS(call(t, 16, t, 100), doctest::Contains("workspace.size() = 100 bytes, expected at least"), Error);
  // A workspace for fewer tokens than passed: the error names both token counts.
  std::vector<std::byte> small(ep.workspace_bytes(t - 2));
  CHECK_THROWS_WITH_AS(ep.forward(MatrixView<std::int32_t const>(ids.data(), t, 2), MatrixView<float const>(w.data(), t, 2),
                                  MatrixView<float const>(x.data(), t, 16), MatrixView<float>(y.data(), t, 16),
                                  Workspace(small.data(), small.size())),
                       doctest::Contains("rank 0: num_tokens = 6, expected <= 4"), Error);
  std::vector<bfloat16> xb(x.size()), yb(x.size());
  CHECK_THROWS_WITH_AS(ep.forward(MatrixView<std::int32_t const>(ids.data(), t, 2), MatrixView<float const>(w.data(), t, 2),
                                  MatrixView<bfloat16 const>(xb.data(), t, 16), MatrixView<bfloat16>(yb.data(), t, 16),
                                  Workspace(ws.data(), ws.size())),
                       doctest::Contains("x's element type = bf16, expected the weights' dtype f32"), Error);
  CHECK_THROWS_WITH_AS((void)ep.workspace_bytes(-1), doctest::Contains("max_tokens = -1"), Error);
}

TEST_CASE("ExpertParallel::forward: invalid ids throw after the collectives, on the rank that had them") {
  SmallLayer layer;
  LocalGroup group(2, {.timeout = std::chrono::seconds(20)});
  std::vector<std::string> errors(2);
  std::vector<std::vector<float>> ys(2);
  group.run([&](int rank, Communicator& comm) {
    auto ep = layer.make(comm);
    std::mt19937_64 rng(static_cast<std::uint64_t>(rank) + 99);
    std::int64_t const t = 5;
    auto x = test::random_vector<float>(t * 16, rng);
    auto ids = test::random_ids(t, 2, 8, rng, 0.0);
    if (rank == 1) ids[3] = 42;
    auto w = test::random_weights(ids.size(), rng);
    ys[static_cast<std::size_t>(rank)].assign(x.size(), NAN);
    std::vector<std::byte> ws(ep.workspace_bytes(t));
    try {
      (void)ep.forward(MatrixView<std::int32_t const>(ids.data(), t, 2), MatrixView<float const>(w.data(), t, 2),
                       MatrixView<float const>(x.data(), t, 16), MatrixView<float>(ys[static_cast<std::size_t>(rank)].data(), t, 16),
                       Workspace(ws.data(), ws.size()));
    } catch (Error const& e) {
      CHECK(e.code() == Errc::kInvalidExpertId);
      errors[static_cast<std::size_t>(rank)] = e.what();
    }
    comm.barrier(StreamRef::host());  // the group is still healthy: both ranks got through forward
  });
  CHECK(errors[0].empty());
  // The message names the rank and that rank's token and slot (ids[3] of [5, 2] ids: token 1, slot 1).
  CHECK(errors[1].find("forward: rank 1: topk_ids held 1 invalid expert id(s) (first: token 1 of rank 1, slot 1: "
                       "topk_ids[1, 1] = 42), expected -1 or an id in [0, 8); those slots were dropped") !=
        std::string::npos);
  for (auto const& y : ys)
    for (float v : y) CHECK(std::isfinite(v));  // written, the invalid slot contributing nothing
}

TEST_CASE("ExpertParallel::forward: a rank with more tokens than another's workspace fails on every rank") {
  SmallLayer layer;
  LocalGroup group(3, {.timeout = std::chrono::seconds(20)});
  std::vector<std::string> errors(3);
  group.run([&](int rank, Communicator& comm) {
    auto ep = layer.make(comm);
    std::mt19937_64 rng(static_cast<std::uint64_t>(rank));
    std::int64_t const t = rank == 2 ? 40 : 4;  // rank 2 sends more than ranks 0 and 1 sized for
    auto x = test::random_vector<float>(static_cast<std::size_t>(t * 16), rng);
    std::vector<float> y(x.size());
    std::vector<std::int32_t> ids(static_cast<std::size_t>(t * 2));
    for (std::size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<std::int32_t>(i % 2);  // all to rank 0's experts
    std::vector<float> w(ids.size(), 0.5f);
    std::vector<std::byte> ws(ep.workspace_bytes(t));
    try {
      (void)ep.forward(MatrixView<std::int32_t const>(ids.data(), t, 2), MatrixView<float const>(w.data(), t, 2),
                       MatrixView<float const>(x.data(), t, 16), MatrixView<float>(y.data(), t, 16),
                       Workspace(ws.data(), ws.size()));
    } catch (Error const& e) {
      CHECK(e.code() == Errc::kWorkspaceTooSmall);
      errors[static_cast<std::size_t>(rank)] = e.what();
    }
  });
  for (auto const& e : errors) CHECK(e.find("rank 0 would receive 96 rows, expected <= 24") != std::string::npos);
}

TEST_CASE("ExpertParallel::forward: AllGather refuses ranks that hold different tokens") {
  SmallLayer layer;
  LocalGroup group(2, {.timeout = std::chrono::seconds(20)});
  std::vector<std::string> errors(2);
  group.run([&](int rank, Communicator& comm) {
    auto ep = layer.make<AllGather>(comm);
    std::int64_t const t = 3 + rank;
    std::mt19937_64 rng(7);
    auto x = test::random_vector<float>(static_cast<std::size_t>(t * 16), rng);
    std::vector<float> y(x.size());
    auto ids = test::random_ids(t, 2, 8, rng);
    auto w = test::random_weights(ids.size(), rng);
    std::vector<std::byte> ws(ep.workspace_bytes(8));
    try {
      (void)ep.forward(MatrixView<std::int32_t const>(ids.data(), t, 2), MatrixView<float const>(w.data(), t, 2),
                       MatrixView<float const>(x.data(), t, 16), MatrixView<float>(y.data(), t, 16),
                       Workspace(ws.data(), ws.size()));
    } catch (Error const& e) {
      errors[static_cast<std::size_t>(rank)] = e.what();
    }
  });
  for (auto const& e : errors) CHECK(e.find("AllGather needs the same tokens on every rank: rank 0 has num_tokens = 3, rank 1 has num_tokens = 4") != std::string::npos);
}

TEST_CASE("ExpertParallel::forward: a rank that never arrives makes the others fail within the timeout") {
  SmallLayer layer;
  LocalGroup group(2, {.timeout = std::chrono::milliseconds(300)});
  auto ep = layer.make(group.communicator(0));
  std::int64_t const t = 4;
  auto x = test::random_vector<float>(t * 16, layer.rng);
  std::vector<float> y(x.size());
  auto ids = test::random_ids(t, 2, 8, layer.rng);
  auto w = test::random_weights(ids.size(), layer.rng);
  std::vector<std::byte> ws(ep.workspace_bytes(t));
  auto const start = std::chrono::steady_clock::now();
  CHECK_THROWS_WITH_AS((void)ep.forward(MatrixView<std::int32_t const>(ids.data(), t, 2), MatrixView<float const>(w.data(), t, 2),
                                        MatrixView<float const>(x.data(), t, 16), MatrixView<float>(y.data(), t, 16),
                                        Workspace(ws.data(), ws.size())),
                       doctest::Contains("for rank(s) [1], which never arrived"), Error);
  CHECK(std::chrono::steady_clock::now() - start < std::chrono::seconds(5));
}
