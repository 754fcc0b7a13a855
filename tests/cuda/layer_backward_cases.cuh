// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

// The layer's training forward and backward on Cuda against the Host layer (Grouped, the oracle),
// for any Cuda expert policy E: the cases layer_backward_test.cu runs with Grouped and
// cutlass_grouped_test.cu with CutlassGrouped and with Grouped where it picks CUTLASS.

#include "cuda_backend.cuh"

#include "../common/host_backend.hpp"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

namespace epx::test::backward {

struct Case {
  RouterConfig router;
  ExpertMlpConfig mlp;
  std::vector<std::int32_t> experts_per_rank;
  std::vector<std::int64_t> tokens_per_rank;  // AllGather: every rank takes the first rank's count
  bool given_routing = false;                 // forward from ids + weights, backward to d_topk_weights
  // AllToAll: MoeConfig::received_rows_factor; tight_received_rows sets it (check_case) to the
  // busiest rank's rows over max_tokens * top_k, the smallest bound the routing fits.
  double received_rows_factor = 0;
  bool tight_received_rows = false;
  bool save_gate_up_output = false;  // MoeConfig's: forward keeps h in saved, backward reads it
};

//! What one rank's layer gave, on the host.
template <class T>
struct RankOut {
  std::vector<T> y;
  std::vector<float> dx, dx_again, d_route;  // d_route: d_logits, or d_topk_weights (given routing)
  std::vector<float> gate_up, down, gate_up_bias, down_bias;
  std::vector<float> gate_up_again;
};

//! The whole group's inputs: rank r reads rows [first[r], first[r] + count[r]).
template <class T>
struct Inputs {
  std::vector<T> x;
  std::vector<float> logits, dy, weights;
  std::vector<std::int32_t> ids;
  std::vector<std::int64_t> first, count;
};

//! Logits whose top-k are far from ties: a random order of well-separated levels, plus noise.
std::vector<float> separated_logits(std::int64_t tokens, std::int32_t experts, std::mt19937_64& rng) {
  std::vector<float> logits(static_cast<std::size_t>(tokens * experts));
  std::normal_distribution<float> noise(0.0f, 0.02f);
  std::vector<int> order(static_cast<std::size_t>(experts));
  for (std::int64_t t = 0; t < tokens; ++t) {
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng);
    for (int e = 0; e < experts; ++e)
      logits[static_cast<std::size_t>(t * experts + e)] =
          0.4f * static_cast<float>(order[static_cast<std::size_t>(e)]) + noise(rng);
  }
  return logits;
}

//! Distinct ids per token (some slots -1) and random weights: a given routing.
void given_routing(Case const& c, std::int64_t tokens, std::mt19937_64& rng, std::vector<std::int32_t>& ids,
                   std::vector<float>& weights) {
  std::int32_t const k = c.router.top_k, e = c.router.num_experts;
  ids.assign(static_cast<std::size_t>(tokens * k), -1);
  std::vector<std::int32_t> all(static_cast<std::size_t>(e));
  for (std::int64_t t = 0; t < tokens; ++t) {
    std::iota(all.begin(), all.end(), 0);
    std::shuffle(all.begin(), all.end(), rng);
    for (std::int32_t j = 0; j < k; ++j)
      if (rng() % 7 != 0) ids[static_cast<std::size_t>(t * k + j)] = all[static_cast<std::size_t>(j)];
  }
  weights = random_vector<float>(ids.size(), rng);
}

template <class T>
std::vector<T> rows_of(std::vector<T> const& v, std::int64_t cols, std::int64_t first, std::int64_t count) {
  if (v.empty() || count == 0) return {};
  return {v.begin() + first * cols, v.begin() + (first + count) * cols};
}

