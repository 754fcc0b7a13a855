// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// The CUTLASS path's per-group arguments (cuda/gemm/group_problem.hpp) against a plain walk over the
// groups: rows, and the element offsets of A rows, B matrices and D rows, with padded leading
// dimensions, empty groups and offsets past 2^31 elements. And the three problems (forward, data
// gradient, weight gradient) run as a ptr-array kernel would run them — every group's (M, N, K),
// operand starts and the call's strides in CUTLASS's modes — against the Host grouped GEMM and its
// gradients: a stride or mode swapped, an offset from the wrong operand, a clamp missing fails here.

#include "../common/test_util.hpp"

#include <epx/cuda/gemm/group_problem.hpp>
#include <epx/host/grouped_gemm.hpp>
#include <epx/host/grouped_gemm_backward.hpp>

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

namespace {

//! A ptr-array GEMM as CUTLASS runs one problem per group: d(m, n) = sum over kk of a(m, kk) b(n, kk)
//! with each operand at its start + mode0 * (first index) + mode1 * (second index).
template <class Problem>
std::vector<float> emulate(Problem const& problem, int groups, std::vector<float> const& a, std::vector<float> const& b,
                           std::vector<float> d) {
  epx::detail::GroupStrides const s = problem.strides();
  for (int g = 0; g < groups; ++g) {
    epx::detail::GroupProblem const p = problem(g);
    for (std::int64_t m = 0; m < p.m; ++m)
      for (std::int64_t n = 0; n < p.n; ++n) {
        float acc = 0.0f;
        for (std::int64_t kk = 0; kk < p.k; ++kk)
          acc += a.at(static_cast<std::size_t>(p.a_offset + m * s.a.mode0 + kk * s.a.mode1)) *
                 b.at(static_cast<std::size_t>(p.b_offset + n * s.b.mode0 + kk * s.b.mode1));
        d.at(static_cast<std::size_t>(p.d_offset + m * s.d.mode0 + n * s.d.mode1)) = acc;
      }
  }
  return d;
}

struct Shape {
  std::vector<std::int32_t> offsets;
  std::int64_t rows;
  std::int32_t n, k;
  std::int64_t lda, ldc;
};

Shape random_shape(std::mt19937_64& rng) {
  std::uniform_int_distribution<int> count(0, 9), pick(0, 2), width(1, 6), groups(1, 5);
  Shape s;
  int const g = groups(rng);
  s.offsets.assign(static_cast<std::size_t>(g) + 1, count(rng));  // rows before group 0
  for (int i = 0; i < g; ++i)
    s.offsets[static_cast<std::size_t>(i) + 1] =
        s.offsets[static_cast<std::size_t>(i)] + (pick(rng) == 0 ? 0 : count(rng));
  s.rows = s.offsets.back() + pick(rng);  // rows after the last group
  s.n = 8 * width(rng);
  s.k = 8 * width(rng);
  s.lda = s.k + 8 * pick(rng);
  s.ldc = s.n + 8 * pick(rng);
  return s;
}

}  // namespace

