// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// grouped_row_range (cuda/gemm/tile_walk.hpp): the rows the per-row kernels of cuda/group_rows.cuh
// visit — [offsets[0], offsets[G]) for valid offsets, and never a row outside [0, num_rows) for
// any offsets (negative, past the buffer, decreasing).

#include <epx/cuda/gemm/tile_walk.hpp>

#include "../common/test_util.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <vector>

using epx::detail::grouped_row_range;

TEST_CASE(
    "grouped_row_range: valid offsets give the rows from the first to the last offset, any offsets stay inside the "
    "buffer") {
  EPX_TEST_SEEDED_RNG(rng);
  std::vector<std::int32_t> const valid = {3, 3, 10, 17, 17};
  auto const r = grouped_row_range(valid.data(), 4, 20);
  CHECK(r.begin == 3);
  CHECK(r.end == 17);
  std::vector<std::int32_t> const one = {0, 0};
  CHECK(grouped_row_range(one.data(), 1, 0).end == 0);
  std::uniform_int_distribution<std::int32_t> any(-50, 150);
  for (int trial = 0; trial < 10000; ++trial) {
    int const groups = 1 + static_cast<int>(rng() % 6);
    std::int64_t const rows = static_cast<std::int64_t>(rng() % 100);
    std::vector<std::int32_t> offsets(static_cast<std::size_t>(groups) + 1);
    for (auto& o : offsets) o = any(rng);
    auto const got = grouped_row_range(offsets.data(), groups, rows);
    CAPTURE(trial);
    REQUIRE(0 <= got.begin);
    REQUIRE(got.begin <= got.end);
    REQUIRE(got.end <= rows);
    // Where the two ends are valid, exactly them.
    std::int64_t const first = offsets.front(), last = offsets.back();
    if (0 <= first && first <= last && last <= rows) {
      CHECK(got.begin == first);
      CHECK(got.end == last);
    }
  }
}
