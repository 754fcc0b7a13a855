// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// grouped_gemm and expert_mlp on the GPU (policies Grouped and CublasGrouped) against their Host
// twins: random inputs, outputs poisoned with NaN bytes first (rows outside the groups must stay
// poisoned, rows inside must be written), two runs bitwise equal.

#include "../common/test_util.hpp"
#include "device_buffer.cuh"

#include <epx/cuda.cuh>

#include <cstring>
#include <numeric>

using namespace epx;
using test::CudaStream;
using test::DeviceBuffer;

namespace {

// Row counts of the groups, mixed in one call: empty, single, around the 16/64/128-row tiles, large.
std::vector<std::int32_t> const kMixedCounts = {0, 1, 7, 63, 64, 65, 0, 1000, 16, 17, 129};

template <class T>
constexpr double tolerance() {
  return std::is_same_v<T, float> ? 1e-5 : 1e-2;
}

//! offsets[0] = first_row; rows before it and after the last group are outside every group.
std::vector<std::int32_t> offsets_from(std::vector<std::int32_t> const& counts, std::int32_t first_row) {
  std::vector<std::int32_t> offsets(counts.size() + 1, first_row);
  std::partial_sum(counts.begin(), counts.end(), offsets.begin() + 1, std::plus<>{});
  for (std::size_t g = 1; g < offsets.size(); ++g) offsets[g] += first_row;
  return offsets;
}

template <class T>
bool all_bytes(T const* p, std::size_t n, unsigned char byte) {
  auto const* b = reinterpret_cast<unsigned char const*>(p);
  return std::all_of(b, b + n * sizeof(T), [&](unsigned char v) { return v == byte; });
}

//! Checks rows [first, last) against `ref` (fp32/double values) and that the other rows still hold the poison.
template <class T, class R>
void check_rows(std::vector<T> const& got, std::vector<R> const& ref, std::int64_t rows, std::int64_t cols,
                std::int64_t first, std::int64_t last, double tol) {
  std::vector<float> got_in;
  std::vector<double> ref_in;
  for (std::int64_t r = first; r < last; ++r)
    for (std::int64_t c = 0; c < cols; ++c) {
      got_in.push_back(to_float(got[static_cast<std::size_t>(r * cols + c)]));
      ref_in.push_back(static_cast<double>(ref[static_cast<std::size_t>(r * cols + c)]));
    }
  if (!ref_in.empty()) CHECK(test::rel_error(got_in, ref_in) <= tol);
  for (float v : got_in) REQUIRE_MESSAGE(std::isfinite(v), "a row inside the groups was not written");
  CHECK(all_bytes(got.data(), static_cast<std::size_t>(first * cols), 0xff));
  CHECK(all_bytes(got.data() + last * cols, static_cast<std::size_t>((rows - last) * cols), 0xff));
}

template <class T>
void check_gemm(std::vector<std::int32_t> const& counts, std::int64_t k, std::int64_t n, bool with_bias,
                bool with_scale, std::mt19937_64& rng) {
  CAPTURE(k);
  CAPTURE(n);
  CAPTURE(with_bias);
  CAPTURE(with_scale);
  auto const groups = static_cast<std::int64_t>(counts.size());
  auto const offsets = offsets_from(counts, 3);
  std::int64_t const rows = offsets.back() + 5;
  auto const a = test::random_vector<T>(static_cast<std::size_t>(rows * k), rng);
  auto const b = test::random_vector<T>(static_cast<std::size_t>(groups * n * k), rng, 1.0f / std::sqrt(float(k)));
  auto const bias = test::random_vector<T>(static_cast<std::size_t>(groups * n), rng);
  auto const scale = test::random_weights(static_cast<std::size_t>(rows), rng);

  // Host reference in fp32 (the row scale applies before the one rounding).
  std::vector<float> ref(static_cast<std::size_t>(rows * n), 0.0f);
  grouped_gemm(Host{}, MatrixView<T const>(a.data(), rows, k), BatchedMatrixView<T const>{b.data(), groups, n, k},
               with_bias ? bias.data() : nullptr, std::span<std::int32_t const>(offsets), MatrixView<float>(ref.data(), rows, n));
  if (with_scale)
    for (std::int64_t r = 0; r < rows; ++r)
      for (std::int64_t c = 0; c < n; ++c) ref[static_cast<std::size_t>(r * n + c)] *= scale[static_cast<std::size_t>(r)];

  CudaStream stream;
  DeviceBuffer<T> d_a(a), d_b(b), d_bias(bias), d_c(static_cast<std::size_t>(rows * n));
  DeviceBuffer<float> d_scale(scale);
  DeviceBuffer<std::int32_t> d_offsets(offsets);
  std::vector<T> first;
  for (int run = 0; run < 2; ++run) {
    d_c.poison(0xff);
    grouped_gemm(stream.ref(), MatrixView<T const>(d_a.data(), rows, k),
                 BatchedMatrixView<T const>{d_b.data(), groups, n, k}, with_bias ? d_bias.data() : nullptr,
                 std::span<std::int32_t const>(d_offsets.data(), offsets.size()), MatrixView<T>(d_c.data(), rows, n),
                 GroupedGemmOptions{.row_scale = with_scale ? d_scale.data() : nullptr});
    stream.sync();
    auto const c = d_c.to_host();
    if (run == 0) {
      check_rows(c, ref, rows, n, offsets.front(), offsets.back(), tolerance<T>());
      first = c;
    } else {
      CHECK(std::memcmp(first.data(), c.data(), c.size() * sizeof(T)) == 0);  // deterministic
    }
  }
}

}  // namespace

