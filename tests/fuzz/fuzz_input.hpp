// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

// Decodes a fuzzer's bytes into shapes, ids, floats and configs. Running out of bytes yields
// zeros, so every input decodes to something.

#include <epx/epx.hpp>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace epx::fuzz {

class ByteReader {
 public:
  ByteReader(std::uint8_t const* data, std::size_t size) : data_(data), size_(size) {}

  template <class T>
  T take() {
    T value{};
    std::size_t const n = std::min(sizeof(T), size_ - pos_);
    std::memcpy(&value, data_ + pos_, n);
    pos_ += n;
    return value;
  }
  //! An integer in [lo, hi].
  std::int64_t in_range(std::int64_t lo, std::int64_t hi) {
    auto const span = static_cast<std::uint64_t>(hi - lo) + 1;
    return lo + static_cast<std::int64_t>(take<std::uint32_t>() % span);
  }
  bool flag() { return take<std::uint8_t>() & 1u; }
  //! Mostly ordinary floats, sometimes any bit pattern (NaN, inf, subnormal, huge).
  float any_float() {
    auto const kind = take<std::uint8_t>();
    if (kind % 8 == 0) return std::bit_cast<float>(take<std::uint32_t>());
    return static_cast<float>(take<std::int16_t>()) / 4096.0f;
  }
  //! An expert id: mostly valid, sometimes -1, sometimes out of range either side.
  std::int32_t any_id(std::int32_t num_experts) {
    auto const kind = take<std::uint8_t>() % 16;
    if (kind == 0) return -1;
    if (kind == 1) return take<std::int32_t>();  // anything at all
    if (kind == 2) return num_experts + static_cast<std::int32_t>(take<std::uint8_t>());
    return static_cast<std::int32_t>(take<std::uint16_t>() % static_cast<std::uint32_t>(num_experts));
  }
  [[nodiscard]] bool empty() const { return pos_ >= size_; }

 private:
  std::uint8_t const* data_;
  std::size_t size_;
  std::size_t pos_ = 0;
};

//! An invariant failed: print it and crash, so libFuzzer saves the input.
#define EPX_FUZZ_CHECK(cond)                                                                      \
  do {                                                                                            \
    if (!(cond)) {                                                                                \
      std::fprintf(stderr, "epx fuzz invariant failed: %s (%s:%d)\n", #cond, __FILE__, __LINE__); \
      std::abort();                                                                               \
    }                                                                                             \
  } while (0)

}  // namespace epx::fuzz
