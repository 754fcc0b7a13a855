// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// The CUTLASS training path against the Host: cutlass_grouped_gemm_backward_data / _weight (the
// grouped GEMM's gradients on CUTLASS's Hopper kernel, other operand layouts than the forward's)
// against the Host grouped_gemm_backward_data / _weight — random inputs, outputs poisoned first
// (rows outside the groups and padding must stay poisoned, every group's gradient written, zeros
// for a group without rows, bias gradients), ragged and empty groups, > 256 groups, padded leading
// dimensions, fp32 and 16-bit outputs, a second run bitwise equal, a CUDA-graph replay, the host-side
// refusals; cutlass_expert_mlp_backward (every GEMM on CUTLASS, dy and dh rounded to T) against the
// Host's expert_mlp_backward for every gated activation and layout, bf16 and fp32 gradients, and with
// no rows at all; then ExpertParallel<CutlassGrouped | Grouped, ..., Cuda>::backward against the Host
// layer on the shared training cases (tests/cuda/layer_backward_cases.cuh). Built for sm_90a only; skipped (exit 77)
// without a GPU; on a device that is not sm_90 the availability check is what is tested.

#include <epx/cuda/cutlass_grouped.cuh>
// CUTLASS's headers first (read under NDEBUG), then the rest
#include "cuda_backend.cuh"

#include "../common/test_util.hpp"
#include "device_buffer.cuh"
#include "poisoned_rows.cuh"
#include "layer_backward_cases.cuh"

#include <epx/cuda.cuh>

#include <cstring>
#include <numeric>

using namespace epx;
using test::CudaStream;
using test::DeviceBuffer;

