// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// grouped_gemm and expert_mlp on the GPU (policies Grouped and CublasGrouped) against their Host
// twins: random inputs, outputs poisoned with NaN bytes first (rows outside the groups and the
// padding of padded rows must stay poisoned, rows inside must be written), two runs bitwise equal.
// Every mainloop (each mma.sync tile, SIMT) is run by name as well as through the tile policy,
// with every epilogue, so that no kernel waits for a model shape to be exercised.
// EPX_TEST_SMALL=1 (compute-sanitizer runs) shrinks the model-sized cases only.

#include "../common/test_util.hpp"
#include "device_buffer.cuh"

#include <epx/cuda.cuh>

#include <cstring>
#include <numeric>
#include <optional>

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
               with_bias ? bias.data() : nullptr, std::span<std::int32_t const>(offsets),
               MatrixView<float>(ref.data(), rows, n));
  if (with_scale)
    for (std::int64_t r = 0; r < rows; ++r)
      for (std::int64_t c = 0; c < n; ++c)
        ref[static_cast<std::size_t>(r * n + c)] *= scale[static_cast<std::size_t>(r)];

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
    for (std::int64_t n : {8, 40, 200}) check_gemm<T>(kMixedCounts, k, n, (k + n) % 3 == 0, n == 40, rng);
  check_gemm<T>({0, 0, 1000, 0}, 128, 136, true, true, rng);  // every row on one group
}

TEST_CASE("GroupedGemm::grouped_gemm[cuda]: model sizes, each tile shape") {
  EPX_TEST_SEEDED_RNG(rng);
  // Qwen3-MoE gate_up (H 2048 -> 2I 1536) with decode-like (<= 16 rows/group), medium and large groups.
  std::int64_t const h = test::pick_size(2048, 256), i2 = test::pick_size(1536, 192);
  check_gemm<bfloat16>(std::vector<std::int32_t>(16, 9), h, i2, false, false, rng);
  check_gemm<bfloat16>(std::vector<std::int32_t>(8, 50), h, i2, false, false, rng);
  check_gemm<bfloat16>({300, 0, 257}, test::pick_size(768, 96), h, true, true, rng);  // down: I 768 -> H 2048
  std::int64_t const gpt = test::pick_size(2880, 360);  // gpt-oss widths (not multiples of 64/128)
  check_gemm<bfloat16>({200, 3}, gpt, gpt, true, false, rng);
}

