// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// ExpertParallel<Grouped, AllToAll | AllGather, Host>::backward: N ranks (uneven placement, a rank
// without experts, a rank without tokens) against the Host stage backwards chained on one process
// over every rank's tokens (each stage checked by finite differences in router_backward_test.cpp
// and expert_backward_test.cpp); the one-rank layer against central finite differences of its own
// forward; bitwise determinism; the errors of a backward that has no forward to go back through.

#include "../common/test_util.hpp"

#include <epx/epx.hpp>

#include <cstring>
#include <limits>
#include <numeric>

using namespace epx;

namespace {

constexpr std::int32_t kExperts = 8, kTopK = 2, kHidden = 16, kInter = 12;

//! The layer configuration the helpers below use: softmax -> top-k, renormalised, SwiGLU,
//! concatenated gate/up, unless a test case sets another (Variant::Scope).
struct Variant {
  RouterConfig router{.num_experts = kExperts, .top_k = kTopK, .renormalize = true};
  ExpertMlpConfig mlp{.hidden = kHidden, .intermediate = kInter};

  static Variant& current() {
    static Variant v;
    return v;
  }
  //! Makes `v` current for this scope.
  struct Scope {
    explicit Scope(Variant v) { current() = v; }
    ~Scope() { current() = Variant{}; }
  };
};

ExpertMlpConfig mlp_config() { return Variant::current().mlp; }
RouterConfig router_config() { return Variant::current().router; }
std::int32_t gate_up_rows() { return mlp_config().gate_up_rows(); }

//! Logits whose top-k are far from ties: a random order of well-separated levels, plus noise.
std::vector<float> separated_logits(std::int64_t tokens, std::mt19937_64& rng) {
  std::vector<float> logits(static_cast<std::size_t>(tokens * kExperts));
  std::normal_distribution<float> noise(0.0f, 0.02f);
  std::vector<int> order(kExperts);
  for (std::int64_t t = 0; t < tokens; ++t) {
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng);
    for (int e = 0; e < kExperts; ++e)
      logits[static_cast<std::size_t>(t * kExperts + e)] =
          0.4f * static_cast<float>(order[static_cast<std::size_t>(e)]) + noise(rng);
  }
  return logits;
}

//! Full-size fp32 weight gradients of `experts` experts.
struct Grads {
  std::vector<float> gate_up, down, gate_up_bias, down_bias;
  std::int32_t experts = 0;
  explicit Grads(std::int32_t e) : experts(e) {
    auto const ue = static_cast<std::size_t>(e);
    gate_up.assign(ue * static_cast<std::size_t>(gate_up_rows()) * kHidden, kPoison());
    down.assign(ue * kHidden * kInter, kPoison());
    gate_up_bias.assign(ue * static_cast<std::size_t>(gate_up_rows()), kPoison());
    down_bias.assign(ue * kHidden, kPoison());
  }
  static float kPoison() { return std::numeric_limits<float>::quiet_NaN(); }
  ExpertWeightGrads<float> view() {
    return {.gate_up = {gate_up.data(), experts, gate_up_rows(), kHidden},
            .down = {down.data(), experts, kHidden, kInter},
            .gate_up_bias = gate_up_bias.data(),
            .down_bias = down_bias.data()};
  }
  //! Experts [first, first + count) of these gradients.
  Grads slice(std::int32_t first, std::int32_t count) const {
    Grads g(count);
    auto copy = [&](std::vector<float> const& from, std::vector<float>& to, std::size_t per) {
      std::copy_n(from.begin() + static_cast<std::ptrdiff_t>(static_cast<std::size_t>(first) * per),
                  static_cast<std::size_t>(count) * per, to.begin());
    };
    copy(gate_up, g.gate_up, static_cast<std::size_t>(gate_up_rows()) * kHidden);
    copy(down, g.down, kHidden * kInter);
    copy(gate_up_bias, g.gate_up_bias, static_cast<std::size_t>(gate_up_rows()));
    copy(down_bias, g.down_bias, kHidden);
    return g;
  }
};

