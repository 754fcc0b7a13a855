// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// ExpertParallel<Grouped | CublasGrouped, AllToAll | AllGather, Cuda> over N ranks of a
// CudaLocalGroup on one GPU must reproduce the Host backend's single-rank layer
// (ExpertParallel<Grouped, AllToAll, Host> over a 1-rank LocalGroup) on the same inputs, within
// bf16 tolerance, and give the same bits on a second run. Outputs are poisoned (NaN) before each
// run, inputs are random (never zeros), and the seed is printed on failure.

#include "../common/test_util.hpp"
#include "device_buffer.cuh"

#include <epx/cuda.cuh>
#include <epx/cuda/expert_parallel.cuh>
#include <epx/cuda/local_group.cuh>

#include <chrono>
#include <cstring>
#include <string>

using namespace epx;
using test::DeviceBuffer;
using test::GlobalWeights;

namespace {

using Stream = test::CudaStream;

template <class E, class D>
struct Policies {
  using Experts = E;
  using Dispatch = D;
};

#define EPX_ALL_POLICIES                                                                                      \
  Policies<Grouped, AllToAll>, Policies<Grouped, AllGather>, Policies<CublasGrouped, AllToAll>,               \
      Policies<CublasGrouped, AllGather>

// kWithoutExpert: given ids get whole rows of -1 (padding) and a row of -1 and one invalid id;
// router logits get whole rows of NaN. Those tokens find no expert (Status::tokens_without_expert).
enum class Routing { kRandom, kHotExpert, kWithInvalid, kWithoutExpert };

struct Scenario {
  std::int32_t num_experts = 16;
  std::int32_t top_k = 4;
  ExpertMlpConfig mlp{.hidden = 64, .intermediate = 48};  // multiples of 8: the bf16 tensor-core path
  std::vector<std::int64_t> tokens_per_rank = {};          // AllToAll: per rank (cycled); AllGather: [0] for all
  std::vector<std::int32_t> experts_per_rank = {};         // empty: contiguous
  Routing routing = Routing::kRandom;
  bool bias = false;
  bool from_logits = false;
};

template <class T>
double tolerance() {
  return std::is_same_v<T, float> ? 1e-4 : 1e-2;
}

template <class T>
struct RankInputs {
  std::vector<T> x = {};
  std::vector<float> logits = {};
  std::vector<std::int32_t> ids = {};
  std::vector<float> weights = {};
  [[nodiscard]] std::int64_t num_tokens(std::int32_t hidden) const {
    return static_cast<std::int64_t>(x.size()) / hidden;
  }
};

RouterConfig router_of(Scenario const& s) {
  return {.num_experts = s.num_experts, .top_k = s.top_k, .renormalize = true};
}

std::vector<std::int32_t> make_ids(Scenario const& s, std::int64_t num_tokens, std::mt19937_64& rng) {
  auto ids = test::random_ids(num_tokens, s.top_k, s.num_experts, rng);
  if (s.routing == Routing::kHotExpert)  // every token sends slot 0 to expert 3 (ids stay distinct)
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
    std::int64_t const mixed = pick(rng);
    std::fill_n(ids.begin() + mixed * s.top_k, s.top_k, -1);
    ids[static_cast<std::size_t>(mixed * s.top_k)] = s.num_experts + 1;
  }
  return ids;
}

std::vector<float> make_logits(Scenario const& s, std::int64_t num_tokens, std::mt19937_64& rng) {
  auto logits = test::random_vector<float>(static_cast<std::size_t>(num_tokens * s.num_experts), rng);
  if (s.routing == Routing::kWithoutExpert && num_tokens > 0) {
    std::uniform_int_distribution<std::int64_t> pick(0, num_tokens - 1);
    for (std::int64_t t : {pick(rng), std::int64_t{0}}) std::fill_n(logits.begin() + t * s.num_experts, s.num_experts, NAN);
  }
  return logits;
}

