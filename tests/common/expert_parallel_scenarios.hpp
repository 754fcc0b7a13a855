// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

// The ExpertParallel scenarios, written once for every execution space: N ranks of the backend's
// local group must reproduce the dense single-rank MoE computed by an independent naive loop
// (test_util.hpp) and the Host layer on one rank, give the same bits on a second run, write every
// row, and count what the Status promises. The including file defines EPX_EP_POLICIES, the
// EpPolicy<Backend, Experts, Dispatch> types to instantiate every case for (and
// EPX_EP_ALL_TO_ALL_POLICIES, those of them with AllToAll), and includes this header once: tests/host/expert_parallel_test.cpp (Host, in CI) and
// tests/cuda/expert_parallel_test.cu (Cuda, on a GPU).

#include "test_util.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

namespace epx::test {

//! A layer to test: the backend (an execution space with its local group and buffers) and the
//! two policies.
template <class B, class E, class D>
struct EpPolicy {
  using Backend = B;
  using Experts = E;
  using Dispatch = D;

  //! The layer's tolerance for element type T. CublasGrouped stores GEMM 1's output h in T before
  //! the activation (cuBLAS's grouped GEMM writes C in the inputs' type, as a PyTorch MoE block
  //! does), where Grouped and the Host keep it in fp32: one more rounding of relative 2^-8 (bf16),
  //! carried through the down projection's sum. Measured on the H200: 0.011-0.012 against 0.01.
  template <class T>
  static double tolerance() {
    double const base = B::template tolerance<T>();
    return std::is_same_v<E, CublasGrouped> && !std::is_same_v<T, float> ? 2 * base : base;
  }
};

// kWithoutExpert: some tokens get all -1 (padding) and one gets -1 and an invalid id; from
// logits, some tokens get all-NaN logits (the router gives them all -1).
enum class Routing { kRandom, kHotExpert, kWithInvalid, kWithoutExpert };

struct Scenario {
  std::int32_t num_experts = 16;
  std::int32_t top_k = 4;
  ExpertMlpConfig mlp = {};                         // hidden 0: the backend's default_mlp() widths
  std::vector<std::int64_t> tokens_per_rank = {};   // AllToAll: per rank (cycled); AllGather: [0] for all
  std::vector<std::int32_t> experts_per_rank = {};  // empty: contiguous
  Routing routing = Routing::kRandom;
  bool bias = false;
  bool from_logits = false;

  [[nodiscard]] RouterConfig router() const {
    return {.num_experts = num_experts, .top_k = top_k, .renormalize = true};
  }
};

//! `s` with the backend's widths where it sets none (activation and layout are kept).
template <class B>
Scenario with_backend_widths(Scenario s) {
  if (s.mlp.hidden == 0) {
    ExpertMlpConfig const widths = B::default_mlp();
    s.mlp.hidden = widths.hidden;
    s.mlp.intermediate = widths.intermediate;
  }
  return s;
}

template <class T>
struct RankInputs {
  std::vector<T> x = {};
  std::vector<float> logits = {};      // from_logits only
  std::vector<std::int32_t> ids = {};  // given, or what the Host router makes of the logits
  std::vector<float> weights = {};
  [[nodiscard]] std::int64_t num_tokens(std::int32_t hidden) const {
    return static_cast<std::int64_t>(x.size()) / hidden;
  }
};

inline std::vector<std::int32_t> make_ids(Scenario const& s, std::int64_t num_tokens, std::mt19937_64& rng) {
  auto ids = random_ids(num_tokens, s.top_k, s.num_experts, rng);
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
    for (std::int64_t t : {pick(rng), pick(rng), num_tokens - 1}) std::fill_n(ids.begin() + t * s.top_k, s.top_k, -1);
    std::int64_t const mixed = pick(rng);  // -1 everywhere but one invalid id: no expert either
    std::fill_n(ids.begin() + mixed * s.top_k, s.top_k, -1);
    ids[static_cast<std::size_t>(mixed * s.top_k)] = s.num_experts + 1;
  }
  return ids;
}