bool same_bits(std::vector<float> const& a, std::vector<float> const& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

//! The forward and backward of the layer as the Host stages chained on one process, over
//! `tokens` tokens with all experts: the reference.
struct Chain {
  std::vector<float> y, dx, d_logits;
  std::vector<std::int32_t> ids;
  Grads grads{kExperts};
};

Chain chain(test::GlobalWeights<float> const& gw, std::vector<float> const& x, std::vector<float> const& logits,
            std::vector<float> const& dy) {
  auto const tokens = static_cast<std::int64_t>(x.size()) / kHidden;
  auto const slots = static_cast<std::size_t>(tokens * kTopK);
  ExpertMlpConfig const mlp = mlp_config();
  ExpertWeights const weights = gw.local({0, kExperts});
  std::vector<std::int32_t> ids(slots);
  std::vector<float> w(slots);
  MatrixView<float const> const logits_view(logits.data(), tokens, kExperts);
  route(Host{}, router_config(), logits_view, {}, MatrixView<std::int32_t>(ids.data(), tokens, kTopK),
        MatrixView<float>(w.data(), tokens, kTopK));
  std::vector<std::byte> plan_ws(plan_workspace_bytes(static_cast<std::int32_t>(tokens), kTopK, kExperts));
  Status status;
  RoutingPlan const plan = make_plan(Host{}, MatrixView<std::int32_t const>(ids.data(), tokens, kTopK), kExperts,
                                     {0, kExperts}, Workspace(plan_ws.data(), plan_ws.size()), status);
  std::vector<float> x_perm(slots * kHidden), out(slots * kHidden);
  std::int64_t const rows = static_cast<std::int64_t>(slots);
  permute(Host{}, plan, MatrixView<float const>(x.data(), tokens, kHidden),
          MatrixView<float>(x_perm.data(), rows, kHidden));
  std::vector<std::byte> ws(
      std::max(expert_mlp_workspace_bytes<float>(mlp, rows), expert_mlp_backward_workspace_bytes<float>(mlp, rows)));
  expert_mlp(Host{}, mlp, weights, MatrixView<float const>(x_perm.data(), rows, kHidden), plan.expert_offsets,
             MatrixView<float>(out.data(), rows, kHidden), Workspace(ws.data(), ws.size()));
  Chain c;
  c.ids = ids;
  c.y.resize(static_cast<std::size_t>(tokens * kHidden));
  unpermute(Host{}, plan, MatrixView<float const>(out.data(), rows, kHidden),
            MatrixView<float const>(w.data(), tokens, kTopK), MatrixView<float>(c.y.data(), tokens, kHidden));
  // Backward, in reverse.
  std::vector<float> d_out(slots * kHidden), d_w(slots), h(slots * static_cast<std::size_t>(gate_up_rows())),
      d_in(slots * kHidden);
  unpermute_backward(Host{}, plan, MatrixView<float const>(out.data(), rows, kHidden),
                     MatrixView<float const>(w.data(), tokens, kTopK),
                     MatrixView<float const>(dy.data(), tokens, kHidden),
                     MatrixView<float>(d_out.data(), rows, kHidden), MatrixView<float>(d_w.data(), tokens, kTopK));
  expert_mlp_gate_up(Host{}, mlp, weights, MatrixView<float const>(x_perm.data(), rows, kHidden), plan.expert_offsets,
                     MatrixView<float>(h.data(), rows, gate_up_rows()));
  expert_mlp_backward(Host{}, mlp, weights, MatrixView<float const>(x_perm.data(), rows, kHidden), plan.expert_offsets,
                      MatrixView<float const>(h.data(), rows, gate_up_rows()),
                      MatrixView<float const>(d_out.data(), rows, kHidden),
                      MatrixView<float>(d_in.data(), rows, kHidden), c.grads.view(), Workspace(ws.data(), ws.size()));
  c.dx.resize(static_cast<std::size_t>(tokens * kHidden));
  permute_backward(Host{}, plan, MatrixView<float const>(d_in.data(), rows, kHidden),
                   MatrixView<float>(c.dx.data(), tokens, kHidden));
  c.d_logits.resize(static_cast<std::size_t>(tokens * kExperts));
  route_backward(Host{}, router_config(), logits_view, MatrixView<std::int32_t const>(ids.data(), tokens, kTopK),
                 MatrixView<float const>(d_w.data(), tokens, kTopK),
                 MatrixView<float>(c.d_logits.data(), tokens, kExperts));
  return c;
}

//! `got`: the weight and bias gradients of the experts `local` owns, bit for bit the chain's.
void check_grads_are_chains(Grads const& got, Chain const& ref, ExpertRange local) {
  Grads const want = ref.grads.slice(local.first, local.count);
  CHECK(same_bits(got.gate_up, want.gate_up));
  CHECK(same_bits(got.down, want.down));
  CHECK(same_bits(got.gate_up_bias, want.gate_up_bias));
  CHECK(same_bits(got.down_bias, want.down_bias));
}

//! What one rank's layer gave.
struct RankOut {
  std::vector<float> y, dx, d_logits, dx_again;
  std::vector<std::int32_t> ids;  // saved_routing's
  Grads grads{0};
};

//! Forward with SavedState and backward of ExpertParallel<Grouped, D, Host> on every rank;
//! rank r's tokens are [first[r], first[r] + count[r]) of x / logits / dy. Each rank's memory is
//! sized for the most tokens of any rank, with MoeConfig's training options as `options` sets them.
struct TrainingOptions {
  double received_rows_factor = 0;
  bool save_gate_up_output = false;
};

template <class D>
std::vector<RankOut> run_layer(test::GlobalWeights<float> const& gw, ExpertPlacement const& placement,
                               std::vector<std::int64_t> const& first, std::vector<std::int64_t> const& count,
                               std::vector<float> const& x, std::vector<float> const& logits,
                               std::vector<float> const& dy, TrainingOptions const& options = {}) {
  int const ranks = placement.num_ranks();
  std::vector<RankOut> outs(static_cast<std::size_t>(ranks));
  LocalGroup group(ranks, {.timeout = std::chrono::seconds(30)});
  std::int64_t const max_tokens = *std::max_element(count.begin(), count.end());
  group.run([&](int rank, Communicator& comm) {
    auto const ur = static_cast<std::size_t>(rank);
    ExpertRange const local = placement.local_range(rank);
    ExpertParallel<Grouped, D, Host> ep(MoeConfig{.router = router_config(),
                                                  .mlp = mlp_config(),
                                                  .weights = gw.local(local),
                                                  .placement = placement,
                                                  .received_rows_factor = options.received_rows_factor,
                                                  .save_gate_up_output = options.save_gate_up_output},
                                        comm);
    std::vector<std::byte> ws(ep.workspace_bytes(max_tokens)), saved(ep.saved_bytes(max_tokens)),
        bws(ep.backward_workspace_bytes(max_tokens));
    std::int64_t const t = count[ur], f = first[ur];
    auto rows = [&](std::vector<float> const& v, std::int64_t cols) {
      return MatrixView<float const>(v.data() + f * cols, t, cols);
    };
    RankOut& o = outs[ur];
    o.y.assign(static_cast<std::size_t>(t * kHidden), Grads::kPoison());
    o.dx = o.y;
    o.dx_again = o.y;
    o.d_logits.assign(static_cast<std::size_t>(t * kExperts), Grads::kPoison());
    o.grads = Grads(local.count);
    ep.forward(Host{}, rows(logits, kExperts), rows(x, kHidden), MatrixView<float>(o.y.data(), t, kHidden),
               Workspace(ws.data(), ws.size()), SavedState(saved.data(), saved.size()));
    std::fill(ws.begin(), ws.end(), std::byte{0xff});  // backward must not read forward's workspace
    auto backward = [&](std::vector<float>& dx) {
      ep.backward(Host{}, rows(logits, kExperts), rows(dy, kHidden), MatrixView<float>(dx.data(), t, kHidden),
                  MatrixView<float>(o.d_logits.data(), t, kExperts), o.grads.view(),
                  SavedState(saved.data(), saved.size()), Workspace(bws.data(), bws.size()));
    };
    backward(o.dx);
    backward(o.dx_again);
    auto const routing = ep.saved_routing(Host{}, SavedState(saved.data(), saved.size()));
    o.ids.assign(routing.topk_ids.data, routing.topk_ids.data + routing.topk_ids.size());
  });
  return outs;
}

template <class T>
std::vector<T> rows_of(std::vector<T> const& v, std::int64_t cols, std::int64_t first, std::int64_t count) {
  return {v.begin() + first * cols, v.begin() + (first + count) * cols};
}

struct Split {
  std::vector<std::int32_t> experts_per_rank;
  std::vector<std::int64_t> tokens_per_rank;
};

}  // namespace