// Each rank's tokens and routing. AllGather: every rank holds rank 0's.
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
    in[ur].x = test::random_vector<T>(static_cast<std::size_t>(t * s.mlp.hidden), rng);
    if (s.from_logits) {
      in[ur].logits = make_logits(s, t, rng);
    } else {
      in[ur].ids = make_ids(s, t, rng);
      in[ur].weights = test::random_weights(in[ur].ids.size(), rng);
    }
  }
  return in;
}

template <class T>
struct Reference {
  std::vector<double> y;
  Status status;
};

// The oracle: the Host backend, one rank owning every expert, on this rank's inputs.
template <class T>
Reference<T> host_reference(Scenario const& s, GlobalWeights<T> const& gw, RankInputs<T> const& in) {
  std::int64_t const t = in.num_tokens(s.mlp.hidden);
  std::vector<T> y(in.x.size());
  Status status;
  LocalGroup group(1);
  group.run([&](int, Communicator& comm) {
    ExpertParallel<Grouped, AllToAll, Host> ep(MoeConfig{.router = router_of(s),
                                                         .mlp = s.mlp,
                                                         .weights = gw.local(ExpertRange{0, s.num_experts}),
                                                         .on_invalid_ids = InvalidIds::kDropAndCount},
                                               comm);
    std::vector<std::byte> ws(ep.workspace_bytes(t));
    MatrixView<T const> x(in.x.data(), t, s.mlp.hidden);
    MatrixView<T> yv(y.data(), t, s.mlp.hidden);
    if (s.from_logits)
      status = ep.forward(MatrixView<float const>(in.logits.data(), t, s.num_experts), x, yv,
                          Workspace(ws.data(), ws.size()));
    else
      status = ep.forward(MatrixView<std::int32_t const>(in.ids.data(), t, s.top_k),
                          MatrixView<float const>(in.weights.data(), t, s.top_k), x, yv,
                          Workspace(ws.data(), ws.size()));
  });
  Reference<T> ref{std::vector<double>(y.size()), status};
  for (std::size_t i = 0; i < y.size(); ++i) ref.y[i] = to_float(y[i]);
  return ref;
}

template <class T>
std::vector<T> slice(std::vector<T> const& v, std::size_t first, std::size_t count) {
  if (v.empty()) return {};
  return std::vector<T>(v.begin() + static_cast<std::ptrdiff_t>(first),
                        v.begin() + static_cast<std::ptrdiff_t>(first + count));
}

// One rank's experts on its device (uploaded inside the rank's thread, with its device current).
template <class T>
struct DeviceExperts {
  DeviceBuffer<T> gate_up, down, gate_up_bias, down_bias;

  DeviceExperts(GlobalWeights<T> const& gw, ExpertRange range)
      : gate_up(slice(gw.gate_up, static_cast<std::size_t>(range.first) * gate_up_size(gw.mlp),
                      static_cast<std::size_t>(range.count) * gate_up_size(gw.mlp))),
        down(slice(gw.down, static_cast<std::size_t>(range.first) * down_size(gw.mlp),
                   static_cast<std::size_t>(range.count) * down_size(gw.mlp))),
        gate_up_bias(slice(gw.gate_up_bias, static_cast<std::size_t>(range.first) * gw.mlp.gate_up_rows(),
                           static_cast<std::size_t>(range.count) * gw.mlp.gate_up_rows())),
        down_bias(slice(gw.down_bias, static_cast<std::size_t>(range.first) * gw.mlp.hidden,
                        static_cast<std::size_t>(range.count) * gw.mlp.hidden)),
        mlp_(gw.mlp),
        count_(range.count) {}

  //! Built the checked way (TensorViews of device memory), as the docs show.
  [[nodiscard]] ExpertWeights weights() const {
    std::int64_t const l = count_, rows = mlp_.gate_up_rows(), h = mlp_.hidden, i = mlp_.intermediate;
    TensorView<T const, 2> gate_up_b, down_b;  // empty: no bias
    if (gate_up_bias.size() > 0) {
      gate_up_b = TensorView<T const, 2>(gate_up_bias.data(), {l, rows});
      down_b = TensorView<T const, 2>(down_bias.data(), {l, h});
    }
    return expert_weights(TensorView<T const, 3>(gate_up.data(), {l, rows, h}),
                          TensorView<T const, 3>(down.data(), {l, h, i}), gate_up_b, down_b);
  }