TEST_CASE_TEMPLATE("GroupedGemm::grouped_gemm[cuda]: mixed group sizes equal the host reference", T, float, bfloat16,
                   epx::half) {
  EPX_TEST_SEEDED_RNG(rng);
  for (std::int64_t k : {8, 72, 256})
    for (std::int64_t n : {8, 40, 200})
      check_gemm<T>(kMixedCounts, k, n, (k + n) % 3 == 0, n == 40, rng);
  check_gemm<T>({0, 0, 1000, 0}, 128, 136, true, true, rng);  // every row on one group
}

TEST_CASE("GroupedGemm::grouped_gemm[cuda]: model sizes, each tile shape") {
  EPX_TEST_SEEDED_RNG(rng);
  // Qwen3-MoE gate_up (H 2048 -> 2I 1536) with decode-like (<= 16 rows/group), medium and large groups.
  check_gemm<bfloat16>(std::vector<std::int32_t>(16, 9), 2048, 1536, false, false, rng);
  check_gemm<bfloat16>(std::vector<std::int32_t>(8, 50), 2048, 1536, false, false, rng);
  check_gemm<bfloat16>({300, 0, 257}, 768, 2048, true, true, rng);  // down: I 768 -> H 2048
  check_gemm<bfloat16>({200, 3}, 2880, 2880, true, false, rng);    // gpt-oss widths (not multiples of 64/128)
}