TEST_CASE("ExpertParallel::backward: AllToAll ranks equal the Host stages chained over every rank's tokens") {
  EPX_TEST_SEEDED_RNG(rng);
  // Even; uneven with a rank without experts; a rank without tokens; one rank.
  std::vector<Split> const splits = {{{4, 4}, {5, 7}}, {{3, 0, 5}, {6, 4, 9}}, {{2, 3, 3}, {7, 0, 5}}, {{8}, {11}}};
  // Every scoring mode (grouped selection, scaling), and every activation with both gate/up layouts.
  std::vector<Variant> variants(1);
  for (Scoring scoring : {Scoring::kTopKSoftmax, Scoring::kSigmoidTopK})
    variants.push_back({.router = {.num_experts = kExperts,
                                   .top_k = kTopK,
                                   .scoring = scoring,
                                   .renormalize = scoring == Scoring::kSigmoidTopK,
                                   .num_groups = 4,
                                   .topk_groups = 2,
                                   .routed_scaling_factor = 2.5f}});
  for (Activation a : {Activation::kGeGLU, Activation::kGeGLUTanh, Activation::kReLU, Activation::kClampedSwiGLU})
    for (GateUpLayout layout : {GateUpLayout::kConcatenated, GateUpLayout::kInterleaved})
      if (a != Activation::kReLU || layout == GateUpLayout::kConcatenated)
        variants.push_back(
            {.mlp = {.hidden = kHidden, .intermediate = kInter, .activation = a, .gate_up_layout = layout}});
  for (std::size_t v = 0; v < variants.size(); ++v)
    for (Split const& s : splits) {
      CAPTURE(v);
      Variant::Scope const scope(variants[v]);
      CAPTURE(s.experts_per_rank.size());
      auto const placement = ExpertPlacement::from_counts(s.experts_per_rank);
      auto const gw = test::GlobalWeights<float>::random(kExperts, mlp_config(), true, rng);
      std::int64_t const total = std::accumulate(s.tokens_per_rank.begin(), s.tokens_per_rank.end(), std::int64_t{0});
      std::vector<std::int64_t> first(s.tokens_per_rank.size(), 0);
      std::partial_sum(s.tokens_per_rank.begin(), s.tokens_per_rank.end() - 1, first.begin() + 1);
      auto const x = test::random_vector<float>(static_cast<std::size_t>(total * kHidden), rng);
      auto const dy = test::random_vector<float>(static_cast<std::size_t>(total * kHidden), rng);
      auto const logits = separated_logits(total, rng);
      Chain const ref = chain(gw, x, logits, dy);
      auto const outs = run_layer<AllToAll>(gw, placement, first, s.tokens_per_rank, x, logits, dy);
      for (int r = 0; r < placement.num_ranks(); ++r) {
        CAPTURE(r);
        auto const& o = outs[static_cast<std::size_t>(r)];
        auto const f = first[static_cast<std::size_t>(r)], t = s.tokens_per_rank[static_cast<std::size_t>(r)];
        // The same rows in the same order meet the same sums: bitwise the chain's.
        CHECK(same_bits(o.y, rows_of(ref.y, kHidden, f, t)));
        CHECK(same_bits(o.dx, rows_of(ref.dx, kHidden, f, t)));
        CHECK(same_bits(o.dx, o.dx_again));
        CHECK(same_bits(o.d_logits, rows_of(ref.d_logits, kExperts, f, t)));
        CHECK(o.ids == rows_of(ref.ids, kTopK, f, t));
        check_grads_are_chains(o.grads, ref, placement.local_range(r));
      }
    }
}

TEST_CASE("ExpertParallel::backward: AllGather ranks equal the Host stages chained on the group's tokens") {
  EPX_TEST_SEEDED_RNG(rng);
  for (std::vector<std::int32_t> const& experts : {std::vector<std::int32_t>{4, 4}, {3, 0, 5}, {1, 2, 2, 3}, {8}}) {
    CAPTURE(experts.size());
    auto const placement = ExpertPlacement::from_counts(experts);
    auto const gw = test::GlobalWeights<float>::random(kExperts, mlp_config(), true, rng);
    std::int64_t const tokens = 9;
    auto const x = test::random_vector<float>(static_cast<std::size_t>(tokens * kHidden), rng);
    auto const dy = test::random_vector<float>(static_cast<std::size_t>(tokens * kHidden), rng);
    auto const logits = separated_logits(tokens, rng);
    Chain const ref = chain(gw, x, logits, dy);
    std::vector<std::int64_t> const first(experts.size(), 0), count(experts.size(), tokens);
    auto const outs = run_layer<AllGather>(gw, placement, first, count, x, logits, dy);
    for (int r = 0; r < placement.num_ranks(); ++r) {
      CAPTURE(r);
      auto const& o = outs[static_cast<std::size_t>(r)];
      // dx: each rank's share summed over the group (another order of fp32 additions than the
      // chain's); each slot's weight gradient comes from one rank (the others add zeros).
      CHECK(test::rel_error(o.y, std::vector<double>(ref.y.begin(), ref.y.end())) <= 1e-5);
      CHECK(test::rel_error(o.dx, std::vector<double>(ref.dx.begin(), ref.dx.end())) <= 1e-5);
      CHECK(same_bits(o.dx, o.dx_again));
      CHECK(same_bits(o.d_logits, ref.d_logits));
      check_grads_are_chains(o.grads, ref, placement.local_range(r));
    }
  }
}

