// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// What a downstream project writes: a 2-rank LocalGroup runs the Host MoE layer with caller-given
// routing, and the result is checked against the layer computed directly, in plain loops.
// Shared by the add_subdirectory, fetch_content and find_package consumer projects.

#include <epx/epx.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

namespace {

constexpr std::int32_t kRanks = 2, kExperts = 8, kTopK = 2, kHidden = 16, kInter = 8, kTokens = 5;

// Expert e on one token, directly: SwiGLU over the concatenated [gate; up] rows, then down.
std::vector<float> expert_direct(std::vector<float> const& gate_up, std::vector<float> const& down, int e,
                                 float const* x) {
  std::vector<float> h(2 * kInter, 0.0f), y(kHidden, 0.0f);
  for (int n = 0; n < 2 * kInter; ++n)
    for (int k = 0; k < kHidden; ++k) h[n] += x[k] * gate_up[(std::size_t(e) * 2 * kInter + n) * kHidden + k];
  for (int c = 0; c < kHidden; ++c)
    for (int i = 0; i < kInter; ++i) {
      float const gate = h[i], up = h[kInter + i];
      float const act = gate / (1.0f + std::exp(-gate)) * up;
      y[c] += act * down[(std::size_t(e) * kHidden + c) * kInter + i];
    }
  return y;
}

}  // namespace

int main() {
  std::mt19937 rng(2026);
  std::normal_distribution<float> normal(0.0f, 0.5f);
  auto random = [&](std::size_t n) {
    std::vector<float> v(n);
    for (auto& x : v) x = normal(rng);
    return v;
  };
  // All experts' weights, K-major: gate_up [E, 2I, H], down [E, H, I]; rank r holds its slice.
  auto const gate_up = random(std::size_t{kExperts} * 2 * kInter * kHidden);
  auto const down = random(std::size_t{kExperts} * kHidden * kInter);
  // Per rank: tokens, and routing given by the caller (distinct experts, spread over both ranks).
  std::vector<std::vector<float>> x(kRanks), y(kRanks), topk_weights(kRanks);
  std::vector<std::vector<std::int32_t>> topk_ids(kRanks);
  for (int r = 0; r < kRanks; ++r) {
    x[r] = random(std::size_t{kTokens} * kHidden);
    y[r].assign(std::size_t{kTokens} * kHidden, 0.0f);
    for (int t = 0; t < kTokens; ++t) {
      std::int32_t const first = (3 * t + r) % kExperts;
      topk_ids[r].insert(topk_ids[r].end(), {first, (first + 5) % kExperts});
      topk_weights[r].insert(topk_weights[r].end(), {0.75f, 0.25f});
    }
  }

  epx::LocalGroup group(kRanks);
  group.run([&](int rank, epx::Communicator& comm) {
    auto const placement = epx::ExpertPlacement::contiguous(kExperts, kRanks);
    auto const local = placement.local_range(rank);
    auto const first = static_cast<std::size_t>(local.first);
    epx::MoeConfig const config{
        .router = {.num_experts = kExperts, .top_k = kTopK},
        .mlp = {.hidden = kHidden, .intermediate = kInter},
        .weights = epx::expert_weights(
            epx::TensorView(gate_up.data() + first * 2 * kInter * kHidden, {local.count, 2 * kInter, kHidden}),
            epx::TensorView(down.data() + first * kHidden * kInter, {local.count, kHidden, kInter})),
        .placement = placement};
    epx::ExpertParallel<epx::Grouped, epx::AllToAll, epx::Host> layer(config, comm);
    std::vector<std::byte> workspace(layer.workspace_bytes(kTokens));
    auto const r = static_cast<std::size_t>(rank);
    layer.forward<float>(epx::Host{}, epx::MatrixView<std::int32_t const>(topk_ids[r].data(), kTokens, kTopK),
                         epx::MatrixView<float const>(topk_weights[r].data(), kTokens, kTopK),
                         epx::MatrixView<float const>(x[r].data(), kTokens, kHidden),
                         epx::MatrixView<float>(y[r].data(), kTokens, kHidden), {workspace.data(), workspace.size()});
  });

  // Every token of every rank against the direct computation.
  float max_diff = 0.0f, max_ref = 0.0f;
  for (std::size_t r = 0; r < kRanks; ++r)
    for (std::size_t t = 0; t < kTokens; ++t) {
      std::vector<float> expected(kHidden, 0.0f);
      for (std::size_t j = 0; j < kTopK; ++j) {
        auto const out = expert_direct(gate_up, down, topk_ids[r][t * kTopK + j], x[r].data() + t * kHidden);
        for (int c = 0; c < kHidden; ++c) expected[c] += topk_weights[r][t * kTopK + j] * out[c];
      }
      for (std::size_t c = 0; c < kHidden; ++c) {
        max_diff = std::max(max_diff, std::abs(y[r][t * kHidden + c] - expected[c]));
        max_ref = std::max(max_ref, std::abs(expected[c]));
      }
    }
  bool const ok = max_ref > 0.0f && max_diff <= 1e-4f * max_ref;
  std::printf("epx %d.%d.%d consumer: %d ranks x %d tokens, max |y - direct| = %.3g (max |direct| = %.3g): %s\n",
              EPX_VERSION_MAJOR, EPX_VERSION_MINOR, EPX_VERSION_PATCH, kRanks, kTokens, double(max_diff),
              double(max_ref), ok ? "OK" : "MISMATCH");
  return ok ? 0 : 1;
}
