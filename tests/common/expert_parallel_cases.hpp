// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

// The ExpertParallel cases, written once for every execution space. The including file includes
// expert_parallel_scenarios.hpp, defines EPX_EP_POLICIES (the EpPolicy<Backend, Experts, Dispatch>
// types to instantiate every case for) and EPX_EP_ALL_TO_ALL_POLICIES (those with AllToAll), names
// them with TYPE_TO_STRING_AS, then includes this header once: tests/host/expert_parallel_test.cpp
// (Host, in CI) and tests/cuda/expert_parallel_test.cu (Cuda, on a GPU).

#include "expert_parallel_scenarios.hpp"

#if !defined(EPX_EP_POLICIES) || !defined(EPX_EP_ALL_TO_ALL_POLICIES)
#error "define EPX_EP_POLICIES and EPX_EP_ALL_TO_ALL_POLICIES (lists of epx::test::EpPolicy types) first"
#endif

// ---- The cases, for every policy of EPX_EP_POLICIES ----

TEST_CASE_TEMPLATE("ExpertParallel::forward: N ranks equal the dense MoE (fp32)", P, EPX_EP_POLICIES) {
  using namespace epx::test;
  EPX_TEST_SEEDED_RNG(rng);
  check_rank_counts<P, float>({.tokens_per_rank = {13, 0, 29, 7}}, rng);
  check_rank_counts<P, float>({.tokens_per_rank = {11, 5, 0, 17}}, rng);
}

TEST_CASE_TEMPLATE("ExpertParallel::forward: N ranks equal the dense MoE (bf16 and fp16)", P, EPX_EP_POLICIES) {
  using namespace epx::test;
  EPX_TEST_SEEDED_RNG(rng);
  Scenario const s{.tokens_per_rank = {17, 5, 0, 11}, .bias = true};
  check_rank_counts<P, epx::bfloat16>(s, rng);
  check_rank_counts<P, epx::half>(s, rng);
  check_rank_counts<P, epx::bfloat16>({.tokens_per_rank = {13, 0, 29, 7}, .bias = true}, rng);
}

TEST_CASE_TEMPLATE("ExpertParallel::forward: uneven placement of 10 experts over 4 ranks", P, EPX_EP_POLICIES) {
  using namespace epx::test;
  EPX_TEST_SEEDED_RNG(rng);
  Scenario s{.num_experts = 10, .top_k = 3, .tokens_per_rank = {9, 14, 3, 21}};  // contiguous: 3, 3, 2, 2
  check_scenario<P, float>(4, s, rng);
  check_scenario<P, epx::bfloat16>(4, s, rng);
  s.experts_per_rank = {6, 0, 1, 3};  // explicit and lopsided, with a rank that owns no expert
  check_scenario<P, float>(4, s, rng);
  check_scenario<P, epx::bfloat16>(4, s, rng);
}

TEST_CASE_TEMPLATE("ExpertParallel::forward: more ranks than experts", P, EPX_EP_POLICIES) {
  using namespace epx::test;
  EPX_TEST_SEEDED_RNG(rng);
  check_scenario<P, float>(8, {.num_experts = 4, .top_k = 2, .tokens_per_rank = {6, 1, 0, 9}}, rng);
}

TEST_CASE_TEMPLATE("ExpertParallel::forward: one hot expert takes every token", P, EPX_EP_POLICIES) {
  using namespace epx::test;
  EPX_TEST_SEEDED_RNG(rng);
  check_rank_counts<P, float>({.tokens_per_rank = {31, 8}, .routing = Routing::kHotExpert}, rng);
  check_rank_counts<P, epx::bfloat16>({.tokens_per_rank = {64, 8}, .routing = Routing::kHotExpert}, rng);
}

TEST_CASE_TEMPLATE("ExpertParallel::forward: zero tokens everywhere still makes every collective", P, EPX_EP_POLICIES) {
  using namespace epx::test;
  EPX_TEST_SEEDED_RNG(rng);
  check_rank_counts<P, float>({.tokens_per_rank = {0}}, rng);
  check_rank_counts<P, epx::bfloat16>({.tokens_per_rank = {0}}, rng);
}