namespace {

using detail::EpilogueKind;
using detail::GemmMainloop;

constexpr GemmMainloop kEveryMainloop[] = {GemmMainloop::kSimt,         GemmMainloop::kMmaDecode,
                                           GemmMainloop::kMmaDecodeN64, GemmMainloop::kMmaDecodeN32,
                                           GemmMainloop::kMmaMedium,    GemmMainloop::kMmaLarge};

//! One grouped GEMM: rows per group (after `first_row` rows of no group, `rows_after` rows follow
//! the last group), K, N product columns, padding of lda and ldc, bias, row scale, gate/up layout.
struct GemmCase {
  std::vector<std::int32_t> counts;
  std::int64_t k = 0;
  std::int64_t n = 0;
  std::int64_t lda_pad = 0;
  std::int64_t ldc_pad = 0;
  bool bias = false;
  bool scale = false;
  bool concatenated = true;  // gated kinds only
  std::int32_t first_row = 3;
  std::int64_t rows_after = 5;
};

std::string describe(GemmCase const& c) {
  std::size_t empty = 0;
  for (auto n : c.counts) empty += n == 0;
  return fmt::format("{} groups ({} empty, {} rows), k {}, n {}, lda +{}, ldc +{}, bias {}, scale {}, {}",
                     c.counts.size(), empty, std::accumulate(c.counts.begin(), c.counts.end(), 0), c.k, c.n, c.lda_pad,
                     c.ldc_pad, c.bias, c.scale, c.concatenated ? "concatenated" : "interleaved");
}

//! The Host reference of epilogue kKind, in double: [rows, width] (width = n / 2 when gated).
template <EpilogueKind kKind, class T>
std::vector<double> epilogue_reference(GemmCase const& c, std::vector<std::int32_t> const& offsets, std::int64_t rows,
                                       std::vector<T> const& a, std::vector<T> const& b, std::vector<T> const& bias,
                                       std::vector<float> const& scale) {
  std::int64_t const lda = c.k + c.lda_pad, groups = static_cast<std::int64_t>(c.counts.size());
  std::vector<float> product(static_cast<std::size_t>(rows * c.n), 0.0f);  // fp32, bias added, by weight row
  grouped_gemm(Host{}, MatrixView<T const>(a.data(), rows, c.k, lda),
               BatchedMatrixView<T const>{b.data(), groups, c.n, c.k}, c.bias ? bias.data() : nullptr,
               std::span<std::int32_t const>(offsets), MatrixView<float>(product.data(), rows, c.n));
  constexpr bool kGated = detail::epilogue_is_gated(kKind);
  std::int64_t const width = kGated ? c.n / 2 : c.n;
  std::vector<double> ref(static_cast<std::size_t>(rows * width), 0.0);
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t i = 0; i < width; ++i) {
      auto at = [&](std::int64_t col) { return double{product[static_cast<std::size_t>(r * c.n + col)]}; };
      double v = 0.0;
      if constexpr (kGated) {
        double const gate = c.concatenated ? at(i) : at(2 * i);
        double const up = c.concatenated ? at(c.n / 2 + i) : at(2 * i + 1);
        v = test::reference_activation(detail::gated_activation(kKind), gate, up,
                                       ClampedSwiGLUParams{.alpha = 1.702f, .limit = 1.5f});
      } else {
        v = at(i);
        if (kKind == EpilogueKind::kReLU) v = std::max(v, 0.0);
        if (c.scale) v *= scale[static_cast<std::size_t>(r)];
      }
      ref[static_cast<std::size_t>(r * width + i)] = v;
    }
  return ref;
}

