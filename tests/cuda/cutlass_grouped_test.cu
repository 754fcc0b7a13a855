// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// The CUTLASS path against the Host: cutlass_grouped_gemm (CUTLASS's sm90 ptr-array grouped GEMM,
// shapes written on the device) against grouped_gemm — bf16 and fp16 in, the input type and fp32
// out, both tile configurations, random inputs, outputs poisoned first (rows outside the groups and
// the padding of padded rows must stay poisoned, rows inside must be written), empty groups, ragged
// rows, > 256 groups, every group empty, a second run bitwise equal, CUDA-graph capture and replay,
// the host-side refusals; cutlass_expert_mlp against expert_mlp for every activation and gate/up
// layout, with and without biases; ExpertParallel<CutlassGrouped, AllToAll | AllGather, Cuda> on
// the shared scenarios (dense MoE and Host layer, 1-8 CudaLocalGroup ranks).
// Built for sm_90a only; skipped (exit 77) without a GPU, and passes trivially nowhere: on a device
// that is not sm_90 the availability check itself is what is tested.

#include <epx/cuda/cutlass_grouped.cuh>
// CUTLASS's headers first (read under NDEBUG), then the rest
#include "cuda_backend.cuh"

#include "../common/expert_parallel_scenarios.hpp"
#include "../common/test_util.hpp"
#include "device_buffer.cuh"
#include "poisoned_rows.cuh"

#include <epx/cuda.cuh>

#include <chrono>
#include <cstring>
#include <numeric>

using namespace epx;
using test::CudaStream;
using test::DeviceBuffer;

namespace {

constexpr std::array kTiles = {CutlassTile::kPingpong64x128, CutlassTile::kCooperative128x256};

using test::all_bytes;
using test::offsets_from;

struct Case {
  std::vector<std::int32_t> counts;
  std::int64_t k = 0, n = 0, lda_pad = 0, ldc_pad = 0;
  std::int32_t first_row = 3;
  std::int64_t rows_after = 5;
};

//! Runs `c` through `tile` and checks it against the Host reference; returns false where CUTLASS
//! cannot run (not an sm_90 device).
template <class T, class TOut>
bool check(Case const& c, CutlassTile tile, std::mt19937_64& rng) {
  if (!cutlass_grouped_gemm_available()) return false;
  INFO("groups " << c.counts.size() << ", k " << c.k << ", n " << c.n << ", lda +" << c.lda_pad << ", ldc +"
                 << c.ldc_pad << ", tile " << static_cast<int>(tile));
  auto const groups = static_cast<std::int64_t>(c.counts.size());
  auto const offsets = offsets_from(c.counts, c.first_row);
  std::int64_t const rows = offsets.back() + c.rows_after, lda = c.k + c.lda_pad, ldc = c.n + c.ldc_pad;
  auto const a = test::random_vector<T>(static_cast<std::size_t>(rows * lda), rng);
  auto const b =
      test::random_vector<T>(static_cast<std::size_t>(groups * c.n * c.k), rng, 1.0f / std::sqrt(float(c.k)));
  std::vector<float> ref(static_cast<std::size_t>(rows * c.n), 0.0f);
  grouped_gemm(Host{}, MatrixView<T const>(a.data(), rows, c.k, lda),
               BatchedMatrixView<T const>{b.data(), groups, c.n, c.k}, nullptr, std::span<std::int32_t const>(offsets),
               MatrixView<float>(ref.data(), rows, c.n));

  CudaStream stream;
  DeviceBuffer<T> d_a(a), d_b(b);
  DeviceBuffer<TOut> d_c(static_cast<std::size_t>(rows * ldc));
  DeviceBuffer<std::int32_t> d_offsets(offsets);
  DeviceBuffer<std::byte> ws(cutlass_grouped_gemm_workspace_bytes<T, TOut>(groups, tile));
  std::vector<TOut> first;
  for (int run = 0; run < 2; ++run) {
    d_c.poison(0xff);
    ws.poison(0xff);  // the argument kernel must write every group's arguments
    cutlass_grouped_gemm<T, TOut>(stream.ref(), MatrixView<T const>(d_a.data(), rows, c.k, lda),
                                  BatchedMatrixView<T const>{d_b.data(), groups, c.n, c.k},
                                  std::span<std::int32_t const>(d_offsets.data(), offsets.size()),
                                  MatrixView<TOut>(d_c.data(), rows, c.n, ldc), Workspace(ws.data(), ws.size()), tile);
    stream.sync();
    auto const got = d_c.to_host();
    if (run == 1) {
      CHECK(std::memcmp(first.data(), got.data(), got.size() * sizeof(TOut)) == 0);  // deterministic
      break;
    }
    first = got;
    auto const [got_in, ref_in, unwritten, overwritten] =
        test::split_poisoned(got, ref, rows, ldc, c.n, offsets.front(), offsets.back());
    CHECK(unwritten == 0);
    CHECK(overwritten == 0);
    // fp32 output: only the accumulation order differs; T output: one rounding more.
    if (!ref_in.empty()) CHECK(test::rel_error(got_in, ref_in) <= (std::is_same_v<TOut, float> ? 1e-4 : 1e-2));
  }
  return true;
}

template <class T, class TOut>
void check_every_tile(Case const& c, std::mt19937_64& rng) {
  for (CutlassTile tile : kTiles) check<T, TOut>(c, tile, rng);
}

}  // namespace

