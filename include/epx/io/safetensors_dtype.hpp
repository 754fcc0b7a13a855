// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! The element types a safetensors header names ("dtype": "BF16", ...), with their sizes in bits.
//! The list is the reference implementation's (huggingface/safetensors, safetensors/src/tensor.rs,
//! enum Dtype, read 2026-12); the spelling in the file is the enumerator's name there.

#include <array>
#include <cstdint>
#include <optional>
#include <string_view>

namespace epx::io {

//! An element type as a safetensors file stores it. Sub-byte types (F4, F6_*) are packed; a
//! tensor of them must fill whole bytes.
enum class SafetensorsDType : std::uint8_t {
  kBool,
  kF4,
  kF6E2M3,
  kF6E3M2,
  kU8,
  kI8,
  kF8E5M2,
  kF8E4M3,
  kF8E8M0,
  kI16,
  kU16,
  kF16,
  kBF16,
  kI32,
  kU32,
  kF32,
  kC64,
  kF64,
  kI64,
  kU64,
};

namespace detail {

struct SafetensorsDTypeEntry {
  SafetensorsDType dtype;
  std::string_view name;  // as the header spells it
  std::uint32_t bits;
};

inline constexpr std::array<SafetensorsDTypeEntry, 20> kSafetensorsDTypes = {{
    {SafetensorsDType::kBool, "BOOL", 8},      {SafetensorsDType::kF4, "F4", 4},
    {SafetensorsDType::kF6E2M3, "F6_E2M3", 6}, {SafetensorsDType::kF6E3M2, "F6_E3M2", 6},
    {SafetensorsDType::kU8, "U8", 8},          {SafetensorsDType::kI8, "I8", 8},
    {SafetensorsDType::kF8E5M2, "F8_E5M2", 8}, {SafetensorsDType::kF8E4M3, "F8_E4M3", 8},
    {SafetensorsDType::kF8E8M0, "F8_E8M0", 8}, {SafetensorsDType::kI16, "I16", 16},
    {SafetensorsDType::kU16, "U16", 16},       {SafetensorsDType::kF16, "F16", 16},
    {SafetensorsDType::kBF16, "BF16", 16},     {SafetensorsDType::kI32, "I32", 32},
    {SafetensorsDType::kU32, "U32", 32},       {SafetensorsDType::kF32, "F32", 32},
    {SafetensorsDType::kC64, "C64", 64},       {SafetensorsDType::kF64, "F64", 64},
    {SafetensorsDType::kI64, "I64", 64},       {SafetensorsDType::kU64, "U64", 64},
}};

}  // namespace detail

//! The header's spelling of `dtype`, e.g. "BF16".
constexpr std::string_view to_string(SafetensorsDType dtype) noexcept {
  for (auto const& e : detail::kSafetensorsDTypes)
    if (e.dtype == dtype) return e.name;
  return "?";
}

//! Bits of one element.
constexpr std::uint32_t bits_of(SafetensorsDType dtype) noexcept {
  for (auto const& e : detail::kSafetensorsDTypes)
    if (e.dtype == dtype) return e.bits;
  return 0;
}

//! The dtype a header names, or nothing for a name the format does not have.
constexpr std::optional<SafetensorsDType> parse_safetensors_dtype(std::string_view name) noexcept {
  for (auto const& e : detail::kSafetensorsDTypes)
    if (e.name == name) return e.dtype;
  return std::nullopt;
}

//! F32, F16 or BF16: the element types epx converts from without a scale.
constexpr bool is_plain_float(SafetensorsDType dtype) noexcept {
  return dtype == SafetensorsDType::kF32 || dtype == SafetensorsDType::kF16 || dtype == SafetensorsDType::kBF16;
}

}  // namespace epx::io