TEST_CASE(
    "ExpertParallel::backward: one rank's gradients (router losses added) equal central finite differences of its "
    "forward") {
  EPX_TEST_SEEDED_RNG(rng);
  // The losses of the step: L = <c, y> + the weighted router losses (load balancing, sequence aux
  // over two sequences, z-loss), whose gradient router_losses adds into backward's d_logits.
  RouterLossConfig const losses{.load_balancing = 0.3f, .sequence_aux = 0.2f, .z_loss = 0.05f};
  std::vector<std::int64_t> const sequences = {0, 2, 5};
  std::int64_t const tokens = 5;
  auto gw = test::GlobalWeights<float>::random(kExperts, mlp_config(), true, rng);
  auto x = test::random_vector<float>(static_cast<std::size_t>(tokens * kHidden), rng);
  auto logits = separated_logits(tokens, rng);
  auto const c = test::random_vector<float>(static_cast<std::size_t>(tokens * kHidden), rng);  // L = <c, y>
  LocalGroup group(1);
  Communicator& comm = group.communicator(0);
  ExpertParallel<Grouped, AllToAll, Host> ep(
      MoeConfig{.router = router_config(), .mlp = mlp_config(), .weights = gw.local({0, kExperts})}, comm);
  std::vector<std::byte> ws(ep.workspace_bytes(tokens)), saved(ep.saved_bytes(tokens)),
      bws(ep.backward_workspace_bytes(tokens));
  auto loss = [&] {
    std::vector<float> y(static_cast<std::size_t>(tokens * kHidden));
    ep.forward(Host{}, MatrixView<float const>(logits.data(), tokens, kExperts),
               MatrixView<float const>(x.data(), tokens, kHidden), MatrixView<float>(y.data(), tokens, kHidden),
               Workspace(ws.data(), ws.size()));
    double l = 0.0;
    for (std::size_t i = 0; i < y.size(); ++i) l += double{c[i]} * y[i];
    // The same routing the forward made, for the losses (selection is piecewise constant).
    std::vector<std::int32_t> ids(static_cast<std::size_t>(tokens * kTopK));
    std::vector<float> w(ids.size()), scratch(static_cast<std::size_t>(tokens * kExperts), 0.0f);
    route(Host{}, router_config(), MatrixView<float const>(logits.data(), tokens, kExperts), {},
          MatrixView<std::int32_t>(ids.data(), tokens, kTopK), MatrixView<float>(w.data(), tokens, kTopK));
    return l + router_losses(Host{}, router_config(), losses, MatrixView<float const>(logits.data(), tokens, kExperts),
                             MatrixView<std::int32_t const>(ids.data(), tokens, kTopK), sequences,
                             MatrixView<float>(scratch.data(), tokens, kExperts))
                   .total;
  };
  std::vector<float> y(static_cast<std::size_t>(tokens * kHidden)), dx(y.size()),
      d_logits(static_cast<std::size_t>(tokens * kExperts));
  Grads grads(kExperts);
  ep.forward(Host{}, MatrixView<float const>(logits.data(), tokens, kExperts),
             MatrixView<float const>(x.data(), tokens, kHidden), MatrixView<float>(y.data(), tokens, kHidden),
             Workspace(ws.data(), ws.size()), SavedState(saved.data(), saved.size()));
  ep.backward(Host{}, MatrixView<float const>(logits.data(), tokens, kExperts),
              MatrixView<float const>(c.data(), tokens, kHidden), MatrixView<float>(dx.data(), tokens, kHidden),
              MatrixView<float>(d_logits.data(), tokens, kExperts), grads.view(),
              SavedState(saved.data(), saved.size()), Workspace(bws.data(), bws.size()));
  auto const routing = ep.saved_routing(Host{}, SavedState(saved.data(), saved.size()));
  (void)router_losses(Host{}, router_config(), losses, MatrixView<float const>(logits.data(), tokens, kExperts),
                      routing.topk_ids, sequences, MatrixView<float>(d_logits.data(), tokens, kExperts));  // adds
  // fp32 forward: a step of 1e-2 keeps rounding (~1e-7 / 1e-2) and truncation (~1e-4) apart from
  // the gradients' scale (~1); the selection does not change (top-k gaps >= 0.3).
  constexpr float kStep = 1e-2f;
  auto check = [&](std::vector<float>& v, std::vector<float> const& grad, std::string_view what) {
    INFO(what);
    double worst = 0.0, scale = 0.0;
    for (std::size_t i = 0; i < v.size(); i += 3) {
      float const keep = v[i];
      v[i] = keep + kStep;
      double const plus = loss();
      v[i] = keep - kStep;
      double const minus = loss();
      v[i] = keep;
      double const fd = (plus - minus) / (2.0 * double{kStep});
      worst = std::max(worst, std::abs(fd - double{grad[i]}));
      scale = std::max(scale, std::abs(fd));
    }
    REQUIRE(scale > 0.0);
    CHECK(worst <= 2e-3 * std::max(1.0, scale));
  };
  check(x, dx, "dx");
  check(logits, d_logits, "d_logits");
  check(gw.down, grads.down, "d_down");
  check(gw.gate_up, grads.gate_up, "d_gate_up");
  check(gw.down_bias, grads.down_bias, "d_down_bias");
  check(gw.gate_up_bias, grads.gate_up_bias, "d_gate_up_bias");
}

