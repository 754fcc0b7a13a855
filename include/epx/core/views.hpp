// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

#include <epx/core/error.hpp>

#include <cstdint>
#include <type_traits>

namespace epx {

//! A row-major matrix that does not own its memory: `rows x cols` elements, row r starting at
//! `data + r * ld`. `T` may be const. The view says nothing about where the memory lives; each
//! execution space documents what it accepts (Host: host memory).
template <class T>
struct MatrixView {
  T* data = nullptr;
  std::int64_t rows = 0;
  std::int64_t cols = 0;
  std::int64_t ld = 0;  //!< leading dimension: elements between the starts of two rows, >= cols

  MatrixView() = default;
  MatrixView(T* data_, std::int64_t rows_, std::int64_t cols_) : MatrixView(data_, rows_, cols_, cols_) {}
  MatrixView(T* data_, std::int64_t rows_, std::int64_t cols_, std::int64_t ld_)
      : data(data_), rows(rows_), cols(cols_), ld(ld_) {}

  //! A view of const elements converts implicitly from a view of mutable ones.
  template <class U>
  requires(std::is_same_v<T, U const>) MatrixView(MatrixView<U> other)
      : data(other.data), rows(other.rows), cols(other.cols), ld(other.ld) {}

  [[nodiscard]] EPX_HOST_DEVICE T* row(std::int64_t r) const noexcept { return data + r * ld; }
  [[nodiscard]] EPX_HOST_DEVICE T& operator()(std::int64_t r, std::int64_t c) const noexcept {
    return data[r * ld + c];
  }
  [[nodiscard]] std::int64_t size() const noexcept { return rows * cols; }
  [[nodiscard]] bool empty() const noexcept { return rows == 0 || cols == 0; }
};

template <class T>
MatrixView(T*, std::int64_t, std::int64_t) -> MatrixView<T>;
template <class T>
MatrixView(T*, std::int64_t, std::int64_t, std::int64_t) -> MatrixView<T>;

//! `batch` row-major matrices of equal shape stored back to back (e.g. one weight per local
//! expert): matrix g starts at `data + g * rows * cols`.
template <class T>
struct BatchedMatrixView {
  T* data = nullptr;
  std::int64_t batch = 0;
  std::int64_t rows = 0;
  std::int64_t cols = 0;

  [[nodiscard]] MatrixView<T> operator[](std::int64_t g) const noexcept {
    return MatrixView<T>(data + g * rows * cols, rows, cols);
  }
};

namespace detail {

//! Checks that a view is well formed and has the expected shape (-1 = any). `name` is the
//! parameter's name in the caller's API, e.g. "x".
template <class T>
void check_matrix(std::string_view where, std::string_view name, MatrixView<T> const& m, std::int64_t rows,
                  std::int64_t cols) {
  if (m.rows < 0 || m.cols < 0 || m.ld < m.cols)
    throw_error(Errc::kInvalidArgument, fmt::format("{}: {} has rows = {}, cols = {}, ld = {}, expected rows >= 0, "
                                                    "cols >= 0, ld >= cols",
                                                    where, name, m.rows, m.cols, m.ld));
  if (rows >= 0 && m.rows != rows)
    throw_error(Errc::kShapeMismatch, fmt::format("{}: {}.rows = {}, expected {}", where, name, m.rows, rows));
  if (cols >= 0 && m.cols != cols)
    throw_error(Errc::kShapeMismatch, fmt::format("{}: {}.cols = {}, expected {}", where, name, m.cols, cols));
  if (m.data == nullptr && m.rows > 0 && m.cols > 0)
    throw_error(Errc::kInvalidArgument, fmt::format("{}: {}.data = nullptr, expected a pointer to {} x {} elements",
                                                    where, name, m.rows, m.cols));
}

}  // namespace detail
}  // namespace epx