namespace {

template <class T>
void check_mlp(ExpertMlpConfig const& config, std::vector<std::int32_t> const& counts, bool with_bias,
               std::mt19937_64& rng) {
  CAPTURE(to_string(config.activation));
  CAPTURE(static_cast<int>(config.gate_up_layout));
  CAPTURE(with_bias);
  auto const groups = static_cast<std::int32_t>(counts.size());
  auto const offsets = offsets_from(counts, 2);
  std::int64_t const rows = offsets.back() + 3, h = config.hidden, inter = config.intermediate;
  std::int64_t const gu = config.gate_up_rows();
  auto const x = test::random_vector<T>(static_cast<std::size_t>(rows * h), rng);
  auto const gate_up = test::random_vector<T>(static_cast<std::size_t>(groups * gu * h), rng, 2.0f / std::sqrt(float(h)));
  auto const down = test::random_vector<T>(static_cast<std::size_t>(groups * h * inter), rng, 1.0f / std::sqrt(float(inter)));
  auto const gu_bias = test::random_vector<T>(static_cast<std::size_t>(groups * gu), rng, 0.5f);
  auto const down_bias = test::random_vector<T>(static_cast<std::size_t>(groups * h), rng, 0.5f);

  std::vector<T> ref(static_cast<std::size_t>(rows * h), from_float<T>(0.0f));
  std::vector<std::byte> host_ws(expert_mlp_workspace_bytes<T>(config, rows));
  expert_mlp(Host{}, config,
             expert_weights<T>(groups, gate_up.data(), down.data(), with_bias ? gu_bias.data() : nullptr,
                               with_bias ? down_bias.data() : nullptr),
             MatrixView<T const>(x.data(), rows, h), std::span<std::int32_t const>(offsets),
             MatrixView<T>(ref.data(), rows, h), Workspace(host_ws.data(), host_ws.size()));
  std::vector<double> ref_d(ref.size());
  std::transform(ref.begin(), ref.end(), ref_d.begin(), [](T v) { return double{to_float(v)}; });

  CudaStream stream;
  DeviceBuffer<T> d_x(x), d_gu(gate_up), d_down(down), d_gub(gu_bias), d_db(down_bias),
      d_out(static_cast<std::size_t>(rows * h));
  DeviceBuffer<std::int32_t> d_offsets(offsets);
  auto const weights = expert_weights<T>(groups, d_gu.data(), d_down.data(), with_bias ? d_gub.data() : nullptr,
                                         with_bias ? d_db.data() : nullptr);
  std::span<std::int32_t const> const offs(d_offsets.data(), offsets.size());
  MatrixView<T const> const dx(d_x.data(), rows, h);
  MatrixView<T> const dout(d_out.data(), rows, h);

  {  // Grouped
    INFO("policy Grouped");
    DeviceBuffer<std::byte> ws(cuda_expert_mlp_workspace_bytes<T>(config, rows));
    std::vector<T> first;
    for (int run = 0; run < 2; ++run) {
      d_out.poison(0xff);
      ws.poison(0xff);  // the activation scratch must be written before it is read
      expert_mlp<T>(stream.ref(), config, weights, dx, offs, dout, Workspace(ws.data(), ws.size()));
      stream.sync();
      auto const out = d_out.to_host();
      if (run == 0) {
        check_rows(out, ref_d, rows, h, offsets.front(), offsets.back(), tolerance<T>());
        first = out;
      } else {
        CHECK(std::memcmp(first.data(), out.data(), out.size() * sizeof(T)) == 0);
      }
    }
  }
  {  // CublasGrouped
    INFO("policy CublasGrouped");
    detail::CudaCublasGroupedExperts experts;
    DeviceBuffer<std::byte> ws(experts.workspace_bytes<T>(config, rows));
    d_out.poison(0xff);
    ws.poison(0xff);
    experts.run<T>(stream.ref(), config, weights, dx, offs, dout, Workspace(ws.data(), ws.size()), -1);
    stream.sync();
    // cuBLAS rounds the gate_up product to T before the activation: about one more rounding.
    check_rows(d_out.to_host(), ref_d, rows, h, offsets.front(), offsets.back(),
               std::is_same_v<T, float> ? 1e-5 : 2e-2);
  }
}

}  // namespace