namespace {

using test::all_bytes;

struct GradCase {
  std::vector<std::int32_t> counts;
  std::int64_t n = 0, k = 0, lda_pad = 0, ldc_pad = 0;
  std::int32_t first_row = 3;
  std::int64_t rows_after = 5;
};

std::vector<std::int32_t> offsets_of(GradCase const& c) { return test::offsets_from(c.counts, c.first_row); }

// fp32 output: only the accumulation order differs from the Host's; 16-bit: one rounding more.
template <class TOut>
constexpr double kTolerance = std::is_same_v<TOut, float> ? 1e-4 : 1e-2;

//! The data gradient da = dc · b[g] of `c` against the Host's; false where CUTLASS cannot run.
template <class T, class TOut>
bool check_data(GradCase const& c, std::mt19937_64& rng) {
  if (!cutlass_grouped_gemm_available()) return false;
  INFO("data: groups " << c.counts.size() << ", n " << c.n << ", k " << c.k << ", ldc +" << c.ldc_pad << ", lda +"
                       << c.lda_pad);
  auto const groups = static_cast<std::int64_t>(c.counts.size());
  auto const offsets = offsets_of(c);
  std::int64_t const rows = offsets.back() + c.rows_after, ldc = c.n + c.ldc_pad, ldda = c.k + c.lda_pad;
  auto const dc = test::random_vector<T>(static_cast<std::size_t>(rows * ldc), rng);
  auto const b =
      test::random_vector<T>(static_cast<std::size_t>(groups * c.n * c.k), rng, 1.0f / std::sqrt(float(c.n)));
  std::vector<float> ref(static_cast<std::size_t>(rows * c.k), 0.0f);
  grouped_gemm_backward_data(Host{}, MatrixView<T const>(dc.data(), rows, c.n, ldc),
                             BatchedMatrixView<T const>{b.data(), groups, c.n, c.k},
                             std::span<std::int32_t const>(offsets), MatrixView<float>(ref.data(), rows, c.k));
  CudaStream stream;
  DeviceBuffer<T> d_dc(dc), d_b(b);
  DeviceBuffer<TOut> d_da(static_cast<std::size_t>(rows * ldda));
  DeviceBuffer<std::int32_t> d_offsets(offsets);
  DeviceBuffer<std::byte> ws(cutlass_grouped_gemm_backward_data_workspace_bytes<T, TOut>(groups));
  std::vector<TOut> first;
  for (int run = 0; run < 2; ++run) {
    d_da.poison(0xff);
    ws.poison(0xff);
    cutlass_grouped_gemm_backward_data<T, TOut>(stream.ref(), MatrixView<T const>(d_dc.data(), rows, c.n, ldc),
                                                BatchedMatrixView<T const>{d_b.data(), groups, c.n, c.k},
                                                std::span<std::int32_t const>(d_offsets.data(), offsets.size()),
                                                MatrixView<TOut>(d_da.data(), rows, c.k, ldda),
                                                Workspace(ws.data(), ws.size()));
    stream.sync();
    auto const got = d_da.to_host();
    if (run == 1) {
      CHECK(std::memcmp(first.data(), got.data(), got.size() * sizeof(TOut)) == 0);  // deterministic
      break;
    }
    first = got;
    auto const [got_in, ref_in, unwritten, overwritten] =
        test::split_poisoned(got, ref, rows, ldda, c.k, offsets.front(), offsets.back());
    CHECK(unwritten == 0);
    CHECK(overwritten == 0);
    if (!ref_in.empty()) CHECK(test::rel_error(got_in, ref_in) <= kTolerance<TOut>);
  }
  return true;
}

//! The weight and bias gradients of `c` against the Host's; false where CUTLASS cannot run.
template <class T, class TOut>
bool check_weight(GradCase const& c, bool bias, std::mt19937_64& rng) {
  if (!cutlass_grouped_gemm_available()) return false;
  INFO("weight: groups " << c.counts.size() << ", n " << c.n << ", k " << c.k << ", lda +" << c.lda_pad << ", ldc +"
                         << c.ldc_pad << ", bias " << bias);
  auto const groups = static_cast<std::int64_t>(c.counts.size());
  auto const offsets = offsets_of(c);
  std::int64_t const rows = offsets.back() + c.rows_after, lda = c.k + c.lda_pad, ldc = c.n + c.ldc_pad;
  auto const a = test::random_vector<T>(static_cast<std::size_t>(rows * lda), rng);
  auto const dc = test::random_vector<T>(static_cast<std::size_t>(rows * ldc), rng);
  std::vector<float> ref(static_cast<std::size_t>(groups * c.n * c.k)),
      ref_bias(static_cast<std::size_t>(groups * c.n));
  grouped_gemm_backward_weight(Host{}, MatrixView<T const>(a.data(), rows, c.k, lda),
                               MatrixView<T const>(dc.data(), rows, c.n, ldc), std::span<std::int32_t const>(offsets),
                               BatchedMatrixView<float>{ref.data(), groups, c.n, c.k}, ref_bias.data());
  CudaStream stream;
  DeviceBuffer<T> d_a(a), d_dc(dc);
  // + 1: a guard after each gradient, which must stay poisoned
  DeviceBuffer<TOut> d_db(ref.size() + 1), d_bias(ref_bias.size() + 1);
  DeviceBuffer<std::int32_t> d_offsets(offsets);
  DeviceBuffer<std::byte> ws(cutlass_grouped_gemm_backward_weight_workspace_bytes<T, TOut>(groups));
  std::vector<TOut> first;
  for (int run = 0; run < 2; ++run) {
    d_db.poison(0xff);
    d_bias.poison(0xff);
    ws.poison(0xff);
    cutlass_grouped_gemm_backward_weight<T, TOut>(stream.ref(), MatrixView<T const>(d_a.data(), rows, c.k, lda),
                                                  MatrixView<T const>(d_dc.data(), rows, c.n, ldc),
                                                  std::span<std::int32_t const>(d_offsets.data(), offsets.size()),
                                                  BatchedMatrixView<TOut>{d_db.data(), groups, c.n, c.k},
                                                  bias ? d_bias.data() : nullptr, Workspace(ws.data(), ws.size()));
    stream.sync();
    auto got = d_db.to_host();
    CHECK(all_bytes(got.back(), 0xff));  // nothing past the weight gradient
    got.pop_back();
    if (run == 1) {
      CHECK(std::memcmp(first.data(), got.data(), got.size() * sizeof(TOut)) == 0);  // deterministic
      break;
    }
    first = got;
    std::int64_t unwritten = 0, nonzero_empty = 0;
    for (std::int64_t g = 0; g < groups; ++g)
      for (std::int64_t i = 0; i < c.n * c.k; ++i) {
        TOut const v = got[static_cast<std::size_t>(g * c.n * c.k + i)];
        unwritten += all_bytes(v, 0xff);
        nonzero_empty += c.counts[static_cast<std::size_t>(g)] == 0 && to_float(v) != 0.0f;
      }
    CHECK(unwritten == 0);
    CHECK(nonzero_empty == 0);  // a group without rows: zeros (CUTLASS would never finish its K = 0 problem)
    if (std::any_of(c.counts.begin(), c.counts.end(), [](std::int32_t n) { return n > 0; })) {
      CHECK(test::rel_error(got, std::vector<double>(ref.begin(), ref.end())) <= kTolerance<TOut>);
    }
    auto const got_bias = d_bias.to_host();
    CHECK(all_bytes(got_bias.back(), 0xff));  // nothing past the bias gradient
    if (bias) {
      std::vector<TOut> const written(got_bias.begin(), got_bias.end() - 1);
      if (std::any_of(c.counts.begin(), c.counts.end(), [](std::int32_t n) { return n > 0; }))
        CHECK(test::rel_error(written, std::vector<double>(ref_bias.begin(), ref_bias.end())) <= kTolerance<TOut>);
    } else {
      CHECK(std::all_of(got_bias.begin(), got_bias.end(), [](TOut v) { return all_bytes(v, 0xff); }));
    }
    if (bias && std::all_of(c.counts.begin(), c.counts.end(), [](std::int32_t n) { return n == 0; }))
      CHECK(std::all_of(got_bias.begin(), got_bias.end() - 1, [](TOut v) { return to_float(v) == 0.0f; }));
  }
  return true;
}

template <class T, class TOut>
void check_both(GradCase const& c, std::mt19937_64& rng) {
  check_data<T, TOut>(c, rng);
  check_weight<T, TOut>(c, true, rng);
}

}  // namespace

