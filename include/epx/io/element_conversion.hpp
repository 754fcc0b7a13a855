// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! Converting a checkpoint's F32, F16 and BF16 elements to the element type epx loads them as.
//!
//! The documented conversion: an element is decoded to fp32 exactly (every F16 and BF16 value is an
//! fp32 value), then rounded once to the destination type, to nearest, ties to even (epx::half and
//! epx::bfloat16 round like CUDA's __float2half_rn / __float2bfloat16_rn). When source and
//! destination types are the same the bits are copied unchanged (NaN payloads included).

#include <epx/core/dtype.hpp>
#include <epx/io/safetensors_dtype.hpp>

#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace epx::io {

//! The safetensors dtype a file uses for epx's element type `T`.
template <float_element T>
constexpr SafetensorsDType safetensors_dtype_of() noexcept {
  if constexpr (std::is_same_v<T, float>)
    return SafetensorsDType::kF32;
  else if constexpr (std::is_same_v<T, half>)
    return SafetensorsDType::kF16;
  else
    return SafetensorsDType::kBF16;
}

namespace detail {

inline std::uint16_t load_u16(std::byte const* p) noexcept {
  return static_cast<std::uint16_t>(std::to_integer<std::uint16_t>(p[0]) | (std::to_integer<std::uint16_t>(p[1]) << 8));
}
inline std::uint32_t load_u32(std::byte const* p) noexcept {
  return std::to_integer<std::uint32_t>(p[0]) | (std::to_integer<std::uint32_t>(p[1]) << 8) |
         (std::to_integer<std::uint32_t>(p[2]) << 16) | (std::to_integer<std::uint32_t>(p[3]) << 24);
}

}  // namespace detail

//! One little-endian F32, F16 or BF16 element at `p`, as fp32 (exact). Other dtypes give 0: the
//! loader refuses them before it decodes anything.
inline float decode_plain(SafetensorsDType dtype, std::byte const* p) noexcept {
  switch (dtype) {
    case SafetensorsDType::kF32: return std::bit_cast<float>(detail::load_u32(p));
    case SafetensorsDType::kF16: return half::to_float(detail::load_u16(p));
    case SafetensorsDType::kBF16: return bfloat16::to_float(detail::load_u16(p));
    default: return 0.0f;
  }
}

//! The element of type `T` (or float) that a plain element at `p` converts to, as documented above.
template <class T>
inline T convert_plain(SafetensorsDType dtype, std::byte const* p) noexcept {
  if constexpr (std::is_same_v<T, float>) {
    return decode_plain(dtype, p);
  } else {
    if (dtype == safetensors_dtype_of<T>()) return T::from_bits(detail::load_u16(p));  // same type: same bits
    return T(decode_plain(dtype, p));
  }
}

//! Converts `n` plain elements of `dtype` at `src` into dst[0], dst[step], ... as convert_plain
//! does, choosing the conversion once per row rather than once per element.
template <class T>
inline void convert_plain_row(SafetensorsDType dtype, std::byte const* src, std::int64_t n, T* dst,
                              std::int64_t step) noexcept {
  auto const run = [&](auto element_size, auto convert) {
    for (std::int64_t j = 0; j < n; ++j) dst[j * step] = convert(src + j * decltype(element_size)::value);
  };
  using Two = std::integral_constant<std::int64_t, 2>;
  using Four = std::integral_constant<std::int64_t, 4>;
  switch (dtype) {
    case SafetensorsDType::kF32:
      return run(Four{}, [](std::byte const* p) { return convert_plain<T>(SafetensorsDType::kF32, p); });
    case SafetensorsDType::kF16:
      return run(Two{}, [](std::byte const* p) { return convert_plain<T>(SafetensorsDType::kF16, p); });
    case SafetensorsDType::kBF16:
      return run(Two{}, [](std::byte const* p) { return convert_plain<T>(SafetensorsDType::kBF16, p); });
    default: return;
  }
}

}  // namespace epx::io
