// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// The training stages on CUDA refuse bad arguments on the host, before any GPU work, so these run
// without a GPU; and the choice of Grouped's kernel. This file is also cuda_args_test's second
// translation unit including <epx/cuda.cuh>: the link fails if a header defines a kernel that is
// not a template (each unit would carry its own definition).

#include <epx/cuda.cuh>

#include "../common/test_util.hpp"
#include "args_test_util.hpp"

#include <doctest/doctest.h>

#include <cstdint>
#include <span>
#include <string>

using namespace epx;
using test::caught;
using test::contains;
using test::fake;
using test::fake_stream;

TEST_CASE("ExpertMlp::expert_mlp_backward[cuda-args]: bad arguments are refused before any GPU work") {
  ExpertMlpConfig const mlp{.hidden = 64, .intermediate = 32};
  std::int64_t const rows = 10;
  ExpertWeights const weights = expert_weights<bfloat16>(2, fake<bfloat16 const>(), fake<bfloat16 const>());
  std::size_t const enough = expert_mlp_backward_workspace_bytes<bfloat16>(mlp, rows);
  auto grads = [&](std::int32_t experts, std::int64_t down_cols) {
    return ExpertWeightGrads<float>{.gate_up = {fake<float>(), experts, mlp.gate_up_rows(), mlp.hidden},
                                    .down = {fake<float>(), experts, mlp.hidden, down_cols}};
  };
  auto call = [&](StreamRef s, std::int64_t dy_rows, std::size_t num_offsets, ExpertWeightGrads<float> const& g,
                  std::size_t ws_bytes, std::int32_t const* offsets = fake<std::int32_t const>()) {
    expert_mlp_backward(s, mlp, weights, MatrixView<bfloat16 const>(fake<bfloat16 const>(), rows, mlp.hidden),
                        std::span<std::int32_t const>(offsets, num_offsets),
                        MatrixView<float const>(fake<float const>(), rows, mlp.gate_up_rows()),
                        MatrixView<float const>(fake<float const>(), dy_rows, mlp.hidden),
                        MatrixView<float>(fake<float>(), rows, mlp.hidden), g, Workspace(fake<std::byte>(), ws_bytes));
  };
  Error e = caught([&] { call(fake_stream(), rows + 1, 3, grads(2, 32), enough); });
  CHECK(e.code() == Errc::kShapeMismatch);
  CHECK(contains(e.what(), "expert_mlp_backward: dy"));
  e = caught([&] { call(fake_stream(), rows, 2, grads(2, 32), enough); });
  CHECK(contains(e.what(), "expert_mlp_backward: expert_offsets.size() = 2, expected num_local_experts + 1 = 3"));
  e = caught([&] { call(fake_stream(), rows, 3, grads(2, 48), enough); });
  CHECK(contains(e.what(), "expert_mlp_backward: grads.down (batch, rows, cols) = (2, 64, 48), expected (2, 64, 32)"));
  e = caught([&] { call(fake_stream(), rows, 3, grads(3, 32), enough); });
  CHECK(contains(e.what(), "grads.gate_up (batch, rows, cols) = (3, 64, 64), expected (2, 64, 64)"));
  e = caught([&] { call(fake_stream(), rows, 3, grads(2, 32), enough, nullptr); });
  CHECK(contains(e.what(), "expert_mlp_backward: expert_offsets.data() = nullptr"));
  e = caught([&] { call(StreamRef::host(), rows, 3, grads(2, 32), enough); });
  CHECK(contains(e.what(), "expert_mlp_backward: stream = StreamRef::host(), expected a CUDA stream"));
  e = caught([&] { call(fake_stream(), rows, 3, grads(2, 32), enough - 1); });
  CHECK(contains(e.what(), "expert_mlp_backward"));
  CHECK(contains(e.what(), "workspace"));
}