TEST_CASE_TEMPLATE("cutlass_grouped_gemm[cuda]: ragged groups, K and N edges, padded lda and ldc, both tiles", T,
                   bfloat16, epx::half) {
  EPX_TEST_SEEDED_RNG(rng);
  if (!cutlass_grouped_gemm_available()) {
    MESSAGE("not an sm_90 device with sm_90a code: the CUTLASS path is unavailable, as the test expects");
    return;
  }
  // Groups around both tile heights (64 and 128 rows), K of one and of several k-tiles with a tail
  // (k % 64 != 0 and k % 128 != 0), N around both tile widths (128 and 256).
  std::vector<std::int32_t> const counts = {0, 1, 7, 63, 64, 65, 0, 300, 16, 17, 129};
  for (std::int64_t k : {8, 72, 200})
    for (std::int64_t n : {8, 136, 264}) {
      Case const c{.counts = counts, .k = k, .n = n, .lda_pad = 8, .ldc_pad = 8};
      check_every_tile<T, T>(c, rng);
      check_every_tile<T, float>(c, rng);
    }
  check_every_tile<T, T>({.counts = {0, 0, 1000, 0}, .k = 128, .n = 136}, rng);  // every row on one group
}

TEST_CASE("cutlass_grouped_gemm[cuda]: more than 256 groups, most empty; every group empty leaves c untouched") {
  EPX_TEST_SEEDED_RNG(rng);
  std::vector<std::int32_t> counts(700, 0);
  std::uniform_int_distribution<int> rows(1, 20), pick(0, 9);
  for (auto& n : counts)
    if (pick(rng) < 2) n = rows(rng);
  counts.back() = 3;
  check_every_tile<bfloat16, bfloat16>({.counts = counts, .k = 64, .n = 72}, rng);
  check_every_tile<bfloat16, float>({.counts = std::vector<std::int32_t>(300, 0), .k = 64, .n = 40}, rng);
}

TEST_CASE("cutlass_grouped_gemm[cuda]: model sizes (Qwen3-MoE gate_up and down, gpt-oss widths)") {
  EPX_TEST_SEEDED_RNG(rng);
  std::int64_t const h = test::pick_size(2048, 256), i2 = test::pick_size(1536, 192);
  check<bfloat16, float>({.counts = std::vector<std::int32_t>(16, 9), .k = h, .n = i2}, CutlassTile::kPingpong64x128,
                         rng);
  check<bfloat16, float>({.counts = std::vector<std::int32_t>(8, 500), .k = h, .n = i2},
                         CutlassTile::kCooperative128x256, rng);
  check<bfloat16, bfloat16>({.counts = {300, 0, 257}, .k = test::pick_size(768, 96), .n = h},
                            CutlassTile::kCooperative128x256, rng);
  std::int64_t const gpt = test::pick_size(2880, 360);
  check<bfloat16, bfloat16>({.counts = {200, 3}, .k = gpt, .n = gpt}, CutlassTile::kPingpong64x128, rng);
}

