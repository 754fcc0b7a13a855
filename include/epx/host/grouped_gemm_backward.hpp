// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! The backward of the grouped GEMM (host reference). Forward (gemm/grouped_gemm.hpp), for the rows
//! r of group g:  c[r, n] = sum over k of a[r, k] * b[g][n, k] (+ bias[g][n]). So, for dc = dL/dc:
//!   data gradient:    da[r, k]      = sum over n of dc[r, n] * b[g][n, k]          (da = dc · b[g])
//!   weight gradient:  db[g][n, k]   = sum over the rows r of g of dc[r, n] * a[r, k] (db[g] = dcᵀ · a)
//!                     dbias[g][n]   = sum over the rows r of g of dc[r, n]
//! fp32 accumulation in a fixed order (n for da, r for db and dbias), one rounding to the output
//! type at the end: bitwise deterministic. A group with no rows gets zero weight gradients.

#include <epx/core/space.hpp>
#include <epx/gemm/grouped_gemm.hpp>

#include <type_traits>

namespace epx {
namespace detail {

//! Checks a stacked [batch, rows, cols] view against the expected extents (-1 = any) and that it
//! has memory for its elements. `name` is the parameter's name in the caller's API.
template <class T>
void check_batched(std::string_view where, std::string_view name, BatchedMatrixView<T> const& m, std::int64_t batch,
                   std::int64_t rows, std::int64_t cols) {
  bool const ok = m.batch >= 0 && m.rows >= 0 && m.cols >= 0 && (batch < 0 || m.batch == batch) &&
                  (rows < 0 || m.rows == rows) && (cols < 0 || m.cols == cols);
  auto const want = [](std::int64_t v) { return v < 0 ? std::string("any") : fmt::format("{}", v); };
  require(ok, Errc::kShapeMismatch, where, fmt::format("{} (batch, rows, cols)", name),
          fmt::format("({}, {}, {})", m.batch, m.rows, m.cols),
          fmt::format("({}, {}, {})", want(batch), want(rows), want(cols)));
  require(m.data != nullptr || m.batch * m.rows * m.cols == 0, Errc::kInvalidArgument, where,
          fmt::format("{}.data", name), "nullptr", fmt::format("a pointer to {} elements", m.batch * m.rows * m.cols));
}

//! Checks one offset per group plus the end, non-decreasing and inside [0, rows]: before anything
//! is written.
inline void check_group_offsets(std::string_view where, std::string_view name, std::span<std::int32_t const> offsets,
                                std::int64_t num_groups, std::int64_t rows, std::string_view groups_name) {
  require(offsets.size() == static_cast<std::size_t>(num_groups) + 1, Errc::kShapeMismatch, where,
          fmt::format("{}.size()", name), offsets.size(), fmt::format("{} + 1 = {}", groups_name, num_groups + 1));
  for (std::size_t g = 0; g + 1 < offsets.size(); ++g)
    require(offsets[g] >= 0 && offsets[g] <= offsets[g + 1] && offsets[g + 1] <= rows, Errc::kInvalidArgument, where,
            fmt::format("{}[{}..{}]", name, g, g + 1), fmt::format("[{}, {}]", offsets[g], offsets[g + 1]),
            fmt::format("0 <= offsets[g] <= offsets[g+1] <= rows = {}", rows));
}

}  // namespace detail

//! @brief The grouped GEMM's data gradient (host reference): da[r, :] = dc[r, :] · b[g] for the
//! rows r of group g, fp32 accumulation in n order, one rounding to TDa at the end.
//! @param[in]  dc       [M, N]: dL/dc
//! @param[in]  b        [G, N, K], K-major: forward's weights
//! @param[in]  offsets  [G + 1]: forward's row ranges, non-decreasing, offsets[G] <= M
//! @param[out] da       [M, K]: dL/da; rows outside [offsets[0], offsets[G]) are left untouched
template <class TDc, class TB, float_element TDa>
requires float_element<TDc> && float_element<TB>
void grouped_gemm_backward_data(Host, MatrixView<TDc> dc_in, BatchedMatrixView<TB> b_in,
                                std::span<std::int32_t const> offsets, MatrixView<TDa> da) {
  constexpr std::string_view where = "grouped_gemm_backward_data";
  MatrixView<std::remove_const_t<TDc> const> const dc(dc_in);
  BatchedMatrixView<std::remove_const_t<TB> const> const b{b_in.data, b_in.batch, b_in.rows, b_in.cols};
  detail::check_matrix(where, "dc", dc, -1, -1);
  detail::check_batched(where, "b", b, -1, dc.cols, -1);
  detail::check_matrix(where, "da", da, dc.rows, b.cols);
  detail::check_group_offsets(where, "offsets", offsets, b.batch, dc.rows, "b.batch");
  for (std::size_t g = 0; g + 1 < offsets.size(); ++g) {
    auto const bg = b[static_cast<std::int64_t>(g)];
    for (std::int64_t r = offsets[g]; r < offsets[g + 1]; ++r) {
      auto const* dcrow = dc.row(r);
      for (std::int64_t k = 0; k < b.cols; ++k) {
        float acc = 0.0f;
        for (std::int64_t n = 0; n < b.rows; ++n) acc += to_float(dcrow[n]) * to_float(bg(n, k));
        da(r, k) = from_float<std::remove_cv_t<TDa>>(acc);
      }
    }
  }
}

//! @brief The grouped GEMM's weight and bias gradients (host reference): db[g] = dc[rows of g]ᵀ ·
//! a[rows of g] and dbias[g] = the column sums of dc[rows of g], fp32 accumulation in row order,
//! one rounding to TDb at the end. Every group is written: zeros for a group with no rows.
//! @param[in]  a        [M, K]: forward's input
//! @param[in]  dc       [M, N]: dL/dc
//! @param[in]  offsets  [G + 1]: forward's row ranges, non-decreasing, offsets[G] <= M
//! @param[out] db       [G, N, K], K-major like forward's b: dL/db (overwritten, not accumulated)
//! @param[out] d_bias   [G, N]: dL/dbias, or nullptr when no bias gradient is wanted
template <class TA, class TDc, float_element TDb>
requires float_element<TA> && float_element<TDc>
void grouped_gemm_backward_weight(Host, MatrixView<TA> a_in, MatrixView<TDc> dc_in,
                                  std::span<std::int32_t const> offsets, BatchedMatrixView<TDb> db,
                                  std::type_identity_t<TDb*> d_bias) {
  constexpr std::string_view where = "grouped_gemm_backward_weight";
  MatrixView<std::remove_const_t<TA> const> const a(a_in);
  MatrixView<std::remove_const_t<TDc> const> const dc(dc_in);
  using TOut = std::remove_cv_t<TDb>;
  detail::check_matrix(where, "a", a, -1, -1);
  detail::check_matrix(where, "dc", dc, a.rows, -1);
  detail::check_batched(where, "db", db, -1, dc.cols, a.cols);
  detail::check_group_offsets(where, "offsets", offsets, db.batch, a.rows, "db.batch");
  for (std::size_t g = 0; g + 1 < offsets.size(); ++g) {
    auto const dbg = db[static_cast<std::int64_t>(g)];
    for (std::int64_t n = 0; n < db.rows; ++n) {
      for (std::int64_t k = 0; k < db.cols; ++k) {
        float acc = 0.0f;
        for (std::int64_t r = offsets[g]; r < offsets[g + 1]; ++r) acc += to_float(dc(r, n)) * to_float(a(r, k));
        dbg(n, k) = from_float<TOut>(acc);
      }
      if (d_bias != nullptr) {
        float acc = 0.0f;
        for (std::int64_t r = offsets[g]; r < offsets[g + 1]; ++r) acc += to_float(dc(r, n));
        d_bias[static_cast<std::int64_t>(g) * db.rows + n] = from_float<TOut>(acc);
      }
    }
  }
}

}  // namespace epx
