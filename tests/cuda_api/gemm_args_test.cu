// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// The argument checks of grouped_gemm and expert_mlp on CUDA, on any machine: each call below is
// refused on the host before any CUDA call (a fake stream handle and null device pointers are never
// touched), so it runs without a GPU.

#include <epx/cuda.cuh>

#include <doctest/doctest.h>

#include <string>

using namespace epx;

namespace {

template <class F>
Error caught(F&& f) {
  try {
    f();
  } catch (Error const& e) {
    return e;
  }
  FAIL("no epx::Error was thrown");
  return Error(Errc::kInvalidArgument, "unreachable");
}

bool contains(std::string const& text, std::string const& part) { return text.find(part) != std::string::npos; }

StreamRef fake_stream() { return StreamRef(reinterpret_cast<CUstream_st*>(std::uintptr_t{0x1000})); }

// Device pointers that are never dereferenced: every call below fails its host-side checks first.
template <class T>
T* fake(std::uintptr_t address = 0x10000) {
  return reinterpret_cast<T*>(address);
}

}  // namespace

TEST_CASE("GroupedGemm::grouped_gemm[cuda-args]: bad arguments are refused before any GPU work") {
  std::int32_t const* offsets = fake<std::int32_t const>();
  auto call = [&](StreamRef s, std::int64_t k, std::int64_t c_rows, std::size_t num_offsets, std::int64_t lda) {
    grouped_gemm(s, MatrixView<bfloat16 const>(fake<bfloat16 const>(), 10, k, lda),
                 BatchedMatrixView<bfloat16 const>{fake<bfloat16 const>(), 2, 24, k}, nullptr,
                 std::span<std::int32_t const>(offsets, num_offsets), MatrixView<bfloat16>(fake<bfloat16>(), c_rows, 24));
  };
  Error e = caught([&] { call(StreamRef::host(), 16, 10, 3, 16); });
  CHECK(e.code() == Errc::kInvalidArgument);
  CHECK(contains(e.what(), "grouped_gemm: stream = StreamRef::host(), expected a CUDA stream"));
  e = caught([&] { call(fake_stream(), 12, 10, 3, 12); });
  CHECK(e.code() == Errc::kInvalidArgument);
  CHECK(contains(e.what(), "grouped_gemm: a.cols (k) = 12, expected a multiple of 8"));
  e = caught([&] { call(fake_stream(), 16, 10, 3, 20); });
  CHECK(e.code() == Errc::kInvalidArgument);
  CHECK(contains(e.what(), "a (data, ld)"));
  e = caught([&] { call(fake_stream(), 16, 10, 2, 16); });
  CHECK(e.code() == Errc::kShapeMismatch);
  CHECK(contains(e.what(), "offsets.size() = 2, expected b.batch + 1 = 3"));
  e = caught([&] { call(fake_stream(), 16, 9, 3, 16); });
  CHECK(e.code() == Errc::kShapeMismatch);
  CHECK(contains(e.what(), "c.rows = 9, expected 10"));
  e = caught([&] {
    grouped_gemm(fake_stream(), MatrixView<bfloat16 const>(fake<bfloat16 const>(0x10002), 10, 16),
                 BatchedMatrixView<bfloat16 const>{fake<bfloat16 const>(), 2, 24, 16}, nullptr,
                 std::span<std::int32_t const>(offsets, 3), MatrixView<bfloat16>(fake<bfloat16>(), 10, 24));
  });
  CHECK(contains(e.what(), "16-byte aligned data"));
}

