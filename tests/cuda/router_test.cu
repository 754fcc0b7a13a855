// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// route on the GPU against the Host twin. Ids must be equal, except at a near-tie: where the two
// experts' selection scores agree to 1e-5 (device expf and reduction order differ from the host's
// in the last bits), and such tokens must be rare. Weights agree to fp32 rounding; the per-expert
// counts equal a count of the device's own ids.

#include "../common/test_util.hpp"
#include "device_buffer.cuh"

#include <epx/cuda.cuh>

using namespace epx;
using test::DeviceBuffer;

namespace {

// The selection score of every expert of one token (score + bias), as the host computes it.
std::vector<float> selection_scores(RouterConfig const& c, float const* logits, std::vector<float> const& bias) {
  auto const e_count = static_cast<std::size_t>(c.num_experts);
  std::vector<float> score(e_count);
  float m = -INFINITY, s = 0.0f;
  for (std::size_t e = 0; e < e_count; ++e) m = std::max(m, logits[e]);
  for (std::size_t e = 0; e < e_count; ++e) s += std::exp(logits[e] - m);
  for (std::size_t e = 0; e < e_count; ++e) {
    float const l = logits[e];
    score[e] = c.scoring == Scoring::kSoftmaxTopK ? std::exp(l - m) / s
               : c.scoring == Scoring::kSigmoidTopK ? 1.0f / (1.0f + std::exp(-l)) : l;
    if (!bias.empty()) score[e] += bias[e];
  }
  return score;
}

template <class L>
void check_route(RouterConfig const& c, std::int64_t t, bool with_bias, std::mt19937_64& rng) {
  CAPTURE(c.num_experts);
  CAPTURE(c.top_k);
  CAPTURE(t);
  CAPTURE(to_string(c.scoring));
  auto const logits = test::random_vector<L>(static_cast<std::size_t>(t * c.num_experts), rng, 2.0f);
  auto const bias = with_bias ? test::random_vector<float>(static_cast<std::size_t>(c.num_experts), rng, 0.3f)
                              : std::vector<float>{};
  std::vector<std::int32_t> host_ids(static_cast<std::size_t>(t * c.top_k));
  std::vector<float> host_w(host_ids.size());
  route(Host{}, c, MatrixView<L const>(logits.data(), t, c.num_experts), bias,
        MatrixView<std::int32_t>(host_ids.data(), t, c.top_k), MatrixView<float>(host_w.data(), t, c.top_k));

  cudaStream_t stream = nullptr;
  EPX_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  DeviceBuffer<L> d_logits(logits);
  DeviceBuffer<float> d_bias(bias);
  DeviceBuffer<std::int32_t> d_ids(host_ids.size()), d_counts(static_cast<std::size_t>(c.num_experts));
  DeviceBuffer<float> d_w(host_w.size());
  d_ids.poison(0x7f);
  d_w.poison(0x7f);
  d_counts.poison(0);
  route(StreamRef(stream), c, MatrixView<L const>(d_logits.data(), t, c.num_experts),
        std::span<float const>(d_bias.data(), bias.size()), MatrixView<std::int32_t>(d_ids.data(), t, c.top_k),
        MatrixView<float>(d_w.data(), t, c.top_k), d_counts.data());
  EPX_CUDA_CHECK(cudaStreamSynchronize(stream));
  EPX_CUDA_CHECK(cudaStreamDestroy(stream));
  auto const ids = d_ids.to_host();
  auto const w = d_w.to_host();
  auto const counts = d_counts.to_host();

  std::int64_t near_ties = 0;
  std::vector<std::int32_t> own_counts(static_cast<std::size_t>(c.num_experts), 0);
  for (std::int64_t tok = 0; tok < t; ++tok) {
    auto const k = static_cast<std::size_t>(c.top_k);
    auto const row = static_cast<std::size_t>(tok) * k;
    for (std::size_t j = 0; j < k; ++j)
      if (ids[row + j] >= 0) ++own_counts[static_cast<std::size_t>(ids[row + j])];
    if (std::equal(ids.begin() + static_cast<std::ptrdiff_t>(row), ids.begin() + static_cast<std::ptrdiff_t>(row + k),
                   host_ids.begin() + static_cast<std::ptrdiff_t>(row))) {
      for (std::size_t j = 0; j < k; ++j)
        REQUIRE_MESSAGE(std::abs(w[row + j] - host_w[row + j]) <= 1e-5f * std::max(1.0f, std::abs(host_w[row + j])),
                        "token " << tok << " slot " << j);
      continue;
    }
    // A different choice is only acceptable at a near-tie of the selection scores.
    std::vector<float> f(static_cast<std::size_t>(c.num_experts));
    for (std::size_t e = 0; e < f.size(); ++e) f[e] = to_float(logits[static_cast<std::size_t>(tok) * f.size() + e]);
    auto const sel = selection_scores(c, f.data(), bias);
    std::size_t j = 0;
    while (ids[row + j] == host_ids[row + j]) ++j;
    float const a = sel[static_cast<std::size_t>(host_ids[row + j])], b = sel[static_cast<std::size_t>(std::max(0, ids[row + j]))];
    INFO("token " << tok << " slot " << j << ": host " << host_ids[row + j] << " (" << a << "), device "
                  << ids[row + j] << " (" << b << ")");
    CHECK(std::abs(a - b) <= 1e-5f * std::max(std::abs(a), 1e-30f));
    ++near_ties;
  }
  CHECK(near_ties <= std::max<std::int64_t>(1, t / 1000));
  CHECK(counts == own_counts);
}

}  // namespace