TEST_CASE_TEMPLATE("ExpertParallel::forward: experts that receive no tokens", P, EPX_EP_POLICIES) {
  using namespace epx::test;
  EPX_TEST_SEEDED_RNG(rng);
  // 64 experts, 2 tokens of top-2: most experts get nothing.
  check_rank_counts<P, float>({.num_experts = 64, .top_k = 2, .tokens_per_rank = {2, 1}}, rng);
  check_rank_counts<P, epx::bfloat16>({.num_experts = 64, .top_k = 2, .tokens_per_rank = {2, 1}}, rng);
}

TEST_CASE_TEMPLATE("ExpertParallel::forward: from router logits", P, EPX_EP_POLICIES) {
  using namespace epx::test;
  EPX_TEST_SEEDED_RNG(rng);
  check_rank_counts<P, epx::bfloat16>(
      {.num_experts = 32, .top_k = 8, .tokens_per_rank = {20, 3, 12}, .from_logits = true}, rng);
}

TEST_CASE_TEMPLATE("ExpertParallel::forward: every activation and gate/up layout", P, EPX_EP_POLICIES) {
  using namespace epx::test;
  using epx::Activation;
  EPX_TEST_SEEDED_RNG(rng);
  for (auto act :
       {Activation::kSwiGLU, Activation::kGeGLU, Activation::kGeGLUTanh, Activation::kReLU, Activation::kClampedSwiGLU})
    for (auto layout : {epx::GateUpLayout::kConcatenated, epx::GateUpLayout::kInterleaved}) {
      CAPTURE(to_string(act));
      CAPTURE(static_cast<int>(layout));
      Scenario s{.tokens_per_rank = {11, 6, 0}, .bias = true};
      s.mlp.activation = act;
      s.mlp.gate_up_layout = layout;
      s.mlp.clamped_swiglu = {.alpha = 1.702f, .limit = 0.5f};  // a low limit so the clamp matters
      check_scenario<P, float>(3, s, rng);
    }
}

TEST_CASE_TEMPLATE("ExpertParallel::forward: invalid ids are dropped and counted", P, EPX_EP_POLICIES) {
  using namespace epx::test;
  EPX_TEST_SEEDED_RNG(rng);
  Scenario const s{.tokens_per_rank = {10, 4, 7}, .routing = Routing::kWithInvalid};
  check_scenario<P, float>(3, s, rng);
  check_scenario<P, epx::bfloat16>(2, s, rng);
  check_scenario<P, epx::bfloat16>(4, s, rng);
}

TEST_CASE_TEMPLATE("ExpertParallel::forward: tokens without expert are counted in Status (given ids)", P,
                   EPX_EP_POLICIES) {
  using namespace epx::test;
  EPX_TEST_SEEDED_RNG(rng);
  check_rank_counts<P, float>({.tokens_per_rank = {12, 5, 9}, .routing = Routing::kWithoutExpert}, rng);
  check_scenario<P, epx::bfloat16>(
      3, {.num_experts = 10, .top_k = 1, .tokens_per_rank = {14, 6, 1}, .routing = Routing::kWithoutExpert}, rng);
  Scenario const four{.tokens_per_rank = {10, 4, 7, 1}, .routing = Routing::kWithoutExpert};
  check_scenario<P, epx::bfloat16>(1, four, rng);
  check_scenario<P, epx::bfloat16>(4, four, rng);
  // top_k 1: ~10% of the tokens are padding, so many warps of the device plan count some.
  check_scenario<P, float>(
      2, {.num_experts = 8, .top_k = 1, .tokens_per_rank = {300, 33}, .routing = Routing::kWithoutExpert}, rng);
}

TEST_CASE_TEMPLATE("ExpertParallel::forward: tokens without expert are counted in Status (all-NaN logits)", P,
                   EPX_EP_POLICIES) {
  using namespace epx::test;
  EPX_TEST_SEEDED_RNG(rng);
  check_rank_counts<P, float>({.num_experts = 16,
                               .top_k = 4,
                               .tokens_per_rank = {11, 3, 8},
                               .routing = Routing::kWithoutExpert,
                               .from_logits = true},
                              rng);
  Scenario const s{.tokens_per_rank = {10, 4, 7, 1}, .routing = Routing::kWithoutExpert, .from_logits = true};
  check_scenario<P, epx::bfloat16>(1, s, rng);
  check_scenario<P, epx::bfloat16>(3, s, rng);
}