TEST_CASE("ExpertMlp::expert_mlp[cuda-args]: widths the tensor-core kernel cannot take and short workspaces are refused") {
  std::int32_t const* offsets = fake<std::int32_t const>();
  auto call = [&](ExpertMlpConfig const& c, std::size_t ws_bytes, std::size_t num_offsets) {
    auto const weights = expert_weights<bfloat16>(2, fake<bfloat16 const>(), fake<bfloat16 const>());
    expert_mlp<bfloat16>(fake_stream(), c, weights, MatrixView<bfloat16 const>(fake<bfloat16 const>(), 10, c.hidden),
                         std::span<std::int32_t const>(offsets, num_offsets),
                         MatrixView<bfloat16>(fake<bfloat16>(), 10, c.hidden), Workspace(fake<std::byte>(), ws_bytes));
  };
  ExpertMlpConfig const good{.hidden = 64, .intermediate = 32};
  std::size_t const enough = cuda_expert_mlp_workspace_bytes<bfloat16>(good, 10);
  Error e = caught([&] { call({.hidden = 60, .intermediate = 32}, 1 << 20, 3); });
  CHECK(e.code() == Errc::kInvalidArgument);
  CHECK(contains(e.what(), "expert_mlp: config.hidden = 60, expected a multiple of 8"));
  e = caught([&] { call({.hidden = 64, .intermediate = 36}, 1 << 20, 3); });
  CHECK(contains(e.what(), "expert_mlp: config.intermediate = 36, expected a multiple of 8"));
  e = caught([&] { call(good, 1 << 20, 2); });
  CHECK(e.code() == Errc::kShapeMismatch);
  CHECK(contains(e.what(), "expert_offsets.size() = 2, expected num_local_experts + 1 = 3"));
  e = caught([&] { call(good, enough - 256, 3); });
  CHECK(e.code() == Errc::kWorkspaceTooSmall);
  e = caught([&] {
    expert_mlp<bfloat16>(StreamRef::host(), good, expert_weights<bfloat16>(2, fake<bfloat16 const>(), fake<bfloat16 const>()),
                         MatrixView<bfloat16 const>(fake<bfloat16 const>(), 10, 64),
                         std::span<std::int32_t const>(offsets, 3), MatrixView<bfloat16>(fake<bfloat16>(), 10, 64),
                         Workspace(fake<std::byte>(), enough));
  });
  CHECK(contains(e.what(), "expert_mlp: stream = StreamRef::host()"));
}

TEST_CASE("Routing::stages[cuda-args]: route, make_plan and permute refuse bad arguments before any GPU work") {
  RouterConfig const router{.num_experts = 600, .top_k = 2};
  auto route_call = [&](StreamRef s, RouterConfig const& c) {
    route(s, c, MatrixView<float const>(fake<float const>(), 4, c.num_experts), {},
          MatrixView<std::int32_t>(fake<std::int32_t>(), 4, 2), MatrixView<float>(fake<float>(), 4, 2));
  };
  Error e = caught([&] { route_call(fake_stream(), router); });
  CHECK(e.code() == Errc::kUnsupported);
  CHECK(contains(e.what(), "route: num_experts = 600, expected <= 512 on CUDA"));
  e = caught([&] { route_call(StreamRef::host(), {.num_experts = 16, .top_k = 2}); });
  CHECK(e.code() == Errc::kInvalidArgument);
  CHECK(contains(e.what(), "route: stream = StreamRef::host(), expected a CUDA stream"));

  MatrixView<std::int32_t const> const ids(fake<std::int32_t const>(), 4, 2);
  e = caught([&] { (void)make_plan(StreamRef::host(), ids, 16, {0, 16}, Workspace(fake<std::byte>(), 1 << 20), fake<Status>()); });
  CHECK(contains(e.what(), "make_plan: stream = StreamRef::host(), expected a CUDA stream"));
  e = caught([&] { (void)make_plan(fake_stream(), ids, 16, {0, 16}, Workspace(fake<std::byte>(), 1 << 20), nullptr); });
  CHECK(e.code() == Errc::kInvalidArgument);
  CHECK(contains(e.what(), "make_plan: status = nullptr, expected a device pointer to an epx::Status"));

  RoutingPlan plan;  // a plan not made by make_plan
  plan.num_tokens = 4;
  plan.top_k = 2;
  e = caught([&] {
    permute(fake_stream(), plan, MatrixView<bfloat16 const>(fake<bfloat16 const>(), 4, 8),
            MatrixView<bfloat16>(fake<bfloat16>(), 8, 8));
  });
  CHECK(contains(e.what(), "permute: plan.expert_offsets.size() = 0, expected >= 1 (a plan made by make_plan)"));
  e = caught([&] {
    permute(StreamRef::host(), plan, MatrixView<bfloat16 const>(fake<bfloat16 const>(), 4, 8),
            MatrixView<bfloat16>(fake<bfloat16>(), 8, 8));
  });
  CHECK(contains(e.what(), "permute: stream = StreamRef::host(), expected a CUDA stream"));
}