TEST_CASE("cutlass_grouped_gemm[cuda]: captured in a CUDA graph and replayed gives the eager result") {
  EPX_TEST_SEEDED_RNG(rng);
  if (!cutlass_grouped_gemm_available()) return;
  std::vector<std::int32_t> const offsets = {0, 5, 5, 45, 245};
  std::int64_t const rows = 245, k = 128, n = 256, groups = 4;
  auto const a = test::random_vector<bfloat16>(static_cast<std::size_t>(rows * k), rng);
  auto const b = test::random_vector<bfloat16>(static_cast<std::size_t>(groups * n * k), rng, 0.1f);
  CudaStream stream;
  DeviceBuffer<bfloat16> d_a(a), d_b(b), d_eager(static_cast<std::size_t>(rows * n)),
      d_graph(static_cast<std::size_t>(rows * n));
  DeviceBuffer<std::int32_t> d_offsets(offsets);
  for (CutlassTile tile : kTiles) {
    DeviceBuffer<std::byte> ws(cutlass_grouped_gemm_workspace_bytes<bfloat16, bfloat16>(groups, tile));
    auto gemm = [&](bfloat16* out) {
      cutlass_grouped_gemm<bfloat16, bfloat16>(stream.ref(), MatrixView<bfloat16 const>(d_a.data(), rows, k),
                                               BatchedMatrixView<bfloat16 const>{d_b.data(), groups, n, k},
                                               std::span<std::int32_t const>(d_offsets.data(), offsets.size()),
                                               MatrixView<bfloat16>(out, rows, n), Workspace(ws.data(), ws.size()),
                                               tile);
    };
    gemm(d_eager.data());
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    EPX_CUDA_CHECK(cudaStreamBeginCapture(stream.s, cudaStreamCaptureModeGlobal));
    gemm(d_graph.data());
    EPX_CUDA_CHECK(cudaStreamEndCapture(stream.s, &graph));
    EPX_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    d_graph.poison(0xff);
    EPX_CUDA_CHECK(cudaGraphLaunch(exec, stream.s));
    stream.sync();
    auto const e = d_eager.to_host(), g = d_graph.to_host();
    CHECK(std::memcmp(e.data(), g.data(), e.size() * sizeof(bfloat16)) == 0);
    (void)cudaGraphExecDestroy(exec);
    (void)cudaGraphDestroy(graph);
  }
}

TEST_CASE("cutlass_grouped_gemm[cuda]: shapes CUTLASS cannot take are refused, naming the parameter") {
  if (!cutlass_grouped_gemm_available()) return;
  std::vector<std::int32_t> const offsets = {0, 4, 8};
  DeviceBuffer<bfloat16> d_a(std::vector<bfloat16>(8 * 24)), d_b(std::vector<bfloat16>(2 * 16 * 24)),
      d_c(std::vector<bfloat16>(8 * 16));
  DeviceBuffer<std::int32_t> d_offsets(offsets);
  DeviceBuffer<std::byte> ws(cutlass_grouped_gemm_workspace_bytes<bfloat16, bfloat16>(2, CutlassTile::kPingpong64x128));
  CudaStream stream;
  auto run = [&](std::int64_t k, std::int64_t n, std::int64_t lda) {
    cutlass_grouped_gemm<bfloat16, bfloat16>(stream.ref(), MatrixView<bfloat16 const>(d_a.data(), 8, k, lda),
                                             BatchedMatrixView<bfloat16 const>{d_b.data(), 2, n, k},
                                             std::span<std::int32_t const>(d_offsets.data(), offsets.size()),
                                             MatrixView<bfloat16>(d_c.data(), 8, n), Workspace(ws.data(), ws.size()),
                                             CutlassTile::kPingpong64x128);
  };
  test::check_throws(Errc::kInvalidArgument, "cutlass_grouped_gemm: k (and lda) = 20 (24)", [&] { run(20, 16, 24); });
  test::check_throws(Errc::kInvalidArgument, "cutlass_grouped_gemm: n (and ldc) = 12 (12)", [&] { run(24, 12, 24); });
  test::check_throws(Errc::kWorkspaceTooSmall, "cutlass_grouped_gemm: workspace.size() = 0 bytes", [&] {
    cutlass_grouped_gemm<bfloat16, bfloat16>(stream.ref(), MatrixView<bfloat16 const>(d_a.data(), 8, 24),
                                             BatchedMatrixView<bfloat16 const>{d_b.data(), 2, 16, 24},
                                             std::span<std::int32_t const>(d_offsets.data(), offsets.size()),
                                             MatrixView<bfloat16>(d_c.data(), 8, 16), Workspace(ws.data(), 0),
                                             CutlassTile::kPingpong64x128);
  });
}

