// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// ExpertParallel<Grouped | CublasGrouped, AllToAll | AllGather, Cuda> over the ranks of a
// CudaLocalGroup on one GPU: the scenarios every execution space runs
// (../common/expert_parallel_cases.hpp, here on the Cuda backend: against the dense reference and
// the Host layer, same bits on a second run, outputs poisoned, random inputs, the seed printed on
// failure), then what only the Cuda layer has: its communicator check and CUDA-graph capture.

#include "cuda_backend.cuh"

#include "../common/expert_parallel_scenarios.hpp"

#include <chrono>
#include <cstring>
#include <string>

namespace epx::test {
using CudaGroupedAllToAll = EpPolicy<CudaBackend, Grouped, AllToAll>;
using CudaGroupedAllGather = EpPolicy<CudaBackend, Grouped, AllGather>;
using CudaCublasAllToAll = EpPolicy<CudaBackend, CublasGrouped, AllToAll>;
using CudaCublasAllGather = EpPolicy<CudaBackend, CublasGrouped, AllGather>;
}  // namespace epx::test

TYPE_TO_STRING_AS("Grouped, AllToAll", epx::test::CudaGroupedAllToAll);
TYPE_TO_STRING_AS("Grouped, AllGather", epx::test::CudaGroupedAllGather);
TYPE_TO_STRING_AS("CublasGrouped, AllToAll", epx::test::CudaCublasAllToAll);
TYPE_TO_STRING_AS("CublasGrouped, AllGather", epx::test::CudaCublasAllGather);

#define EPX_EP_POLICIES                                                                           \
  epx::test::CudaGroupedAllToAll, epx::test::CudaGroupedAllGather, epx::test::CudaCublasAllToAll, \
      epx::test::CudaCublasAllGather
#define EPX_EP_ALL_TO_ALL_POLICIES epx::test::CudaGroupedAllToAll, epx::test::CudaCublasAllToAll
#include "../common/expert_parallel_cases.hpp"

using namespace epx;
using test::DeviceBuffer;
using test::DeviceExperts;
using test::GlobalWeights;
using test::SmallLayer;
using Stream = test::CudaStream;

TEST_CASE("ExpertParallel<Cuda>: a host-memory communicator is refused, naming it") {
  SmallLayer layer;
  LocalGroup group(1);
  CHECK_THROWS_WITH_AS((ExpertParallel<Grouped, AllToAll, Cuda>(
                           layer.config(layer.gw.local(ExpertRange{0, SmallLayer::kExperts})), group.communicator(0))),
                       doctest::Contains("comm.memory_space() = host, expected device"), Error);
  // can_implement says the same without building the layer, and names the tensor-core kernel's widths.
  auto const why = ExpertParallel<Grouped, AllGather, Cuda>::can_implement(
      layer.config(layer.gw.local(ExpertRange{0, SmallLayer::kExperts})), group.communicator(0));
  REQUIRE(why.has_value());
  CHECK(std::string(why->what()).find("comm.memory_space() = host, expected device") != std::string::npos);
  CudaLocalGroup device_group(1);
  std::vector<bfloat16> const unread(1);  // the checks refuse the layer before any weight is read
  auto odd = layer.config(expert_weights<bfloat16>(SmallLayer::kExperts, unread.data(), unread.data()));
  odd.mlp.intermediate = 12;
  auto const widths = ExpertParallel<Grouped, AllToAll, Cuda>::can_implement(odd, device_group.communicator(0));
  REQUIRE(widths.has_value());
  CHECK(std::string(widths->what()).find("mlp.intermediate = 12, expected a multiple of 8 for bf16 weights") !=
        std::string::npos);
  CHECK_FALSE(ExpertParallel<CublasGrouped, AllToAll, Cuda>::can_implement(odd, device_group.communicator(0))
                  .has_value());  // cuBLAS takes any width
}

TEST_CASE(
    "ExpertParallel<Grouped, AllGather, Cuda>::forward: captured in a CUDA graph, replays give the eager result") {
  // The header promises that AllGather with Grouped captures when the communicator's all_reduce_sum
  // does (a 1-rank CudaLocalGroup: yes; NCCL: yes). After one eager warm-up forward (kernel
  // attributes set, the stream's device checked), a captured forward must replay to the eager bits,
  // from router logits and from given top-k alike.
  EPX_TEST_SEEDED_RNG(rng);
  test::Scenario const s{
      .num_experts = 32, .top_k = 4, .mlp = {.hidden = 128, .intermediate = 64}, .tokens_per_rank = {77}, .bias = true};
  auto const gw = GlobalWeights<bfloat16>::random(s.num_experts, s.mlp, s.bias, rng);
  std::int64_t const t = s.tokens_per_rank[0];
  auto const x_host = test::random_vector<bfloat16>(static_cast<std::size_t>(t * s.mlp.hidden), rng);
  auto const logits_host = test::random_vector<float>(static_cast<std::size_t>(t * s.num_experts), rng);
  auto const ids_host = test::make_ids(s, t, rng);
  auto const weights_host = test::random_weights(ids_host.size(), rng);
  std::vector<bfloat16> eager[2], replayed[2];
  CudaLocalGroup group(1, {.timeout = std::chrono::seconds(30)});
  group.run([&](int, Communicator& comm) {
    Stream stream;
    DeviceExperts<bfloat16> const experts(gw, ExpertRange{0, s.num_experts});
    ExpertParallel<Grouped, AllGather, Cuda> ep(
        MoeConfig{.router = s.router(), .mlp = s.mlp, .weights = experts.weights()}, comm);
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
    CHECK(test::bitwise_equal(replayed[from_logits], eager[from_logits]));
  }
  // And the eager result is the layer's (from given top-k: the Host oracle on the same routing).
  test::RankInputs<bfloat16> in{.x = x_host, .ids = ids_host, .weights = weights_host};
  CHECK(test::rel_error(eager[0], test::host_layer(s, gw, in).y) <= test::CudaBackend::tolerance<bfloat16>());
}
