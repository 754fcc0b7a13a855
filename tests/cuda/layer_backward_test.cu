// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// ExpertParallel<Grouped, AllToAll | AllGather, Cuda>: the training forward (SavedState) and the
// backward over the ranks of a CudaLocalGroup, against the Host layer on the same inputs and
// placement (the Host layer's backward is checked against finite differences and the chained
// stages in tests/host/layer_backward_test.cpp). Uneven placement, a rank without experts, a rank
// without tokens; every scoring mode family and activation; bf16 and fp32; from logits and from
// given routing; gradients poisoned before, a second backward bitwise equal; AllToAll with its
// memory sized by the tightest received_rows_factor; GEMM 1's output kept by the forward
// (save_gate_up_output); the errors of a backward with no forward behind it.

#include "layer_backward_cases.cuh"

using namespace epx;
using test::backward::cases;
using test::backward::check_case;

TEST_CASE_TEMPLATE("ExpertParallel<Grouped, AllToAll, Cuda>::backward equals the Host layer's", T, bfloat16, float) {
  EPX_TEST_SEEDED_RNG(rng);
  auto const all = cases();
  for (std::size_t i = 0; i < all.size(); ++i) {
    CAPTURE(i);
    check_case<Grouped, AllToAll, T>(all[i], rng);
  }
}

TEST_CASE_TEMPLATE("ExpertParallel<Grouped, AllGather, Cuda>::backward equals the Host layer's", T, bfloat16, float) {
  EPX_TEST_SEEDED_RNG(rng);
  auto const all = cases();
  for (std::size_t i = 0; i < all.size(); ++i) {
    CAPTURE(i);
    check_case<Grouped, AllGather, T>(all[i], rng);
  }
}

TEST_CASE(
    "ExpertParallel<Grouped, AllToAll, Cuda>::backward sized by the tightest received_rows_factor equals the "
    "Host layer's") {
  EPX_TEST_SEEDED_RNG(rng);
  auto const all = cases();
  for (std::size_t i = 0; i < all.size(); ++i) {
    if (all[i].experts_per_rank.size() < 2) continue;  // one rank receives only its own rows
    CAPTURE(i);
    auto c = all[i];
    c.tight_received_rows = true;
    check_case<Grouped, AllToAll, bfloat16>(c, rng);
  }
}

TEST_CASE_TEMPLATE(
    "ExpertParallel<Grouped, AllToAll | AllGather, Cuda>::backward from the h its forward kept "
    "(save_gate_up_output) equals the Host layer's",
    T, bfloat16, float) {
  EPX_TEST_SEEDED_RNG(rng);
  auto const all = cases();
  for (std::size_t i = 0; i < all.size(); i += 2) {
    CAPTURE(i);
    auto c = all[i];
    c.save_gate_up_output = true;
    check_case<Grouped, AllToAll, T>(c, rng);
    check_case<Grouped, AllGather, T>(c, rng);
  }
}

TEST_CASE("ExpertParallel<Grouped, AllToAll, Cuda>::backward without a forward behind it is an Error") {
  EPX_TEST_SEEDED_RNG(rng);
  ExpertMlpConfig const mlp{.hidden = 64, .intermediate = 48};
  RouterConfig const router{.num_experts = 8, .top_k = 2};
  auto const gw = test::GlobalWeights<bfloat16>::random(8, mlp, false, rng);
  CudaLocalGroup group(1);
  group.run([&](int, Communicator& comm) {
    test::CudaStream stream;
    test::DeviceExperts<bfloat16> const experts(gw, {0, 8});
    ExpertParallel<Grouped, AllToAll, Cuda> ep(MoeConfig{.router = router, .mlp = mlp, .weights = experts.weights()},
                                               comm);
    std::int64_t const t = 5;
    test::DeviceBuffer<std::byte> saved(ep.saved_bytes(t)), bws(ep.backward_workspace_bytes(t));
    test::DeviceBuffer<float> logits(test::random_vector<float>(t * 8, rng)), dy(t * 64), dx(t * 64), dl(t * 8);
    test::DeviceBuffer<float> g1(8 * 96 * 64), g2(8 * 64 * 48);
    saved.poison(0);  // never written by a forward
    ExpertWeightGrads<float> const grads{.gate_up = {g1.data(), 8, 96, 64}, .down = {g2.data(), 8, 64, 48}};
    CHECK_THROWS_WITH_AS(ep.backward(stream.ref(), MatrixView<float const>(logits.data(), t, 8),
                                     MatrixView<float const>(dy.data(), t, 64), MatrixView<float>(dx.data(), t, 64),
                                     MatrixView<float>(dl.data(), t, 8), grads, SavedState(saved.data(), saved.size()),
                                     Workspace(bws.data(), bws.size())),
                         doctest::Contains("saved holds no completed forward"), Error);
  });
}