TEST_CASE(
    "ExpertParallel::backward: from given routing, bf16 weights with fp32 gradients, equals the fp32 chain's "
    "weights' gradient") {
  EPX_TEST_SEEDED_RNG(rng);
  std::int64_t const tokens = 7;
  auto const gw = test::GlobalWeights<bfloat16>::random(kExperts, mlp_config(), false, rng);
  auto const x = test::random_vector<bfloat16>(static_cast<std::size_t>(tokens * kHidden), rng);
  auto const dy = test::random_vector<float>(static_cast<std::size_t>(tokens * kHidden), rng);
  std::vector<std::int32_t> ids = {0, 3, 5, -1, 7, 2, 1, 1 + 5, 4, 6, -1, -1, 2, 3};
  auto const weights = test::random_weights(ids.size(), rng);
  LocalGroup group(2);
  std::vector<std::vector<float>> dws(2), dxs(2);
  group.run([&](int rank, Communicator& comm) {
    auto const placement = ExpertPlacement::contiguous(kExperts, 2);
    ExpertParallel<Grouped, AllGather, Host> ep(
        MoeConfig{.router = router_config(), .mlp = mlp_config(), .weights = gw.local(placement.local_range(rank))},
        comm);
    std::vector<std::byte> ws(ep.workspace_bytes(tokens)), saved(ep.saved_bytes(tokens)),
        bws(ep.backward_workspace_bytes(tokens));
    std::vector<bfloat16> y(static_cast<std::size_t>(tokens * kHidden));
    auto const ur = static_cast<std::size_t>(rank);
    ep.forward(Host{}, MatrixView<std::int32_t const>(ids.data(), tokens, kTopK),
               MatrixView<float const>(weights.data(), tokens, kTopK),
               MatrixView<bfloat16 const>(x.data(), tokens, kHidden), MatrixView<bfloat16>(y.data(), tokens, kHidden),
               Workspace(ws.data(), ws.size()), SavedState(saved.data(), saved.size()));
    dws[ur].assign(ids.size(), Grads::kPoison());
    dxs[ur].assign(static_cast<std::size_t>(tokens * kHidden), Grads::kPoison());
    Grads grads(placement.local_range(rank).count);
    ep.backward(Host{}, MatrixView<float const>(dy.data(), tokens, kHidden),
                MatrixView<float>(dxs[ur].data(), tokens, kHidden), MatrixView<float>(dws[ur].data(), tokens, kTopK),
                grads.view(), SavedState(saved.data(), saved.size()), Workspace(bws.data(), bws.size()));
  });
  // d_topk_weights[t, j] = <dy_t, expert_{id}(x_t)>, in double from the test's own expert loop.
  std::vector<double> want(ids.size(), 0.0);
  for (std::int64_t t = 0; t < tokens; ++t)
    for (int j = 0; j < kTopK; ++j) {
      auto const s = static_cast<std::size_t>(t * kTopK + j);
      if (ids[s] < 0) continue;
      auto const out = gw.expert(ids[s], x.data() + t * kHidden);
      for (int h = 0; h < kHidden; ++h)
        want[s] += double{dy[static_cast<std::size_t>(t * kHidden + h)]} * out[static_cast<std::size_t>(h)];
    }
  for (auto const& dw : dws) {
    CHECK(test::rel_error(dw, want) <= 2e-2);  // the experts' outputs were rounded to bf16 once
    for (std::size_t s = 0; s < ids.size(); ++s)
      if (ids[s] < 0) CHECK(dw[s] == 0.0f);
  }
  CHECK(same_bits(dws[0], dws[1]));
  CHECK(same_bits(dxs[0], dxs[1]));
}