TEST_CASE("cutlass_grouped_gemm_backward_data | _weight[cuda]: ragged and empty groups, padded ld, n and k edges") {
  EPX_TEST_SEEDED_RNG(rng);
  if (!cutlass_grouped_gemm_available()) return;
  std::uniform_int_distribution<int> count(0, 150), pad(0, 2), width(1, 40);
  for (int trial = 0; trial < 6; ++trial) {
    GradCase c;
    std::uniform_int_distribution<int> groups(1, 9);
    c.counts.resize(static_cast<std::size_t>(groups(rng)));
    for (auto& n : c.counts) n = pad(rng) == 0 ? 0 : count(rng);
    c.n = 8 * width(rng);
    c.k = 8 * width(rng);
    c.lda_pad = 8 * pad(rng);
    c.ldc_pad = 8 * pad(rng);
    CAPTURE(trial);
    check_both<bfloat16, float>(c, rng);
    check_both<bfloat16, bfloat16>(c, rng);
    check_both<epx::half, float>(c, rng);
  }
  // n and k at the tile edges (Cooperative 128 x 256 x 64): one past, one short; one row per group.
  check_both<bfloat16, float>({.counts = {1, 129, 0, 64}, .n = 264, .k = 136}, rng);
  check_both<bfloat16, bfloat16>({.counts = {257, 1}, .n = 8, .k = 8}, rng);
  check_weight<bfloat16, float>({.counts = {70, 3}, .n = 40, .k = 24}, false, rng);  // no bias gradient asked
}

