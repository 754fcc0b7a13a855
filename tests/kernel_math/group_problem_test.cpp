// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// The CUTLASS path's per-group arguments (cuda/gemm/group_problem.hpp) against a plain walk over the
// groups: rows, and the element offsets of A rows, B matrices and D rows, with padded leading
// dimensions, empty groups and offsets past 2^31 elements.

#include "../common/test_util.hpp"

#include <epx/cuda/gemm/group_problem.hpp>

#include <array>
#include <numeric>
#include <random>
#include <vector>

using epx::detail::group_problem;

TEST_CASE("group_problem: every group's rows and offsets equal a walk over the groups") {
  EPX_TEST_SEEDED_RNG(rng);
  std::uniform_int_distribution<int> rows(0, 300), pick(0, 3), width(1, 64);
  for (int trial = 0; trial < 50; ++trial) {
    int const groups = 1 + trial * 7;
    std::vector<std::int32_t> offsets(static_cast<std::size_t>(groups) + 1, rows(rng));  // rows before group 0
    for (int g = 0; g < groups; ++g)
      offsets[static_cast<std::size_t>(g) + 1] =
          offsets[static_cast<std::size_t>(g)] + (pick(rng) == 0 ? 0 : rows(rng));
    std::int32_t const n = 8 * width(rng), k = 8 * width(rng);
    std::int64_t const lda = k + 8 * pick(rng), ldd = n + 4 * pick(rng);
    std::int64_t a_row = offsets[0], b_elem = 0;
    for (int g = 0; g < groups; ++g) {
      CAPTURE(g);
      auto const p = group_problem(offsets.data(), g, lda, ldd, n, k);
      std::int32_t const m = offsets[static_cast<std::size_t>(g) + 1] - offsets[static_cast<std::size_t>(g)];
      CHECK(p.m == m);
      CHECK(p.n == n);
      CHECK(p.k == k);
      CHECK(p.a_offset == a_row * lda);
      CHECK(p.d_offset == a_row * ldd);
      CHECK(p.b_offset == b_elem);
      a_row += m;
      b_elem += std::int64_t{n} * k;
    }
  }
}

TEST_CASE("group_problem: offsets past 2^31 elements do not wrap (model sizes)") {
  // AllToAll's receive rows on 8 ranks x 16384 tokens x 8 slots (1 048 576), 7168 columns
  // (DeepSeek-V3's hidden): the last expert's rows start past 2^31 elements.
  std::vector<std::int32_t> const offsets = {0, 1000000, 1048576};
  auto const p = group_problem(offsets.data(), 1, 7168, 7168, 7168, 2048);
  CHECK(p.m == 48576);
  CHECK(p.a_offset == std::int64_t{1000000} * 7168);
  CHECK(p.a_offset > std::int64_t{1} << 31);
  CHECK(p.b_offset == std::int64_t{7168} * 2048);
  static_assert(group_problem(std::array<std::int32_t, 3>{2, 5, 9}.data(), 1, 16, 24, 8, 16).d_offset == 5 * 24);
}