TEST_CASE("ExpertParallel::backward: a backward with no forward to go back through is an Error") {
  EPX_TEST_SEEDED_RNG(rng);
  std::int64_t const tokens = 4;
  auto const gw = test::GlobalWeights<float>::random(kExperts, mlp_config(), false, rng);
  auto const x = test::random_vector<float>(static_cast<std::size_t>(tokens * kHidden), rng);
  auto const logits = separated_logits(tokens, rng);
  LocalGroup group(1);
  Communicator& comm = group.communicator(0);
  MoeConfig const config{.router = router_config(), .mlp = mlp_config(), .weights = gw.local({0, kExperts})};
  ExpertParallel<Grouped, AllToAll, Host> ep(config, comm), other(config, comm);
  std::vector<std::byte> ws(ep.workspace_bytes(tokens)), saved(ep.saved_bytes(tokens), std::byte{0xff}),
      bws(ep.backward_workspace_bytes(tokens));
  std::vector<float> y(static_cast<std::size_t>(tokens * kHidden)), dx(y.size()),
      d_logits(static_cast<std::size_t>(tokens * kExperts));
  Grads grads(kExperts);
  MatrixView<float const> const lv(logits.data(), tokens, kExperts), xv(x.data(), tokens, kHidden);
  auto backward = [&](ExpertParallel<Grouped, AllToAll, Host>& layer, std::int64_t rows) {
    layer.backward(Host{}, MatrixView<float const>(logits.data(), rows, kExperts),
                   MatrixView<float const>(y.data(), rows, kHidden), MatrixView<float>(dx.data(), rows, kHidden),
                   MatrixView<float>(d_logits.data(), rows, kExperts), grads.view(),
                   SavedState(saved.data(), saved.size()), Workspace(bws.data(), bws.size()));
  };
  test::check_throws(Errc::kInvalidArgument, "backward: saved holds no completed forward",
                     [&] { backward(ep, tokens); });
  ep.forward(Host{}, lv, xv, MatrixView<float>(y.data(), tokens, kHidden), Workspace(ws.data(), ws.size()),
             SavedState(saved.data(), saved.size()));
  test::check_throws(Errc::kInvalidArgument, "saved was written by the forward of another layer",
                     [&] { backward(other, tokens); });
  test::check_throws(Errc::kInvalidArgument, "dy.rows = 3, expected 4 (the num_tokens of the forward that wrote saved)",
                     [&] { backward(ep, 3); });
  test::check_throws(Errc::kWorkspaceTooSmall, "backward: workspace.size() = 16 bytes", [&] {
    ep.backward(Host{}, lv, MatrixView<float const>(y.data(), tokens, kHidden),
                MatrixView<float>(dx.data(), tokens, kHidden), MatrixView<float>(d_logits.data(), tokens, kExperts),
                grads.view(), SavedState(saved.data(), saved.size()), Workspace(bws.data(), 16));
  });
  std::vector<epx::half> dy_half(static_cast<std::size_t>(tokens * kHidden));
  std::vector<epx::half> dx_half(dy_half.size());
  ExpertWeightGrads<epx::half> const half_grads{};
  test::check_throws(Errc::kInvalidArgument, "dy's element type is f16, expected float or the weights' dtype f32", [&] {
    ep.backward(Host{}, MatrixView<epx::half const>(dy_half.data(), tokens, kHidden),
                MatrixView<epx::half>(dx_half.data(), tokens, kHidden),
                MatrixView<float>(d_logits.data(), tokens, kTopK), half_grads, SavedState(saved.data(), saved.size()),
                Workspace(bws.data(), bws.size()));
  });
  // A forward that threw leaves `saved` marked incomplete.
  test::check_throws(Errc::kWorkspaceTooSmall, "forward: workspace.size() = 16 bytes", [&] {
    ep.forward(Host{}, lv, xv, MatrixView<float>(y.data(), tokens, kHidden), Workspace(ws.data(), 16),
               SavedState(saved.data(), saved.size()));
  });
  test::check_throws(Errc::kInvalidArgument, "saved holds no completed forward", [&] { backward(ep, tokens); });
}

TEST_CASE(
    "ExpertParallel::backward: AllToAll sized by received_rows_factor, at the tightest factor the routing allows, "
    "gives the chain's bits") {
  EPX_TEST_SEEDED_RNG(rng);
  std::vector<Split> const splits = {
      {{4, 4}, {5, 7}}, {{3, 0, 5}, {6, 4, 9}}, {{2, 3, 3}, {7, 0, 5}}, {{2, 2, 2, 2}, {9, 9, 9, 9}}};
  for (Split const& s : splits) {
    CAPTURE(s.experts_per_rank.size());
    auto const placement = ExpertPlacement::from_counts(s.experts_per_rank);
    auto const gw = test::GlobalWeights<float>::random(kExperts, mlp_config(), true, rng);
    std::int64_t const total = std::accumulate(s.tokens_per_rank.begin(), s.tokens_per_rank.end(), std::int64_t{0});
    std::int64_t const max_tokens = *std::max_element(s.tokens_per_rank.begin(), s.tokens_per_rank.end());
    std::vector<std::int64_t> first(s.tokens_per_rank.size(), 0);
    std::partial_sum(s.tokens_per_rank.begin(), s.tokens_per_rank.end() - 1, first.begin() + 1);
    auto const x = test::random_vector<float>(static_cast<std::size_t>(total * kHidden), rng);
    auto const dy = test::random_vector<float>(static_cast<std::size_t>(total * kHidden), rng);
    auto const logits = separated_logits(total, rng);
    Chain const ref = chain(gw, x, logits, dy);
    // The factor whose rows are exactly the busiest rank's: below the dropless worst case (ranks).
    double const factor =
        static_cast<double>(test::most_received_rows(ref.ids, placement)) / static_cast<double>(max_tokens * kTopK);
    CAPTURE(factor);
    REQUIRE(factor < placement.num_ranks());
    auto const outs =
        run_layer<AllToAll>(gw, placement, first, s.tokens_per_rank, x, logits, dy, {.received_rows_factor = factor});
    for (int r = 0; r < placement.num_ranks(); ++r) {
      CAPTURE(r);
      auto const& o = outs[static_cast<std::size_t>(r)];
      auto const f = first[static_cast<std::size_t>(r)], t = s.tokens_per_rank[static_cast<std::size_t>(r)];
      CHECK(same_bits(o.y, rows_of(ref.y, kHidden, f, t)));
      CHECK(same_bits(o.dx, rows_of(ref.dx, kHidden, f, t)));
      CHECK(same_bits(o.d_logits, rows_of(ref.d_logits, kExperts, f, t)));
      check_grads_are_chains(o.grads, ref, placement.local_range(r));
    }
  }
}