TEST_CASE(
    "cutlass_grouped_gemm_backward_weight[cuda]: more than 256 groups, most empty; every group empty gives zeros") {
  EPX_TEST_SEEDED_RNG(rng);
  if (!cutlass_grouped_gemm_available()) return;
  std::vector<std::int32_t> counts(300, 0);
  for (std::size_t g = 0; g < counts.size(); g += 37) counts[g] = static_cast<std::int32_t>(1 + g % 50);
  check_both<bfloat16, float>({.counts = counts, .n = 24, .k = 16}, rng);
  check_both<bfloat16, bfloat16>({.counts = std::vector<std::int32_t>(5, 0), .n = 16, .k = 32}, rng);
}

TEST_CASE("cutlass_grouped_gemm_backward_weight | _data[cuda]: model sizes (Mixtral down, Qwen3 gate_up)") {
  EPX_TEST_SEEDED_RNG(rng);
  if (!cutlass_grouped_gemm_available()) return;
  std::int64_t const h = test::pick_size(4096, 256), i = test::pick_size(1536, 128);
  check_both<bfloat16, float>({.counts = {test::pick_size<std::int32_t>(600, 60), 0, 37}, .n = h, .k = i}, rng);
  check_both<bfloat16, bfloat16>({.counts = {300, 257}, .n = 2 * i, .k = h}, rng);
}

TEST_CASE("cutlass_grouped_gemm_backward_weight[cuda]: captured in a CUDA graph, the replay equals the eager run") {
  EPX_TEST_SEEDED_RNG(rng);
  if (!cutlass_grouped_gemm_available()) return;
  std::vector<std::int32_t> const offsets = {0, 40, 40, 130};
  std::int64_t const rows = 130, n = 48, k = 72, groups = 3;
  DeviceBuffer<bfloat16> d_a(test::random_vector<bfloat16>(static_cast<std::size_t>(rows * k), rng)),
      d_dc(test::random_vector<bfloat16>(static_cast<std::size_t>(rows * n), rng));
  DeviceBuffer<std::int32_t> d_offsets(offsets);
  DeviceBuffer<float> eager(static_cast<std::size_t>(groups * n * k)), replay(eager.size()), bias(groups * n),
      bias_replay(groups * n);
  DeviceBuffer<std::byte> ws(cutlass_grouped_gemm_backward_weight_workspace_bytes<bfloat16, float>(groups));
  CudaStream stream;
  auto run = [&](float* db, float* dbias) {
    cutlass_grouped_gemm_backward_weight<bfloat16, float>(
        stream.ref(), MatrixView<bfloat16 const>(d_a.data(), rows, k), MatrixView<bfloat16 const>(d_dc.data(), rows, n),
        std::span<std::int32_t const>(d_offsets.data(), offsets.size()), BatchedMatrixView<float>{db, groups, n, k},
        dbias, Workspace(ws.data(), ws.size()));
  };
  run(eager.data(), bias.data());
  stream.sync();
  replay.poison(0xff);
  bias_replay.poison(0xff);
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  REQUIRE(cudaStreamBeginCapture(stream.s, cudaStreamCaptureModeThreadLocal) == cudaSuccess);
  run(replay.data(), bias_replay.data());
  REQUIRE(cudaStreamEndCapture(stream.s, &graph) == cudaSuccess);
  REQUIRE(cudaGraphInstantiate(&exec, graph, 0) == cudaSuccess);
  REQUIRE(cudaGraphLaunch(exec, stream.s) == cudaSuccess);
  stream.sync();
  auto const e = eager.to_host(), g = replay.to_host();
  CHECK(std::memcmp(e.data(), g.data(), e.size() * sizeof(float)) == 0);
  auto const eb = bias.to_host(), gb = bias_replay.to_host();
  CHECK(std::memcmp(eb.data(), gb.data(), eb.size() * sizeof(float)) == 0);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
}