//! Runs `c` with epilogue kKind through `mainloop` (or the tile policy when nullopt) and checks it
//! against the Host reference: rows of the groups written and close, every other row and the
//! padding of every row still poisoned, a second run bitwise equal. Returns false when the mainloop
//! cannot run here (SIMT for 16-bit types and the reverse, mma.sync below sm_80).
template <EpilogueKind kKind, class T, class TC>
bool check_epilogue(GemmCase const& c, std::optional<GemmMainloop> mainloop, std::mt19937_64& rng) {
  auto const dev = detail::current_device_traits();
  if (mainloop && !detail::gemm_mainloop_available<T>(*mainloop, dev)) return false;
  INFO(describe(c));
  INFO("mainloop " << (mainloop ? detail::kernel_name(*mainloop) : std::string_view("picked by the tile policy")));
  constexpr bool kGated = detail::epilogue_is_gated(kKind);
  auto const groups = static_cast<std::int64_t>(c.counts.size());
  auto const offsets = offsets_from(c.counts, c.first_row);
  std::int64_t const rows = offsets.back() + c.rows_after, lda = c.k + c.lda_pad;
  std::int64_t const width = kGated ? c.n / 2 : c.n, ldc = width + c.ldc_pad;
  auto const a = test::random_vector<T>(static_cast<std::size_t>(rows * lda), rng);
  auto const b =
      test::random_vector<T>(static_cast<std::size_t>(groups * c.n * c.k), rng, 1.0f / std::sqrt(float(c.k)));
  auto const bias = test::random_vector<T>(static_cast<std::size_t>(groups * c.n), rng, 0.5f);
  auto const scale = test::random_weights(static_cast<std::size_t>(rows), rng);
  auto const ref = epilogue_reference<kKind>(c, offsets, rows, a, b, bias, scale);

  CudaStream stream;
  DeviceBuffer<T> d_a(a), d_b(b), d_bias(bias);
  DeviceBuffer<TC> d_c(static_cast<std::size_t>(rows * ldc));
  DeviceBuffer<float> d_scale(scale);
  DeviceBuffer<std::int32_t> d_offsets(offsets);
  MatrixView<T const> const av(d_a.data(), rows, c.k, lda);
  BatchedMatrixView<T const> const bv{d_b.data(), groups, c.n, c.k};
  std::span<std::int32_t const> const offs(d_offsets.data(), offsets.size());
  MatrixView<TC> const cv(d_c.data(), rows, width, ldc);
  float const* const row_scale = c.scale ? d_scale.data() : nullptr;
  T const* const bias_ptr = c.bias ? d_bias.data() : nullptr;
  std::vector<TC> first;
  for (int run = 0; run < 2; ++run) {
    d_c.poison(0xff);
    if constexpr (kKind == EpilogueKind::kLinear) {
      if (!mainloop) {
        grouped_gemm(stream.ref(), av, bv, bias_ptr, offs, cv, GroupedGemmOptions{.row_scale = row_scale});
      }
    }
    if (mainloop || kKind != EpilogueKind::kLinear) {
      // The launch arguments as grouped_gemm / expert_mlp build them (with paired columns, gated
      // GEMMs write n / 2 columns; linear_gemm_args takes c's shape as it is).
      auto args = detail::linear_gemm_args<T, TC>(av, bv, bias_ptr, offs, cv, kGated ? nullptr : row_scale);
      args.epilogue.concatenated = c.concatenated;
      args.epilogue.clamped = {.alpha = 1.702f, .limit = 1.5f};  // a limit the data reaches
      if (mainloop)
        detail::launch_grouped_gemm<kKind>(args, *mainloop, dev, {stream.ref(), "grouped_gemm_test"},
                                           "grouped_gemm_test");
      else
        detail::run_grouped_gemm<kKind>(args, -1, {stream.ref(), "grouped_gemm_test"}, "grouped_gemm_test");
    }
    stream.sync();
    auto const got = d_c.to_host();
    if (run == 1) {
      CHECK(std::memcmp(first.data(), got.data(), got.size() * sizeof(TC)) == 0);  // deterministic
      break;
    }
    first = got;
    std::vector<float> got_in;
    std::vector<double> ref_in;
    std::int64_t unwritten = 0, overwritten = 0;
    for (std::int64_t r = 0; r < rows; ++r) {
      bool const inside = r >= offsets.front() && r < offsets.back();
      for (std::int64_t col = 0; col < ldc; ++col) {
        TC const v = got[static_cast<std::size_t>(r * ldc + col)];
        if (inside && col < width) {
          got_in.push_back(to_float(v));
          ref_in.push_back(ref[static_cast<std::size_t>(r * width + col)]);
          unwritten += all_bytes(&v, 1, 0xff);
        } else {
          overwritten += !all_bytes(&v, 1, 0xff);  // a row of no group, or a padding column past the width
        }
      }
    }
    CHECK(unwritten == 0);
    CHECK(overwritten == 0);
    // A ReLU of a few values can be all zeros (6 rows x 1 column: one draw in 64): then the
    // kernel's values must be exact zeros too, and a relative error has nothing to divide by.
    bool const all_zero = std::all_of(ref_in.begin(), ref_in.end(), [](double v) { return v == 0.0; });
    if (all_zero)
      for (float v : got_in) CHECK(v == 0.0f);
    else
      CHECK(test::rel_error(got_in, ref_in) <= tolerance<T>());
  }
  return true;
}

}  // namespace

