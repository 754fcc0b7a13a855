// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// docs/first-layer.md walks through this program; the test example.first_layer_snippet keeps the
// page's code block equal to the lines between the markers below.
// example-begin first-layer
#include <epx/epx.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <numeric>
#include <random>
#include <vector>

// Qwen3-30B-A3B's MoE layer: 128 experts, top-8, softmax over all experts then renormalised over
// the 8 chosen, SwiGLU experts. Its hidden size (2048) and expert width (768) are divided by 8 so
// that the weights take 38 MB instead of 2.4 GB and the program runs in well under a second.
constexpr int kExperts = 128, kTopK = 8, kHidden = 2048 / 8, kInter = 768 / 8;
constexpr int kRanks = 2, kTokensPerRank = 32;

// Uniform in [-bound, bound), made from the generator's bits so that every platform draws the same.
std::vector<float> uniform(std::size_t n, float bound, std::mt19937_64& rng) {
  std::vector<float> v(n);
  for (auto& x : v) x = bound * (static_cast<float>(rng() >> 40) * 0x1p-23f - 1.0f);
  return v;
}

template <class A>
double dot(A const* a, float const* b, int n) {
  double sum = 0.0;
  for (int i = 0; i < n; ++i) sum += double(a[i]) * double(b[i]);
  return sum;
}

// The same layer as plain loops in double precision over all experts' weights: logits = x · routerᵀ,
// softmax, the 8 largest (ties to the lower id), weights renormalised, SwiGLU, weighted sum.
std::vector<double> reference_layer(std::vector<float> const& x, std::vector<float> const& router,
                                    std::vector<float> const& gate_up, std::vector<float> const& down) {
  std::vector<double> y(x.size(), 0.0), prob(kExperts), act(kInter);
  std::vector<int> order(kExperts);
  for (std::size_t t = 0; t < x.size() / kHidden; ++t) {
    float const* xt = &x[t * kHidden];
    double sum = 0.0;
    for (int e = 0; e < kExperts; ++e) sum += prob[e] = std::exp(dot(xt, &router[e * kHidden], kHidden));
    for (auto& p : prob) p /= sum;
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return prob[a] > prob[b]; });
    double chosen = 0.0;
    for (int j = 0; j < kTopK; ++j) chosen += prob[order[j]];
    for (int j = 0; j < kTopK; ++j) {
      std::size_t const e = order[j];
      for (std::size_t i = 0; i < kInter; ++i) {
        double const gate = dot(xt, &gate_up[(e * 2 * kInter + i) * kHidden], kHidden);
        double const up = dot(xt, &gate_up[(e * 2 * kInter + kInter + i) * kHidden], kHidden);
        act[i] = gate / (1.0 + std::exp(-gate)) * up;
      }
      for (std::size_t n = 0; n < kHidden; ++n)
        y[t * kHidden + n] += prob[e] / chosen * dot(act.data(), &down[(e * kHidden + n) * kInter], kInter);
    }
  }
  return y;
}

int main() {
  std::mt19937_64 rng(2026);
  // The layer's weights as a checkpoint holds them, for all experts; bounds as torch's nn.Linear
  // initialises them (±1/sqrt(fan_in)). fp32 here; bf16 and fp16 work the same way.
  auto const router = uniform(kExperts * kHidden, 1.0f / std::sqrt(float(kHidden)), rng);  // mlp.gate.weight [E, H]
  auto const gate_up = uniform(std::size_t{kExperts} * 2 * kInter * kHidden,  // gate_proj then up_proj: [E, 2I, H]
                               1.0f / std::sqrt(float(kHidden)), rng);
  auto const down =
      uniform(std::size_t{kExperts} * kHidden * kInter, 1.0f / std::sqrt(float(kInter)), rng);  // [E, H, I]
  std::vector<std::vector<float>> x(kRanks), y(kRanks);  // each rank's own tokens (AllToAll)
  for (int r = 0; r < kRanks; ++r) {
    x[r] = uniform(kTokensPerRank * kHidden, 1.0f, rng);
    y[r].assign(x[r].size(), NAN);  // a row epx did not write would show up as an error below
  }

  // Two expert-parallel ranks, threads of this process (on GPUs: one NcclCommunicator per rank).
  epx::ExpertPlacement const placement = epx::ExpertPlacement::contiguous(kExperts, kRanks);
  epx::LocalGroup group(kRanks);
  group.run([&](int rank, epx::Communicator& comm) {
    epx::ExpertRange const mine = placement.local_range(rank);  // experts [first, first + count)
    std::size_t const gate_up_size = 2 * kInter * kHidden, down_size = kHidden * kInter;  // one expert's
    epx::ExpertParallel<epx::Grouped, epx::AllToAll, epx::Host> moe(
        {.router =
             {.num_experts = kExperts, .top_k = kTopK, .scoring = epx::Scoring::kSoftmaxTopK, .renormalize = true},
         .mlp = {.hidden = kHidden,
                 .intermediate = kInter,
                 .activation = epx::Activation::kSwiGLU,
                 .gate_up_layout = epx::GateUpLayout::kConcatenated},
         .weights = epx::expert_weights(  // this rank's experts only; shapes checked by the layer
             epx::TensorView(gate_up.data() + mine.first * gate_up_size, {mine.count, 2 * kInter, kHidden}),
             epx::TensorView(down.data() + mine.first * down_size, {mine.count, kHidden, kInter})),
         .placement = placement},
        comm);

    // The router's projection is the caller's: logits = x · routerᵀ, here epx's grouped GEMM with
    // one group that holds every row.
    std::vector<float> logits(kTokensPerRank * kExperts);
    std::int32_t const one_group[] = {0, kTokensPerRank};
    epx::grouped_gemm(epx::Host{}, epx::MatrixView(x[rank].data(), kTokensPerRank, kHidden),
                      epx::BatchedMatrixView<float const>{router.data(), 1, kExperts, kHidden}, nullptr, one_group,
                      epx::MatrixView(logits.data(), kTokensPerRank, kExperts));

    // Route, sort rows by expert, send them to their experts' ranks, run the experts, bring the
    // rows back and sum each token's 8 weighted outputs.
    std::vector<std::byte> workspace(moe.workspace_bytes(kTokensPerRank));  // size once, reuse
    moe.forward(epx::Host{}, epx::MatrixView(logits.data(), kTokensPerRank, kExperts),
                epx::MatrixView(x[rank].data(), kTokensPerRank, kHidden),
                epx::MatrixView(y[rank].data(), kTokensPerRank, kHidden), {workspace.data(), workspace.size()});
    epx::Status const status = moe.status(epx::Host{});  // the routing counters of that forward
    std::printf("rank %d: experts %d to %d, busiest of them computed %u rows\n", rank, mine.first, mine.end() - 1,
                status.max_tokens_per_expert);
  });

  double max_diff = 0.0, max_ref = 0.0;  // max-norm relative error over both ranks' tokens
  for (int r = 0; r < kRanks; ++r) {
    std::vector<double> const want = reference_layer(x[r], router, gate_up, down);
    for (std::size_t i = 0; i < want.size(); ++i) {
      double const diff = std::abs(y[r][i] - want[i]);
      if (!(diff <= max_diff)) max_diff = diff;  // a NaN counts as the largest error
      max_ref = std::max(max_ref, std::abs(want[i]));
    }
  }
  double const error = max_diff / max_ref;
  std::printf("max relative error against the double-precision loop: %.1e (fp32; at most 1e-5 expected)\n", error);
  return error <= 1e-5 ? 0 : 1;
}
// example-end first-layer
