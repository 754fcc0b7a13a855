// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// The device dequantisation's arithmetic, on the host (no GPU): the EPX_HOST_DEVICE index functions
// (which scale block, which byte and nibble) against the formats' layouts enumerated block by
// block, the EPX_HOST_DEVICE decoders against the host load's decode (copy_executor's decode_rows)
// and the old table, every code, and Fp8Source::at / Mxfp4Source::at -- what the kernels of
// cuda_dequantize.cuh compute per element -- walked the way load_layer_to_device walks a matrix
// (chunks of rows, each with its scale block rows) and as sub-matrices at odd offsets, against
// decode_rows bit for bit, for bf16, fp16 and fp32.

#include "io_test_util.hpp"

#include <epx/io/copy_executor.hpp>
#include <epx/io/fp8_e4m3.hpp>
#include <epx/io/mxfp4.hpp>

#include <bit>
#include <cmath>
#include <algorithm>
#include <array>
#include <cstring>
#include <limits>

using namespace epx;
using namespace epx::test::io;

namespace {

// The decoders and index functions are constexpr: the kernels and constant expressions share them.
static_assert(io::decode_e4m3(0x7e) == 448.0f);
static_assert(io::decode_e4m3(0x01) == 0x1p-9f);
static_assert(io::decode_e2m1(0xf) == -6.0f);
static_assert(io::decode_e8m0(127) == 1.0f);
static_assert(io::fp8_scale_index(129, 255, 128, 128, 2) == 3);
static_assert(io::mxfp4_byte_index(33) == 16 && io::mxfp4_nibble_shift(33) == 4 && io::mxfp4_scale_index(33) == 1);
static_assert(io::dequantize_product(1.5f, 2.0f) == 3.0f);

template <class U>
using Vec = std::vector<U>;

//! A random fp32 scale: mantissa and sign random, exponent in [-20, 20] (subnormal products occur).
float random_scale(std::mt19937_64& rng) {
  std::uniform_real_distribution<float> mantissa(1.0f, 2.0f);
  std::uniform_int_distribution<int> exponent(-20, 20);
  float const s = std::ldexp(mantissa(rng), exponent(rng));
  return rng() % 8 == 0 ? -s : s;
}

template <class U>
void check_same_bits(Vec<U> const& got, Vec<U> const& want, char const* what) {
  CAPTURE(what);
  REQUIRE(got.size() == want.size());
  std::size_t mismatches = 0, first = got.size();
  for (std::size_t k = 0; k < got.size(); ++k)
    if (bits_of(got[k]) != bits_of(want[k])) {
      ++mismatches;
      first = std::min(first, k);
    }
  CAPTURE(first);
  CHECK(mismatches == 0);
}

//! A poisoned destination: every element must be written.
template <class U>
Vec<U> poisoned(std::size_t n) {
  Vec<U> v(n);
  std::memset(static_cast<void*>(v.data()), 0xcd, n * sizeof(U));
  return v;
}

template <class U>
void check_fp8(std::mt19937_64& rng, std::int64_t rows, std::int64_t cols, std::int64_t br, std::int64_t bc) {
  CAPTURE(rows);
  CAPTURE(cols);
  CAPTURE(br);
  CAPTURE(bc);
  io::CopyJob job;
  job.encoding = io::WeightEncoding::kFp8BlockScaled;
  job.stored_rows = rows;
  job.stored_cols = cols;
  job.fp8_block = {br, bc};
  std::int64_t const scale_rows = job.fp8_scale_rows(), scale_cols = job.fp8_scale_cols();
  REQUIRE(scale_rows == io::num_scale_blocks(rows, br));
  Vec<std::uint8_t> values(static_cast<std::size_t>(rows * cols));
  for (auto& v : values) v = static_cast<std::uint8_t>(rng());
  for (std::size_t k = 0; k < std::min<std::size_t>(256, values.size()); ++k) values[k] = static_cast<std::uint8_t>(k);
  std::shuffle(values.begin(), values.end(), rng);  // every code where there is room, NaN codes included
  Vec<float> scales(static_cast<std::size_t>(scale_rows * scale_cols));
  for (auto& s : scales) s = random_scale(rng);
  // The host load's decode (copy_executor), the whole matrix in one go.
  Vec<U> want(values.size());
  io::detail::decode_rows<U>(job, reinterpret_cast<std::byte const*>(values.data()), nullptr, scales, 0, rows,
                             io::detail::StridedOut<U>{want.data(), cols, 1});
  // As load_layer_to_device runs it: chunks of rows, each with the scale block rows it uses.
  std::int64_t const chunk = std::uniform_int_distribution<std::int64_t>(1, rows)(rng);
  CAPTURE(chunk);
  Vec<U> got = poisoned<U>(values.size());
  for (std::int64_t s0 = 0; s0 < rows; s0 += chunk) {
    std::int64_t const n = std::min(chunk, rows - s0), b0 = s0 / br;
    io::Fp8Source const src{.values = values.data() + s0 * cols,
                            .values_ld = cols,
                            .scales = scales.data() + b0 * scale_cols,
                            .scale_ld = scale_cols,
                            .row0 = s0 - b0 * br,
                            .col0 = 0,
                            .block_rows = br,
                            .block_cols = bc};
    for (std::int64_t i = 0; i < n; ++i)
      for (std::int64_t j = 0; j < cols; ++j)
        got[static_cast<std::size_t>((s0 + i) * cols + j)] = io::detail::round_to<U>(src.at(i, j));
  }
  check_same_bits(got, want, "fp8, in chunks of rows");
  // A sub-matrix at an odd offset, from the whole matrix's scales.
  std::int64_t const r0 = rows / 3, c0 = cols / 3 | 1, sub_rows = rows - r0,
                     sub_cols = std::max<std::int64_t>(cols - c0 - 1, 0);
  io::Fp8Source const sub{.values = values.data() + r0 * cols,
                          .values_ld = cols,
                          .scales = scales.data(),
                          .scale_ld = scale_cols,
                          .row0 = r0,
                          .col0 = c0,
                          .block_rows = br,
                          .block_cols = bc};
  Vec<U> sub_got = poisoned<U>(static_cast<std::size_t>(sub_rows * sub_cols)), sub_want(sub_got.size());
  for (std::int64_t i = 0; i < sub_rows; ++i)
    for (std::int64_t j = 0; j < sub_cols; ++j) {
      sub_got[static_cast<std::size_t>(i * sub_cols + j)] = io::detail::round_to<U>(sub.at(i, j));
      sub_want[static_cast<std::size_t>(i * sub_cols + j)] = want[static_cast<std::size_t>((r0 + i) * cols + c0 + j)];
    }
  check_same_bits(sub_got, sub_want, "fp8, a sub-matrix at an odd offset");
}

template <class U>
void check_mxfp4(std::mt19937_64& rng, std::int64_t rows, std::int64_t cols) {
  CAPTURE(rows);
  CAPTURE(cols);
  io::CopyJob job;
  job.encoding = io::WeightEncoding::kMxfp4;
  job.stored_rows = rows;
  job.stored_cols = cols;
  std::int64_t const row_bytes = job.value_row_bytes(), row_scales = job.scale_row_bytes();
  REQUIRE(row_bytes == cols / 2);
  REQUIRE(row_scales == cols / 32);
  Vec<std::uint8_t> blocks(static_cast<std::size_t>(rows * row_bytes)),
      scales(static_cast<std::size_t>(rows * row_scales));
  for (auto& b : blocks) b = static_cast<std::uint8_t>(rng());
  for (auto& s : scales) s = static_cast<std::uint8_t>(rng() % 8 == 0 ? rng() : 100 + rng() % 50);
  for (std::uint8_t const special : {0x00, 0xff, 0xfe, 0x01}) scales[rng() % scales.size()] = special;  // NaN, ends
  Vec<U> want(static_cast<std::size_t>(rows * cols));
  io::detail::decode_rows<U>(job, reinterpret_cast<std::byte const*>(blocks.data()),
                             reinterpret_cast<std::byte const*>(scales.data()), {}, 0, rows,
                             io::detail::StridedOut<U>{want.data(), cols, 1});
  std::int64_t const chunk = std::uniform_int_distribution<std::int64_t>(1, rows)(rng);
  CAPTURE(chunk);
  Vec<U> got = poisoned<U>(want.size());
  for (std::int64_t s0 = 0; s0 < rows; s0 += chunk) {
    std::int64_t const n = std::min(chunk, rows - s0);
    io::Mxfp4Source const src{.blocks = blocks.data() + s0 * row_bytes,
                              .blocks_ld = row_bytes,
                              .scales = scales.data() + s0 * row_scales,
                              .scale_ld = row_scales,
                              .col0 = 0};
    for (std::int64_t i = 0; i < n; ++i)
      for (std::int64_t j = 0; j < cols; ++j)
        got[static_cast<std::size_t>((s0 + i) * cols + j)] = io::detail::round_to<U>(src.at(i, j));
  }
  check_same_bits(got, want, "mxfp4, in chunks of rows");
  // A sub-matrix starting at an odd column (a high nibble), odd width.
  std::int64_t const r0 = rows / 2, c0 = 7, sub_rows = rows - r0, sub_cols = cols - c0 - 2;
  io::Mxfp4Source const sub{.blocks = blocks.data() + r0 * row_bytes,
                            .blocks_ld = row_bytes,
                            .scales = scales.data() + r0 * row_scales,
                            .scale_ld = row_scales,
                            .col0 = c0};
  Vec<U> sub_got = poisoned<U>(static_cast<std::size_t>(sub_rows * sub_cols)), sub_want(sub_got.size());
  for (std::int64_t i = 0; i < sub_rows; ++i)
    for (std::int64_t j = 0; j < sub_cols; ++j) {
      sub_got[static_cast<std::size_t>(i * sub_cols + j)] = io::detail::round_to<U>(sub.at(i, j));
      sub_want[static_cast<std::size_t>(i * sub_cols + j)] = want[static_cast<std::size_t>((r0 + i) * cols + c0 + j)];
    }
  check_same_bits(sub_got, sub_want, "mxfp4, a sub-matrix at an odd column");
}

}  // namespace