TEST_CASE("cutlass_grouped_gemm_backward_data | _weight[cuda]: shapes CUTLASS cannot take are refused, naming them") {
  if (!cutlass_grouped_gemm_available()) return;
  CudaStream stream;
  DeviceBuffer<bfloat16> d_a(std::vector<bfloat16>(16 * 24)), d_dc(std::vector<bfloat16>(16 * 24));
  DeviceBuffer<float> d_out(std::vector<float>(2 * 24 * 24));
  DeviceBuffer<std::int32_t> d_offsets(std::vector<std::int32_t>{0, 4, 8});
  DeviceBuffer<std::byte> ws(cutlass_grouped_gemm_backward_weight_workspace_bytes<bfloat16, float>(2));
  std::span<std::int32_t const> const offsets(d_offsets.data(), 3);
  auto weight = [&](std::int64_t n, std::int64_t k, std::size_t ws_bytes, std::size_t num_offsets) {
    cutlass_grouped_gemm_backward_weight<bfloat16, float>(
        stream.ref(), MatrixView<bfloat16 const>(d_a.data(), 8, k), MatrixView<bfloat16 const>(d_dc.data(), 8, n),
        offsets.first(num_offsets), BatchedMatrixView<float>{d_out.data(), 2, n, k}, nullptr,
        Workspace(ws.data(), ws_bytes));
  };
  constexpr char const* kWeight = "cutlass_grouped_gemm_backward_weight: ";
  test::check_throws(Errc::kInvalidArgument, std::string(kWeight) + "n (db.rows) = 12",
                     [&] { weight(12, 24, ws.size(), 3); });
  test::check_throws(Errc::kInvalidArgument, std::string(kWeight) + "k (db.cols) = 20",
                     [&] { weight(16, 20, ws.size(), 3); });
  test::check_throws(Errc::kShapeMismatch, std::string(kWeight) + "offsets.size() = 2",
                     [&] { weight(16, 24, ws.size(), 2); });
  test::check_throws(Errc::kWorkspaceTooSmall, std::string(kWeight) + "workspace.size() = 0 bytes",
                     [&] { weight(16, 24, 0, 3); });
  auto data = [&](std::int64_t n, std::int64_t k) {
    cutlass_grouped_gemm_backward_data<bfloat16, float>(stream.ref(), MatrixView<bfloat16 const>(d_dc.data(), 8, n),
                                                        BatchedMatrixView<bfloat16 const>{d_a.data(), 2, n, k}, offsets,
                                                        MatrixView<float>(d_out.data(), 8, k),
                                                        Workspace(ws.data(), ws.size()));
  };
  constexpr char const* kData = "cutlass_grouped_gemm_backward_data: ";
  test::check_throws(Errc::kInvalidArgument, std::string(kData) + "n (b.rows) = 20", [&] { data(20, 16); });
  test::check_throws(Errc::kInvalidArgument, std::string(kData) + "k (b.cols) = 4", [&] { data(16, 4); });
  test::check_throws(Errc::kInvalidArgument, std::string(kData) + "n (b.rows) = 0", [&] { data(0, 16); });
}

