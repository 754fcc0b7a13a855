// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// Gate/up column selection (gemm/paired_columns.hpp), the one rule behind the fused GEMM epilogue's
// paired weight rows, the cuBLAS activation kernel and the Host reference, checked against the two
// layouts' definitions (GateUpLayout in gemm/expert_mlp.hpp).

#include "../common/test_util.hpp"

#include <epx/gemm/paired_columns.hpp>

#include <algorithm>
#include <vector>

using namespace epx;

TEST_CASE("paired_weight_row: gated columns read gate i and up i side by side") {
  for (int const inter : {1, 7, 40, 768}) {
    int const n = 2 * inter;
    std::vector<int> seen(static_cast<std::size_t>(n), 0);
    for (int p = 0; p < n; ++p) {
      int const concatenated = detail::paired_weight_row(p, n, true, true);
      CHECK(concatenated == (p % 2 == 0 ? p / 2 : inter + p / 2));  // gate rows first, then up rows
      ++seen[static_cast<std::size_t>(concatenated)];
      CHECK(detail::paired_weight_row(p, n, true, false) == p);  // interleaved: already paired
      CHECK(detail::paired_weight_row(p, n, false, true) == p);  // not gated: identity
      if (p + 4 < n && (p % 2) == ((p + 4) % 2))
        CHECK(detail::paired_weight_row(p + 4, n, true, true) - concatenated ==
              detail::paired_weight_row_step(4, true, true));
    }
    CHECK(std::all_of(seen.begin(), seen.end(), [](int c) { return c == 1; }));  // a permutation
  }
}

TEST_CASE("gate_column, up_column: interleaved 2i and 2i + 1, concatenated i and inter + i") {
  for (int const inter : {1, 5, 96, 2048}) {
    std::vector<int> seen_cat(static_cast<std::size_t>(2 * inter), 0), seen_int(seen_cat);
    for (int i = 0; i < inter; ++i) {
      INFO("inter = " << inter << ", i = " << i);
      CHECK(detail::gate_column(i, inter, false) == 2 * i);  // GateUpLayout::kInterleaved (gpt-oss)
      CHECK(detail::up_column(i, inter, false) == 2 * i + 1);
      CHECK(detail::gate_column(i, inter, true) == i);  // GateUpLayout::kConcatenated ([gate | up])
      CHECK(detail::up_column(i, inter, true) == inter + i);
      ++seen_cat[static_cast<std::size_t>(detail::gate_column(i, inter, true))];
      ++seen_cat[static_cast<std::size_t>(detail::up_column(i, inter, true))];
      ++seen_int[static_cast<std::size_t>(detail::gate_column(i, inter, false))];
      ++seen_int[static_cast<std::size_t>(detail::up_column(i, inter, false))];
    }
    auto const once = [](int c) { return c == 1; };
    CHECK(std::all_of(seen_cat.begin(), seen_cat.end(), once));  // every column used exactly once
    CHECK(std::all_of(seen_int.begin(), seen_int.end(), once));
  }
  static_assert(detail::up_column(3, 8, true) == 11 && detail::gate_column(3, 8, false) == 6);
}
