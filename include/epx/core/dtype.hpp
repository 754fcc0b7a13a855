// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

#include <epx/config.hpp>

#include <fmt/format.h>

#include <bit>
#include <cstddef>
#include <cstdint>
#include <string_view>
#include <type_traits>

namespace epx {

//! bfloat16 storage: the upper 16 bits of an IEEE binary32, bit-compatible with CUDA's
//! `__nv_bfloat16`. Arithmetic happens in float; conversion from float rounds to nearest even.
struct bfloat16 {
  std::uint16_t bits = 0;

  bfloat16() = default;
  explicit bfloat16(float value) noexcept : bits(from_float(value)) {}
  [[nodiscard]] explicit operator float() const noexcept { return to_float(bits); }
  [[nodiscard]] static bfloat16 from_bits(std::uint16_t b) noexcept {
    bfloat16 h;
    h.bits = b;
    return h;
  }

  static std::uint16_t from_float(float value) noexcept {
    auto u = std::bit_cast<std::uint32_t>(value);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((u >> 16) | 0x0040u);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even; overflow carries into inf
    return static_cast<std::uint16_t>(u >> 16);
  }
  static float to_float(std::uint16_t b) noexcept { return std::bit_cast<float>(std::uint32_t{b} << 16); }
};

//! IEEE binary16 storage, bit-compatible with CUDA's `__half`. Conversion from float rounds to
//! nearest even, with subnormals, overflow to infinity and NaN handled as the hardware does.
struct half {
  std::uint16_t bits = 0;

  half() = default;
  explicit half(float value) noexcept : bits(from_float(value)) {}
  [[nodiscard]] explicit operator float() const noexcept { return to_float(bits); }
  [[nodiscard]] static half from_bits(std::uint16_t b) noexcept {
    half h;
    h.bits = b;
    return h;
  }

  static std::uint16_t from_float(float value) noexcept {
    auto const u = std::bit_cast<std::uint32_t>(value);
    auto const sign = static_cast<std::uint16_t>((u >> 16) & 0x8000u);
    auto const abs = u & 0x7fffffffu;
    if (abs > 0x7f800000u) return static_cast<std::uint16_t>(sign | 0x7e00u | ((abs >> 13) & 0x3ffu));  // NaN
    if (abs >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // rounds to >= 65520: inf
    if (abs >= 0x38800000u) {                                                   // normal half: exponent >= -14
      auto const mant_and_exp = abs - 0x38000000u;                              // rebias exponent 127 -> 15
      auto const rounded = mant_and_exp + 0xfffu + ((mant_and_exp >> 13) & 1u);
      return static_cast<std::uint16_t>(sign | (rounded >> 13));
    }
    if (abs < 0x33000000u) return sign;  // below half the smallest subnormal: +-0
    // Subnormal half: shift the 24-bit significand right, rounding to nearest even.
    auto const exponent = static_cast<int>(abs >> 23);         // 102 .. 112
    auto const significand = (abs & 0x7fffffu) | 0x800000u;    // implicit bit
    auto const shift = static_cast<unsigned>(126 - exponent);  // 14 .. 24
    auto const truncated = significand >> shift;
    auto const remainder = significand & ((1u << shift) - 1u);
    auto const halfway = 1u << (shift - 1);
    auto result = truncated;
    if (remainder > halfway || (remainder == halfway && (truncated & 1u))) ++result;
    return static_cast<std::uint16_t>(sign | result);
  }
  static float to_float(std::uint16_t h) noexcept {
    std::uint32_t const sign = std::uint32_t{h & 0x8000u} << 16;
    std::uint32_t const exponent = (h >> 10) & 0x1fu;
    std::uint32_t mantissa = h & 0x3ffu;
    if (exponent == 0x1fu) return std::bit_cast<float>(sign | 0x7f800000u | (mantissa << 13));  // inf, NaN
    if (exponent != 0) return std::bit_cast<float>(sign | ((exponent + 112u) << 23) | (mantissa << 13));
    if (mantissa == 0) return std::bit_cast<float>(sign);  // +-0
    int e = -1;                                            // normalise the subnormal
    do {
      ++e;
      mantissa <<= 1;
    } while ((mantissa & 0x400u) == 0);
    return std::bit_cast<float>(sign | (static_cast<std::uint32_t>(112 - e) << 23) | ((mantissa & 0x3ffu) << 13));
  }
};

static_assert(sizeof(bfloat16) == 2 && std::is_trivially_copyable_v<bfloat16>);
static_assert(sizeof(half) == 2 && std::is_trivially_copyable_v<half>);

//! Runtime tag of an element type, for type-erased buffers (weights, communicator payloads).
enum class DType : std::uint8_t { kF32, kF16, kBF16, kI32, kI64 };

constexpr std::string_view to_string(DType t) noexcept {
  switch (t) {
    case DType::kF32: return "f32";
    case DType::kF16: return "f16";
    case DType::kBF16: return "bf16";
    case DType::kI32: return "i32";
    case DType::kI64: return "i64";
  }
  return "?";
}

constexpr std::size_t size_of(DType t) noexcept {
  switch (t) {
    case DType::kF32:
    case DType::kI32: return 4;
    case DType::kF16:
    case DType::kBF16: return 2;
    case DType::kI64: return 8;
  }
  return 0;
}

template <class T>
struct dtype_of;
template <>
struct dtype_of<float> {
  static constexpr DType value = DType::kF32;
};
template <>
struct dtype_of<half> {
  static constexpr DType value = DType::kF16;
};
template <>
struct dtype_of<bfloat16> {
  static constexpr DType value = DType::kBF16;
};
template <>
struct dtype_of<std::int32_t> {
  static constexpr DType value = DType::kI32;
};
template <>
struct dtype_of<std::int64_t> {
  static constexpr DType value = DType::kI64;
};
template <class T>
inline constexpr DType dtype_of_v = dtype_of<std::remove_cv_t<T>>::value;

//! Element types epx computes with (activations, weights): fp32, fp16, bf16.
template <class T>
concept float_element = std::is_same_v < std::remove_cv_t<T>,
float > || std::is_same_v<std::remove_cv_t<T>, half> || std::is_same_v<std::remove_cv_t<T>, bfloat16>;

//! Converts any float_element to float (identity for float).
template <float_element T>
[[nodiscard]] inline float to_float(T value) noexcept {
  if constexpr (std::is_same_v<std::remove_cv_t<T>, float>)
    return value;
  else
    return static_cast<float>(value);
}

//! Converts a float to any float_element, rounding to nearest even.
template <float_element T>
[[nodiscard]] inline T from_float(float value) noexcept {
  if constexpr (std::is_same_v<T, float>)
    return value;
  else
    return T(value);
}

}  // namespace epx

template <>
struct fmt::formatter<epx::DType> : fmt::formatter<std::string_view> {
  auto format(epx::DType t, format_context& ctx) const {
    return formatter<std::string_view>::format(to_string(t), ctx);
  }
};