 private:
  static std::size_t gate_up_size(ExpertMlpConfig const& m) {
    return static_cast<std::size_t>(m.gate_up_rows()) * static_cast<std::size_t>(m.hidden);
  }
  static std::size_t down_size(ExpertMlpConfig const& m) {
    return static_cast<std::size_t>(m.hidden) * static_cast<std::size_t>(m.intermediate);
  }
  ExpertMlpConfig mlp_;
  std::int32_t count_;
};

// What one rank's GPU runs produced.
template <class T>
struct RankResult {
  std::vector<T> first, second;  // y of two identical forwards
  Status status;
  std::string error;  // what forward or status() threw, if anything
  Errc error_code = Errc::kInvalidArgument;
};

// Runs the layer on `num_ranks` CudaLocalGroup ranks, twice, on one GPU.
template <class Experts, class Dispatch, class T>
std::vector<RankResult<T>> run_gpu(int num_ranks, Scenario const& s, GlobalWeights<T> const& gw,
                                   std::vector<RankInputs<T>> const& in, InvalidIds on_invalid_ids) {
  CudaLocalGroup group(num_ranks, {.timeout = std::chrono::seconds(60)});
  std::vector<RankResult<T>> out(static_cast<std::size_t>(num_ranks));
  std::int64_t max_tokens = 0;
  for (auto const& r : in) max_tokens = std::max(max_tokens, r.num_tokens(s.mlp.hidden));
  group.reserve(static_cast<std::size_t>(max_tokens * s.mlp.hidden) * sizeof(float));  // AllGather's all-reduce
  ExpertPlacement const placement = s.experts_per_rank.empty()
                                        ? ExpertPlacement::contiguous(s.num_experts, num_ranks)
                                        : ExpertPlacement::from_counts(s.experts_per_rank);
  group.run([&](int rank, Communicator& comm) {
    auto const r = static_cast<std::size_t>(rank);
    auto& res = out[r];
    Stream stream;
    DeviceExperts<T> const experts(gw, placement.local_range(rank));
    ExpertParallel<Experts, Dispatch, Cuda> ep(MoeConfig{.router = router_of(s),
                                                         .mlp = s.mlp,
                                                         .weights = experts.weights(),
                                                         .placement = placement,
                                                         .on_invalid_ids = on_invalid_ids},
                                               comm);
    DeviceBuffer<std::byte> ws(ep.workspace_bytes(max_tokens));
    ws.poison(0x5a);
    std::int64_t const t = in[r].num_tokens(s.mlp.hidden);
    DeviceBuffer<T> x(in[r].x), y(in[r].x.size());
    DeviceBuffer<float> logits(in[r].logits), weights(in[r].weights);
    DeviceBuffer<std::int32_t> ids(in[r].ids);
    for (int rep = 0; rep < 2; ++rep) {
      y.poison(0xff);  // NaN in f32 and bf16: every row must be written
      try {
        MatrixView<T const> xv(x.data(), t, s.mlp.hidden);
        MatrixView<T> yv(y.data(), t, s.mlp.hidden);
        if (s.from_logits)
          ep.forward(stream.ref(), MatrixView<float const>(logits.data(), t, s.num_experts), xv, yv,
                     Workspace(ws.data(), ws.size()));
        else
          ep.forward(stream.ref(), MatrixView<std::int32_t const>(ids.data(), t, s.top_k),
                     MatrixView<float const>(weights.data(), t, s.top_k), xv, yv, Workspace(ws.data(), ws.size()));
        res.status = ep.status(stream.ref());
      } catch (Error const& e) {
        if (e.code() != Errc::kInvalidExpertId) throw;  // anything else fails the test (and aborts the group)
        res.error = e.what();
        res.error_code = e.code();
      }
      EPX_CUDA_CHECK(cudaStreamSynchronize(stream.s));
      (rep == 0 ? res.first : res.second) = y.to_host();
    }
    comm.barrier(stream.ref());  // the group is still healthy after every forward
    EPX_CUDA_CHECK(cudaStreamSynchronize(stream.s));
  });
  return out;
}