TEST_CASE("dequantize index: FP8 scale blocks, MXFP4 bytes, nibbles and scales, enumerated by layout") {
  // FP8: every element of block (bi, bj) uses scale bi * ld + bj, whatever the block shape.
  for (auto [rows, cols, br, bc] :
       {std::array<std::int64_t, 4>{300, 257, 128, 128}, {77, 45, 16, 32}, {5, 9, 1, 1}, {129, 128, 128, 64}}) {
    CAPTURE(rows);
    CAPTURE(cols);
    std::int64_t const ld = io::num_scale_blocks(cols, bc) + 3;  // a padded scale row
    std::int64_t mismatches = 0, visited = 0;
    for (std::int64_t bi = 0; bi * br < rows; ++bi)
      for (std::int64_t bj = 0; bj * bc < cols; ++bj)
        for (std::int64_t r = bi * br; r < std::min(rows, (bi + 1) * br); ++r)
          for (std::int64_t c = bj * bc; c < std::min(cols, (bj + 1) * bc); ++c) {
            mismatches += io::fp8_scale_index(r, c, br, bc, ld) != bi * ld + bj;
            ++visited;
          }
    CHECK(visited == rows * cols);
    CHECK(mismatches == 0);
  }
  // MXFP4: byte b holds elements 2b (low nibble) and 2b + 1 (high); scale k covers 32k .. 32k + 31.
  std::int64_t mismatches = 0;
  for (std::int64_t b = 0; b < 200; ++b) {
    mismatches += io::mxfp4_byte_index(2 * b) != b || io::mxfp4_nibble_shift(2 * b) != 0;
    mismatches += io::mxfp4_byte_index(2 * b + 1) != b || io::mxfp4_nibble_shift(2 * b + 1) != 4;
  }
  for (std::int64_t k = 0; k < 20; ++k)
    for (std::int64_t e = 0; e < 32; ++e) mismatches += io::mxfp4_scale_index(32 * k + e) != k;
  CHECK(mismatches == 0);
}

