// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// The chunking and summation order of the CUDA unpermute_backward (cuda/permute_backward.cuh), on the
// host: the chunk width covers a row exactly, a chunk loads as one word only where every chunk start
// is aligned, and the blocked dot product (detail::unpermute_backward_dot, which the GPU test
// compares the kernel with bit for bit) visits every column exactly once, sums in the tree the
// kernel's shuffles form, and stays within rounding of the exact dot product.

#include "../common/test_util.hpp"

#include <epx/permute/permute_backward_args.hpp>

#include <cmath>
#include <vector>

using namespace epx;

namespace {

// The tree of __shfl_down_sync stated recursively: halve the lanes, lane i adding lane i + n/2.
float halving_sum(std::vector<float> v) {
  while (v.size() > 1) {
    std::size_t const half = v.size() / 2;
    for (std::size_t i = 0; i < half; ++i) v[i] = v[i] + v[i + half];
    v.resize(half);
  }
  return v[0];
}

}  // namespace

TEST_CASE("PermuteBackwardMath::backward_chunk_elems: one 16-byte vector of the wider type, or one column") {
  for (std::int64_t a : {2, 4})
    for (std::int64_t b : {2, 4})
      for (std::int64_t cols : {0, 1, 3, 4, 6, 7, 8, 12, 16, 70, 72, 4096, 4097}) {
        CAPTURE(a);
        CAPTURE(b);
        CAPTURE(cols);
        int const w = detail::backward_chunk_elems(cols, a, b);
        std::int64_t const wider = std::max(a, b);
        CHECK(cols % w == 0);  // whole chunks: the kernel's chunk loop covers the row exactly
        if (cols % (16 / wider) == 0)
          CHECK(w * wider == 16);
        else
          CHECK(w == 1);
      }
  static_assert(detail::backward_chunk_elems(72, 2, 2) == 8);
  static_assert(detail::backward_chunk_elems(72, 2, 4) == 4);
  static_assert(detail::backward_chunk_elems(70, 2, 2) == 1);
}

TEST_CASE("PermuteBackwardMath::chunks_load_whole: one word only where every chunk start is aligned") {
  EPX_TEST_SEEDED_RNG(rng);
  std::uniform_int_distribution<std::int64_t> small(0, 200);
  int aligned_cases = 0;
  for (int trial = 0; trial < 4000; ++trial) {
    std::int64_t const elem = std::int64_t{1} << std::uniform_int_distribution<int>(1, 2)(rng);  // 2 or 4 bytes
    int const w = std::array<int, 4>{1, 2, 4, 8}[std::uniform_int_distribution<std::size_t>(0, 3)(rng)];
    std::uintptr_t const base = 4096 + static_cast<std::uintptr_t>(elem * (small(rng) % 16));
    std::int64_t const cols = w * (1 + small(rng) % 20), ld = cols + small(rng) % 9;
    bool const whole = detail::chunks_load_whole(base, ld, w, elem);
    CAPTURE(elem);
    CAPTURE(w);
    CAPTURE(base);
    CAPTURE(ld);
    // Independent statement: the chunk is an 8- or 16-byte word and every chunk of 32 rows starts
    // on a multiple of its size.
    std::int64_t const bytes = w * elem;
    bool every_chunk_aligned = w > 1 && (bytes == 8 || bytes == 16);
    for (std::int64_t r = 0; r < 32 && every_chunk_aligned; ++r)
      for (std::int64_t c = 0; c < cols / w && every_chunk_aligned; ++c)
        every_chunk_aligned = (base + static_cast<std::uintptr_t>((r * ld + c * w) * elem)) % bytes == 0;
    CHECK(whole == every_chunk_aligned);
    aligned_cases += whole ? 1 : 0;
  }
  CHECK(aligned_cases > 100);  // the random layouts reach both answers
}

TEST_CASE("PermuteBackwardMath::warp_tree_sum: the shuffle tree, lane i adding lane i + offset") {
  EPX_TEST_SEEDED_RNG(rng);
  for (int trial = 0; trial < 200; ++trial) {
    auto const v = test::random_vector<float>(32, rng);
    std::array<float, 32> lanes{};
    std::copy(v.begin(), v.end(), lanes.begin());
    float const got = detail::warp_tree_sum(lanes), want = halving_sum(v);
    CHECK(std::memcmp(&got, &want, sizeof(float)) == 0);
  }
  // The order shows with 1 and 31 x 2^-24: sequential adds lose every 2^-24 (ties to even); the tree
  // loses only lane 16's, added to lane 0's 1 in its first step, and pairs up the other 30 first.
  std::array<float, 32> lanes{};
  lanes[0] = 1.0f;
  for (int i = 1; i < 32; ++i) lanes[static_cast<std::size_t>(i)] = 0x1p-24f;
  float sequential = 0.0f;
  for (float x : lanes) sequential += x;
  CHECK(sequential == 1.0f);
  CHECK(detail::warp_tree_sum(lanes) == 1.0f + 30 * 0x1p-24f);
}

TEST_CASE("PermuteBackwardMath::unpermute_backward_dot: every column once, within rounding of the exact dot") {
  EPX_TEST_SEEDED_RNG(rng);
  for (int threads : {32, 64, 128, 256, 1024})
    for (std::int64_t cols : {0, 1, 7, 8, 64, 72, 100, 1000, 4096}) {
      for (int w : {1, 4, 8}) {
        if (cols % w != 0) continue;
        CAPTURE(threads);
        CAPTURE(cols);
        CAPTURE(w);
        auto const n = static_cast<std::size_t>(cols);
        // One-hot x: the dot is exactly g at that column, so each column counts once, no more.
        if (cols <= 100) {
          auto const g = test::random_vector<float>(n, rng);
          for (std::size_t c = 0; c < n; ++c) {
            std::vector<float> x(n, 0.0f);
            x[c] = 1.0f;
            CHECK(detail::unpermute_backward_dot(g.data(), x.data(), cols, w, threads) == g[c]);
          }
        }
        // Small integers: every partial sum is exact, so the result equals the exact dot.
        std::uniform_int_distribution<int> ints(-8, 8);
        std::vector<float> gi(n), xi(n);
        double exact = 0.0;
        for (std::size_t c = 0; c < n; ++c) {
          gi[c] = static_cast<float>(ints(rng));
          xi[c] = static_cast<float>(ints(rng));
          exact += double{gi[c]} * xi[c];
        }
        CHECK(detail::unpermute_backward_dot(gi.data(), xi.data(), cols, w, threads) == exact);
        // Random floats: within fp32 rounding of the exact dot (relative to the sum of |terms|).
        auto const g = test::random_vector<float>(n, rng), x = test::random_vector<float>(n, rng);
        double ref = 0.0, mag = 0.0;
        for (std::size_t c = 0; c < n; ++c) {
          ref += double{g[c]} * x[c];
          mag += std::abs(double{g[c]} * x[c]);
        }
        double const got = detail::unpermute_backward_dot(g.data(), x.data(), cols, w, threads);
        CHECK(std::abs(got - ref) <= 1e-6 * std::max(mag, 1e-30) * std::log2(static_cast<double>(cols) + 2.0));
      }
    }
}
