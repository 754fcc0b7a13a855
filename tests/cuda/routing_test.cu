// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// make_plan, permute and unpermute on the GPU against their Host twins (the comparisons every space
// runs, ../common/routing_cases.hpp: ids, counts, offsets and permutations exactly equal; unpermute
// bitwise equal; outputs poisoned first), then what only the CUDA stages have: capture in a CUDA
// graph, and the refusal of a host StreamRef.

#include "cuda_backend.cuh"

#include "../common/routing_comparison.hpp"

namespace epx::test {
using CudaStageF32 = StageCase<CudaBackend, float>;
using CudaStageBF16 = StageCase<CudaBackend, bfloat16>;
using CudaStageF16 = StageCase<CudaBackend, epx::half>;  // CUDA has a global ::half too
}  // namespace epx::test

TYPE_TO_STRING_AS("float", epx::test::CudaStageF32);
TYPE_TO_STRING_AS("bf16", epx::test::CudaStageBF16);
TYPE_TO_STRING_AS("fp16", epx::test::CudaStageF16);
TYPE_TO_STRING_AS("Cuda", epx::test::CudaBackend);
#define EPX_STAGE_CASES epx::test::CudaStageF32, epx::test::CudaStageBF16, epx::test::CudaStageF16
#define EPX_STAGE_BACKENDS epx::test::CudaBackend
#include "../common/routing_cases.hpp"

using namespace epx;
using test::DeviceBuffer;
using Stream = test::CudaStream;

TEST_CASE("Plan::make_plan[cuda]: router-free pipeline captured in a CUDA graph and replayed") {
  EPX_TEST_SEEDED_RNG(rng);
  std::int64_t const t = 512, h = 128;
  std::int32_t const k = 4, e = 64;
  auto const ids = test::random_ids(t, k, e, rng);
  auto const weights = test::random_weights(ids.size(), rng);
  auto const x = test::random_vector<bfloat16>(static_cast<std::size_t>(t * h), rng);
  Stream stream;
  DeviceBuffer<std::int32_t> d_ids(ids);
  DeviceBuffer<float> d_w(weights);
  DeviceBuffer<bfloat16> d_x(x), d_perm(static_cast<std::size_t>(t * k * h)), d_y(static_cast<std::size_t>(t * h)),
      d_y2(static_cast<std::size_t>(t * h));
  DeviceBuffer<std::byte> d_ws(cuda_plan_workspace_bytes(t, k, e));
  DeviceBuffer<Status> d_status(1);
  d_status.poison(0);
  auto pipeline = [&](bfloat16* y) {
    RoutingPlan const plan = make_plan(stream.ref(), MatrixView<std::int32_t const>(d_ids.data(), t, k), e, {0, e},
                                       Workspace(d_ws.data(), d_ws.size()), d_status.data());
    permute(stream.ref(), plan, MatrixView<bfloat16 const>(d_x.data(), t, h),
            MatrixView<bfloat16>(d_perm.data(), t * k, h));
    // permuted rows stand in for expert outputs: y = sum_j w_j * x_t
    unpermute(stream.ref(), plan, MatrixView<bfloat16 const>(d_perm.data(), t * k, h),
              MatrixView<float const>(d_w.data(), t, k), MatrixView<bfloat16>(y, t, h));
  };
  pipeline(d_y.data());  // eager
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  EPX_CUDA_CHECK(cudaStreamBeginCapture(stream.s, cudaStreamCaptureModeGlobal));
  pipeline(d_y2.data());  // any allocation or sync here would break the capture
  EPX_CUDA_CHECK(cudaStreamEndCapture(stream.s, &graph));
  EPX_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  d_y2.poison(0xcd);
  for (int replay = 0; replay < 3; ++replay) EPX_CUDA_CHECK(cudaGraphLaunch(exec, stream.s));
  EPX_CUDA_CHECK(cudaStreamSynchronize(stream.s));
  EPX_CUDA_CHECK(cudaGraphExecDestroy(exec));
  EPX_CUDA_CHECK(cudaGraphDestroy(graph));
  auto const y1 = d_y.to_host(), y2 = d_y2.to_host();
  CHECK(std::memcmp(y1.data(), y2.data(), y1.size() * sizeof(bfloat16)) == 0);
  // and y is really sum_j w_j x_t (token 0, first element)
  float want = 0.0f;
  for (std::int32_t j = 0; j < k; ++j)
    if (ids[static_cast<std::size_t>(j)] >= 0) want += weights[static_cast<std::size_t>(j)] * static_cast<float>(x[0]);
  CHECK(static_cast<float>(y1[0]) == doctest::Approx(want).epsilon(1e-2));
}

TEST_CASE("Permute::permute[cuda]: a host StreamRef is refused") {
  std::vector<std::int32_t> ids{0, 1};
  std::vector<std::byte> ws(plan_workspace_bytes(1, 2, 2));
  Status st;
  RoutingPlan const plan = make_plan(Host{}, MatrixView<std::int32_t const>(ids.data(), 1, 2), 2, {0, 2},
                                     Workspace(ws.data(), ws.size()), st);
  std::vector<float> x(8), xp(16);
  CHECK_THROWS_WITH_AS(
      permute(StreamRef::host(), plan, MatrixView<float const>(x.data(), 1, 8), MatrixView<float>(xp.data(), 2, 8)),
      doctest::Contains("permute: stream = StreamRef::host()"), Error);
}