template <class T>
bool bitwise_equal(std::vector<T> const& a, std::vector<T> const& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

// Checks every rank's output against the Host oracle on its own tokens.
template <class P, class T>
void check_scenario(int num_ranks, Scenario const& s, std::mt19937_64& rng,
                    InvalidIds on_invalid_ids = InvalidIds::kDropAndCount) {
  using Experts = typename P::Experts;
  using Dispatch = typename P::Dispatch;
  CAPTURE(num_ranks);
  auto const gw = GlobalWeights<T>::random(s.num_experts, s.mlp, s.bias, rng);
  auto const in = make_inputs<Dispatch, T>(num_ranks, s, rng);
  auto const results = run_gpu<Experts, Dispatch, T>(num_ranks, s, gw, in, on_invalid_ids);
  for (int r = 0; r < num_ranks; ++r) {
    CAPTURE(r);
    auto const ur = static_cast<std::size_t>(r);
    auto const& res = results[ur];
    auto const ref = host_reference(s, gw, in[ur]);
    bool const all_zero = std::all_of(ref.y.begin(), ref.y.end(), [](double v) { return v == 0.0; });
    if (all_zero)  // every slot of this rank was -1 (or invalid): exact zeros
      for (auto v : res.first) CHECK(to_float(v) == 0.0f);
    else
      CHECK(test::rel_error(res.first, ref.y) <= tolerance<T>());
    CHECK(bitwise_equal(res.first, res.second));
    if (on_invalid_ids == InvalidIds::kDropAndCount) {
      CHECK(res.error.empty());
      CHECK(res.status.invalid_ids == ref.status.invalid_ids);
      CHECK(res.status.dropped_slots == ref.status.dropped_slots);
      // Counted by the device plan over this rank's tokens (AllGather: every rank's, the same).
      CHECK(res.status.tokens_without_expert == ref.status.tokens_without_expert);
      if (s.routing == Routing::kWithoutExpert && !ref.y.empty()) CHECK(ref.status.tokens_without_expert >= 1);
    }
  }
}

template <class P, class T>
void check_rank_counts(Scenario const& s, std::mt19937_64& rng) {
  for (int num_ranks : {1, 2, 4, 8}) check_scenario<P, T>(num_ranks, s, rng);
}

// A small layer for the error cases (f32: every policy offers it).
struct SmallLayer {
  static constexpr std::int32_t kExperts = 8, kHidden = 16, kTopK = 2;
  ExpertMlpConfig mlp{.hidden = kHidden, .intermediate = 8};
  std::mt19937_64 rng{5};
  GlobalWeights<float> gw = GlobalWeights<float>::random(kExperts, mlp, false, rng);
};

}  // namespace

TEST_CASE_TEMPLATE("ExpertParallel<Cuda>::forward: N ranks equal the Host layer (bf16)", P, EPX_ALL_POLICIES) {
  EPX_TEST_SEEDED_RNG(rng);
  check_rank_counts<P, bfloat16>({.tokens_per_rank = {13, 0, 29, 7}, .bias = true}, rng);
}

TEST_CASE_TEMPLATE("ExpertParallel<Cuda>::forward: N ranks equal the Host layer (fp32)", P, EPX_ALL_POLICIES) {
  EPX_TEST_SEEDED_RNG(rng);
  check_rank_counts<P, float>({.tokens_per_rank = {11, 5, 0, 17}}, rng);
}