TEST_CASE_TEMPLATE("GroupedGemm::mainloops[cuda]: every tile and epilogue, ragged edges, odd n, padded lda and ldc", T,
                   bfloat16, epx::half, float) {
  EPX_TEST_SEEDED_RNG(rng);
  // Groups around every tile height (0, 1, 15, 16, 17, 63, 65, 127, 129 rows); K tails (k % 64 != 0);
  // N edges of every tile width, odd (single-column stores) and even; lda and ldc padded, ldc odd
  // (unpaired stores) and even (paired stores with an odd n: a lone last column).
  std::vector<std::int32_t> const counts = {0, 1, 15, 16, 17, 0, 63, 65, 127, 129};
  std::vector<GemmCase> const cases = {
      {.counts = counts, .k = 72, .n = 37, .lda_pad = 8, .ldc_pad = 3, .bias = true, .scale = true},
      {.counts = counts, .k = 200, .n = 133, .lda_pad = 0, .ldc_pad = 5, .bias = true, .scale = false},
      {.counts = counts, .k = 64, .n = 96, .lda_pad = 16, .ldc_pad = 0, .bias = false, .scale = true},
      {.counts = {1, 0, 2, 3}, .k = 8, .n = 1, .lda_pad = 8, .ldc_pad = 1, .bias = true, .scale = true},
      {.counts = {40}, .k = 136, .n = 264, .lda_pad = 8, .ldc_pad = 2, .bias = true, .scale = true},
  };
  for (GemmCase const& c : cases) {
    check_epilogue<EpilogueKind::kLinear, T, T>(c, std::nullopt, rng);  // grouped_gemm itself
    for (GemmMainloop m : kEveryMainloop) {
      check_epilogue<EpilogueKind::kLinear, T, T>(c, m, rng);
      check_epilogue<EpilogueKind::kReLU, T, T>(c, m, rng);
    }
  }
  // Gated epilogues (n even): both gate/up layouts, with and without bias, every mainloop.
  std::vector<GemmCase> const gated = {
      {.counts = counts, .k = 72, .n = 48, .lda_pad = 8, .ldc_pad = 3, .bias = true, .concatenated = true},
      {.counts = counts, .k = 136, .n = 266, .lda_pad = 0, .ldc_pad = 2, .bias = false, .concatenated = false},
  };
  for (GemmCase const& c : gated)
    for (GemmMainloop m : kEveryMainloop) {
      check_epilogue<EpilogueKind::kSwiGLU, T, T>(c, m, rng);
      check_epilogue<EpilogueKind::kGeGLU, T, T>(c, m, rng);
      check_epilogue<EpilogueKind::kGeGLUTanh, T, T>(c, m, rng);
      check_epilogue<EpilogueKind::kClampedSwiGLU, T, T>(c, m, rng);
    }
}

TEST_CASE("GroupedGemm::mainloops[cuda]: decode and medium tiles with fp16, bias, row scale, K tails and N edges") {
  EPX_TEST_SEEDED_RNG(rng);
  std::int64_t const k = test::pick_size(1096, 200);  // 17 k-tiles + a tail of 8
  for (std::int64_t n : {8, 56, 100, 136, 200, 383}) {
    GemmCase const c{.counts = {3, 16, 0, 9, 1, 12, 64, 40},
                     .k = k,
                     .n = n,
                     .lda_pad = 8,
                     .ldc_pad = 1,
                     .bias = true,
                     .scale = true};
    for (GemmMainloop m :
         {GemmMainloop::kMmaDecode, GemmMainloop::kMmaDecodeN64, GemmMainloop::kMmaDecodeN32, GemmMainloop::kMmaMedium})
      CHECK(check_epilogue<EpilogueKind::kLinear, epx::half, epx::half>(c, m, rng));
  }
}

TEST_CASE("GroupedGemm::mainloops[cuda]: more than 256 groups, most of them empty (the prefix scan beyond one block)") {
  EPX_TEST_SEEDED_RNG(rng);
  // 256-expert models: the scheduler's block scan covers 128 or 256 groups per chunk; 700 groups
  // take several chunks, and empty groups must not shift the tiles of the next ones.
  std::vector<std::int32_t> counts(700, 0);
  std::uniform_int_distribution<int> rows(1, 20), pick(0, 9);
  for (auto& n : counts)
    if (pick(rng) < 2) n = rows(rng);
  counts.back() = 3;  // the last group of the last chunk holds rows
  GemmCase const c{.counts = counts, .k = 64, .n = 72, .lda_pad = 0, .ldc_pad = 0, .bias = true, .scale = true};
  check_epilogue<EpilogueKind::kLinear, bfloat16, bfloat16>(c, std::nullopt, rng);
  for (GemmMainloop m : kEveryMainloop) check_epilogue<EpilogueKind::kLinear, bfloat16, bfloat16>(c, m, rng);
  check_epilogue<EpilogueKind::kLinear, float, float>(c, GemmMainloop::kSimt, rng);
  GemmCase const gated{.counts = counts, .k = 64, .n = 64, .bias = true, .concatenated = true};
  for (GemmMainloop m : kEveryMainloop) check_epilogue<EpilogueKind::kSwiGLU, bfloat16, bfloat16>(gated, m, rng);
}