TEST_CASE("GroupedGemm::grouped_gemm_backward[cuda-args]: bad arguments are refused before any GPU work") {
  std::int32_t const* offsets = fake<std::int32_t const>();
  Error e = caught([&] {
    grouped_gemm_backward_data(fake_stream(), MatrixView<float const>(fake<float const>(), 10, 48),
                               BatchedMatrixView<bfloat16 const>{fake<bfloat16 const>(), 2, 64, 32},
                               std::span<std::int32_t const>(offsets, 3), MatrixView<float>(fake<float>(), 10, 32));
  });
  CHECK(e.code() == Errc::kShapeMismatch);  // dc has 48 columns, b's rows (n) are 64
  e = caught([&] {
    grouped_gemm_backward_data(StreamRef::host(), MatrixView<float const>(fake<float const>(), 10, 64),
                               BatchedMatrixView<bfloat16 const>{fake<bfloat16 const>(), 2, 64, 32},
                               std::span<std::int32_t const>(offsets, 3), MatrixView<float>(fake<float>(), 10, 32));
  });
  CHECK(contains(e.what(), "stream = StreamRef::host(), expected a CUDA stream"));
  e = caught([&] {
    grouped_gemm_backward_weight(fake_stream(), MatrixView<bfloat16 const>(fake<bfloat16 const>(), 10, 32),
                                 MatrixView<float const>(fake<float const>(), 10, 64),
                                 std::span<std::int32_t const>(offsets, 2),
                                 BatchedMatrixView<float>{fake<float>(), 2, 64, 32}, nullptr);
  });
  CHECK(contains(e.what(), "offsets.size() = 2"));
  e = caught([&] {
    grouped_gemm_backward_weight(fake_stream(), MatrixView<bfloat16 const>(fake<bfloat16 const>(), 10, 32),
                                 MatrixView<float const>(fake<float const>(), 9, 64),
                                 std::span<std::int32_t const>(offsets, 3),
                                 BatchedMatrixView<float>{fake<float>(), 2, 64, 32}, nullptr);
  });
  CHECK(e.code() == Errc::kShapeMismatch);  // dc's rows are not a's
}

TEST_CASE("Router::route_backward[cuda-args]: bad arguments are refused before any GPU work") {
  RouterConfig const router{.num_experts = 16, .top_k = 2};
  auto call = [&](StreamRef s, RouterConfig const& c, std::int64_t d_rows, Status* status) {
    route_backward(s, c, MatrixView<float const>(fake<float const>(), 4, c.num_experts),
                   MatrixView<std::int32_t const>(fake<std::int32_t const>(), 4, c.top_k),
                   MatrixView<float const>(fake<float const>(), 4, c.top_k),
                   MatrixView<float>(fake<float>(), d_rows, c.num_experts), status);
  };
  Error e = caught([&] { call(fake_stream(), router, 5, fake<Status>()); });
  CHECK(e.code() == Errc::kShapeMismatch);
  e = caught([&] { call(fake_stream(), {.num_experts = 600, .top_k = 2}, 4, fake<Status>()); });
  CHECK(e.code() == Errc::kUnsupported);
  e = caught([&] { call(fake_stream(), router, 4, nullptr); });
  CHECK(contains(e.what(), "route_backward: status = nullptr"));
  e = caught([&] { call(StreamRef::host(), router, 4, fake<Status>()); });
  CHECK(contains(e.what(), "route_backward: stream = StreamRef::host(), expected a CUDA stream"));
}

TEST_CASE("ExpertParallel<Grouped, ..., Cuda>[cuda-host]: the kernel Grouped picks, and which layers train") {
  using detail::grouped_kernel_for;
  using detail::GroupedKernel;
  detail::GroupedKernelPolicy const policy{.cutlass_min_rows_per_expert = 128};
  // CUTLASS from 128 rows per local expert on average, with 16-bit weights, where it runs.
  CHECK(grouped_kernel_for(policy, true, true, 128 * 8, 8) == GroupedKernel::kCutlass);
  CHECK(grouped_kernel_for(policy, true, true, 128 * 8 - 1, 8) == GroupedKernel::kEpx);  // decode-like: own kernel
  CHECK(grouped_kernel_for(policy, false, true, 1 << 20, 8) == GroupedKernel::kEpx);     // no CUTLASS here
  CHECK(grouped_kernel_for(policy, true, false, 1 << 20, 8) == GroupedKernel::kEpx);     // fp32 weights
  CHECK(grouped_kernel_for(policy, true, true, 1 << 20, 0) == GroupedKernel::kEpx);      // no local experts
  CHECK(grouped_kernel_for(policy, true, true, 0, 1) == GroupedKernel::kEpx);
  // This unit is built without CUTLASS: Grouped never picks it, whatever the rows.
  CHECK_FALSE(detail::CudaGroupedExperts::kWithCutlass);
  CHECK(detail::CudaGroupedExperts::pick<bfloat16>(1 << 20, 8) == GroupedKernel::kEpx);
  CHECK(detail::CudaGroupedExperts{}.kernel_name() == "none");
  // The training overloads exist for Grouped (and CutlassGrouped) on Cuda, not for CublasGrouped.
  static_assert(ExpertParallel<Grouped, AllToAll, Cuda>::kHasBackward);
  static_assert(ExpertParallel<Grouped, AllGather, Cuda>::kHasBackward);
  static_assert(!ExpertParallel<CublasGrouped, AllToAll, Cuda>::kHasBackward);
  static_assert(ExpertParallel<Grouped, AllToAll, Host>::kHasBackward);
}