namespace {

//! cutlass_expert_mlp_backward<T, G> against the Host's expert_mlp_gate_up + expert_mlp_backward on
//! the same rows: dx (rows outside the groups left poisoned), every weight and bias gradient.
template <class T, class G>
void check_expert_backward(ExpertMlpConfig const& config, std::vector<std::int32_t> const& counts,
                           std::mt19937_64& rng) {
  INFO("activation " << static_cast<int>(config.activation) << ", layout " << static_cast<int>(config.gate_up_layout)
                     << ", hidden " << config.hidden << ", intermediate " << config.intermediate << ", groups "
                     << counts.size());
  auto const groups = static_cast<std::int32_t>(counts.size());
  auto const offsets = test::offsets_from(counts, 2);
  std::int64_t const rows = offsets.back() + 3, h = config.hidden, gu = config.gate_up_rows(),
                     inter = config.intermediate;
  auto const x = test::random_vector<T>(static_cast<std::size_t>(rows * h), rng);
  auto const dy = test::random_vector<G>(static_cast<std::size_t>(rows * h), rng);
  auto const gate_up =
      test::random_vector<T>(static_cast<std::size_t>(groups * gu * h), rng, 2.0f / std::sqrt(float(h)));
  auto const down =
      test::random_vector<T>(static_cast<std::size_t>(groups * h * inter), rng, 1.0f / std::sqrt(float(inter)));
  auto const gu_bias = test::random_vector<T>(static_cast<std::size_t>(groups * gu), rng, 0.5f);
  auto const down_bias = test::random_vector<T>(static_cast<std::size_t>(groups * h), rng, 0.5f);

  // The Host: h, then the backward.
  auto const host_weights = expert_weights<T>(groups, gate_up.data(), down.data(), gu_bias.data(), down_bias.data());
  std::vector<float> h_host(static_cast<std::size_t>(rows * gu));
  std::span<std::int32_t const> const host_offsets(offsets);
  expert_mlp_gate_up(Host{}, config, host_weights, MatrixView<T const>(x.data(), rows, h), host_offsets,
                     MatrixView<float>(h_host.data(), rows, gu));
  std::vector<G> dx_ref(static_cast<std::size_t>(rows * h)), gu_ref(static_cast<std::size_t>(groups * gu * h)),
      down_ref(static_cast<std::size_t>(groups * h * inter)), gub_ref(static_cast<std::size_t>(groups * gu)),
      db_ref(static_cast<std::size_t>(groups * h));
  std::vector<std::byte> host_ws(expert_mlp_backward_workspace_bytes<T>(config, rows));
  expert_mlp_backward(Host{}, config, host_weights, MatrixView<T const>(x.data(), rows, h), host_offsets,
                      MatrixView<float const>(h_host.data(), rows, gu), MatrixView<G const>(dy.data(), rows, h),
                      MatrixView<G>(dx_ref.data(), rows, h),
                      ExpertWeightGrads<G>{.gate_up = {gu_ref.data(), groups, gu, h},
                                           .down = {down_ref.data(), groups, h, inter},
                                           .gate_up_bias = gub_ref.data(),
                                           .down_bias = db_ref.data()},
                      Workspace(host_ws.data(), host_ws.size()));

  CudaStream stream;
  DeviceBuffer<T> d_x(x), d_gu(gate_up), d_down(down), d_gub(gu_bias), d_dnb(down_bias);
  DeviceBuffer<G> d_dy(dy), d_dx(dx_ref.size()), g_gu(gu_ref.size()), g_down(down_ref.size()), g_gub(gub_ref.size()),
      g_db(db_ref.size());
  DeviceBuffer<std::int32_t> d_offsets(offsets);
  DeviceBuffer<std::byte> ws(cutlass_expert_mlp_backward_workspace_bytes<T>(config, groups, rows));
  auto const weights = expert_weights<T>(groups, d_gu.data(), d_down.data(), d_gub.data(), d_dnb.data());
  for (auto* b : {&d_dx, &g_gu, &g_down, &g_gub, &g_db}) b->poison(0xff);
  ws.poison(0xff);
  cutlass_expert_mlp_backward<T, G>(stream.ref(), config, weights, MatrixView<T const>(d_x.data(), rows, h),
                                    std::span<std::int32_t const>(d_offsets.data(), offsets.size()),
                                    MatrixView<G const>(d_dy.data(), rows, h), MatrixView<G>(d_dx.data(), rows, h),
                                    ExpertWeightGrads<G>{.gate_up = {g_gu.data(), groups, gu, h},
                                                         .down = {g_down.data(), groups, h, inter},
                                                         .gate_up_bias = g_gub.data(),
                                                         .down_bias = g_db.data()},
                                    Workspace(ws.data(), ws.size()));
  stream.sync();
  auto const dx = d_dx.to_host();
  std::vector<float> dx_in;
  std::vector<double> dx_want;
  std::int64_t overwritten = 0;
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t c = 0; c < h; ++c) {
      auto const i = static_cast<std::size_t>(r * h + c);
      if (r >= offsets.front() && r < offsets.back()) {
        dx_in.push_back(to_float(dx[i]));
        dx_want.push_back(to_float(dx_ref[i]));
      } else {
        overwritten += !all_bytes(dx[i], 0xff);
      }
    }
  CHECK(overwritten == 0);
  auto const doubles = [](std::vector<G> const& v) {
    std::vector<double> out(v.size());
    std::transform(v.begin(), v.end(), out.begin(), [](G e) { return static_cast<double>(to_float(e)); });
    return out;
  };
  // One rounding of dy (none when G = T) and of dh to T, then fp32 sums: 1e-2 of the largest element.
  if (!dx_want.empty()) CHECK(test::rel_error(dx_in, dx_want) <= 1e-2);
  CHECK(test::rel_error(g_gu.to_host(), doubles(gu_ref)) <= 1e-2);
  CHECK(test::rel_error(g_down.to_host(), doubles(down_ref)) <= 1e-2);
  CHECK(test::rel_error(g_gub.to_host(), doubles(gub_ref)) <= 1e-2);
  CHECK(test::rel_error(g_db.to_host(), doubles(db_ref)) <= 1e-2);
}

}  // namespace

