// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
//
// A scaled-down Qwen3-MoE layer (64 experts, top-8, softmax router with renormalisation, SwiGLU
// experts) split over 4 expert-parallel ranks of a LocalGroup, run with both dispatch policies
// and checked against the dense single-rank layer computed by a plain loop. Prints one row per
// run: policy, ranks, element type, max relative error, time per forward.
//
// This build runs the Host backend (reference loops on the CPU); the times are CPU times.

#include <epx/epx.hpp>

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

namespace {

constexpr int kExperts = 64, kTopK = 8, kHidden = 256, kIntermediate = 96, kRanks = 4, kTokensPerRank = 48;

template <class T>
std::vector<T> random_values(std::size_t n, float scale, std::mt19937_64& rng) {
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<T> v(n);
  for (auto& x : v) x = epx::from_float<T>(dist(rng));
  return v;
}

// The layer as one would write it without epx: every token through its experts, in double.
template <class T>
std::vector<double> dense_layer(std::vector<T> const& x, std::vector<std::int32_t> const& ids,
                                std::vector<float> const& weights, std::vector<T> const& gate_up,
                                std::vector<T> const& down, std::size_t num_tokens) {
  std::vector<double> y(num_tokens * kHidden, 0.0), h(2 * kIntermediate), act(kIntermediate);
  for (std::size_t t = 0; t < num_tokens; ++t)
    for (std::size_t j = 0; j < kTopK; ++j) {
      int const e = ids[t * kTopK + j];
      if (e < 0) continue;
      for (std::size_t n = 0; n < 2 * kIntermediate; ++n) {
        double acc = 0;
        for (std::size_t k = 0; k < kHidden; ++k)
          acc += double(epx::to_float(x[t * kHidden + k])) * epx::to_float(gate_up[(e * 2 * kIntermediate + n) * kHidden + k]);
        h[n] = acc;
      }
      for (std::size_t i = 0; i < kIntermediate; ++i)
        act[i] = h[i] / (1.0 + std::exp(-h[i])) * h[kIntermediate + i];  // silu(gate) * up
      for (std::size_t n = 0; n < kHidden; ++n) {
        double acc = 0;
        for (std::size_t i = 0; i < kIntermediate; ++i)
          acc += act[i] * epx::to_float(down[(e * kHidden + n) * kIntermediate + i]);
        y[t * kHidden + n] += weights[t * kTopK + j] * acc;
      }
    }
  return y;
}

struct Row {
  char const* policy;
  char const* dtype;
  double max_rel_error;
  double ms_per_forward;
};

template <class Dispatch, class T>
Row run(char const* policy, char const* dtype, std::mt19937_64& rng) {
  constexpr bool kAllToAll = std::is_same_v<Dispatch, epx::AllToAll>;
  // The whole layer's weights; each rank hands epx only its own experts' slice.
  auto const gate_up = random_values<T>(std::size_t{kExperts} * 2 * kIntermediate * kHidden, 0.0625f, rng);
  auto const down = random_values<T>(std::size_t{kExperts} * kHidden * kIntermediate, 0.1f, rng);
  epx::RouterConfig const router{.num_experts = kExperts, .top_k = kTopK, .renormalize = true};
  auto const placement = epx::ExpertPlacement::contiguous(kExperts, kRanks);

  // AllToAll: each rank brings its own tokens. AllGather: every rank holds the same tokens.
  std::size_t const tokens = kAllToAll ? kTokensPerRank : kTokensPerRank * kRanks;
  std::vector<std::vector<T>> x(kRanks), y(kRanks);
  std::vector<std::vector<float>> logits(kRanks);
  for (int r = 0; r < kRanks; ++r) {
    x[r] = (kAllToAll || r == 0) ? random_values<T>(tokens * kHidden, 1.0f, rng) : x[0];
    logits[r] = (kAllToAll || r == 0) ? random_values<float>(tokens * kExperts, 1.0f, rng) : logits[0];
    y[r].resize(tokens * kHidden);
  }

  std::vector<double> ms(kRanks);
  epx::LocalGroup group(kRanks);
  group.run([&](int rank, epx::Communicator& comm) {
    auto const local = placement.local_range(rank);
    std::size_t const gu = std::size_t{2} * kIntermediate * kHidden, dn = std::size_t{kHidden} * kIntermediate;
    epx::ExpertParallel<epx::Grouped, Dispatch, epx::Host> moe(
        {.router = router,
         .mlp = {.hidden = kHidden, .intermediate = kIntermediate, .activation = epx::Activation::kSwiGLU},
         .weights = epx::expert_weights(local.count, gate_up.data() + local.first * gu, down.data() + local.first * dn),
         .placement = placement},
        comm);
    std::vector<std::byte> workspace(moe.workspace_bytes(static_cast<std::int64_t>(tokens)));
    auto forward = [&] {
      return moe.forward(epx::MatrixView<float const>(logits[rank].data(), tokens, kExperts),
                         epx::MatrixView<T const>(x[rank].data(), tokens, kHidden),
                         epx::MatrixView<T>(y[rank].data(), tokens, kHidden), {workspace.data(), workspace.size()});
    };
    (void)forward();  // warm-up
    std::vector<double> times;
    for (int rep = 0; rep < 3; ++rep) {
      auto const start = std::chrono::steady_clock::now();
      (void)forward();
      times.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
    }
    std::sort(times.begin(), times.end());
    ms[rank] = times[1];
  });

  // Check every rank against the dense layer on its tokens, routed the same way.
  double max_rel = 0.0;
  for (int r = 0; r < kRanks; ++r) {
    std::vector<std::int32_t> ids(tokens * kTopK);
    std::vector<float> weights(ids.size());
    epx::route(epx::Host{}, router, epx::MatrixView<float const>(logits[r].data(), tokens, kExperts), {},
               epx::MatrixView<std::int32_t>(ids.data(), tokens, kTopK), epx::MatrixView<float>(weights.data(), tokens, kTopK));
    auto const want = dense_layer(x[r], ids, weights, gate_up, down, tokens);
    double diff = 0, ref = 0;
    for (std::size_t i = 0; i < want.size(); ++i) {
      diff = std::max(diff, std::abs(epx::to_float(y[r][i]) - want[i]));
      ref = std::max(ref, std::abs(want[i]));
    }
    max_rel = std::max(max_rel, diff / ref);
  }
  return {policy, dtype, max_rel, *std::max_element(ms.begin(), ms.end())};
}

}  // namespace