TEST_CASE("Router::route[cuda]: softmax, top-k softmax and sigmoid match the host") {
  EPX_TEST_SEEDED_RNG(rng);
  for (std::int32_t e : {8, 128, 256, 384})
    for (std::int32_t k : {1, 2, 4, 8})
      for (std::int64_t t : {1, 7, 128, 4096})
        for (auto scoring : {Scoring::kSoftmaxTopK, Scoring::kTopKSoftmax, Scoring::kSigmoidTopK}) {
          if (k > e) continue;
          check_route<float>({.num_experts = e, .top_k = k, .scoring = scoring, .renormalize = true}, t, false, rng);
        }
  check_route<bfloat16>({.num_experts = 128, .top_k = 8, .renormalize = true}, 16384, false, rng);
  check_route<float>({.num_experts = 512, .top_k = 16, .scoring = Scoring::kSigmoidTopK}, 1000, true, rng);
}

TEST_CASE("Router::route[cuda]: the DeepSeek-V3 grouped configuration matches the host") {
  EPX_TEST_SEEDED_RNG(rng);
  RouterConfig const c{.num_experts = 256, .top_k = 8, .scoring = Scoring::kSigmoidTopK, .renormalize = true,
                       .num_groups = 8, .topk_groups = 4, .routed_scaling_factor = 2.5f};
  for (std::int64_t t : {1, 128, 4096, 16384}) check_route<bfloat16>(c, t, true, rng);
}

TEST_CASE("Router::route[cuda]: more than 512 experts is refused") {
  std::vector<float> logits(600);
  std::vector<std::int32_t> ids(2);
  std::vector<float> w(2);
  auto* fake = reinterpret_cast<CUstream_st*>(std::uintptr_t{0x2});
  CHECK_THROWS_WITH_AS(route(StreamRef(fake), RouterConfig{.num_experts = 600, .top_k = 2},
                             MatrixView<float const>(logits.data(), 1, 600), {}, MatrixView<std::int32_t>(ids.data(), 1, 2),
                             MatrixView<float>(w.data(), 1, 2)),
                       doctest::Contains("num_experts = 600, expected <= 512 on CUDA"), Error);
}
