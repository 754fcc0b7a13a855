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
//! nearest even (bf16 by default). A NaN product is made the same on host and device
//! (dequantize_product): the decoded NaN, else the scale's NaN quietened, else 0xFFC00000 (inf x 0)
//! -- what an x86 host's multiply gives, where a GPU's multiply would give its canonical NaN.
//!
//! The decoders and the index math below are EPX_HOST_DEVICE and constexpr: host code, the device
//! kernels (cuda_dequantize.cuh) and constexpr tests share them, so the host and the device decode
//! every element the same way, bit for bit.

#include <epx/config.hpp>

#include <cstdint>

namespace epx::io {
namespace detail {

//! The float with `bits` (std::bit_cast, usable in device code without relaxed constexpr).
EPX_HOST_DEVICE constexpr float float_from_bits(std::uint32_t bits) noexcept { return __builtin_bit_cast(float, bits); }
//! The bits of `value`.
EPX_HOST_DEVICE constexpr std::uint32_t bits_from_float(float value) noexcept {
  return __builtin_bit_cast(std::uint32_t, value);
}

}  // namespace detail

//! The block DeepSeek-V3 scales by, [rows, cols] (config.json's quantization_config.weight_block_size).
inline constexpr std::int32_t kFp8DefaultBlock = 128;

//! One E4M3 (e4m3fn) element as fp32 (exact).
EPX_HOST_DEVICE constexpr float decode_e4m3(std::uint8_t bits) noexcept {
  std::uint32_t const sign = std::uint32_t{bits & 0x80u} << 24;
  std::uint32_t const exponent = (bits >> 3) & 0xfu;
  std::uint32_t const mantissa = bits & 0x7u;
  if (exponent == 0xf && mantissa == 0x7) return detail::float_from_bits(sign | 0x7fc00000u);  // NaN
  if (exponent == 0) {  // subnormal: m/8 x 2^-6 = m x 2^-9, exact in fp32
    float const magnitude = static_cast<float>(mantissa) * 0x1p-9f;
    return sign != 0 ? -magnitude : magnitude;
  }
  // Normal: rebias the exponent 7 -> 127 and widen the mantissa 3 -> 23 bits.
  return detail::float_from_bits(sign | ((exponent + 120u) << 23) | (mantissa << 20));
}

//! Scale blocks along a dimension of `extent` elements in blocks of `block`: ceil(extent / block).
EPX_HOST_DEVICE constexpr std::int64_t num_scale_blocks(std::int64_t extent, std::int64_t block) noexcept {
  return (extent + block - 1) / block;
}

//! `value` x `scale` in fp32 (one rounding), with a NaN result defined the same everywhere: `value`
//! if it is NaN, else `scale` quietened if it is NaN, else 0xFFC00000 (x86's default NaN: inf x 0).
EPX_HOST_DEVICE constexpr float dequantize_product(float value, float scale) noexcept {
  float const product = value * scale;
  if (product == product) return product;
  if (value != value) return value;
  if (scale != scale) return detail::float_from_bits(detail::bits_from_float(scale) | 0x00400000u);
  return detail::float_from_bits(0xffc00000u);
}

//! Where FP8 element (r, c) of a matrix finds its scale: the row-major index of block
//! (r / block_rows, c / block_cols) in a scale matrix whose rows are `scale_ld` apart.
EPX_HOST_DEVICE constexpr std::int64_t fp8_scale_index(std::int64_t r, std::int64_t c, std::int64_t block_rows,
                                                       std::int64_t block_cols, std::int64_t scale_ld) noexcept {
  return (r / block_rows) * scale_ld + c / block_cols;
}

//! An FP8 e4m3 block-scaled [rows, cols] sub-matrix (host or device memory, as the caller reads
//! it). Element (i, j) is stored row row0 + i, column col0 + j of a matrix whose fp32 scales are
//! blocks of block_rows x block_cols; `values` points at stored row row0, column 0, and `scales` at
//! the block row that holds stored row 0 (so a chunk of rows passes row0 = its first row's offset
//! in its first block row, and the scales from that block row on).
struct Fp8Source {
  std::uint8_t const* values = nullptr;  //!< the sub-matrix's first stored row, at stored column 0
  std::int64_t values_ld = 0;            //!< bytes between stored rows (>= col0 + cols)
  float const* scales = nullptr;         //!< fp32 scales, from the block row that holds stored row 0
  std::int64_t scale_ld = 0;             //!< scales between block rows (>= ceil((col0 + cols) / block_cols))
  std::int64_t row0 = 0;                 //!< the first row, counted from stored row 0
  std::int64_t col0 = 0;                 //!< the first column
  std::int64_t block_rows = kFp8DefaultBlock;
  std::int64_t block_cols = kFp8DefaultBlock;

  //! Element (i, j) dequantised to fp32 (what the device kernel computes, element by element).
  EPX_HOST_DEVICE constexpr float at(std::int64_t i, std::int64_t j) const noexcept {
    std::int64_t const c = col0 + j;
    return dequantize_product(decode_e4m3(values[i * values_ld + c]),
                              scales[fp8_scale_index(row0 + i, c, block_rows, block_cols, scale_ld)]);
  }
};

}  // namespace epx::io