TEST_CASE("cutlass_expert_mlp_backward[cuda]: bf16 gradients equal the Host's, every activation and layout") {
  EPX_TEST_SEEDED_RNG(rng);
  if (!cutlass_grouped_gemm_available()) return;
  for (Activation act : {Activation::kSwiGLU, Activation::kGeGLU, Activation::kGeGLUTanh, Activation::kClampedSwiGLU})
    for (GateUpLayout layout : {GateUpLayout::kConcatenated, GateUpLayout::kInterleaved})
      check_expert_backward<bfloat16, bfloat16>(
          {.hidden = 64, .intermediate = 48, .activation = act, .gate_up_layout = layout}, {30, 0, 71, 5}, rng);
  check_expert_backward<bfloat16, float>({.hidden = 136, .intermediate = 40, .activation = Activation::kGeGLU},
                                         {200, 3}, rng);
}

TEST_CASE("cutlass_expert_mlp_backward[cuda]: no rows: every weight and bias gradient is zero, dx untouched") {
  if (!cutlass_grouped_gemm_available()) return;
  ExpertMlpConfig const config{.hidden = 32, .intermediate = 16};
  std::int32_t const groups = 3;
  std::int64_t const rows = 4;  // offsets all 0: no expert has rows
  std::vector<std::int32_t> const offsets(groups + 1, 0);
  DeviceBuffer<bfloat16> d_x(std::vector<bfloat16>(rows * 32, bfloat16(1.0f))),
      d_gu(std::vector<bfloat16>(groups * 32 * 32, bfloat16(0.5f))),
      d_down(std::vector<bfloat16>(groups * 32 * 16, bfloat16(0.5f)));
  DeviceBuffer<bfloat16> d_dy(std::vector<bfloat16>(rows * 32, bfloat16(1.0f))), d_dx(rows * 32),
      g_gu(groups * 32 * 32), g_down(groups * 32 * 16), g_gub(groups * 32), g_db(groups * 32);
  DeviceBuffer<std::int32_t> d_offsets(offsets);
  DeviceBuffer<std::byte> ws(cutlass_expert_mlp_backward_workspace_bytes<bfloat16>(config, groups, rows));
  for (auto* b : {&d_dx, &g_gu, &g_down, &g_gub, &g_db}) b->poison(0xff);
  CudaStream stream;
  cutlass_expert_mlp_backward<bfloat16, bfloat16>(
      stream.ref(), config, expert_weights<bfloat16>(groups, d_gu.data(), d_down.data()),
      MatrixView<bfloat16 const>(d_x.data(), rows, 32), std::span<std::int32_t const>(d_offsets.data(), offsets.size()),
      MatrixView<bfloat16 const>(d_dy.data(), rows, 32), MatrixView<bfloat16>(d_dx.data(), rows, 32),
      ExpertWeightGrads<bfloat16>{.gate_up = {g_gu.data(), groups, 32, 32},
                                  .down = {g_down.data(), groups, 32, 16},
                                  .gate_up_bias = g_gub.data(),
                                  .down_bias = g_db.data()},
      Workspace(ws.data(), ws.size()));
  stream.sync();
  auto const zeros = [](std::vector<bfloat16> const& v) {
    return std::all_of(v.begin(), v.end(), [](bfloat16 e) { return to_float(e) == 0.0f && !all_bytes(e, 0xff); });
  };
  CHECK(zeros(g_gu.to_host()));
  CHECK(zeros(g_down.to_host()));
  CHECK(zeros(g_gub.to_host()));
  CHECK(zeros(g_db.to_host()));
  auto const dx = d_dx.to_host();
  CHECK(std::all_of(dx.begin(), dx.end(), [](bfloat16 e) { return all_bytes(e, 0xff); }));
}