TEST_CASE_TEMPLATE("ExpertParallel::forward: given top-k is used as given: unsorted, duplicated, not renormalised", P,
                   EPX_EP_POLICIES) {
  // docs/api.md promises: caller-given weights are used as they are (renormalize and
  // routed_scaling_factor apply only to the router's own weights), ids need not be sorted, and an
  // id repeated in one token's row is applied once per slot.
  using namespace epx;
  using namespace epx::test;
  using B = typename P::Backend;
  EPX_TEST_SEEDED_RNG(rng);
  std::int32_t const e = 8, k = 4;
  std::int64_t const t = 37;
  ExpertMlpConfig const mlp{.hidden = 24, .intermediate = 16};
  auto const gw = GlobalWeights<float>::random(e, mlp, true, rng);
  auto const x = random_vector<float>(static_cast<std::size_t>(t * mlp.hidden), rng);
  auto ids = random_ids(t, k, e, rng, 0.0);
  for (std::int64_t tok = 0; tok < t; tok += 3)
    ids[static_cast<std::size_t>(tok * k + 2)] = ids[static_cast<std::size_t>(tok * k)];
  std::vector<float> weights(ids.size());
  std::uniform_real_distribution<float> w(0.5f, 3.0f);  // far from summing to 1
  for (auto& v : weights) v = w(rng);
  auto const expected = dense_moe(gw, x, ids, weights, t, k);
  int const ranks = 2;
  std::vector<std::vector<float>> ys(ranks);
  typename B::Group group(ranks, {.timeout = std::chrono::seconds(30)});
  auto const placement = ExpertPlacement::contiguous(e, ranks);
  group.run([&](int rank, Communicator& comm) {
    typename B::Rank on;
    typename B::template Experts<float> const experts(gw, placement.local_range(rank));
    ExpertParallel<typename P::Experts, typename P::Dispatch, typename B::Space> ep(
        MoeConfig{.router = {.num_experts = e, .top_k = k, .renormalize = true, .routed_scaling_factor = 2.5f},
                  .mlp = mlp,
                  .weights = experts.weights(),
                  .placement = placement},
        comm);
    typename B::template Buffer<std::byte> ws(ep.workspace_bytes(t));
    typename B::template Buffer<float> xb(x), y(x.size()), wb(weights);
    typename B::template Buffer<std::int32_t> ib(ids);
    y.poison(0xff);
    ep.forward(on.context(), MatrixView<std::int32_t const>(ib.data(), t, k), MatrixView<float const>(wb.data(), t, k),
               MatrixView<float const>(xb.data(), t, mlp.hidden), MatrixView<float>(y.data(), t, mlp.hidden),
               Workspace(ws.data(), ws.size()));
    on.sync();
    ys[static_cast<std::size_t>(rank)] = y.to_host();
  });
  for (auto const& y : ys) CHECK(rel_error(y, expected) <= P::template tolerance<float>());
}

TEST_CASE_TEMPLATE(
    "ExpertParallel::forward: invalid ids throw after the collectives (kThrow), naming rank, token "
    "and slot",
    P, EPX_EP_POLICIES) {
  using namespace epx;
  using namespace epx::test;
  using B = typename P::Backend;
  constexpr bool kAllToAll = std::is_same_v<typename P::Dispatch, AllToAll>;
  EPX_TEST_SEEDED_RNG(rng);
  Scenario const s = with_backend_widths<B>({.tokens_per_rank = {6, 9}});
  int const num_ranks = 2;
  auto const gw = GlobalWeights<bfloat16>::random(s.num_experts, s.mlp, false, rng);
  auto in = make_inputs<typename P::Dispatch, bfloat16>(num_ranks, s, rng);
  // AllToAll: only rank 1 holds invalid ids. AllGather: every rank holds the same tokens, so all do.
  // Two of them: the message names the first in row-major order (a min over slots on every space).
  for (int r = kAllToAll ? 1 : 0; r < num_ranks; ++r) {
    in[static_cast<std::size_t>(r)].ids.back() = -5;
    in[static_cast<std::size_t>(r)].ids[3] = 42;
  }
  auto const results = run_layer<P, bfloat16>(num_ranks, s, gw, in, InvalidIds::kThrow);
  for (int r = 0; r < num_ranks; ++r) {
    CAPTURE(r);
    auto const& res = results[static_cast<std::size_t>(r)];
    bool const had_invalid = !kAllToAll || r == 1;
    if (had_invalid) {
      CHECK(res.error_code == Errc::kInvalidExpertId);
      // The rank, its token and the slot (ids[3] with top_k 4); AllToAll raises from forward,
      // AllGather from status() (the results contract of ExpertParallel).
      std::string const text = fmt::format(
          "{}: rank {}: topk_ids held 2 invalid expert id(s) (first: token 0 of rank {}, slot 3: "
          "topk_ids[0, 3] = 42), expected -1 or an id in [0, 16)",
          kAllToAll ? "forward" : "status", r, r);
      CHECK(res.error.find(text) != std::string::npos);
    } else {
      CHECK(res.error.empty());
    }
    // Written, the invalid slot contributing nothing: equal to the oracle, which drops it too.
    auto const ref = host_layer(s, gw, in[static_cast<std::size_t>(r)]);
    CHECK(rel_error(res.first, ref.y) <= P::template tolerance<bfloat16>());
    CHECK(bitwise_equal(res.first, res.second));
  }
}