namespace {

//! cutlass_expert_mlp against the Host expert_mlp on the same rows (outside rows left poisoned).
template <class T>
void check_mlp(ExpertMlpConfig const& config, std::vector<std::int32_t> const& counts, bool bias,
               std::mt19937_64& rng) {
  INFO("activation " << static_cast<int>(config.activation) << ", layout " << static_cast<int>(config.gate_up_layout)
                     << ", bias " << bias << ", hidden " << config.hidden << ", intermediate " << config.intermediate);
  auto const groups = static_cast<std::int32_t>(counts.size());
  auto const offsets = offsets_from(counts, 2);
  std::int64_t const rows = offsets.back() + 3, h = config.hidden, gu = config.gate_up_rows(),
                     inter = config.intermediate;
  auto const x = test::random_vector<T>(static_cast<std::size_t>(rows * h), rng);
  auto const gate_up =
      test::random_vector<T>(static_cast<std::size_t>(groups * gu * h), rng, 2.0f / std::sqrt(float(h)));
  auto const down =
      test::random_vector<T>(static_cast<std::size_t>(groups * h * inter), rng, 1.0f / std::sqrt(float(inter)));
  auto const gu_bias = test::random_vector<T>(static_cast<std::size_t>(groups * gu), rng, 0.5f);
  auto const down_bias = test::random_vector<T>(static_cast<std::size_t>(groups * h), rng, 0.5f);
  auto const host_weights = expert_weights<T>(groups, gate_up.data(), down.data(), bias ? gu_bias.data() : nullptr,
                                              bias ? down_bias.data() : nullptr);
  std::vector<T> ref(static_cast<std::size_t>(rows * h));
  std::vector<std::byte> host_ws(expert_mlp_workspace_bytes<T>(config, rows));
  expert_mlp(Host{}, config, host_weights, MatrixView<T const>(x.data(), rows, h),
             std::span<std::int32_t const>(offsets), MatrixView<T>(ref.data(), rows, h),
             Workspace(host_ws.data(), host_ws.size()));

  CudaStream stream;
  DeviceBuffer<T> d_x(x), d_gu(gate_up), d_down(down), d_gub(gu_bias), d_db(down_bias),
      d_out(static_cast<std::size_t>(rows * h));
  DeviceBuffer<std::int32_t> d_offsets(offsets);
  DeviceBuffer<std::byte> ws(cutlass_expert_mlp_workspace_bytes<T>(config, groups, rows, bias));
  auto const weights = expert_weights<T>(groups, d_gu.data(), d_down.data(), bias ? d_gub.data() : nullptr,
                                         bias ? d_db.data() : nullptr);
  std::vector<T> first;
  for (int run = 0; run < 2; ++run) {
    d_out.poison(0xff);
    ws.poison(0xff);
    cutlass_expert_mlp<T>(stream.ref(), config, weights, MatrixView<T const>(d_x.data(), rows, h),
                          std::span<std::int32_t const>(d_offsets.data(), offsets.size()),
                          MatrixView<T>(d_out.data(), rows, h), Workspace(ws.data(), ws.size()));
    stream.sync();
    auto const got = d_out.to_host();
    if (run == 1) {
      CHECK(std::memcmp(first.data(), got.data(), got.size() * sizeof(T)) == 0);
      break;
    }
    first = got;
    std::vector<float> got_in;
    std::vector<double> ref_in;
    std::int64_t overwritten = 0;
    for (std::int64_t r = 0; r < rows; ++r)
      for (std::int64_t c = 0; c < h; ++c) {
        auto const i = static_cast<std::size_t>(r * h + c);
        if (r >= offsets.front() && r < offsets.back()) {
          got_in.push_back(to_float(got[i]));
          ref_in.push_back(to_float(ref[i]));
        } else {
          overwritten += !all_bytes(got[i], 0xff);
        }
      }
    CHECK(overwritten == 0);
    for (float v : got_in) REQUIRE_MESSAGE(std::isfinite(v), "a row inside the groups was not written");
    if (!ref_in.empty()) CHECK(test::rel_error(got_in, ref_in) <= 1e-2);  // both round a and out once to T
  }
}

}  // namespace

