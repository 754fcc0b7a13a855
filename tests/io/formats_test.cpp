// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// Element formats against plain references written from their definitions: every FP8 E4M3 code,
// every E2M1 code and E8M0 scale, MXFP4's nibble order, and the F32/F16/BF16 conversions (bits kept
// when the type is the same, one round-to-nearest-even otherwise, ties and specials included).

#include "io_test_util.hpp"

#include <bit>
#include <cmath>
#include <limits>

using namespace epx;
using namespace epx::test::io;

namespace {

// The same value (NaN matches NaN) and the same sign of zero.
void check_same_value(float got, double want) {
  if (std::isnan(want)) {
    CHECK(std::isnan(got));
    return;
  }
  CHECK(static_cast<double>(got) == want);
  CHECK(std::signbit(got) == std::signbit(want));
}

// IEEE binary16 from its fields (reference).
double ref_f16(std::uint16_t h) {
  int const s = h >> 15, e = (h >> 10) & 0x1f, m = h & 0x3ff;
  double mag = 0.0;
  if (e == 31)
    mag = m == 0 ? INFINITY : std::nan("");
  else if (e == 0)
    mag = std::ldexp(m / 1024.0, -14);
  else
    mag = std::ldexp(1.0 + m / 1024.0, e - 15);
  return s ? -mag : mag;
}

}  // namespace

TEST_CASE("formats: every FP8 E4M3 code decodes to its value") {
  int nan_codes = 0;
  for (int b = 0; b < 256; ++b) {
    CAPTURE(b);
    float const got = io::decode_e4m3(static_cast<std::uint8_t>(b));
    check_same_value(got, ref_e4m3(static_cast<std::uint8_t>(b)));
    nan_codes += std::isnan(got);
  }
  CHECK(nan_codes == 2);  // S.1111.111 only: e4m3fn has no infinities
  CHECK(io::decode_e4m3(0x7e) == 448.0f);
  CHECK(io::decode_e4m3(0x01) == 0x1p-9f);  // the smallest subnormal
  CHECK(io::decode_e4m3(0x08) == 0x1p-6f);  // the smallest normal
}

TEST_CASE("formats: every E2M1 code and E8M0 scale, MXFP4 low nibble first") {
  for (int c = 0; c < 16; ++c) {
    CAPTURE(c);
    check_same_value(io::decode_e2m1(static_cast<std::uint8_t>(c)), ref_e2m1(static_cast<std::uint8_t>(c)));
  }
  for (int s = 0; s < 256; ++s) {
    CAPTURE(s);
    check_same_value(io::decode_e8m0(static_cast<std::uint8_t>(s)), ref_e8m0(static_cast<std::uint8_t>(s)));
  }
  EPX_TEST_SEEDED_RNG(rng);
  std::uniform_int_distribution<int> byte(0, 255);
  std::uint8_t block[16];
  for (auto& b : block) b = static_cast<std::uint8_t>(byte(rng));
  auto const scale = static_cast<std::uint8_t>(byte(rng) % 200 + 20);
  for (int i = 0; i < 32; ++i) {
    CAPTURE(i);
    std::uint8_t const code = i % 2 == 0 ? block[i / 2] & 0xf : block[i / 2] >> 4;
    check_same_value(io::mxfp4_element(block, i, scale), ref_e2m1(code) * ref_e8m0(scale));
  }
  // Products at the ends of the scale range: exact subnormals, and overflow to infinity.
  CHECK(io::mxfp4_element(std::array<std::uint8_t, 16>{0x01}.data(), 0, 0) == 0x1p-128f);   // 0.5 x 2^-127
  CHECK(std::isinf(io::mxfp4_element(std::array<std::uint8_t, 16>{0x07}.data(), 0, 254)));  // 6 x 2^127
}