// AllToAll only: every rank brings its own tokens (AllGather's ranks hold one token set; its case
// is the Host's "AllGather names a rank whose tokens exceed its workspace on every rank").
TEST_CASE_TEMPLATE("ExpertParallel::forward: a rank with more tokens than another's workspace fails on every rank", P,
                   EPX_EP_ALL_TO_ALL_POLICIES) {
  using namespace epx;
  using namespace epx::test;
  using B = typename P::Backend;
  {
    SmallLayer layer;
    typename B::Group group(3, {.timeout = std::chrono::seconds(30)});
    std::vector<std::string> errors(3);
    group.run([&](int rank, Communicator& comm) {
      typename B::Rank on;
      auto const placement = ExpertPlacement::contiguous(SmallLayer::kExperts, 3);
      typename B::template Experts<float> const experts(layer.gw, placement.local_range(rank));
      ExpertParallel<typename P::Experts, AllToAll, typename B::Space> ep(layer.config(experts.weights()), comm);
      std::int64_t const t = rank == 2 ? 40 : 4;  // rank 2 sends more than ranks 0 and 1 sized for
      std::mt19937_64 rng(static_cast<std::uint64_t>(rank));
      typename B::template Buffer<float> x(
          random_vector<float>(static_cast<std::size_t>(t * SmallLayer::kHidden), rng));
      typename B::template Buffer<float> y(static_cast<std::size_t>(t * SmallLayer::kHidden));
      std::vector<std::int32_t> host_ids(static_cast<std::size_t>(t * 2));
      for (std::size_t i = 0; i < host_ids.size(); ++i)
        host_ids[i] = static_cast<std::int32_t>(i % 2);  // all to rank 0
      typename B::template Buffer<std::int32_t> ids(host_ids);
      typename B::template Buffer<float> w(std::vector<float>(host_ids.size(), 0.5f));
      typename B::template Buffer<std::byte> ws(ep.workspace_bytes(t));
      try {
        ep.forward(on.context(), MatrixView<std::int32_t const>(ids.data(), t, 2),
                   MatrixView<float const>(w.data(), t, 2), MatrixView<float const>(x.data(), t, SmallLayer::kHidden),
                   MatrixView<float>(y.data(), t, SmallLayer::kHidden), Workspace(ws.data(), ws.size()));
      } catch (Error const& e) {
        if (e.code() != Errc::kWorkspaceTooSmall) throw;
        errors[static_cast<std::size_t>(rank)] = e.what();
      }
      on.sync();
    });
    for (auto const& e : errors) CHECK(e.find("rank 0 would receive 96 rows, expected <= 24") != std::string::npos);
  }
}