//! Forward (SavedState) and two backwards of ExpertParallel<E, D, Space> on every rank of
//! Backend's group, every output poisoned first (NaN), forward's workspace poisoned before the
//! backward (which must not read it).
template <class Backend, class E, class D, class T>
std::vector<RankOut<T>> run_layer(Case const& c, GlobalWeights<T> const& gw, Inputs<T> const& in) {
  using Space = typename Backend::Space;
  using Bytes = typename Backend::template Buffer<std::byte>;
  using Floats = typename Backend::template Buffer<float>;
  auto const placement = ExpertPlacement::from_counts(c.experts_per_rank);
  int const ranks = placement.num_ranks();
  std::int32_t const hidden = c.mlp.hidden, experts = c.router.num_experts, k = c.router.top_k;
  std::int32_t const gu = c.mlp.gate_up_rows(), inter = c.mlp.intermediate;
  std::int64_t const max_tokens = std::max<std::int64_t>(1, *std::max_element(in.count.begin(), in.count.end()));
  std::vector<RankOut<T>> outs(static_cast<std::size_t>(ranks));
  typename Backend::Group group(ranks, {.timeout = std::chrono::seconds(60)});
  group.run([&](int rank, Communicator& comm) {
    auto const ur = static_cast<std::size_t>(rank);
    typename Backend::Rank on;
    ExpertRange const local = placement.local_range(rank);
    typename Backend::template Experts<T> const experts_here(gw, local);
    ExpertParallel<E, D, Space> ep(MoeConfig{.router = c.router,
                                             .mlp = c.mlp,
                                             .weights = experts_here.weights(),
                                             .placement = placement,
                                             .received_rows_factor = c.received_rows_factor,
                                             .save_gate_up_output = c.save_gate_up_output},
                                   comm);
    Bytes ws(ep.workspace_bytes(max_tokens)), saved(ep.saved_bytes(max_tokens)),
        bws(ep.backward_workspace_bytes(max_tokens));
    std::int64_t const t = in.count[ur], f = in.first[ur];
    typename Backend::template Buffer<T> x(rows_of(in.x, hidden, f, t)), y(static_cast<std::size_t>(t * hidden));
    Floats logits(rows_of(in.logits, experts, f, t)), dy(rows_of(in.dy, hidden, f, t));
    Floats weights(rows_of(in.weights, k, f, t));
    typename Backend::template Buffer<std::int32_t> ids(rows_of(in.ids, k, f, t));
    Floats dx(static_cast<std::size_t>(t * hidden)), dx_again(dx.size());
    Floats d_route(static_cast<std::size_t>(t * (c.given_routing ? k : experts)));
    auto const l = static_cast<std::size_t>(local.count);
    Floats gate_up(l * static_cast<std::size_t>(gu * hidden)), down(l * static_cast<std::size_t>(hidden * inter)),
        gate_up_bias(l * static_cast<std::size_t>(gu)), down_bias(l * static_cast<std::size_t>(hidden));
    for (auto* b : {&dx, &dx_again, &d_route, &gate_up, &down, &gate_up_bias, &down_bias}) b->poison(0xff);
    y.poison(0xff);
    ExpertWeightGrads<float> const grads{.gate_up = {gate_up.data(), local.count, gu, hidden},
                                         .down = {down.data(), local.count, hidden, inter},
                                         .gate_up_bias = gate_up_bias.data(),
                                         .down_bias = down_bias.data()};
    MatrixView<float const> const logits_view(logits.data(), t, experts), dy_view(dy.data(), t, hidden);
    SavedState const state(saved.data(), saved.size());
    Workspace const bwork(bws.data(), bws.size());
    if (c.given_routing)
      ep.forward(on.context(), MatrixView<std::int32_t const>(ids.data(), t, k),
                 MatrixView<float const>(weights.data(), t, k), MatrixView<T const>(x.data(), t, hidden),
                 MatrixView<T>(y.data(), t, hidden), Workspace(ws.data(), ws.size()), state);
    else
      ep.forward(on.context(), logits_view, MatrixView<T const>(x.data(), t, hidden),
                 MatrixView<T>(y.data(), t, hidden), Workspace(ws.data(), ws.size()), state);
    on.sync();
    ws.poison(0xff);
    auto backward = [&](Floats& dx_out) {
      if (c.given_routing)
        ep.backward(on.context(), dy_view, MatrixView<float>(dx_out.data(), t, hidden),
                    MatrixView<float>(d_route.data(), t, k), grads, state, bwork);
      else
        ep.backward(on.context(), logits_view, dy_view, MatrixView<float>(dx_out.data(), t, hidden),
                    MatrixView<float>(d_route.data(), t, experts), grads, state, bwork);
    };
    backward(dx);
    on.sync();
    RankOut<T>& o = outs[ur];
    o.gate_up_again = gate_up.to_host();
    gate_up.poison(0xff);
    backward(dx_again);
    on.sync();
    o.y = y.to_host();
    o.dx = dx.to_host();
    o.dx_again = dx_again.to_host();
    o.d_route = d_route.to_host();
    o.gate_up = gate_up.to_host();
    o.down = down.to_host();
    o.gate_up_bias = gate_up_bias.to_host();
    o.down_bias = down_bias.to_host();
  });
  return outs;
}

