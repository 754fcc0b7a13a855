// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

// What the CUTLASS tests (cutlass_grouped_test.cu, cutlass_grouped_backward_test.cu) read back from an
// output poisoned with 0xff bytes before the call: the group offsets of a case, whether an element
// still holds the poison, and a padded [rows, ld] output split into the elements inside the groups'
// rows and columns (to compare with the Host) and those outside (which must stay poisoned).

#include <epx/core/dtype.hpp>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace epx::test {

//! [counts.size() + 1] offsets of groups of `counts` rows, the first starting at `first_row`.
inline std::vector<std::int32_t> offsets_from(std::vector<std::int32_t> const& counts, std::int32_t first_row) {
  std::vector<std::int32_t> offsets(counts.size() + 1, first_row);
  for (std::size_t g = 0; g < counts.size(); ++g) offsets[g + 1] = offsets[g] + counts[g];
  return offsets;
}

//! Whether every byte of `v` is `byte` (an element the call did not write).
template <class T>
bool all_bytes(T const& v, unsigned char byte) {
  auto const* b = reinterpret_cast<unsigned char const*>(&v);
  return std::all_of(b, b + sizeof(T), [&](unsigned char x) { return x == byte; });
}

//! A poisoned output read back: the elements of rows [begin, end) and columns [0, cols) beside the
//! reference's, how many of them still hold the poison, and how many elsewhere do not.
struct PoisonedRows {
  std::vector<float> got_in;
  std::vector<double> ref_in;
  std::int64_t unwritten = 0;
  std::int64_t overwritten = 0;
};

//! `got` is [rows, ld]; `ref` is [rows, cols] (dense).
template <class T>
PoisonedRows split_poisoned(std::vector<T> const& got, std::vector<float> const& ref, std::int64_t rows,
                            std::int64_t ld, std::int64_t cols, std::int64_t begin, std::int64_t end) {
  PoisonedRows out;
  for (std::int64_t r = 0; r < rows; ++r) {
    bool const inside = r >= begin && r < end;
    for (std::int64_t col = 0; col < ld; ++col) {
      T const v = got[static_cast<std::size_t>(r * ld + col)];
      if (inside && col < cols) {
        out.got_in.push_back(to_float(v));
        out.ref_in.push_back(ref[static_cast<std::size_t>(r * cols + col)]);
        out.unwritten += all_bytes(v, 0xff);
      } else {
        out.overwritten += !all_bytes(v, 0xff);
      }
    }
  }
  return out;
}

}  // namespace epx::test