// Router logits for `num_tokens` tokens; kWithoutExpert makes whole rows NaN.
inline std::vector<float> make_logits(Scenario const& s, std::int64_t num_tokens, std::mt19937_64& rng) {
  auto logits = random_vector<float>(static_cast<std::size_t>(num_tokens * s.num_experts), rng);
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
inline std::uint64_t count_tokens_without_expert(std::vector<std::int32_t> const& ids, std::int32_t top_k,
                                                 std::int32_t num_experts) {
  std::uint64_t n = 0;
  for (std::size_t t = 0; t * static_cast<std::size_t>(top_k) < ids.size(); ++t) {
    auto const row = ids.begin() + static_cast<std::ptrdiff_t>(t * static_cast<std::size_t>(top_k));
    n += std::none_of(row, row + top_k, [&](std::int32_t id) { return id >= 0 && id < num_experts; });
  }
  return n;
}

// Each rank's tokens and routing (AllGather: every rank holds rank 0's).
template <class Dispatch, class T>
std::vector<RankInputs<T>> make_inputs(int num_ranks, Scenario const& s, std::mt19937_64& rng) {
  constexpr bool kAllToAll = std::is_same_v<Dispatch, AllToAll>;
  std::vector<RankInputs<T>> in(static_cast<std::size_t>(num_ranks));
  for (int r = 0; r < num_ranks; ++r) {
    auto const ur = static_cast<std::size_t>(r);
    if (!kAllToAll && r > 0) {
      in[ur] = in[0];
      continue;
    }
    std::int64_t const t = s.tokens_per_rank[kAllToAll ? ur % s.tokens_per_rank.size() : 0];
    in[ur].x = random_vector<T>(static_cast<std::size_t>(t * s.mlp.hidden), rng);
    if (s.from_logits) {
      in[ur].logits = make_logits(s, t, rng);
      in[ur].ids.resize(static_cast<std::size_t>(t * s.top_k));
      in[ur].weights.resize(in[ur].ids.size());
      route(Host{}, s.router(), MatrixView<float const>(in[ur].logits.data(), t, s.num_experts), {},
            MatrixView<std::int32_t>(in[ur].ids.data(), t, s.top_k),
            MatrixView<float>(in[ur].weights.data(), t, s.top_k));
    } else {
      in[ur].ids = make_ids(s, t, rng);
      in[ur].weights = random_weights(in[ur].ids.size(), rng);
    }
  }
  return in;
}

template <class T>
struct LayerReference {
  std::vector<double> y;
  Status status;
};

// The Host layer, one rank owning every expert, on one rank's inputs: the oracle of every backend.
template <class T>
LayerReference<T> host_layer(Scenario const& s, GlobalWeights<T> const& gw, RankInputs<T> const& in) {
  std::int64_t const t = in.num_tokens(s.mlp.hidden);
  std::vector<T> y(in.x.size());
  Status status;
  LocalGroup group(1);
  group.run([&](int, Communicator& comm) {
    ExpertParallel<Grouped, AllToAll, Host> ep(MoeConfig{.router = s.router(),
                                                         .mlp = s.mlp,
                                                         .weights = gw.local(ExpertRange{0, s.num_experts}),
                                                         .on_invalid_ids = InvalidIds::kDropAndCount},
                                               comm);
    std::vector<std::byte> ws(ep.workspace_bytes(t));
    MatrixView<T const> x(in.x.data(), t, s.mlp.hidden);
    MatrixView<T> yv(y.data(), t, s.mlp.hidden);
    if (s.from_logits)
      ep.forward(Host{}, MatrixView<float const>(in.logits.data(), t, s.num_experts), x, yv,
                 Workspace(ws.data(), ws.size()));
    else
      ep.forward(Host{}, MatrixView<std::int32_t const>(in.ids.data(), t, s.top_k),
                 MatrixView<float const>(in.weights.data(), t, s.top_k), x, yv, Workspace(ws.data(), ws.size()));
    status = ep.status(Host{});
  });
  LayerReference<T> ref{std::vector<double>(y.size()), status};
  for (std::size_t i = 0; i < y.size(); ++i) ref.y[i] = to_float(y[i]);
  return ref;
}

// What one rank's runs produced.
template <class T>
struct RankResult {
  std::vector<T> first, second;  // y of two identical forwards
  Status status;
  std::string error;  // what forward or status() threw (kInvalidExpertId only), if anything
  Errc error_code = Errc::kInvalidArgument;
};

inline ExpertPlacement placement_of(Scenario const& s, int num_ranks) {
  return s.experts_per_rank.empty() ? ExpertPlacement::contiguous(s.num_experts, num_ranks)
                                    : ExpertPlacement::from_counts(s.experts_per_rank);
}

// Runs the layer on `num_ranks` ranks of the backend's group, twice; outputs poisoned before each.
template <class P, class T>
std::vector<RankResult<T>> run_layer(int num_ranks, Scenario const& s, GlobalWeights<T> const& gw,
                                     std::vector<RankInputs<T>> const& in, InvalidIds on_invalid_ids) {
  using B = typename P::Backend;
  typename B::Group group(num_ranks, {.timeout = std::chrono::seconds(60)});
  std::vector<RankResult<T>> out(static_cast<std::size_t>(num_ranks));
  std::int64_t max_tokens = 0;
  for (auto const& r : in) max_tokens = std::max(max_tokens, r.num_tokens(s.mlp.hidden));
  B::reserve(group, static_cast<std::size_t>(max_tokens * s.mlp.hidden) * sizeof(float));  // AllGather's all-reduce
  ExpertPlacement const placement = placement_of(s, num_ranks);
  group.run([&](int rank, Communicator& comm) {
    auto const r = static_cast<std::size_t>(rank);
    auto& res = out[r];
    typename B::Rank on;
    typename B::template Experts<T> const experts(gw, placement.local_range(rank));
    ExpertParallel<typename P::Experts, typename P::Dispatch, typename B::Space> ep(
        MoeConfig{.router = s.router(),
                  .mlp = s.mlp,
                  .weights = experts.weights(),
                  .placement = placement,
                  .on_invalid_ids = on_invalid_ids},
        comm);
    typename B::template Buffer<std::byte> ws(ep.workspace_bytes(max_tokens));
    ws.poison(0x5a);
    std::int64_t const t = in[r].num_tokens(s.mlp.hidden);
    typename B::template Buffer<T> x(in[r].x), y(in[r].x.size());
    typename B::template Buffer<float> logits(in[r].logits), weights(in[r].weights);
    typename B::template Buffer<std::int32_t> ids(in[r].ids);
    for (int rep = 0; rep < 2; ++rep) {
      y.poison(0xff);  // NaN in every element type: every row must be written
      try {
        MatrixView<T const> xv(x.data(), t, s.mlp.hidden);
        MatrixView<T> yv(y.data(), t, s.mlp.hidden);
        if (s.from_logits)
          ep.forward(on.context(), MatrixView<float const>(logits.data(), t, s.num_experts), xv, yv,
                     Workspace(ws.data(), ws.size()));
        else
          ep.forward(on.context(), MatrixView<std::int32_t const>(ids.data(), t, s.top_k),
                     MatrixView<float const>(weights.data(), t, s.top_k), xv, yv, Workspace(ws.data(), ws.size()));
        res.status = ep.status(on.context());
      } catch (Error const& e) {
        if (e.code() != Errc::kInvalidExpertId) throw;  // anything else fails the test (and aborts the group)
        res.error = e.what();
        res.error_code = e.code();
      }
      on.sync();
      (rep == 0 ? res.first : res.second) = y.to_host();
    }
    comm.barrier(on.comm_stream());  // the group is still healthy after every forward
    on.sync();
  });
  return out;
}

template <class T>
bool bitwise_equal(std::vector<T> const& a, std::vector<T> const& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

// Runs the scenario and checks every rank's output and counters.
template <class P, class T>
void check_scenario(int num_ranks, Scenario scenario, std::mt19937_64& rng,
                    InvalidIds on_invalid_ids = InvalidIds::kDropAndCount) {
  using B = typename P::Backend;
  constexpr bool kAllToAll = std::is_same_v<typename P::Dispatch, AllToAll>;
  Scenario const s = with_backend_widths<B>(std::move(scenario));
  CAPTURE(num_ranks);
  auto const gw = GlobalWeights<T>::random(s.num_experts, s.mlp, s.bias, rng);
  auto const in = make_inputs<typename P::Dispatch, T>(num_ranks, s, rng);
  auto const results = run_layer<P, T>(num_ranks, s, gw, in, on_invalid_ids);
  for (int r = 0; r < num_ranks; ++r) {
    CAPTURE(r);
    auto const ur = static_cast<std::size_t>(r);
    auto const& res = results[ur];
    std::int64_t const num_tokens = in[ur].num_tokens(s.mlp.hidden);
    auto const dense = dense_moe(gw, in[ur].x, in[ur].ids, in[ur].weights, num_tokens, s.top_k);
    auto const oracle = host_layer(s, gw, in[ur]);
    if (std::all_of(dense.begin(), dense.end(), [](double v) { return v == 0.0; })) {
      for (auto v : res.first) CHECK(to_float(v) == 0.0f);  // every slot -1 (or invalid): exact zeros
    } else {
      CHECK(rel_error(res.first, dense) <= P::template tolerance<T>());
      CHECK(rel_error(res.first, oracle.y) <= P::template tolerance<T>());
    }
    CHECK(bitwise_equal(res.first, res.second));
    // Tokens that found no expert: counted, and their rows exactly zero.
    auto const without = count_tokens_without_expert(in[ur].ids, s.top_k, s.num_experts);
    for (std::int64_t t = 0; t < num_tokens; ++t) {
      auto const row = in[ur].ids.begin() + t * s.top_k;
      if (std::none_of(row, row + s.top_k, [&](std::int32_t id) { return id >= 0 && id < s.num_experts; }))
        for (std::int32_t c = 0; c < s.mlp.hidden; ++c)
          CHECK(to_float(res.first[static_cast<std::size_t>(t * s.mlp.hidden + c)]) == 0.0f);
    }
    if (on_invalid_ids != InvalidIds::kDropAndCount) continue;
    CHECK(res.error.empty());
    if (s.routing == Routing::kWithInvalid && num_tokens > 0) {
      CHECK(res.status.invalid_ids == 2);
      CHECK(res.status.dropped_slots == 2);
    } else if (s.routing == Routing::kWithoutExpert && !s.from_logits && num_tokens > 0) {
      CHECK(res.status.invalid_ids == 1);
    } else {
      CHECK(res.status.invalid_ids == 0);
    }
    CHECK(res.status.invalid_ids == oracle.status.invalid_ids);
    CHECK(res.status.dropped_slots == oracle.status.dropped_slots);
    CHECK(res.status.tokens_without_expert == without);
    CHECK(res.status.tokens_without_expert == oracle.status.tokens_without_expert);
    if (s.routing == Routing::kWithoutExpert && num_tokens > 0) CHECK(without >= 1);
    // ok() is about slots dropped, not tokens without expert (Status::ok()).
    CHECK(res.status.ok() == (res.status.invalid_ids == 0 && res.status.dropped_slots == 0));
    if (!kAllToAll) {  // the same tokens on every rank: the same counters
      CHECK(res.status.tokens_without_expert == results[0].status.tokens_without_expert);
      CHECK(res.status.invalid_ids == results[0].status.invalid_ids);
    }
  }
}

template <class P, class T>
void check_rank_counts(Scenario const& s, std::mt19937_64& rng) {
  for (int num_ranks : P::Backend::rank_counts()) {
    if (!s.experts_per_rank.empty() && static_cast<int>(s.experts_per_rank.size()) != num_ranks) continue;
    check_scenario<P, T>(num_ranks, s, rng);
  }
}

// A small fp32 layer (every policy offers fp32) for the error cases.
struct SmallLayer {
  static constexpr std::int32_t kExperts = 8, kHidden = 16, kTopK = 2;
  ExpertMlpConfig mlp{.hidden = kHidden, .intermediate = 8};
  std::mt19937_64 rng{5};
  GlobalWeights<float> gw = GlobalWeights<float>::random(kExperts, mlp, false, rng);

  [[nodiscard]] MoeConfig config(ExpertWeights const& weights, InvalidIds policy = InvalidIds::kThrow) const {
    return {
        .router = {.num_experts = kExperts, .top_k = kTopK}, .mlp = mlp, .weights = weights, .on_invalid_ids = policy};
  }
};

}  // namespace epx::test