TEST_CASE("GroupedGemm::mainloops[cuda]: every group empty while a has rows leaves c untouched") {
  EPX_TEST_SEEDED_RNG(rng);
  GemmCase const c{.counts = std::vector<std::int32_t>(300, 0),
                   .k = 64,
                   .n = 40,
                   .bias = true,
                   .scale = true,
                   .first_row = 4,
                   .rows_after = 9};
  check_epilogue<EpilogueKind::kLinear, bfloat16, bfloat16>(c, std::nullopt, rng);
  for (GemmMainloop m : kEveryMainloop) {
    check_epilogue<EpilogueKind::kLinear, bfloat16, bfloat16>(c, m, rng);
    check_epilogue<EpilogueKind::kLinear, float, float>(c, m, rng);
  }
}

TEST_CASE("GroupedGemm::mainloops[cuda]: bf16 in, fp32 out (output type other than the input type)") {
  EPX_TEST_SEEDED_RNG(rng);
  GemmCase const c{
      .counts = {0, 1, 17, 70, 130}, .k = 136, .n = 77, .lda_pad = 8, .ldc_pad = 3, .bias = true, .scale = true};
  check_epilogue<EpilogueKind::kLinear, bfloat16, float>(c, std::nullopt, rng);
  for (GemmMainloop m : kEveryMainloop) check_epilogue<EpilogueKind::kLinear, bfloat16, float>(c, m, rng);
  GemmCase const even{.counts = {5, 64, 0, 129}, .k = 64, .n = 128, .ldc_pad = 2, .bias = true, .scale = false};
  for (GemmMainloop m : kEveryMainloop)
    check_epilogue<EpilogueKind::kLinear, bfloat16, float>(even, m, rng);  // float2 stores
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
  auto const gate_up =
      test::random_vector<T>(static_cast<std::size_t>(groups * gu * h), rng, 2.0f / std::sqrt(float(h)));
  auto const down =
      test::random_vector<T>(static_cast<std::size_t>(groups * h * inter), rng, 1.0f / std::sqrt(float(inter)));
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
    DeviceBuffer<std::byte> ws(experts.workspace_bytes<T>(config, static_cast<std::int32_t>(groups), rows));
    d_out.poison(0xff);
    ws.poison(0xff);
    experts.run<T>({stream.ref(), "grouped_gemm_test"}, config, weights, dx, offs, dout,
                   Workspace(ws.data(), ws.size()), -1);
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
  for (Activation act :
       {Activation::kSwiGLU, Activation::kGeGLU, Activation::kGeGLUTanh, Activation::kReLU, Activation::kClampedSwiGLU})
    for (GateUpLayout layout : {GateUpLayout::kConcatenated, GateUpLayout::kInterleaved}) {
      if (act == Activation::kReLU && layout == GateUpLayout::kInterleaved) continue;  // not gated
      ExpertMlpConfig const config{.hidden = 64,
                                   .intermediate = 48,
                                   .activation = act,
                                   .gate_up_layout = layout,
                                   .clamped_swiglu = {.alpha = 1.702f, .limit = 1.5f}};  // a limit the data reaches
      check_mlp<T>(config, kMixedCounts, act == Activation::kClampedSwiGLU || layout == GateUpLayout::kInterleaved,
                   rng);
    }
}

TEST_CASE("ExpertMlp::expert_mlp[cuda]: model sizes (Qwen3-MoE and gpt-oss widths), all rows on one expert") {
  EPX_TEST_SEEDED_RNG(rng);
  check_mlp<bfloat16>({.hidden = test::pick_size(2048, 256), .intermediate = test::pick_size(768, 96)},
                      {40, 0, 9, 130, 1, 0, 17, 64}, false, rng);
  int const gpt = test::pick_size(2880, 360);
  check_mlp<bfloat16>({.hidden = gpt,
                       .intermediate = gpt,
                       .activation = Activation::kClampedSwiGLU,
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