TEST_CASE("formats: the plain dtypes decode exactly and convert with one rounding") {
  EPX_TEST_SEEDED_RNG(rng);
  std::uniform_int_distribution<std::uint32_t> bits32;
  // F16 and BF16: every bit pattern decodes to its value.
  for (std::uint32_t h = 0; h < 65536; ++h) {
    auto const b16 = static_cast<std::uint16_t>(h);
    std::byte const p[2] = {static_cast<std::byte>(h & 0xff), static_cast<std::byte>(h >> 8)};
    check_same_value(io::decode_plain(io::SafetensorsDType::kF16, p), ref_f16(b16));
    check_same_value(io::decode_plain(io::SafetensorsDType::kBF16, p),
                     static_cast<double>(std::bit_cast<float>(std::uint32_t{b16} << 16)));
    // Same type: the same bits, NaN payloads included.
    CHECK(io::convert_plain<half>(io::SafetensorsDType::kF16, p).bits == b16);
    CHECK(io::convert_plain<bfloat16>(io::SafetensorsDType::kBF16, p).bits == b16);
  }
  // F32 -> F16 / BF16: round to nearest, ties to even; specials kept.
  struct Case {
    std::uint32_t f32;
    std::uint16_t bf16;
    std::uint16_t f16;
  };
  for (Case c : {Case{0x3f808000u, 0x3f80u, 0x3c04u},   // 1 + 2^-8: bf16 tie -> even (down)
                 Case{0x3f818000u, 0x3f82u, 0x3c0cu},   // 1 + 3 x 2^-8: bf16 tie -> even (up)
                 Case{0x3f801000u, 0x3f80u, 0x3c00u},   // 1 + 2^-11: f16 tie -> even (down)
                 Case{0x3f803000u, 0x3f80u, 0x3c02u},   // 1 + 3 x 2^-11: f16 tie -> even (up)
                 Case{0x80000000u, 0x8000u, 0x8000u},   // -0
                 Case{0x7f800000u, 0x7f80u, 0x7c00u},   // +inf
                 Case{0x477ff000u, 0x4780u, 0x7c00u},   // 65520: f16 overflows to inf
                 Case{0x33800000u, 0x3380u, 0x0001u}})  // 2^-24: the smallest f16 subnormal
  {
    CAPTURE(c.f32);
    std::byte p[4];
    for (int i = 0; i < 4; ++i) p[i] = static_cast<std::byte>((c.f32 >> (8 * i)) & 0xff);
    CHECK(io::convert_plain<bfloat16>(io::SafetensorsDType::kF32, p).bits == c.bf16);
    CHECK(io::convert_plain<half>(io::SafetensorsDType::kF32, p).bits == c.f16);
    CHECK(std::bit_cast<std::uint32_t>(io::convert_plain<float>(io::SafetensorsDType::kF32, p)) == c.f32);
  }
  // Random F32 -> BF16 against a reference rounding on the integer bits.
  for (int i = 0; i < 100000; ++i) {
    std::uint32_t const u = bits32(rng);
    if ((u & 0x7fffffffu) > 0x7f800000u) continue;  // NaN: checked above through the same-type path
    std::byte p[4];
    for (int k = 0; k < 4; ++k) p[k] = static_cast<std::byte>((u >> (8 * k)) & 0xff);
    std::uint32_t const lower = u & 0xffffu, upper = u >> 16;
    std::uint32_t const want = lower > 0x8000u || (lower == 0x8000u && (upper & 1u)) ? upper + 1 : upper;
    CHECK(io::convert_plain<bfloat16>(io::SafetensorsDType::kF32, p).bits == static_cast<std::uint16_t>(want));
  }
  // F16 -> BF16 and BF16 -> F16 through the exact fp32 value.
  for (int i = 0; i < 20000; ++i) {
    auto const h = static_cast<std::uint16_t>(bits32(rng));
    std::byte const p[2] = {static_cast<std::byte>(h & 0xff), static_cast<std::byte>(h >> 8)};
    double const v16 = ref_f16(h);
    if (std::isnan(v16)) continue;
    CHECK(io::convert_plain<bfloat16>(io::SafetensorsDType::kF16, p).bits == bfloat16(static_cast<float>(v16)).bits);
    float const vb = std::bit_cast<float>(std::uint32_t{h} << 16);
    if (std::isnan(vb)) continue;
    CHECK(io::convert_plain<half>(io::SafetensorsDType::kBF16, p).bits == half(vb).bits);
  }
}

TEST_CASE("formats: the safetensors dtype names and sizes") {
  for (auto const& [name, bits] : std::vector<std::pair<std::string, std::uint32_t>>{
           {"BOOL", 8}, {"U8", 8},   {"I8", 8},    {"F8_E4M3", 8}, {"F8_E5M2", 8}, {"F8_E8M0", 8}, {"I16", 16},
           {"U16", 16}, {"F16", 16}, {"BF16", 16}, {"I32", 32},    {"U32", 32},    {"F32", 32},    {"F64", 64},
           {"I64", 64}, {"U64", 64}, {"C64", 64},  {"F4", 4},      {"F6_E2M3", 6}, {"F6_E3M2", 6}}) {
    CAPTURE(name);
    auto const dtype = io::parse_safetensors_dtype(name);
    REQUIRE(dtype.has_value());
    CHECK(io::bits_of(*dtype) == bits);
    CHECK(io::to_string(*dtype) == name);
  }
  CHECK(!io::parse_safetensors_dtype("bf16").has_value());  // the spelling is exact
  CHECK(!io::parse_safetensors_dtype("").has_value());
}