TEST_CASE("dequantize index: the host-device decoders, every code, against the host's decode") {
  // E2M1: the table the host decoder used before it became host-device code.
  constexpr float kTable[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
  for (int c = 0; c < 16; ++c) {
    CAPTURE(c);
    float const want = (c & 8) != 0 ? -kTable[c & 7] : kTable[c & 7];
    CHECK(std::bit_cast<std::uint32_t>(io::decode_e2m1(static_cast<std::uint8_t>(c))) ==
          std::bit_cast<std::uint32_t>(want));
    CHECK(static_cast<double>(io::decode_e2m1(static_cast<std::uint8_t>(c))) == ref_e2m1(static_cast<std::uint8_t>(c)));
  }
  // E4M3 and E8M0: every code against the references (NaN: the documented bits).
  for (int b = 0; b < 256; ++b) {
    CAPTURE(b);
    auto const u = static_cast<std::uint8_t>(b);
    double const e4 = ref_e4m3(u), e8 = ref_e8m0(u);
    if (std::isnan(e4))
      CHECK(std::bit_cast<std::uint32_t>(io::decode_e4m3(u)) == ((b & 0x80) != 0 ? 0xffc00000u : 0x7fc00000u));
    else
      CHECK(static_cast<double>(io::decode_e4m3(u)) == e4);
    if (std::isnan(e8))
      CHECK(std::bit_cast<std::uint32_t>(io::decode_e8m0(u)) == 0x7fc00000u);
    else
      CHECK(static_cast<double>(io::decode_e8m0(u)) == e8);
  }
  // dequantize_product: the plain fp32 product, and NaN defined the same on host and device.
  EPX_TEST_SEEDED_RNG(rng);
  std::int64_t mismatches = 0;
  for (int k = 0; k < 100000; ++k) {
    float const v = io::decode_e4m3(static_cast<std::uint8_t>(rng())), s = random_scale(rng);
    if (std::isnan(v)) continue;
    mismatches += std::bit_cast<std::uint32_t>(io::dequantize_product(v, s)) != std::bit_cast<std::uint32_t>(v * s);
  }
  CHECK(mismatches == 0);
  auto bits = [](float f) { return std::bit_cast<std::uint32_t>(f); };
  float const inf = std::numeric_limits<float>::infinity();
  CHECK(bits(io::dequantize_product(io::decode_e4m3(0xff), 2.0f)) == 0xffc00000u);  // the value's NaN, sign kept
  CHECK(bits(io::dequantize_product(io::decode_e4m3(0x7f), 2.0f)) == 0x7fc00000u);
  CHECK(bits(io::dequantize_product(1.0f, std::bit_cast<float>(0x7f800001u))) == 0x7fc00001u);       // quietened
  CHECK(bits(io::dequantize_product(0.0f, inf)) == 0xffc00000u);                                     // inf x 0
  CHECK(bits(io::dequantize_product(io::decode_e4m3(0xff), io::decode_e8m0(0xff))) == 0xffc00000u);  // the value first
}

TEST_CASE("dequantize index: FP8 chunks and sub-matrices as the kernel computes them equal the host load") {
  EPX_TEST_SEEDED_RNG(rng);
  for (auto [rows, cols, br, bc] : {std::array<std::int64_t, 4>{300, 257, 128, 128},
                                    {129, 130, 128, 128},
                                    {77, 45, 16, 32},
                                    {1, 3, 128, 128},
                                    {64, 200, 64, 128}}) {
    check_fp8<bfloat16>(rng, rows, cols, br, bc);
    check_fp8<half>(rng, rows, cols, br, bc);
    check_fp8<float>(rng, rows, cols, br, bc);
  }
}

TEST_CASE("dequantize index: MXFP4 chunks and sub-matrices as the kernel computes them equal the host load") {
  EPX_TEST_SEEDED_RNG(rng);
  for (auto [rows, cols] : {std::array<std::int64_t, 2>{131, 96}, {1, 32}, {45, 288}, {200, 64}}) {
    check_mxfp4<bfloat16>(rng, rows, cols);
    check_mxfp4<half>(rng, rows, cols);
    check_mxfp4<float>(rng, rows, cols);
  }
}

TEST_CASE("dequantize index: load_layer (host) refuses Dequantize::kDevice, naming the option") {
  EPX_TEST_SEEDED_RNG(rng);
  TempDir dir;
  CaseShape shape;
  write_model(build_model("deepseek_v3", Encoding::kFp8, shape, rng), dir.path());
  io::Checkpoint ckpt(dir.path());
  auto const model = io::read_model(ckpt);
  io::LayerRequest const request{.layer = shape.layer, .placement = ExpertPlacement::contiguous(6, 1), .rank = 0};
  io::HostLayerStorage<bfloat16> storage(model, request);
  test::check_throws(Errc::kInvalidArgument, "options.dequantize = Dequantize::kDevice", [&] {
    (void)io::load_layer(ckpt, model, request, storage.buffers(), {.dequantize = io::Dequantize::kDevice});
  });
  // kHost and kAuto load the same bits (load_layer always decodes on the host).
  io::HostLayerStorage<bfloat16> host(model, request), automatic(model, request);
  (void)io::load_layer(ckpt, model, request, host.buffers(), {.dequantize = io::Dequantize::kHost});
  (void)io::load_layer(ckpt, model, request, automatic.buffers(), {.dequantize = io::Dequantize::kAuto});
  check_same_bits(host.gate_up, automatic.gate_up, "gate_up");
  check_same_bits(host.down, automatic.down, "down");
}