TEST_CASE_TEMPLATE("ExpertParallel<Cuda>::forward: uneven placement, a rank without experts", P, EPX_ALL_POLICIES) {
  EPX_TEST_SEEDED_RNG(rng);
  Scenario s{.num_experts = 10, .top_k = 3, .tokens_per_rank = {9, 14, 3, 21}, .experts_per_rank = {6, 0, 1, 3}};
  check_scenario<P, bfloat16>(4, s, rng);
  s.experts_per_rank = {};  // 10 over 4 contiguous: 3, 3, 2, 2
  check_scenario<P, bfloat16>(4, s, rng);
}

TEST_CASE_TEMPLATE("ExpertParallel<Cuda>::forward: one hot expert takes every token", P, EPX_ALL_POLICIES) {
  EPX_TEST_SEEDED_RNG(rng);
  check_rank_counts<P, bfloat16>({.tokens_per_rank = {64, 8}, .routing = Routing::kHotExpert}, rng);
}

TEST_CASE_TEMPLATE("ExpertParallel<Cuda>::forward: zero tokens everywhere still makes every call", P,
                   EPX_ALL_POLICIES) {
  EPX_TEST_SEEDED_RNG(rng);
  check_rank_counts<P, bfloat16>({.tokens_per_rank = {0}}, rng);
}

TEST_CASE_TEMPLATE("ExpertParallel<Cuda>::forward: experts that receive no tokens", P, EPX_ALL_POLICIES) {
  EPX_TEST_SEEDED_RNG(rng);
  check_rank_counts<P, bfloat16>({.num_experts = 64, .top_k = 2, .tokens_per_rank = {2, 1}}, rng);
}

TEST_CASE_TEMPLATE("ExpertParallel<Cuda>::forward: from router logits", P, EPX_ALL_POLICIES) {
  EPX_TEST_SEEDED_RNG(rng);
  check_rank_counts<P, bfloat16>({.num_experts = 32, .top_k = 8, .tokens_per_rank = {20, 3, 12}, .from_logits = true},
                                 rng);
}

TEST_CASE_TEMPLATE("ExpertParallel<Cuda>::forward: invalid ids are dropped and counted", P, EPX_ALL_POLICIES) {
  EPX_TEST_SEEDED_RNG(rng);
  Scenario const s{.tokens_per_rank = {10, 4, 7}, .routing = Routing::kWithInvalid};
  check_scenario<P, bfloat16>(2, s, rng);
  check_scenario<P, bfloat16>(4, s, rng);
}

TEST_CASE_TEMPLATE("ExpertParallel<Cuda>::forward: tokens without expert are counted as the Host layer counts them", P,
                   EPX_ALL_POLICIES) {
  EPX_TEST_SEEDED_RNG(rng);
  Scenario s{.tokens_per_rank = {10, 4, 7, 1}, .routing = Routing::kWithoutExpert};
  check_scenario<P, bfloat16>(1, s, rng);
  check_scenario<P, bfloat16>(4, s, rng);
  s.from_logits = true;  // all-NaN logits: the router gives those tokens all -1
  check_scenario<P, bfloat16>(1, s, rng);
  check_scenario<P, bfloat16>(3, s, rng);
  s = Scenario{.num_experts = 8, .top_k = 1, .tokens_per_rank = {300, 33}, .routing = Routing::kWithoutExpert};
  check_scenario<P, float>(2, s, rng);  // top_k 1: ~10% of the tokens are padding, many warps count some
}

