// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! TensorView: a pointer with the extents and element strides of what it points to, as a
//! framework reports them (torch: `.sizes()`, `.strides()`). epx keeps the shape of each expert
//! weight (TensorShape) so that a layer can refuse a tensor in another layout instead of reading
//! it as if it were the expected one (a transposed checkpoint tensor computes garbage, silently).

#include <epx/core/error.hpp>

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <type_traits>

namespace epx {

//! The largest rank TensorShape records: expert weights are [experts, rows, cols].
inline constexpr std::size_t kMaxTensorRank = 3;

//! Extents and element strides of a tensor, without its pointer or element type: what
//! ExpertWeights keeps of each weight. `rank == 0` means "not known" (a weight given as a bare
//! pointer), which no check can use.
struct TensorShape {
  std::int32_t rank = 0;
  std::array<std::int64_t, kMaxTensorRank> extents = {};
  std::array<std::int64_t, kMaxTensorRank> strides = {};  //!< elements between neighbours of each dimension

  [[nodiscard]] bool known() const noexcept { return rank > 0; }
  [[nodiscard]] std::span<std::int64_t const> extent_list() const noexcept {
    return {extents.data(), static_cast<std::size_t>(rank)};
  }
  [[nodiscard]] std::span<std::int64_t const> stride_list() const noexcept {
    return {strides.data(), static_cast<std::size_t>(rank)};
  }
  //! Product of the extents (0 when any is 0).
  [[nodiscard]] std::int64_t size() const noexcept {
    std::int64_t n = 1;
    for (auto e : extent_list()) n *= e;
    return n;
  }
};

namespace detail {

//! The strides of a dense row-major tensor of these extents (the last index moves fastest).
template <std::size_t Rank>
constexpr std::array<std::int64_t, Rank> row_major_strides(std::array<std::int64_t, Rank> const& extents) noexcept {
  std::array<std::int64_t, Rank> strides{};
  std::int64_t step = 1;
  for (std::size_t d = Rank; d-- > 0;) {
    strides[d] = step;
    step *= extents[d] > 0 ? extents[d] : 1;
  }
  return strides;
}

//! Whether `strides` lay the tensor out densely in row-major order. As torch's is_contiguous():
//! the stride of a dimension of extent 1 is never used, so it may be anything, and an empty tensor
//! (an extent of 0) is contiguous.
inline bool is_row_major(std::span<std::int64_t const> extents, std::span<std::int64_t const> strides) noexcept {
  for (auto e : extents)
    if (e == 0) return true;
  std::int64_t step = 1;
  for (std::size_t d = extents.size(); d-- > 0;) {
    if (extents[d] != 1 && strides[d] != step) return false;
    step *= extents[d];
  }
  return true;
}

//! "[a, b, c]", as messages print extents and strides.
inline std::string format_list(std::span<std::int64_t const> values) {
  std::string text = "[";
  for (std::size_t i = 0; i < values.size(); ++i) text += fmt::format("{}{}", i == 0 ? "" : ", ", values[i]);
  return text + "]";
}

}  // namespace detail

//! A tensor that does not own its memory: `data` with `Rank` extents and, for each dimension, the
//! number of elements between neighbours along it (element strides, not bytes: torch's
//! `.strides()`). `T` may be const. Build one from a framework tensor with its sizes and strides,
//! or from extents alone for a dense row-major tensor:
//!
//!   epx::TensorView(ptr, {experts, rows, cols})                       // contiguous
//!   epx::TensorView(ptr, {t.size(0), t.size(1), t.size(2)},
//!                        {t.stride(0), t.stride(1), t.stride(2)})     // as torch lays it out
template <class T, std::size_t Rank>
struct TensorView {
  static_assert(Rank >= 1 && Rank <= kMaxTensorRank, "epx: TensorView has rank 1 to 3");

  T* data = nullptr;
  std::array<std::int64_t, Rank> extents = {};
  std::array<std::int64_t, Rank> strides = {};

  TensorView() = default;
  //! A dense row-major tensor: strides follow from the extents.
  TensorView(T* data_, std::int64_t const (&extents_)[Rank]) : data(data_) {
    for (std::size_t d = 0; d < Rank; ++d) extents[d] = extents_[d];
    strides = detail::row_major_strides(extents);
  }
  TensorView(T* data_, std::int64_t const (&extents_)[Rank], std::int64_t const (&strides_)[Rank]) : data(data_) {
    for (std::size_t d = 0; d < Rank; ++d) {
      extents[d] = extents_[d];
      strides[d] = strides_[d];
    }
  }
  TensorView(T* data_, std::array<std::int64_t, Rank> const& extents_, std::array<std::int64_t, Rank> const& strides_)
      : data(data_), extents(extents_), strides(strides_) {}

  //! A view of const elements converts implicitly from a view of mutable ones.
  template <class U>
  requires(std::is_same_v<T, U const>) TensorView(TensorView<U, Rank> const& other)
      : data(other.data), extents(other.extents), strides(other.strides) {}

  [[nodiscard]] TensorShape shape() const noexcept {
    TensorShape s{.rank = static_cast<std::int32_t>(Rank)};
    for (std::size_t d = 0; d < Rank; ++d) {
      s.extents[d] = extents[d];
      s.strides[d] = strides[d];
    }
    return s;
  }
  [[nodiscard]] std::int64_t size() const noexcept { return shape().size(); }
  [[nodiscard]] bool is_contiguous() const noexcept { return detail::is_row_major(extents, strides); }
};

}  // namespace epx