TEST_CASE("ForwardProblem, DataGradientProblem, WeightGradientProblem: emulated, they equal the Host's GEMMs") {
  using namespace epx;
  EPX_TEST_SEEDED_RNG(rng);
  for (int trial = 0; trial < 60; ++trial) {
    Shape const s = random_shape(rng);
    CAPTURE(trial);
    auto const groups = static_cast<int>(s.offsets.size()) - 1;
    auto const a = test::random_vector<float>(static_cast<std::size_t>(s.rows * s.lda), rng);
    auto const b = test::random_vector<float>(static_cast<std::size_t>(groups) * s.n * s.k, rng);
    auto const dc = test::random_vector<float>(static_cast<std::size_t>(s.rows * s.ldc), rng);
    auto const poison = test::random_vector<float>(static_cast<std::size_t>(s.rows * s.ldc), rng);
    std::span<std::int32_t const> const offsets(s.offsets);

    // Forward: c = a · b[g]ᵀ, c with ldc.
    auto want = poison;
    grouped_gemm(Host{}, MatrixView<float const>(a.data(), s.rows, s.k, s.lda),
                 BatchedMatrixView<float const>{b.data(), groups, s.n, s.k}, nullptr, offsets,
                 MatrixView<float>(want.data(), s.rows, s.n, s.ldc));
    auto got = emulate(detail::ForwardProblem{s.offsets.data(), s.rows, s.lda, s.ldc, s.n, s.k}, groups, a, b, poison);
    CHECK(got == want);

    // Data gradient: da = dc · b[g], da with lda.
    auto da_want = a;  // untouched rows keep a's values
    grouped_gemm_backward_data(Host{}, MatrixView<float const>(dc.data(), s.rows, s.n, s.ldc),
                               BatchedMatrixView<float const>{b.data(), groups, s.n, s.k}, offsets,
                               MatrixView<float>(da_want.data(), s.rows, s.k, s.lda));
    auto const da_got =
        emulate(detail::DataGradientProblem{s.offsets.data(), s.rows, s.ldc, s.lda, s.n, s.k}, groups, dc, b, a);
    CHECK(da_got == da_want);

    // Weight gradient: db[g] = dc[rows of g]ᵀ · a[rows of g]; an empty group's zeros are the caller's.
    std::vector<float> db_want(static_cast<std::size_t>(groups) * s.n * s.k);
    grouped_gemm_backward_weight(Host{}, MatrixView<float const>(a.data(), s.rows, s.k, s.lda),
                                 MatrixView<float const>(dc.data(), s.rows, s.n, s.ldc), offsets,
                                 BatchedMatrixView<float>{db_want.data(), groups, s.n, s.k}, nullptr);
    auto db_got = emulate(detail::WeightGradientProblem{s.offsets.data(), s.rows, s.ldc, s.lda, s.n, s.k}, groups, dc,
                          a, std::vector<float>(db_want.size(), 0.0f));
    CHECK(db_got == db_want);
  }
}

TEST_CASE("ForwardProblem, DataGradientProblem, WeightGradientProblem: offsets that leave the rows are clamped") {
  using epx::detail::DataGradientProblem;
  using epx::detail::ForwardProblem;
  using epx::detail::WeightGradientProblem;
  std::vector<std::int32_t> const offsets = {-5, 3, 3, 40};  // below 0, an empty group, past num_rows = 10
  ForwardProblem const forward{offsets.data(), 10, 24, 16, 16, 24};
  CHECK(forward(0).m == 3);
  CHECK(forward(0).a_offset == 0);
  CHECK(forward(1).m == 0);
  CHECK(forward(2).m == 7);
  CHECK(forward(2).a_offset == 3 * 24);
  CHECK(forward(2).d_offset == 3 * 16);
  CHECK(forward(2).b_offset == 2 * 16 * 24);
  std::vector<std::int32_t> const decreasing = {9, 2};  // a decreasing pair: empty, not 2^32 - 7 rows
  CHECK(ForwardProblem{decreasing.data(), 10, 24, 16, 16, 24}(0).m == 0);
  DataGradientProblem const data{offsets.data(), 10, 24, 16, 24, 16};
  CHECK(data(0).m == 3);
  CHECK(data(0).a_offset == 0);
  CHECK(data(1).m == 0);
  CHECK(data(2).m == 7);
  CHECK(data(2).d_offset == 3 * 16);
  WeightGradientProblem const weight{offsets.data(), 10, 24, 16, 24, 16};
  CHECK(weight(0).k == 3);
  CHECK(weight(1).m == 0);  // (n, k, 0) would never finish on CUTLASS
  CHECK(weight(1).n == 0);
  CHECK(weight(1).k == 0);
  CHECK(weight(2).k == 7);
  CHECK(weight(2).b_offset == 3 * 16);
  CHECK(weight(2).d_offset == 2 * 24 * 16);
}