TEST_CASE_TEMPLATE("ExpertParallel<Cuda>::forward: invalid ids throw after the collectives (kThrow)", P,
                   EPX_ALL_POLICIES) {
  using Dispatch = typename P::Dispatch;
  constexpr bool kAllToAll = std::is_same_v<Dispatch, AllToAll>;
  EPX_TEST_SEEDED_RNG(rng);
  Scenario const s{.tokens_per_rank = {6, 9}};
  int const num_ranks = 2;
  auto const gw = GlobalWeights<bfloat16>::random(s.num_experts, s.mlp, false, rng);
  auto in = make_inputs<Dispatch, bfloat16>(num_ranks, s, rng);
  // AllToAll: only rank 1 holds an invalid id. AllGather: every rank holds the same tokens, so all do.
  for (int r = kAllToAll ? 1 : 0; r < num_ranks; ++r) in[static_cast<std::size_t>(r)].ids[3] = 42;
  auto const results = run_gpu<typename P::Experts, Dispatch, bfloat16>(num_ranks, s, gw, in, InvalidIds::kThrow);
  for (int r = 0; r < num_ranks; ++r) {
    CAPTURE(r);
    auto const& res = results[static_cast<std::size_t>(r)];
    bool const had_invalid = !kAllToAll || r == 1;
    if (had_invalid) {
      CHECK(res.error_code == Errc::kInvalidExpertId);
      // Named as the Host layer names it: the rank, its token and the slot (ids[3] with top_k 4).
      std::string const text =
          fmt::format("{}: rank {}: topk_ids held 1 invalid expert id(s) (first: token 0 of rank {}, slot 3: "
                      "topk_ids[0, 3] = 42), expected -1 or an id in [0, 16)",
                      kAllToAll ? "forward" : "status", r, r);
      CHECK(res.error.find(text) != std::string::npos);
    } else {
      CHECK(res.error.empty());
    }
    // Written, the invalid slot contributing nothing: equal to the oracle, which drops it too.
    auto const ref = host_reference(s, gw, in[static_cast<std::size_t>(r)]);
    CHECK(test::rel_error(res.first, ref.y) <= tolerance<bfloat16>());
    CHECK(bitwise_equal(res.first, res.second));
  }
}

TEST_CASE("ExpertParallel<Cuda>: a host-memory communicator is refused, naming it") {
  SmallLayer layer;
  LocalGroup group(1);
  CHECK_THROWS_WITH_AS((ExpertParallel<Grouped, AllToAll, Cuda>(
                           MoeConfig{.router = {.num_experts = SmallLayer::kExperts, .top_k = SmallLayer::kTopK},
                                     .mlp = layer.mlp,
                                     .weights = layer.gw.local(ExpertRange{0, SmallLayer::kExperts})},
                           group.communicator(0))),
                       doctest::Contains("comm.memory_space() = host, expected device"), Error);
}

TEST_CASE("ExpertParallel<Cuda>::forward: a rank with more tokens than another's workspace fails on every rank") {
  SmallLayer layer;
  CudaLocalGroup group(3, {.timeout = std::chrono::seconds(30)});
  std::vector<std::string> errors(3);
  group.run([&](int rank, Communicator& comm) {
    Stream stream;
    auto const placement = ExpertPlacement::contiguous(SmallLayer::kExperts, 3);
    DeviceExperts<float> const experts(layer.gw, placement.local_range(rank));
    ExpertParallel<Grouped, AllToAll, Cuda> ep(
        MoeConfig{.router = {.num_experts = SmallLayer::kExperts, .top_k = SmallLayer::kTopK},
                  .mlp = layer.mlp,
                  .weights = experts.weights()},
        comm);
    std::int64_t const t = rank == 2 ? 40 : 4;  // rank 2 sends more than ranks 0 and 1 sized for
    std::mt19937_64 rng(static_cast<std::uint64_t>(rank));
    DeviceBuffer<float> x(test::random_vector<float>(static_cast<std::size_t>(t * SmallLayer::kHidden), rng));
    DeviceBuffer<float> y(static_cast<std::size_t>(t * SmallLayer::kHidden));
    std::vector<std::int32_t> host_ids(static_cast<std::size_t>(t * 2));
    for (std::size_t i = 0; i < host_ids.size(); ++i)
      host_ids[i] = static_cast<std::int32_t>(i % 2);  // all to rank 0's experts
    DeviceBuffer<std::int32_t> ids(host_ids);
    DeviceBuffer<float> w(std::vector<float>(host_ids.size(), 0.5f));
    DeviceBuffer<std::byte> ws(ep.workspace_bytes(t));
    try {
      ep.forward(stream.ref(), MatrixView<std::int32_t const>(ids.data(), t, 2),
                 MatrixView<float const>(w.data(), t, 2), MatrixView<float const>(x.data(), t, SmallLayer::kHidden),
                 MatrixView<float>(y.data(), t, SmallLayer::kHidden), Workspace(ws.data(), ws.size()));
    } catch (Error const& e) {
      if (e.code() != Errc::kWorkspaceTooSmall) throw;
      errors[static_cast<std::size_t>(rank)] = e.what();
    }
    EPX_CUDA_CHECK(cudaStreamSynchronize(stream.s));
  });
  for (auto const& e : errors) CHECK(e.find("rank 0 would receive 96 rows, expected <= 24") != std::string::npos);
}

