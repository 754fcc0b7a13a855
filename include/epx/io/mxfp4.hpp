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
//! ldexp). Scale 0xFF is NaN (OCP MX v1.0), so its whole block is NaN.

#include <array>
#include <bit>
#include <cstdint>

namespace epx::io {

//! Elements per MXFP4 block (one scale each).
inline constexpr std::int64_t kMxfp4BlockElements = 32;
//! Bytes of packed codes per block.
inline constexpr std::int64_t kMxfp4BlockBytes = 16;

//! An E2M1 code (low 4 bits of `code`) as fp32: sign, 2 exponent bits (bias 1), 1 mantissa bit.
constexpr float decode_e2m1(std::uint8_t code) noexcept {
  constexpr std::array<float, 8> kMagnitude = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
  float const magnitude = kMagnitude[code & 0x7u];
  return (code & 0x8u) != 0 ? -magnitude : magnitude;
}

//! An E8M0 scale as fp32: 2^(bits - 127) (2^-127 is an fp32 subnormal, exact); 0xFF is NaN.
constexpr float decode_e8m0(std::uint8_t bits) noexcept {
  if (bits == 0xff) return std::bit_cast<float>(0x7fc00000u);
  if (bits == 0) return std::bit_cast<float>(0x00400000u);  // 2^-127
  return std::bit_cast<float>(std::uint32_t{bits} << 23);
}

//! Element `index` (0 .. 31) of an MXFP4 block: its packed 16 bytes and its scale, as fp32.
constexpr float mxfp4_element(std::uint8_t const* block_bytes, std::int64_t index, std::uint8_t scale) noexcept {
  std::uint8_t const byte = block_bytes[index / 2];
  std::uint8_t const code =
      (index % 2 == 0) ? static_cast<std::uint8_t>(byte & 0xfu) : static_cast<std::uint8_t>(byte >> 4);
  return decode_e2m1(code) * decode_e8m0(scale);
}

}  // namespace epx::io