// A bound on the received rows (MoeConfig::received_rows_factor) that the routing exceeds: every
// rank throws the same Error at the count exchange, naming the rank and the factor it would need;
// the group is healthy after it, and a routing within the bound runs on the same objects.
TEST_CASE_TEMPLATE(
    "ExpertParallel::forward: more received rows than received_rows_factor holds fails on every rank, then recovers", P,
    EPX_EP_ALL_TO_ALL_POLICIES) {
  using namespace epx;
  using namespace epx::test;
  using B = typename P::Backend;
  constexpr int kRanks = 4;
  constexpr std::int64_t t = 6;
  SmallLayer layer;
  typename B::Group group(kRanks, {.timeout = std::chrono::seconds(30)});
  std::vector<std::string> errors(kRanks);
  std::vector<std::vector<float>> ys(kRanks), xs(kRanks);
  std::vector<std::int32_t> even(static_cast<std::size_t>(t * SmallLayer::kTopK));
  for (std::size_t i = 0; i < even.size(); ++i) even[i] = static_cast<std::int32_t>(i % SmallLayer::kExperts);
  std::vector<float> const weights = random_weights(even.size(), layer.rng);
  for (auto& x : xs) x = random_vector<float>(static_cast<std::size_t>(t * SmallLayer::kHidden), layer.rng);
  group.run([&](int rank, Communicator& comm) {
    auto const r = static_cast<std::size_t>(rank);
    typename B::Rank on;
    auto const placement = ExpertPlacement::contiguous(SmallLayer::kExperts, kRanks);  // rank 0: experts 0 and 1
    typename B::template Experts<float> const experts(layer.gw, placement.local_range(rank));
    MoeConfig config = layer.config(experts.weights());
    config.received_rows_factor = 1.5;  // 18 of the 48 rows the dropless worst case holds
    ExpertParallel<typename P::Experts, AllToAll, typename B::Space> ep(config, comm);
    typename B::template Buffer<float> x(xs[r]), y(xs[r].size()), w(weights);
    std::vector<std::int32_t> hot(even.size());
    for (std::size_t i = 0; i < hot.size(); ++i) hot[i] = static_cast<std::int32_t>(i % 2);  // all to rank 0
    typename B::template Buffer<std::int32_t> hot_ids(hot), even_ids(even);
    typename B::template Buffer<std::byte> ws(ep.workspace_bytes(t));
    auto forward = [&](std::int32_t const* ids) {
      ep.forward(on.context(), MatrixView<std::int32_t const>(ids, t, SmallLayer::kTopK),
                 MatrixView<float const>(w.data(), t, SmallLayer::kTopK),
                 MatrixView<float const>(x.data(), t, SmallLayer::kHidden),
                 MatrixView<float>(y.data(), t, SmallLayer::kHidden), Workspace(ws.data(), ws.size()));
    };
    try {
      forward(hot_ids.data());
    } catch (Error const& e) {
      if (e.code() != Errc::kWorkspaceTooSmall) throw;
      errors[r] = e.what();
    }
    on.sync();
    y.poison(0xff);
    forward(even_ids.data());  // rank 0 receives 16 rows: within the bound
    on.sync();
    ys[r] = y.to_host();
  });
  for (int r = 0; r < kRanks; ++r) {
    CAPTURE(r);
    auto const& e = errors[static_cast<std::size_t>(r)];
    CHECK(e.find("rank 0 would receive 48 rows") != std::string::npos);
    CHECK(e.find("MoeConfig::received_rows_factor = 1.5 shares") != std::string::npos);
    CHECK(e.find("nothing was dropped: set received_rows_factor >=") != std::string::npos);
    CHECK(e == errors[0]);
    auto const dense = dense_moe(layer.gw, xs[static_cast<std::size_t>(r)], even, weights, t, SmallLayer::kTopK);
    CHECK(rel_error(ys[static_cast<std::size_t>(r)], dense) <= P::template tolerance<float>());
  }
}