TEST_CASE_TEMPLATE("cutlass_expert_mlp[cuda]: every activation and gate/up layout equals the Host expert_mlp", T,
                   bfloat16, epx::half) {
  EPX_TEST_SEEDED_RNG(rng);
  if (!cutlass_grouped_gemm_available()) return;
  std::vector<std::int32_t> const counts = {0, 9, 130, 1, 0, 64, 200};
  for (Activation a :
       {Activation::kSwiGLU, Activation::kGeGLU, Activation::kGeGLUTanh, Activation::kReLU, Activation::kClampedSwiGLU})
    for (GateUpLayout layout : {GateUpLayout::kConcatenated, GateUpLayout::kInterleaved}) {
      if (a == Activation::kReLU && layout == GateUpLayout::kInterleaved) continue;  // not gated: one layout
      ExpertMlpConfig config{.hidden = 136, .intermediate = 72, .activation = a, .gate_up_layout = layout};
      config.clamped_swiglu = {.alpha = 1.702f, .limit = 1.5f};  // a limit the data reaches
      check_mlp<T>(config, counts, false, rng);
      check_mlp<T>(config, counts, true, rng);
    }
  check_mlp<T>({.hidden = 64, .intermediate = 32}, std::vector<std::int32_t>(300, 0), true, rng);  // no rows at all
}

namespace epx::test {
using CudaCutlassAllToAll = EpPolicy<CudaBackend, CutlassGrouped, AllToAll>;
using CudaCutlassAllGather = EpPolicy<CudaBackend, CutlassGrouped, AllGather>;
}  // namespace epx::test
TYPE_TO_STRING_AS("CutlassGrouped, AllToAll", epx::test::CudaCutlassAllToAll);
TYPE_TO_STRING_AS("CutlassGrouped, AllGather", epx::test::CudaCutlassAllGather);

TEST_CASE_TEMPLATE("ExpertParallel<CutlassGrouped>[cuda]: N ranks equal the dense MoE and the Host layer", P,
                   epx::test::CudaCutlassAllToAll, epx::test::CudaCutlassAllGather) {
  using namespace epx::test;
  EPX_TEST_SEEDED_RNG(rng);
  if (!cutlass_grouped_gemm_available()) return;
  check_rank_counts<P, bfloat16>({.tokens_per_rank = {17, 5, 0, 11}, .bias = true}, rng);
  check_rank_counts<P, epx::half>({.tokens_per_rank = {9, 30}}, rng);
  check_rank_counts<P, bfloat16>({.num_experts = 10, .top_k = 3, .tokens_per_rank = {9, 14, 3, 21}}, rng);
  check_rank_counts<P, bfloat16>({.tokens_per_rank = {40, 7}, .routing = Routing::kHotExpert}, rng);
  check_rank_counts<P, bfloat16>({.tokens_per_rank = {12}, .routing = Routing::kWithInvalid, .from_logits = false},
                                 rng);
  check_rank_counts<P, bfloat16>({.tokens_per_rank = {0}}, rng);  // zero tokens everywhere
  ExpertMlpConfig gated{.hidden = 64,
                        .intermediate = 48,
                        .activation = Activation::kClampedSwiGLU,
                        .gate_up_layout = GateUpLayout::kInterleaved};
  check_rank_counts<P, bfloat16>({.mlp = gated, .tokens_per_rank = {13, 6}, .bias = true, .from_logits = true}, rng);
}

TEST_CASE("ExpertParallel<CutlassGrouped>[cuda]: fp32 weights and odd widths are refused at construction") {
  epx::test::SmallLayer layer;
  CudaLocalGroup group(1);
  std::vector<float> const unread(1);
  auto const fp32 = ExpertParallel<CutlassGrouped, AllToAll, Cuda>::can_implement(
      layer.config(expert_weights<float>(epx::test::SmallLayer::kExperts, unread.data(), unread.data())),
      group.communicator(0));
  REQUIRE(fp32.has_value());
  CHECK(std::string(fp32->what()).find("weights.dtype = f32, expected bf16 or f16") != std::string::npos);
  std::vector<bfloat16> const unread16(1);
  auto odd = layer.config(expert_weights<bfloat16>(epx::test::SmallLayer::kExperts, unread16.data(), unread16.data()));
  odd.mlp.intermediate = 12;
  auto const widths = ExpertParallel<CutlassGrouped, AllGather, Cuda>::can_implement(odd, group.communicator(0));
  REQUIRE(widths.has_value());
  CHECK(std::string(widths->what()).find("mlp.intermediate = 12, expected a multiple of 8") != std::string::npos);
}

