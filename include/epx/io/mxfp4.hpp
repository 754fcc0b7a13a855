// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! gpt-oss's MXFP4 expert weights: E2M1 elements in blocks of 32, one E8M0 scale per block.
//!
//! Sources (read 2026-12): the OCP Microscaling Formats (MX) v1.0 spec (MXFP4: k = 32, element
//! E2M1, scale E8M0), and transformers' gpt-oss integration (integrations/mxfp4.py:
//! Mxfp4GptOssExperts, convert_moe_packed_tensors; models/gpt_oss/convert_gpt_oss_weights_to_hf.py).
//! A weight `W` [rows, cols] of a stacked [E, rows, cols] projection is stored as
//!   `<name>_blocks` U8 [E, rows, cols / 32, 16]: two E2M1 codes per byte, the low nibble first
//!                  (element 2j in the low 4 bits of byte j, element 2j + 1 in the high 4 bits);
//!   `<name>_scales` U8 [E, rows, cols / 32]: the block's scale 2^(s - 127).
//! Dequantised: W[r, c] = e2m1(code) x 2^(scale[r, c / 32] - 127). For gpt-oss the rows are the
//! output features ([E, 2I, H] for gate_up_proj, [E, H, I] for down_proj): unlike its bf16 form
//! ([E, H, 2I], [E, I, H]), the packed form is K-major already, and transformers transposes after
//! unpacking.
//!
//! epx's dequantisation, bit for bit: the product is exact in fp32 (a code has at most two
//! significant bits, the scale is a power of two), then it is rounded to the destination type to
//! nearest even (bf16 by default: exact unless it leaves bf16's range, as in transformers' bf16
//! ldexp). Scale 0xFF is NaN (OCP MX v1.0), so its whole block is NaN (0x7FC00000, the decoded
//! scale, on host and device alike: dequantize_product).
//!
//! The decoders and the index math are EPX_HOST_DEVICE and constexpr (see fp8_e4m3.hpp).

#include <epx/config.hpp>
#include <epx/io/fp8_e4m3.hpp>

#include <cstdint>

namespace epx::io {

//! Elements per MXFP4 block (one scale each).
inline constexpr std::int64_t kMxfp4BlockElements = 32;
//! Bytes of packed codes per block.
inline constexpr std::int64_t kMxfp4BlockBytes = 16;

//! An E2M1 code (low 4 bits of `code`) as fp32: sign, 2 exponent bits (bias 1), 1 mantissa bit.
//! Computed from the fields rather than looked up: a table would live in host memory only.
EPX_HOST_DEVICE constexpr float decode_e2m1(std::uint8_t code) noexcept {
  std::uint32_t const exponent = (code >> 1) & 0x3u;
  std::uint32_t const mantissa = code & 0x1u;
  // exponent 0: subnormal, m x 0.5; else (1 + m / 2) x 2^(exponent - 1)
  float const magnitude = exponent == 0
                              ? static_cast<float>(mantissa) * 0.5f
                              : static_cast<float>(2u + mantissa) * static_cast<float>(1u << exponent) * 0.25f;
  return (code & 0x8u) != 0 ? -magnitude : magnitude;
}

//! An E8M0 scale as fp32: 2^(bits - 127) (2^-127 is an fp32 subnormal, exact); 0xFF is NaN.
EPX_HOST_DEVICE constexpr float decode_e8m0(std::uint8_t bits) noexcept {
  if (bits == 0xff) return detail::float_from_bits(0x7fc00000u);
  if (bits == 0) return detail::float_from_bits(0x00400000u);  // 2^-127
  return detail::float_from_bits(std::uint32_t{bits} << 23);
}

//! Where MXFP4 element c of a stored row finds its code: byte c / 2 of the row's packed bytes...
EPX_HOST_DEVICE constexpr std::int64_t mxfp4_byte_index(std::int64_t c) noexcept { return c / 2; }
//! ... shifted right by this (the low nibble first) ...
EPX_HOST_DEVICE constexpr std::uint32_t mxfp4_nibble_shift(std::int64_t c) noexcept {
  return static_cast<std::uint32_t>(c % 2) * 4u;
}
//! ... and its scale: byte c / 32 of the row's scales.
EPX_HOST_DEVICE constexpr std::int64_t mxfp4_scale_index(std::int64_t c) noexcept { return c / kMxfp4BlockElements; }

//! Element `index` (0 .. 31) of an MXFP4 block: its packed 16 bytes and its scale, as fp32.
EPX_HOST_DEVICE constexpr float mxfp4_element(std::uint8_t const* block_bytes, std::int64_t index,
                                              std::uint8_t scale) noexcept {
  auto const code =
      static_cast<std::uint8_t>((block_bytes[mxfp4_byte_index(index)] >> mxfp4_nibble_shift(index)) & 0xfu);
  return dequantize_product(decode_e2m1(code), decode_e8m0(scale));
}

//! An MXFP4 [rows, cols] sub-matrix (host or device memory): element (i, j) is element col0 + j of
//! stored row i.
struct Mxfp4Source {
  std::uint8_t const* blocks = nullptr;  //!< the first row's packed codes (two per byte, low nibble first)
  std::int64_t blocks_ld = 0;            //!< bytes between rows (>= ceil((col0 + cols) / 2))
  std::uint8_t const* scales = nullptr;  //!< the first row's E8M0 scales, one per 32 elements
  std::int64_t scale_ld = 0;             //!< bytes between rows (>= ceil((col0 + cols) / 32))
  std::int64_t col0 = 0;                 //!< the first column

  //! Element (i, j) dequantised to fp32 (what the device kernel computes, element by element).
  EPX_HOST_DEVICE constexpr float at(std::int64_t i, std::int64_t j) const noexcept {
    std::int64_t const c = col0 + j;
    std::uint8_t const* const row = blocks + i * blocks_ld;
    auto const code = static_cast<std::uint8_t>((row[mxfp4_byte_index(c)] >> mxfp4_nibble_shift(c)) & 0xfu);
    return dequantize_product(decode_e2m1(code), decode_e8m0(scales[i * scale_ld + mxfp4_scale_index(c)]));
  }
};

}  // namespace epx::io