TEST_CASE("ExpertParallel<Cuda>::forward: bad shapes, element types and workspace are named") {
  SmallLayer layer;
  CudaLocalGroup group(1);
  Stream stream;
  DeviceExperts<float> const experts(layer.gw, ExpertRange{0, SmallLayer::kExperts});
  ExpertParallel<Grouped, AllGather, Cuda> ep(
      MoeConfig{.router = {.num_experts = SmallLayer::kExperts, .top_k = SmallLayer::kTopK},
                .mlp = layer.mlp,
                .weights = experts.weights()},
      group.communicator(0));
  std::int64_t const t = 6;
  DeviceBuffer<float> x(test::random_vector<float>(static_cast<std::size_t>(t * SmallLayer::kHidden), layer.rng));
  DeviceBuffer<float> y(static_cast<std::size_t>(t * SmallLayer::kHidden));
  DeviceBuffer<std::int32_t> ids(test::random_ids(t, 2, SmallLayer::kExperts, layer.rng));
  DeviceBuffer<float> w(test::random_weights(static_cast<std::size_t>(t * 2), layer.rng));
  DeviceBuffer<std::byte> ws(ep.workspace_bytes(t)), small(ep.workspace_bytes(4));
  auto forward = [&](std::int64_t y_rows, DeviceBuffer<std::byte> const& buffer) {
    ep.forward(stream.ref(), MatrixView<std::int32_t const>(ids.data(), t, 2), MatrixView<float const>(w.data(), t, 2),
               MatrixView<float const>(x.data(), t, SmallLayer::kHidden),
               MatrixView<float>(y.data(), y_rows, SmallLayer::kHidden), Workspace(buffer.data(), buffer.size()));
  };
  CHECK_THROWS_WITH_AS(forward(t - 1, ws), doctest::Contains("forward: y.rows = 5, expected 6"), Error);
  CHECK_THROWS_WITH_AS(forward(t, small), doctest::Contains("num_tokens = 6, expected <= 4"), Error);
  DeviceBuffer<bfloat16> xb(static_cast<std::size_t>(t * SmallLayer::kHidden)), yb(xb.size());
  CHECK_THROWS_WITH_AS(ep.forward(stream.ref(), MatrixView<std::int32_t const>(ids.data(), t, 2),
                                  MatrixView<float const>(w.data(), t, 2),
                                  MatrixView<bfloat16 const>(xb.data(), t, SmallLayer::kHidden),
                                  MatrixView<bfloat16>(yb.data(), t, SmallLayer::kHidden),
                                  Workspace(ws.data(), ws.size())),
                       doctest::Contains("x's element type = bf16, expected the weights' dtype f32"), Error);
  CHECK_THROWS_WITH_AS((void)ep.workspace_bytes(-1), doctest::Contains("max_tokens = -1"), Error);
  // The object still works after refused calls.
  forward(t, ws);
  CHECK(ep.status(stream.ref()).invalid_ids == 0);
}