TEST_CASE_TEMPLATE("ExpertParallel::forward: bad shapes, element types and workspace are named", P, EPX_EP_POLICIES) {
  using namespace epx;
  using namespace epx::test;
  using B = typename P::Backend;
  SmallLayer layer;
  typename B::Group group(1, {.timeout = std::chrono::seconds(10)});
  group.run([&](int, Communicator& comm) {
    typename B::Rank on;
    typename B::template Experts<float> const experts(layer.gw, ExpertRange{0, SmallLayer::kExperts});
    ExpertParallel<typename P::Experts, typename P::Dispatch, typename B::Space> ep(layer.config(experts.weights()),
                                                                                    comm);
    std::int64_t const t = 6;
    typename B::template Buffer<float> x(
        random_vector<float>(static_cast<std::size_t>(t * SmallLayer::kHidden), layer.rng));
    typename B::template Buffer<float> y(static_cast<std::size_t>(t * SmallLayer::kHidden));
    typename B::template Buffer<std::int32_t> ids(random_ids(t, 2, SmallLayer::kExperts, layer.rng));
    typename B::template Buffer<float> w(random_weights(static_cast<std::size_t>(t * 2), layer.rng));
    typename B::template Buffer<std::byte> ws(ep.workspace_bytes(t)), small(ep.workspace_bytes(t - 2));
    auto call = [&](std::int64_t id_rows, std::int64_t x_cols, std::int64_t y_rows, std::size_t ws_bytes) {
      ep.forward(on.context(), MatrixView<std::int32_t const>(ids.data(), id_rows, 2),
                 MatrixView<float const>(w.data(), id_rows, 2), MatrixView<float const>(x.data(), t, x_cols),
                 MatrixView<float>(y.data(), y_rows, x_cols), Workspace(ws.data(), ws_bytes));
    };
    check_throws(Errc::kShapeMismatch, "forward: topk_ids.rows = 5, expected 6",
                 [&] { call(t - 1, 16, t, ws.size()); });
    check_throws(Errc::kShapeMismatch, "forward: x.cols = 15, expected 16", [&] { call(t, 15, t, ws.size()); });
    check_throws(Errc::kShapeMismatch, "forward: y.rows = 4, expected 6", [&] { call(t, 16, t - 2, ws.size()); });
    check_throws(Errc::kWorkspaceTooSmall, "workspace.size() = 100 bytes, expected at least",
                 [&] { call(t, 16, t, 100); });
    // A workspace for fewer tokens than passed: the error names both token counts.
    check_throws(Errc::kWorkspaceTooSmall, "rank 0: num_tokens = 6, expected <= 4", [&] {
      ep.forward(on.context(), MatrixView<std::int32_t const>(ids.data(), t, 2),
                 MatrixView<float const>(w.data(), t, 2), MatrixView<float const>(x.data(), t, 16),
                 MatrixView<float>(y.data(), t, 16), Workspace(small.data(), small.size()));
    });
    typename B::template Buffer<bfloat16> xb(static_cast<std::size_t>(t * 16)), yb(xb.size());
    check_throws(Errc::kInvalidArgument, "x's element type = bf16, expected the weights' dtype f32", [&] {
      ep.forward(on.context(), MatrixView<std::int32_t const>(ids.data(), t, 2),
                 MatrixView<float const>(w.data(), t, 2), MatrixView<bfloat16 const>(xb.data(), t, 16),
                 MatrixView<bfloat16>(yb.data(), t, 16), Workspace(ws.data(), ws.size()));
    });
    check_throws(Errc::kInvalidArgument, "max_tokens = -1", [&] { (void)ep.workspace_bytes(-1); });
    // The object still works after refused calls.
    call(t, 16, t, ws.size());
    CHECK(ep.status(on.context()).invalid_ids == 0);
    on.sync();
  });
}

TEST_CASE_TEMPLATE("ExpertParallel::forward: a rank that never arrives makes the others fail within the timeout", P,
                   EPX_EP_POLICIES) {
  using namespace epx;
  using namespace epx::test;
  using B = typename P::Backend;
  SmallLayer layer;
  typename B::Group group(2, {.timeout = std::chrono::milliseconds(300)});
  typename B::Rank on;
  auto const placement = ExpertPlacement::contiguous(SmallLayer::kExperts, 2);
  typename B::template Experts<float> const experts(layer.gw, placement.local_range(0));
  ExpertParallel<typename P::Experts, typename P::Dispatch, typename B::Space> ep(layer.config(experts.weights()),
                                                                                  group.communicator(0));
  std::int64_t const t = 4;
  typename B::template Buffer<float> x(random_vector<float>(static_cast<std::size_t>(t * 16), layer.rng));
  typename B::template Buffer<float> y(static_cast<std::size_t>(t * 16));
  typename B::template Buffer<std::int32_t> ids(random_ids(t, 2, 8, layer.rng));
  typename B::template Buffer<float> w(random_weights(static_cast<std::size_t>(t * 2), layer.rng));
  typename B::template Buffer<std::byte> ws(ep.workspace_bytes(t));
  auto const start = std::chrono::steady_clock::now();
  check_throws(Errc::kTimeout, "for rank(s) [1], which never arrived", [&] {
    ep.forward(on.context(), MatrixView<std::int32_t const>(ids.data(), t, 2), MatrixView<float const>(w.data(), t, 2),
               MatrixView<float const>(x.data(), t, 16), MatrixView<float>(y.data(), t, 16),
               Workspace(ws.data(), ws.size()));
  });
  CHECK(std::chrono::steady_clock::now() - start < std::chrono::seconds(5));
}