TEST_CASE("ExpertParallel<CutlassGrouped | Grouped>::backward[cuda]: CUTLASS's gradients equal the Host's") {
  // Every GEMM of the backward on CUTLASS (h recomputed, dy and dh rounded to bf16): CutlassGrouped
  // at every case; Grouped, which runs CUTLASS's backward wherever CUTLASS runs, at prefill sizes
  // (its forward on CUTLASS too) and at decode sizes (its forward on epx's kernel).
  using namespace epx::test::backward;
  EPX_TEST_SEEDED_RNG(rng);
  if (!cutlass_grouped_gemm_available()) return;
  auto const all = cases();
  for (std::size_t i = 0; i < all.size(); ++i) {
    CAPTURE(i);
    check_case<CutlassGrouped, AllToAll, bfloat16>(all[i], rng);
    if (i % 2 == 0) check_case<CutlassGrouped, AllGather, bfloat16>(all[i], rng);
  }
  check_case<Grouped, AllGather, bfloat16>(all[1], rng);
  epx::test::backward::Case prefill = all[0];
  prefill.experts_per_rank = {3, 5};
  prefill.tokens_per_rank = {700, 560};
  check_case<Grouped, AllToAll, bfloat16>(prefill, rng);
}

TEST_CASE(
    "ExpertParallel<CutlassGrouped | Grouped>::backward[cuda]: from the h a CUTLASS forward kept "
    "(save_gate_up_output), the Host's gradients") {
  // The forward writes GEMM 1's output into saved with its bias added by the activation kernel;
  // the backward skips GEMM 1 and reads it (every activation and layout of cases(), biases on).
  using namespace epx::test::backward;
  EPX_TEST_SEEDED_RNG(rng);
  if (!cutlass_grouped_gemm_available()) return;
  auto const all = cases();
  for (std::size_t i = 0; i < all.size(); ++i) {
    CAPTURE(i);
    auto c = all[i];
    c.save_gate_up_output = true;
    check_case<CutlassGrouped, AllToAll, bfloat16>(c, rng);
    // Grouped at these (decode) sizes: its forward on epx's fused kernel (h by one more GEMM 1, the
    // bias inside it), its backward on CUTLASS from that h (no bias added again).
    if (i % 3 == 0) check_case<Grouped, AllToAll, bfloat16>(c, rng);
  }
  epx::test::backward::Case prefill = all[0];
  prefill.experts_per_rank = {3, 5};
  prefill.tokens_per_rank = {700, 560};
  prefill.save_gate_up_output = true;
  check_case<Grouped, AllToAll, bfloat16>(prefill, rng);  // Grouped's forward on CUTLASS at this size
}