TEST_CASE("ExpertParallel: received_rows_factor shrinks exactly the rows AllToAll holds for its experts") {
  EPX_TEST_SEEDED_RNG(rng);
  constexpr int kRanks = 4;
  auto const gw = test::GlobalWeights<bfloat16>::random(kExperts, mlp_config(), false, rng);
  LocalGroup group(kRanks);
  group.run([&](int rank, Communicator& comm) {
    auto const placement = ExpertPlacement::contiguous(kExperts, kRanks);
    auto layer = [&](double factor) {
      return ExpertParallel<Grouped, AllToAll, Host>(MoeConfig{.router = router_config(),
                                                               .mlp = mlp_config(),
                                                               .weights = gw.local(placement.local_range(rank)),
                                                               .received_rows_factor = factor},
                                                     comm);
    };
    auto const dropless = layer(0), shares = layer(1.3), ranks = layer(kRanks), more = layer(11.5);
    auto const all_gather =
        ExpertParallel<Grouped, AllGather, Host>(MoeConfig{.router = router_config(),
                                                           .mlp = mlp_config(),
                                                           .weights = gw.local(placement.local_range(rank)),
                                                           .received_rows_factor = 1.3},
                                                 comm);
    auto const aligned = [](std::size_t bytes) { return align_up<std::size_t>(bytes, Workspace::kAlignment); };
    for (std::int64_t m : {0, 1, 7, 50, 333}) {
      CAPTURE(m);
      // SavedState: only the experts' input rows depend on the factor, kHidden bf16 each.
      auto const rows_bytes = [&](std::int64_t rows) { return aligned(static_cast<std::size_t>(rows) * kHidden * 2); };
      std::int64_t const worst = m * kRanks * kTopK;
      auto const ceil_shares = static_cast<std::int64_t>(std::ceil(1.3 * static_cast<double>(m * kTopK)));
      CHECK(dropless.saved_bytes(m) - shares.saved_bytes(m) == rows_bytes(worst) - rows_bytes(ceil_shares));
      // Factors of num_ranks and above are the dropless worst case.
      CHECK(ranks.saved_bytes(m) == dropless.saved_bytes(m));
      CHECK(more.saved_bytes(m) == dropless.saved_bytes(m));
      CHECK(ranks.workspace_bytes(m) == dropless.workspace_bytes(m));
      CHECK(more.backward_workspace_bytes(m) == dropless.backward_workspace_bytes(m));
      if (m > 0) {
        CHECK(shares.workspace_bytes(m) < dropless.workspace_bytes(m));
        CHECK(shares.backward_workspace_bytes(m) < dropless.backward_workspace_bytes(m));
      }
    }
    // AllGather's experts run on each rank's own slots: the factor changes nothing.
    auto const all_gather_default = ExpertParallel<Grouped, AllGather, Host>(
        MoeConfig{.router = router_config(), .mlp = mlp_config(), .weights = gw.local(placement.local_range(rank))},
        comm);
    CHECK(all_gather.saved_bytes(50) == all_gather_default.saved_bytes(50));
    CHECK(all_gather.workspace_bytes(50) == all_gather_default.workspace_bytes(50));
  });
}

TEST_CASE(
    "ExpertParallel::backward: save_gate_up_output keeps GEMM 1's output in saved, and the gradients are the "
    "chain's bits") {
  EPX_TEST_SEEDED_RNG(rng);
  // AllToAll (uneven, a rank without experts, a rank without tokens; with a received-rows bound
  // too) and AllGather, two activations and both layouts: h kept equals h recomputed, bit for bit.
  std::vector<Split> const splits = {{{4, 4}, {5, 7}}, {{3, 0, 5}, {6, 4, 9}}, {{2, 3, 3}, {7, 0, 5}}};
  for (Activation a : {Activation::kSwiGLU, Activation::kClampedSwiGLU})
    for (GateUpLayout layout : {GateUpLayout::kConcatenated, GateUpLayout::kInterleaved})
      for (Split const& s : splits)
        for (bool all_gather : {false, true}) {
          Variant::Scope const scope(
              {.mlp = {.hidden = kHidden, .intermediate = kInter, .activation = a, .gate_up_layout = layout}});
          CAPTURE(s.experts_per_rank.size());
          CAPTURE(all_gather);
          auto const placement = ExpertPlacement::from_counts(s.experts_per_rank);
          auto const gw = test::GlobalWeights<float>::random(kExperts, mlp_config(), true, rng);
          std::vector<std::int64_t> count = s.tokens_per_rank, first(count.size(), 0);
          if (all_gather)
            std::fill(count.begin(), count.end(), s.tokens_per_rank[0]);
          else
            std::partial_sum(count.begin(), count.end() - 1, first.begin() + 1);
          std::int64_t const total =
              all_gather ? count[0] : std::accumulate(count.begin(), count.end(), std::int64_t{0});
          auto const x = test::random_vector<float>(static_cast<std::size_t>(total * kHidden), rng);
          auto const dy = test::random_vector<float>(static_cast<std::size_t>(total * kHidden), rng);
          auto const logits = separated_logits(total, rng);
          Chain const ref = chain(gw, x, logits, dy);
          TrainingOptions const keep{.received_rows_factor = all_gather ? 0.0 : 2.0, .save_gate_up_output = true};
          auto const outs = all_gather ? run_layer<AllGather>(gw, placement, first, count, x, logits, dy, keep)
                                       : run_layer<AllToAll>(gw, placement, first, count, x, logits, dy, keep);
          for (int r = 0; r < placement.num_ranks(); ++r) {
            CAPTURE(r);
            auto const& o = outs[static_cast<std::size_t>(r)];
            auto const f = first[static_cast<std::size_t>(r)], t = count[static_cast<std::size_t>(r)];
            if (!all_gather) {  // AllGather sums dx over ranks in another order than the chain
              CHECK(same_bits(o.y, rows_of(ref.y, kHidden, f, t)));
              CHECK(same_bits(o.dx, rows_of(ref.dx, kHidden, f, t)));
            }
            CHECK(same_bits(o.dx, o.dx_again));
            CHECK(same_bits(o.d_logits, rows_of(ref.d_logits, kExperts, f, t)));
            check_grads_are_chains(o.grads, ref, placement.local_range(r));
          }
        }
}