int main() {
  std::mt19937_64 rng(2026);
  std::vector<Row> rows;
  rows.push_back(run<epx::AllToAll, float>("AllToAll", "f32", rng));
  rows.push_back(run<epx::AllGather, float>("AllGather", "f32", rng));
  rows.push_back(run<epx::AllToAll, epx::bfloat16>("AllToAll", "bf16", rng));
  rows.push_back(run<epx::AllGather, epx::bfloat16>("AllGather", "bf16", rng));

  fmt::print("epx {}.{}.{} demo: Qwen3-style MoE layer, {} experts, top-{}, hidden {}, intermediate {}, "
             "Host backend (CPU)\n\n", EPX_VERSION_MAJOR, EPX_VERSION_MINOR, EPX_VERSION_PATCH, kExperts, kTopK,
             kHidden, kIntermediate);
  fmt::print("| policy    | ranks | dtype | tokens/rank | max rel. error | ms / forward (CPU) |\n");
  fmt::print("|-----------|-------|-------|-------------|----------------|--------------------|\n");
  bool ok = true;
  for (auto const& r : rows) {
    bool const exact = std::string_view(r.dtype) == "f32";
    bool const pass = r.max_rel_error <= (exact ? 1e-5 : 1e-2);
    ok = ok && pass;
    int const tokens = std::string_view(r.policy) == "AllToAll" ? kTokensPerRank : kTokensPerRank * kRanks;
    fmt::print("| {:<9} | {:>5} | {:<5} | {:>11} | {:>14.2e} | {:>18.2f} |{}\n", r.policy, kRanks, r.dtype, tokens,
               r.max_rel_error, r.ms_per_forward, pass ? "" : "  <- above tolerance");
  }
  fmt::print("\n{}\n", ok ? "all runs match the dense layer" : "MISMATCH against the dense layer");
  return ok ? 0 : 1;
}