TEST_CASE_TEMPLATE("ExpertMlp::expert_mlp[cuda]: every activation and gate/up layout equals the host reference", T,
                   float, bfloat16, epx::half) {
  EPX_TEST_SEEDED_RNG(rng);
  for (Activation act : {Activation::kSwiGLU, Activation::kGeGLU, Activation::kGeGLUTanh, Activation::kReLU,
                         Activation::kClampedSwiGLU})
    for (GateUpLayout layout : {GateUpLayout::kConcatenated, GateUpLayout::kInterleaved}) {
      if (act == Activation::kReLU && layout == GateUpLayout::kInterleaved) continue;  // not gated
      ExpertMlpConfig const config{.hidden = 64, .intermediate = 48, .activation = act, .gate_up_layout = layout,
                                   .clamped_swiglu = {.alpha = 1.702f, .limit = 1.5f}};  // a limit the data reaches
      check_mlp<T>(config, kMixedCounts, act == Activation::kClampedSwiGLU || layout == GateUpLayout::kInterleaved, rng);
    }
}

TEST_CASE("ExpertMlp::expert_mlp[cuda]: model sizes (Qwen3-MoE and gpt-oss widths), all rows on one expert") {
  EPX_TEST_SEEDED_RNG(rng);
  check_mlp<bfloat16>({.hidden = 2048, .intermediate = 768}, {40, 0, 9, 130, 1, 0, 17, 64}, false, rng);
  check_mlp<bfloat16>({.hidden = 2880, .intermediate = 2880, .activation = Activation::kClampedSwiGLU,
                       .gate_up_layout = GateUpLayout::kInterleaved},
                      {33, 0, 70}, true, rng);
  check_mlp<bfloat16>({.hidden = 256, .intermediate = 128}, {0, 0, 2000, 0}, false, rng);
}

TEST_CASE("ExpertMlp::expert_mlp[cuda]: captured in a CUDA graph and replayed gives the eager result") {
  EPX_TEST_SEEDED_RNG(rng);
  ExpertMlpConfig const config{.hidden = 128, .intermediate = 64};
  std::vector<std::int32_t> const counts = {5, 0, 40, 200};
  auto const offsets = offsets_from(counts, 0);
  std::int64_t const rows = offsets.back();
  auto const x = test::random_vector<bfloat16>(static_cast<std::size_t>(rows * 128), rng);
  auto const gu = test::random_vector<bfloat16>(static_cast<std::size_t>(4 * 128 * 128), rng, 0.1f);
  auto const down = test::random_vector<bfloat16>(static_cast<std::size_t>(4 * 128 * 64), rng, 0.1f);
  CudaStream stream;
  DeviceBuffer<bfloat16> d_x(x), d_gu(gu), d_down(down), d_eager(static_cast<std::size_t>(rows * 128)),
      d_graph(static_cast<std::size_t>(rows * 128));
  DeviceBuffer<std::int32_t> d_offsets(offsets);
  DeviceBuffer<std::byte> ws(cuda_expert_mlp_workspace_bytes<bfloat16>(config, rows));
  auto const weights = expert_weights<bfloat16>(4, d_gu.data(), d_down.data());
  auto forward = [&](bfloat16* out) {
    expert_mlp<bfloat16>(stream.ref(), config, weights, MatrixView<bfloat16 const>(d_x.data(), rows, 128),
                         std::span<std::int32_t const>(d_offsets.data(), offsets.size()),
                         MatrixView<bfloat16>(out, rows, 128), Workspace(ws.data(), ws.size()));
  };
  forward(d_eager.data());
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  EPX_CUDA_CHECK(cudaStreamBeginCapture(stream.s, cudaStreamCaptureModeGlobal));
  forward(d_graph.data());
  EPX_CUDA_CHECK(cudaStreamEndCapture(stream.s, &graph));
  EPX_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  d_graph.poison(0xff);
  EPX_CUDA_CHECK(cudaGraphLaunch(exec, stream.s));
  stream.sync();
  auto const a = d_eager.to_host(), b = d_graph.to_host();
  CHECK(std::memcmp(a.data(), b.data(), a.size() * sizeof(bfloat16)) == 0);
  (void)cudaGraphExecDestroy(exec);
  (void)cudaGraphDestroy(graph);
}