TEST_CASE("ExpertParallel: save_gate_up_output adds exactly GEMM 1's output rows to saved_bytes") {
  EPX_TEST_SEEDED_RNG(rng);
  constexpr int kRanks = 3;
  auto const gw = test::GlobalWeights<bfloat16>::random(kExperts, mlp_config(), false, rng);
  LocalGroup group(kRanks);
  group.run([&](int rank, Communicator& comm) {
    auto const placement = ExpertPlacement::contiguous(kExperts, kRanks);
    auto const aligned = [](std::size_t bytes) { return align_up<std::size_t>(bytes, Workspace::kAlignment); };
    for (double factor : {0.0, 1.5}) {
      auto config = [&](bool keep) {
        return MoeConfig{.router = router_config(),
                         .mlp = mlp_config(),
                         .weights = gw.local(placement.local_range(rank)),
                         .received_rows_factor = factor,
                         .save_gate_up_output = keep};
      };
      ExpertParallel<Grouped, AllToAll, Host> const plain(config(false), comm), keeping(config(true), comm);
      ExpertParallel<Grouped, AllGather, Host> const gather(config(false), comm), gather_keeping(config(true), comm);
      for (std::int64_t m : {0, 1, 9, 120}) {
        CAPTURE(m);
        std::int64_t const rows =
            factor == 0 ? m * kRanks * kTopK : static_cast<std::int64_t>(std::ceil(factor * m * kTopK));
        auto const h_bytes = [&](std::int64_t r) {
          return aligned(static_cast<std::size_t>(r) * static_cast<std::size_t>(gate_up_rows()) * 4);
        };
        CHECK(keeping.saved_bytes(m) - plain.saved_bytes(m) == h_bytes(rows));
        CHECK(gather_keeping.saved_bytes(m) - gather.saved_bytes(m) == h_bytes(m * kTopK));
        // The forward's workspace is the same; the backward's loses the h it no longer recomputes.
        CHECK(keeping.workspace_bytes(m) == plain.workspace_bytes(m));
        CHECK(plain.backward_workspace_bytes(m) - keeping.backward_workspace_bytes(m) == h_bytes(rows));
        CHECK(gather.backward_workspace_bytes(m) - gather_keeping.backward_workspace_bytes(m) == h_bytes(m * kTopK));
      }
    }
  });
}

TEST_CASE("ExpertParallel::backward: with save_gate_up_output the backward reads the h its forward kept") {
  // h is SavedState's last part: overwrite it after the forward and the gradients must change
  // (NaN), which a backward that recomputed h would not show; written again, they are the chain's.
  EPX_TEST_SEEDED_RNG(rng);
  std::int64_t const tokens = 6;
  auto const gw = test::GlobalWeights<float>::random(kExperts, mlp_config(), true, rng);
  auto const x = test::random_vector<float>(static_cast<std::size_t>(tokens * kHidden), rng);
  auto const dy = test::random_vector<float>(static_cast<std::size_t>(tokens * kHidden), rng);
  auto const logits = separated_logits(tokens, rng);
  Chain const ref = chain(gw, x, logits, dy);
  LocalGroup group(1);
  Communicator& comm = group.communicator(0);
  MoeConfig config{.router = router_config(), .mlp = mlp_config(), .weights = gw.local({0, kExperts})};
  ExpertParallel<Grouped, AllToAll, Host> const plain(config, comm);
  config.save_gate_up_output = true;
  ExpertParallel<Grouped, AllToAll, Host> ep(config, comm);
  std::size_t const saved_bytes = ep.saved_bytes(tokens), h_bytes = saved_bytes - plain.saved_bytes(tokens);
  REQUIRE(h_bytes >= static_cast<std::size_t>(tokens * kTopK * gate_up_rows()) * sizeof(float));
  // An aligned base: the carving then starts at the buffer's start and h ends kAlignment - 1 bytes
  // before the end of saved_bytes (the sizing's slack for an unaligned base).
  std::vector<std::byte> storage(saved_bytes + Workspace::kAlignment);
  auto const address = reinterpret_cast<std::uintptr_t>(storage.data());
  std::byte* const base = storage.data() + (align_up<std::uintptr_t>(address, Workspace::kAlignment) - address);
  std::byte* const h_start = base + (saved_bytes - (Workspace::kAlignment - 1)) - h_bytes;
  SavedState const saved(base, saved_bytes);
  std::vector<std::byte> ws(ep.workspace_bytes(tokens)), bws(ep.backward_workspace_bytes(tokens));
  std::vector<float> y(static_cast<std::size_t>(tokens * kHidden)), dx(y.size()),
      d_logits(static_cast<std::size_t>(tokens * kExperts));
  Grads grads(kExperts);
  MatrixView<float const> const lv(logits.data(), tokens, kExperts);
  auto step = [&](bool corrupt_h) {
    ep.forward(Host{}, lv, MatrixView<float const>(x.data(), tokens, kHidden),
               MatrixView<float>(y.data(), tokens, kHidden), Workspace(ws.data(), ws.size()), saved);
    if (corrupt_h) std::fill(h_start, h_start + h_bytes, std::byte{0xff});  // NaN in every fp32 of h
    ep.backward(Host{}, lv, MatrixView<float const>(dy.data(), tokens, kHidden),
                MatrixView<float>(dx.data(), tokens, kHidden), MatrixView<float>(d_logits.data(), tokens, kExperts),
                grads.view(), saved, Workspace(bws.data(), bws.size()));
  };
  step(true);
  CHECK(std::any_of(dx.begin(), dx.end(), [](float v) { return std::isnan(v); }));
  CHECK(std::any_of(grads.gate_up.begin(), grads.gate_up.end(), [](float v) { return std::isnan(v); }));
  step(false);
  CHECK(same_bits(y, ref.y));
  CHECK(same_bits(dx, ref.dx));
  CHECK(same_bits(grads.gate_up, ref.grads.gate_up));
  CHECK(same_bits(grads.down, ref.grads.down));
}