TEST_CASE("ExpertParallel<Grouped, AllGather, Cuda>::forward: captured in a CUDA graph, replays give the eager result") {
  // The header promises that AllGather with Grouped captures when the communicator's all_reduce_sum
  // does (a 1-rank CudaLocalGroup: yes; NCCL: yes). After one eager warm-up forward (kernel
  // attributes set, the stream's device checked), a captured forward must replay to the eager bits,
  // from router logits and from given top-k alike.
  EPX_TEST_SEEDED_RNG(rng);
  Scenario const s{.num_experts = 32, .top_k = 4, .mlp = {.hidden = 128, .intermediate = 64}, .tokens_per_rank = {77},
                   .bias = true};
  auto const gw = GlobalWeights<bfloat16>::random(s.num_experts, s.mlp, s.bias, rng);
  std::int64_t const t = s.tokens_per_rank[0];
  auto const x_host = test::random_vector<bfloat16>(static_cast<std::size_t>(t * s.mlp.hidden), rng);
  auto const logits_host = test::random_vector<float>(static_cast<std::size_t>(t * s.num_experts), rng);
  auto const ids_host = make_ids(s, t, rng);
  auto const weights_host = test::random_weights(ids_host.size(), rng);
  std::vector<bfloat16> eager[2], replayed[2];
  CudaLocalGroup group(1, {.timeout = std::chrono::seconds(30)});
  group.run([&](int, Communicator& comm) {
    Stream stream;
    DeviceExperts<bfloat16> const experts(gw, ExpertRange{0, s.num_experts});
    ExpertParallel<Grouped, AllGather, Cuda> ep(
        MoeConfig{.router = router_of(s), .mlp = s.mlp, .weights = experts.weights()}, comm);
    DeviceBuffer<std::byte> ws(ep.workspace_bytes(t));
    DeviceBuffer<bfloat16> x(x_host), y(x_host.size());
    DeviceBuffer<float> logits(logits_host), weights(weights_host);
    DeviceBuffer<std::int32_t> ids(ids_host);
    MatrixView<bfloat16 const> const xv(x.data(), t, s.mlp.hidden);
    MatrixView<bfloat16> const yv(y.data(), t, s.mlp.hidden);
    for (int from_logits = 0; from_logits < 2; ++from_logits) {
      auto forward = [&] {
        if (from_logits != 0)
          ep.forward(stream.ref(), MatrixView<float const>(logits.data(), t, s.num_experts), xv, yv,
                     Workspace(ws.data(), ws.size()));
        else
          ep.forward(stream.ref(), MatrixView<std::int32_t const>(ids.data(), t, s.top_k),
                     MatrixView<float const>(weights.data(), t, s.top_k), xv, yv, Workspace(ws.data(), ws.size()));
      };
      y.poison(0xff);
      forward();  // eager warm-up
      stream.sync();
      eager[from_logits] = y.to_host();
      cudaGraph_t graph = nullptr;
      cudaGraphExec_t exec = nullptr;
      EPX_CUDA_CHECK(cudaStreamBeginCapture(stream.s, cudaStreamCaptureModeGlobal));
      forward();
      EPX_CUDA_CHECK(cudaStreamEndCapture(stream.s, &graph));
      EPX_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
      y.poison(0xff);
      for (int replay = 0; replay < 3; ++replay) EPX_CUDA_CHECK(cudaGraphLaunch(exec, stream.s));
      stream.sync();
      replayed[from_logits] = y.to_host();
      EPX_CUDA_CHECK(cudaGraphExecDestroy(exec));
      EPX_CUDA_CHECK(cudaGraphDestroy(graph));
    }
  });
  for (int from_logits = 0; from_logits < 2; ++from_logits) {
    CAPTURE(from_logits);
    CHECK(bitwise_equal(replayed[from_logits], eager[from_logits]));
  }
  // And the eager result is the layer's (from given top-k: the Host oracle on the same routing).
  RankInputs<bfloat16> in{.x = x_host, .ids = ids_host, .weights = weights_host};
  CHECK(test::rel_error(eager[0], host_reference(s, gw, in).y) <= tolerance<bfloat16>());
}
