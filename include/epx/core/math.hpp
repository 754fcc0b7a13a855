// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

#include <epx/config.hpp>

#include <concepts>
#include <cstdint>

namespace epx {

template <std::integral T>
EPX_HOST_DEVICE constexpr T ceil_div(T a, T b) noexcept {
  return (a + b - 1) / b;
}

template <std::integral T>
EPX_HOST_DEVICE constexpr T align_up(T value, T alignment) noexcept {
  return ceil_div(value, alignment) * alignment;
}

//! Number of bits needed to represent every value in [0, n]: the `end_bit` of a radix sort over
//! keys in that range. bit_width(0) == 0.
EPX_HOST_DEVICE constexpr int bit_width(std::uint64_t n) noexcept {
  int bits = 0;
  while (n != 0) {
    ++bits;
    n >>= 1;
  }
  return bits;
}

}  // namespace epx
