// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! DeepSeek-V3's FP8 weights: E4M3 elements with one fp32 scale per 128 x 128 block.
//!
//! Sources (read 2026-12): DeepSeek-V3's README_WEIGHTS.md ("FP8 Weight Documentation") and its
//! config.json "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme":
//! "dynamic", "weight_block_size": [128, 128]}. A weight `W` [rows, cols] (nn.Linear's [out, in]) is
//! stored as `<name>` (F8_E4M3) with `<name>_scale_inv` (F32) [ceil(rows / 128), ceil(cols / 128)];
//! edge blocks are partial. Dequantised: W[r, c] = fp8(W[r, c]) x scale_inv[r / 128, c / 128].
//!
//! E4M3 is torch.float8_e4m3fn / the OCP 8-bit floating point spec's E4M3: sign, 4 exponent bits
//! (bias 7), 3 mantissa bits; exponent 0 is subnormal (m/8 x 2^-6); no infinities; S.1111.111 is
//! NaN; the largest finite value is 448.
//!
//! epx's dequantisation, bit for bit: fp32(fp8) x fp32(scale) rounded to fp32 (one multiply, as the
//! reference dequantisation kernel computes it in fp32), then rounded to the destination type to
//! nearest even (bf16 by default).

#include <bit>
#include <cstdint>

namespace epx::io {

//! The block DeepSeek-V3 scales by, [rows, cols] (config.json's quantization_config.weight_block_size).
inline constexpr std::int32_t kFp8DefaultBlock = 128;

//! One E4M3 (e4m3fn) element as fp32 (exact).
constexpr float decode_e4m3(std::uint8_t bits) noexcept {
  std::uint32_t const sign = std::uint32_t{bits & 0x80u} << 24;
  std::uint32_t const exponent = (bits >> 3) & 0xfu;
  std::uint32_t const mantissa = bits & 0x7u;
  if (exponent == 0xf && mantissa == 0x7) return std::bit_cast<float>(sign | 0x7fc00000u);  // NaN
  if (exponent == 0) {  // subnormal: m/8 x 2^-6 = m x 2^-9, exact in fp32
    float const magnitude = static_cast<float>(mantissa) * 0x1p-9f;
    return sign != 0 ? -magnitude : magnitude;
  }
  // Normal: rebias the exponent 7 -> 127 and widen the mantissa 3 -> 23 bits.
  return std::bit_cast<float>(sign | ((exponent + 120u) << 23) | (mantissa << 20));
}

//! Scale blocks along a dimension of `extent` elements in blocks of `block`: ceil(extent / block).
constexpr std::int64_t num_scale_blocks(std::int64_t extent, std::int64_t block) noexcept {
  return (extent + block - 1) / block;
}

}  // namespace epx::io