TEST_CASE(
    "ExpertParallel<Grouped>[cuda]: with CUTLASS built in, Grouped runs it at prefill and its own kernel for decode") {
  // This unit carries the CUTLASS path (EPX_HAVE_CUTLASS): Grouped picks per forward, from the rows
  // per local expert (GroupedKernelPolicy: CUTLASS from 128), and says which kernel ran. Both agree
  // with the Host layer on the same routing.
  using namespace epx::test;
  EPX_TEST_SEEDED_RNG(rng);
  static_assert(epx::detail::CudaGroupedExperts::kWithCutlass);
  bool const cutlass_here = cutlass_grouped_gemm_available();
  Scenario const s{.num_experts = 8, .top_k = 2, .mlp = {.hidden = 64, .intermediate = 48}, .bias = true};
  auto const gw = GlobalWeights<bfloat16>::random(s.num_experts, s.mlp, s.bias, rng);
  CudaLocalGroup group(1, {.timeout = std::chrono::seconds(30)});
  group.run([&](int, Communicator& comm) {
    CudaStream stream;
    DeviceExperts<bfloat16> const experts(gw, ExpertRange{0, s.num_experts});
    ExpertParallel<Grouped, AllToAll, Cuda> ep(
        MoeConfig{.router = s.router(), .mlp = s.mlp, .weights = experts.weights()}, comm);
    CHECK(ep.expert_kernel() == "none");
    // 100 tokens: 25 rows per expert (decode-like); 700 tokens: 175 per expert (prefill).
    for (std::int64_t const t : {std::int64_t{100}, std::int64_t{700}}) {
      CAPTURE(t);
      auto const x_host = random_vector<bfloat16>(static_cast<std::size_t>(t * s.mlp.hidden), rng);
      auto const ids_host = make_ids(s, t, rng);
      auto const weights_host = random_weights(ids_host.size(), rng);
      DeviceBuffer<std::byte> ws(ep.workspace_bytes(t));
      DeviceBuffer<bfloat16> x(x_host), y(x_host.size());
      DeviceBuffer<float> weights(weights_host);
      DeviceBuffer<std::int32_t> ids(ids_host);
      y.poison(0xff);
      ep.forward(stream.ref(), MatrixView<std::int32_t const>(ids.data(), t, s.top_k),
                 MatrixView<float const>(weights.data(), t, s.top_k),
                 MatrixView<bfloat16 const>(x.data(), t, s.mlp.hidden), MatrixView<bfloat16>(y.data(), t, s.mlp.hidden),
                 Workspace(ws.data(), ws.size()));
      stream.sync();
      std::string_view const want = t == 700 && cutlass_here ? "cutlass" : "epx";
      CHECK(ep.expert_kernel() == want);
      RankInputs<bfloat16> in{.x = x_host, .ids = ids_host, .weights = weights_host};
      CHECK(rel_error(y.to_host(), host_layer(s, gw, in).y) <= CudaBackend::tolerance<bfloat16>());
    }
  });
}

namespace epx::test {
using CudaGroupedAllToAll = EpPolicy<CudaBackend, Grouped, AllToAll>;
}  // namespace epx::test
TYPE_TO_STRING_AS("Grouped (CUTLASS built in), AllToAll", epx::test::CudaGroupedAllToAll);

TEST_CASE(
    "ExpertParallel<Grouped>[cuda]: with CUTLASS built in, N ranks at prefill sizes equal the dense MoE and the Host") {
  using namespace epx::test;
  EPX_TEST_SEEDED_RNG(rng);
  // 8 experts, top-2: ~170 rows per local expert, so every rank's Grouped runs CUTLASS (on sm_90).
  check_rank_counts<CudaGroupedAllToAll, bfloat16>({.tokens_per_rank = {700, 650}, .bias = true}, rng);
}
