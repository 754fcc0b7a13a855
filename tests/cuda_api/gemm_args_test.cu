// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// The argument checks of grouped_gemm and expert_mlp on CUDA, on any machine: each call below is
// refused on the host before any CUDA call (a fake stream handle and null device pointers are never
// touched), so it runs without a GPU.

#include <epx/cuda.cuh>

#include "../common/test_util.hpp"
#include "args_test_util.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <random>
#include <set>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

using namespace epx;
using test::caught;
using test::contains;
using test::fake;
using test::fake_stream;

TEST_CASE("GroupedGemm::grouped_gemm[cuda-args]: bad arguments are refused before any GPU work") {
  std::int32_t const* offsets = fake<std::int32_t const>();
  auto call = [&](StreamRef s, std::int64_t k, std::int64_t c_rows, std::size_t num_offsets, std::int64_t lda) {
    grouped_gemm(s, MatrixView<bfloat16 const>(fake<bfloat16 const>(), 10, k, lda),
                 BatchedMatrixView<bfloat16 const>{fake<bfloat16 const>(), 2, 24, k}, nullptr,
                 std::span<std::int32_t const>(offsets, num_offsets),
                 MatrixView<bfloat16>(fake<bfloat16>(), c_rows, 24));
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

TEST_CASE(
    "ExpertMlp::expert_mlp[cuda-args]: widths the tensor-core kernel cannot take and short workspaces are refused") {
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
    expert_mlp<bfloat16>(
        StreamRef::host(), good, expert_weights<bfloat16>(2, fake<bfloat16 const>(), fake<bfloat16 const>()),
        MatrixView<bfloat16 const>(fake<bfloat16 const>(), 10, 64), std::span<std::int32_t const>(offsets, 3),
        MatrixView<bfloat16>(fake<bfloat16>(), 10, 64), Workspace(fake<std::byte>(), enough));
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
  e = caught([&] {
    (void)make_plan(StreamRef::host(), ids, 16, {0, 16}, Workspace(fake<std::byte>(), 1 << 20), fake<Status>());
  });
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

TEST_CASE("ExpertParallel<Cuda>::ExpertParallel[cuda-args]: weights in another layout and a short bias are refused") {
  // gpt-oss-like widths (gate_up_rows 64 != hidden 48); 8 experts over 2 ranks: rank 0 owns 4.
  ExpertMlpConfig const mlp{.hidden = 48,
                            .intermediate = 32,
                            .activation = Activation::kClampedSwiGLU,
                            .gate_up_layout = GateUpLayout::kInterleaved};
  test::UnusedCommunicator comm(MemorySpace::kDevice, 2);  // rank 0 of 2: owns 4 of 8 experts
  auto config = [&](ExpertWeights const& w) {
    return MoeConfig{
        .router = {.num_experts = 8, .top_k = 2, .scoring = Scoring::kTopKSoftmax}, .mlp = mlp, .weights = w};
  };
  auto const down = TensorView<bfloat16 const, 3>(fake<bfloat16 const>(), {4, 48, 32});
  // gate_up_proj as the checkpoint stores it ([E, H, 2I]), then its transpose as a strided view.
  Error e = caught([&] {
    (void)ExpertParallel<Grouped, AllToAll, Cuda>(
        config(expert_weights(TensorView<bfloat16 const, 3>(fake<bfloat16 const>(), {4, 48, 64}), down)), comm);
  });
  CHECK(e.code() == Errc::kShapeMismatch);
  CHECK(contains(e.what(),
                 "ExpertParallel: weights.gate_up.extents = [4, 48, 64], expected [4, 64, 48] = [local "
                 "experts, gate_up_rows (2 * intermediate), hidden], contiguous and K-major (gpt-oss's "
                 "gate_up_proj is [E, H, 2I]: pass its transpose [E, 2I, H], made contiguous)"));
  e = caught([&] {
    (void)ExpertParallel<CublasGrouped, AllGather, Cuda>(
        config(expert_weights(TensorView<bfloat16 const, 3>(fake<bfloat16 const>(), {4, 64, 48}, {3072, 1, 64}), down)),
        comm);
  });
  CHECK(e.code() == Errc::kInvalidArgument);
  CHECK(contains(e.what(), "ExpertParallel: weights.gate_up.strides = [3072, 1, 64], expected [3072, 48, 1]"));
  auto with_bias = config(expert_weights(TensorView<bfloat16 const, 3>(fake<bfloat16 const>(), {4, 64, 48}), down));
  with_bias.correction_bias = std::span<float const>(fake<float const>(), 7);
  e = caught([&] { (void)ExpertParallel<Grouped, AllToAll, Cuda>(with_bias, comm); });
  CHECK(e.code() == Errc::kShapeMismatch);
  CHECK(
      contains(e.what(), "ExpertParallel: correction_bias.size() = 7, expected 0 (no bias) or router.num_experts = 8"));
}

TEST_CASE("ExpertMlp::expert_mlp[cuda-args]: weights in another layout are refused before any GPU work") {
  ExpertMlpConfig const mlp{.hidden = 64, .intermediate = 32};
  std::int32_t const* offsets = fake<std::int32_t const>();
  auto const weights = expert_weights(TensorView<bfloat16 const, 3>(fake<bfloat16 const>(), {2, 64, 64}),
                                      TensorView<bfloat16 const, 3>(fake<bfloat16 const>(), {2, 32, 64}));
  Error e = caught([&] {
    expert_mlp<bfloat16>(fake_stream(), mlp, weights, MatrixView<bfloat16 const>(fake<bfloat16 const>(), 10, 64),
                         std::span<std::int32_t const>(offsets, 3), MatrixView<bfloat16>(fake<bfloat16>(), 10, 64),
                         Workspace(fake<std::byte>(), 1 << 20));
  });
  CHECK(e.code() == Errc::kShapeMismatch);
  CHECK(contains(e.what(),
                 "expert_mlp: weights.down.extents = [2, 32, 64], expected [2, 64, 32] = [local experts, "
                 "hidden, intermediate], contiguous and K-major (gpt-oss's down_proj is [E, I, H]"));
}

namespace {

// Walks every tile the way a persistent grid of `grid` CTAs does and counts how often each
// (row, n-block) output cell is written.
template <int BM, int BN>
void check_tile_walk(std::vector<std::int32_t> const& offsets, std::int64_t num_rows, int n, int grid) {
  CAPTURE(BM);
  CAPTURE(BN);
  CAPTURE(n);
  CAPTURE(grid);
  int const groups = static_cast<int>(offsets.size()) - 1;
  int const n_blocks = ceil_div(n, BN);
  std::vector<long long> start(static_cast<std::size_t>(groups) + 1);
  detail::host_tile_prefix(start.data(), offsets.data(), groups, num_rows, BM, BN, n);
  std::vector<int> written(static_cast<std::size_t>(num_rows * n_blocks), 0);
  for (int cta = 0; cta < grid; ++cta) {
    detail::TileWalker<BM, BN> walker(start.data(), offsets.data(), groups, num_rows, n);
    for (long long t = cta; t < walker.num_tiles(); t += grid) {
      detail::GemmTile const tile = walker.tile(t);
      auto const rows = detail::group_rows(offsets.data(), tile.group, num_rows);
      REQUIRE(tile.row_begin >= rows.begin);
      REQUIRE(tile.row_end <= rows.end);
      REQUIRE(tile.row_end - tile.row_begin <= BM);
      REQUIRE(tile.row_end > tile.row_begin);
      REQUIRE(tile.n_begin % BN == 0);
      for (std::int64_t r = tile.row_begin; r < tile.row_end; ++r)
        ++written[static_cast<std::size_t>(r * n_blocks + tile.n_begin / BN)];
    }
  }
  // Every row of every (clamped) group once per n-block; rows of no group never.
  std::vector<int> expected(written.size(), 0);
  for (int g = 0; g < groups; ++g) {
    auto const rows = detail::group_rows(offsets.data(), g, num_rows);
    for (std::int64_t r = rows.begin; r < rows.end; ++r)
      for (int b = 0; b < n_blocks; ++b) ++expected[static_cast<std::size_t>(r * n_blocks + b)];
  }
  CHECK(written == expected);
}

}  // namespace

TEST_CASE("GroupedGemm::tile_scheduler[cuda-host]: every output tile is computed exactly once, within its group") {
  std::uint64_t const seed = std::random_device{}();
  INFO("seed = " << seed);
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> rows_of(0, 300), groups_of(1, 40), grid_of(1, 300);
  for (int round = 0; round < 30; ++round) {
    std::vector<std::int32_t> offsets{std::uniform_int_distribution<int>(0, 5)(rng)};
    int const groups = groups_of(rng);
    for (int g = 0; g < groups; ++g) {
      int rows = rows_of(rng);
      if (g % 5 == 2) rows = 0;  // experts without tokens
      offsets.push_back(offsets.back() + rows);
    }
    std::int64_t const num_rows = offsets.back() + std::uniform_int_distribution<int>(0, 7)(rng);
    int const n = std::uniform_int_distribution<int>(1, 600)(rng);
    int const grid = grid_of(rng);
    check_tile_walk<16, 128>(offsets, num_rows, n, grid);
    check_tile_walk<64, 128>(offsets, num_rows, n, grid);
    check_tile_walk<128, 128>(offsets, num_rows, n, grid);
    check_tile_walk<64, 64>(offsets, num_rows, n, grid);
  }
  // Offsets that decrease or leave [0, num_rows] are clamped: nothing outside A or C is touched.
  check_tile_walk<64, 128>({-5, 10, 4, 300, 90}, 100, 256, 7);
}

TEST_CASE(
    "GroupedGemm::pick_mma_mainloop[cuda-host]: tile height from rows per group, narrower decode tiles when SMs would "
    "idle") {
  using detail::GemmMainloop;
  using detail::pick_mma_mainloop;
  // Decode with every expert local: 128 groups x 12 n-blocks of 128 = 1536 tiles for 132 SMs.
  CHECK(pick_mma_mainloop(1024, 128, 1536, 132, {}) == GemmMainloop::kMmaDecode);
  // 8 groups with rows x 12 n-blocks = 96 tiles < 132 SMs: 64-wide tiles give 192.
  CHECK(pick_mma_mainloop(64, 8, 1536, 132, {}) == GemmMainloop::kMmaDecodeN64);
  // One local expert's down projection (n 4096): 32 tiles at 128, 64 at 64, so 32-wide (128 tiles).
  CHECK(pick_mma_mainloop(4, 1, 4096, 132, {}) == GemmMainloop::kMmaDecodeN32);
  // More groups than rows: at most `rows` groups hold rows (10 x 16 n-blocks = 160 tiles).
  CHECK(pick_mma_mainloop(10, 256, 2048, 132, {}) == GemmMainloop::kMmaDecode);
  CHECK(pick_mma_mainloop(10, 256, 2048, 200, {}) == GemmMainloop::kMmaDecodeN64);
  // The threshold is the SM count itself.
  CHECK(pick_mma_mainloop(16, 1, 128 * 132, 132, {}) == GemmMainloop::kMmaDecode);
  CHECK(pick_mma_mainloop(16, 1, 128 * 131, 132, {}) == GemmMainloop::kMmaDecodeN64);
  // Medium and large tiles do not narrow; the medium threshold is inclusive.
  CHECK(pick_mma_mainloop(8 * 50, 8, 64, 132, {}) == GemmMainloop::kMmaMedium);
  CHECK(pick_mma_mainloop(8 * 64, 8, 64, 132, {}) == GemmMainloop::kMmaMedium);
  CHECK(pick_mma_mainloop(8 * 65, 8, 64, 132, {}) == GemmMainloop::kMmaLarge);
  CHECK(pick_mma_mainloop(5000, 0, 64, 132, {}) == GemmMainloop::kMmaLarge);  // no groups: rows decide
  // The thresholds are the policy's data, the same for every device.
  CHECK(pick_mma_mainloop(8 * 20, 8, 64, 132, {.decode_rows = 32, .medium_rows = 64}) == GemmMainloop::kMmaDecodeN32);
  CHECK(pick_mma_mainloop(8 * 100, 8, 64, 132, {.decode_rows = 16, .medium_rows = 128}) == GemmMainloop::kMmaMedium);
  detail::DeviceTraits const hopper{.device = 0, .sms = 132, .major = 9, .minor = 0};
  detail::DeviceTraits const ampere{.device = 0, .sms = 108, .major = 8, .minor = 0};
  for (detail::DeviceTraits const& dev : {hopper, ampere}) {
    detail::GemmTilePolicy const policy = detail::policy_for<detail::GemmTilePolicy>(dev);
    CHECK(pick_mma_mainloop(8 * 65, 8, 64, dev.sms, policy) == GemmMainloop::kMmaLarge);
    CHECK(pick_mma_mainloop(8 * 64, 8, 64, dev.sms, policy) == GemmMainloop::kMmaMedium);
  }
}

TEST_CASE("GroupedGemm::epilogue_kinds[cuda-host]: one kernel per activation, launch errors name the kernel launched") {
  using detail::EpilogueKind;
  CHECK(detail::first_gemm_epilogue(Activation::kSwiGLU) == EpilogueKind::kSwiGLU);
  CHECK(detail::first_gemm_epilogue(Activation::kGeGLU) == EpilogueKind::kGeGLU);
  CHECK(detail::first_gemm_epilogue(Activation::kGeGLUTanh) == EpilogueKind::kGeGLUTanh);
  CHECK(detail::first_gemm_epilogue(Activation::kReLU) == EpilogueKind::kReLU);
  CHECK(detail::first_gemm_epilogue(Activation::kClampedSwiGLU) == EpilogueKind::kClampedSwiGLU);
  for (Activation a : {Activation::kSwiGLU, Activation::kGeGLU, Activation::kGeGLUTanh, Activation::kReLU,
                       Activation::kClampedSwiGLU}) {
    CAPTURE(to_string(a));
    EpilogueKind const kind = detail::first_gemm_epilogue(a);
    CHECK(detail::epilogue_is_gated(kind) == is_gated(a));
    if (is_gated(a)) CHECK(detail::gated_activation(kind) == a);
  }
  CHECK_FALSE(detail::epilogue_is_gated(EpilogueKind::kLinear));

  using detail::GemmMainloop;
  std::vector<std::string> names;
  for (GemmMainloop m : {GemmMainloop::kSimt, GemmMainloop::kMmaDecode, GemmMainloop::kMmaDecodeN64,
                         GemmMainloop::kMmaDecodeN32, GemmMainloop::kMmaMedium, GemmMainloop::kMmaLarge})
    names.emplace_back(detail::kernel_name(m));
  CHECK(std::set<std::string>(names.begin(), names.end()).size() == names.size());
  CHECK(contains(names[0], "grouped_gemm_simt_kernel"));
  CHECK(contains(names[3], "grouped_gemm_mma_kernel (16x32"));
  CHECK(contains(names[5], "grouped_gemm_mma_kernel (128x128"));
  // Which mainloops a build and device can run.
  detail::DeviceTraits const hopper{.device = 0, .sms = 132, .major = 9, .minor = 0};
  detail::DeviceTraits const volta{.device = 0, .sms = 80, .major = 7, .minor = 0};
  CHECK(detail::gemm_mainloop_available<float>(GemmMainloop::kSimt, volta));
  CHECK_FALSE(detail::gemm_mainloop_available<float>(GemmMainloop::kMmaDecode, hopper));
  CHECK_FALSE(detail::gemm_mainloop_available<bfloat16>(GemmMainloop::kSimt, hopper));
  CHECK(detail::gemm_mainloop_available<bfloat16>(GemmMainloop::kMmaLarge, hopper));
  CHECK_FALSE(detail::gemm_mainloop_available<bfloat16>(GemmMainloop::kMmaLarge, volta));
}