bool same_bits(std::vector<float> const& a, std::vector<float> const& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

//! Max-norm relative error of `got` against the Host's `want` (0 for two empty vectors; a NaN in
//! one and not the other, e.g. a poisoned element never written, is infinite).
template <class A>
double error_vs_host(std::vector<A> const& got, std::vector<A> const& want) {
  if (want.empty()) return got.empty() ? 0.0 : INFINITY;
  std::vector<double> ref(want.size());
  std::transform(want.begin(), want.end(), ref.begin(), [](A v) { return static_cast<double>(to_float(v)); });
  return rel_error(got, ref);
}

//! The factor whose bound is the busiest rank's rows: received_rows_factor's tightest fit.
template <class T>
double tight_received_rows_factor(Case const& c, Inputs<T> const& in) {
  std::int64_t const total = std::accumulate(in.count.begin(), in.count.end(), std::int64_t{0});
  std::vector<std::int32_t> ids = in.ids;
  if (!c.given_routing) {  // the router's choice, as the layer's forward makes it
    std::vector<float> weights(ids.size());
    route(Host{}, c.router, MatrixView<float const>(in.logits.data(), total, c.router.num_experts), {},
          MatrixView<std::int32_t>(ids.data(), total, c.router.top_k),
          MatrixView<float>(weights.data(), total, c.router.top_k));
  }
  std::int64_t const most = most_received_rows(ids, ExpertPlacement::from_counts(c.experts_per_rank));
  std::int64_t const max_tokens = std::max<std::int64_t>(1, *std::max_element(in.count.begin(), in.count.end()));
  return std::max(1.0, static_cast<double>(most)) / static_cast<double>(max_tokens * c.router.top_k);
}

//! Runs `c` with ExpertParallel<E, D, Cuda> and the Host layer (Grouped) and compares every rank's outputs.
template <class E, class D, class T>
void check_case(Case c, std::mt19937_64& rng) {
  auto gw = GlobalWeights<T>::random(c.router.num_experts, c.mlp, true, rng);
  if (c.mlp.activation == Activation::kReLU) {
    // ReLU's derivative jumps at 0: an h within rounding of 0 (the GPU's GEMM sums in another order)
    // could take the other side on each space. Biases of +-3 keep h away from 0 on both sides.
    for (std::size_t i = 0; i < gw.gate_up_bias.size(); ++i) gw.gate_up_bias[i] = from_float<T>(i % 2 ? 3.0f : -3.0f);
  }
  Inputs<T> in;
  std::size_t const ranks = c.experts_per_rank.size();
  bool const gather = std::is_same_v<D, AllGather>;
  in.count = gather ? std::vector<std::int64_t>(ranks, c.tokens_per_rank[0]) : c.tokens_per_rank;
  in.first.assign(ranks, 0);
  if (!gather) std::partial_sum(in.count.begin(), in.count.end() - 1, in.first.begin() + 1);
  std::int64_t const total = gather ? in.count[0] : std::accumulate(in.count.begin(), in.count.end(), std::int64_t{0});
  in.x = random_vector<T>(static_cast<std::size_t>(total * c.mlp.hidden), rng);
  in.dy = random_vector<float>(static_cast<std::size_t>(total * c.mlp.hidden), rng);
  in.logits = separated_logits(total, c.router.num_experts, rng);
  given_routing(c, total, rng, in.ids, in.weights);
  if (c.tight_received_rows && !gather) c.received_rows_factor = tight_received_rows_factor(c, in);
  CAPTURE(c.received_rows_factor);
  auto const want = run_layer<HostBackend, Grouped, D, T>(c, gw, in);
  auto const got = run_layer<CudaBackend, E, D, T>(c, gw, in);
  // fp32: the GPU's GEMMs fuse multiply-adds and its exp/tanh differ by ulps; 16-bit: one rounding
  // of storage (h -> a) can flip where the recomputed h differs in its last fp32 bits.
  double const tol = CudaBackend::tolerance<T>();
  for (std::size_t r = 0; r < ranks; ++r) {
    CAPTURE(r);
    auto const& g = got[r];
    auto const& w = want[r];
    CHECK(error_vs_host(g.y, w.y) <= tol);
    CHECK(error_vs_host(g.dx, w.dx) <= tol);
    CHECK(error_vs_host(g.d_route, w.d_route) <= tol);
    CHECK(error_vs_host(g.gate_up, w.gate_up) <= tol);
    CHECK(error_vs_host(g.down, w.down) <= tol);
    CHECK(error_vs_host(g.gate_up_bias, w.gate_up_bias) <= tol);
    CHECK(error_vs_host(g.down_bias, w.down_bias) <= tol);
    // Deterministic: a second backward over the same saved state gives the same bits.
    CHECK(same_bits(g.dx, g.dx_again));
    CHECK(same_bits(g.gate_up, g.gate_up_again));
  }
}

std::vector<Case> cases() {
  std::vector<Case> out;
  auto const splits =
      std::vector<std::pair<std::vector<std::int32_t>, std::vector<std::int64_t>>>{{{8}, {37}},
                                                                                   {{4, 4}, {29, 40}},
                                                                                   {{3, 0, 5}, {21, 33, 17}},
                                                                                   {{2, 3, 3}, {26, 0, 31}},
                                                                                   {{1, 2, 2, 3}, {9, 14, 0, 23}}};
  RouterConfig const softmax{.num_experts = 8, .top_k = 2, .renormalize = true};
  RouterConfig const grouped{.num_experts = 8,
                             .top_k = 3,
                             .scoring = Scoring::kSigmoidTopK,
                             .renormalize = true,
                             .num_groups = 4,
                             .topk_groups = 2,
                             .routed_scaling_factor = 2.5f};
  RouterConfig const topk_softmax{.num_experts = 8, .top_k = 2, .scoring = Scoring::kTopKSoftmax};
  std::vector<std::pair<RouterConfig, ExpertMlpConfig>> const variants = {
      {softmax, {.hidden = 64, .intermediate = 48}},
      {grouped,
       {.hidden = 64,
        .intermediate = 32,
        .activation = Activation::kGeGLU,
        .gate_up_layout = GateUpLayout::kInterleaved}},
      {topk_softmax,
       {.hidden = 128,
        .intermediate = 40,
        .activation = Activation::kClampedSwiGLU,
        .gate_up_layout = GateUpLayout::kInterleaved}},
      {softmax, {.hidden = 72, .intermediate = 56, .activation = Activation::kReLU}},
      {grouped, {.hidden = 64, .intermediate = 48, .activation = Activation::kGeGLUTanh}},
  };
  for (std::size_t v = 0; v < variants.size(); ++v)
    for (std::size_t s = 0; s < splits.size(); ++s)
      if ((v + s) % 2 == 0 || s == 0)
        out.push_back({.router = variants[v].first,
                       .mlp = variants[v].second,
                       .experts_per_rank = splits[s].first,
                       .tokens_per_rank = splits[s].second,
                       .given_routing = (v + s) % 3 == 1});
  return out;
}

}  // namespace epx::test::backward
