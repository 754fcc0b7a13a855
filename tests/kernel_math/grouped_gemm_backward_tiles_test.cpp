// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// The index math of the grouped GEMM's backward kernels (cuda/gemm/backward_tiles.hpp), on the host:
// the load maps cover their slices exactly once and coalesced, the thread -> output map covers a
// tile exactly once, the weight gradient's tile list writes every db element and every d_bias
// element of every group exactly once (edge shapes: N, K of 0, 1, 3, tile multiples and tails,
// many groups), the data gradient's walk (TileWalker with K in the place of N) writes every row of
// every group exactly once and nothing outside the groups (ragged, empty and clamped groups), and
// the zero padding of a partial slice leaves an fp32 sum bitwise unchanged (what makes the kernels'
// sums equal the Host's).

#include "../common/test_util.hpp"

#include <epx/cuda/gemm/backward_tiles.hpp>
#include <epx/cuda/gemm/tile_walk.hpp>

#include <algorithm>
#include <cstring>
#include <random>
#include <vector>

using namespace epx;
using detail::BackwardTileShape;
using detail::FragmentCoord;

namespace {

constexpr int kThreads = BackwardTileShape::kThreads, kPasses = BackwardTileShape::kLoadPasses;

//! Every (row, col) of a [rows, cols] slice loaded exactly once by the threads' passes of `coord`,
//! and each run of `run` consecutive threads reading consecutive columns of one row.
template <class Coord>
void check_load_map(Coord coord, int rows, int cols, int run) {
  std::vector<int> seen(static_cast<std::size_t>(rows * cols), 0);
  int uncoalesced = 0;
  for (int pass = 0; pass < kPasses; ++pass)
    for (int tid = 0; tid < kThreads; ++tid) {
      FragmentCoord const c = coord(tid, pass);
      if (c.row < 0 || c.row >= rows || c.col < 0 || c.col >= cols) REQUIRE_MESSAGE(false, "outside the slice");
      ++seen[static_cast<std::size_t>(c.row * cols + c.col)];
      if (tid % run != 0) {  // coalesced: the previous thread read the previous element of the row
        FragmentCoord const prev = coord(tid - 1, pass);
        uncoalesced += prev.row == c.row && prev.col + 1 == c.col ? 0 : 1;
      }
    }
  CHECK(uncoalesced == 0);
  CHECK(std::count(seen.begin(), seen.end(), 1) == rows * cols);
}

}  // namespace

TEST_CASE("GroupedGemmBackwardTiles::load maps: each slice loaded once, consecutive threads on one row") {
  static_assert(kPasses * kThreads == BackwardTileShape::kBK * BackwardTileShape::kBN);
  // [16, 64] slices: a warp reads 32 consecutive elements of one row.
  check_load_map([](int tid, int pass) { return BackwardTileShape::slice_coord(tid, pass); }, BackwardTileShape::kBK,
                 BackwardTileShape::kBN, 32);
  // [64, 16] strips: 16 threads read one row's 16 consecutive elements.
  check_load_map([](int tid, int pass) { return BackwardTileShape::strip_coord(tid, pass); }, BackwardTileShape::kBM,
                 BackwardTileShape::kBK, 16);
  static_assert(BackwardTileShape::slice_coord(33, 1).row == 4 && BackwardTileShape::slice_coord(33, 1).col == 33);
  static_assert(BackwardTileShape::strip_coord(17, 0).row == 1 && BackwardTileShape::strip_coord(17, 0).col == 1);
}

TEST_CASE("GroupedGemmBackwardTiles::output_coord: a 64 x 64 tile, each output owned by one thread") {
  constexpr int BM = BackwardTileShape::kBM, BN = BackwardTileShape::kBN;
  std::vector<int> seen(BM * BN, 0);
  for (int tid = 0; tid < kThreads; ++tid)
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) {
        FragmentCoord const o = BackwardTileShape::output_coord(tid, i, j);
        if (o.row < 0 || o.row >= BM || o.col < 0 || o.col >= BN) REQUIRE_MESSAGE(false, "outside the tile");
        ++seen[static_cast<std::size_t>(o.row * BN + o.col)];
      }
  CHECK(std::count(seen.begin(), seen.end(), 1) == BM * BN);
  // The bias rows: one thread per row of the tile.
  int bias_threads = 0;
  for (int tid = 0; tid < kThreads; ++tid) bias_threads += BackwardTileShape::sums_bias(tid) ? 1 : 0;
  CHECK(bias_threads == BM);
  CHECK(BackwardTileShape::sums_bias(BM - 1));
  CHECK(!BackwardTileShape::sums_bias(BM));
}

namespace {

//! Walks the weight gradient's tiles as the kernel does and counts the writes of every db and
//! d_bias element.
void check_weight_walk(int groups, int n, int k, bool with_bias) {
  CAPTURE(groups);
  CAPTURE(n);
  CAPTURE(k);
  CAPTURE(with_bias);
  auto const db_size = static_cast<std::size_t>(groups) * n * k, bias_size = static_cast<std::size_t>(groups) * n;
  std::vector<int> db(db_size, 0), bias(bias_size, 0);
  long long const tiles = detail::weight_tiles(groups, n, k, with_bias);
  if (tiles == 0) CHECK((db_size == 0 && (!with_bias || bias_size == 0)));  // nothing to write
  long long last_group = -1;
  int out_of_order = 0;
  for (long long t = 0; t < tiles; ++t) {
    detail::WeightTile const tile = detail::weight_tile(t, n, k, with_bias);
    bool const inside = tile.group >= 0 && tile.group < groups && tile.n_begin >= 0 && tile.n_begin < n &&
                        tile.k_begin >= 0 && tile.k_begin < std::max(k, 1);
    if (!inside) REQUIRE_MESSAGE(false, "tile " << t << " outside [groups, n, k]");
    out_of_order += tile.group >= last_group ? 0 : 1;  // in order: neighbouring CTAs share the group's rows
    last_group = tile.group;
    if (tile.bias && !with_bias) REQUIRE_MESSAGE(false, "a bias tile without a bias gradient");
    for (int tid = 0; tid < kThreads; ++tid) {
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) {
          FragmentCoord const o = BackwardTileShape::output_coord(tid, i, j);
          int const dn = tile.n_begin + o.row, dk = tile.k_begin + o.col;
          if (dn < n && dk < k) ++db[(static_cast<std::size_t>(tile.group) * n + dn) * k + dk];
        }
      if (tile.bias && BackwardTileShape::sums_bias(tid) && tile.n_begin + tid < n)
        ++bias[static_cast<std::size_t>(tile.group) * n + tile.n_begin + tid];
    }
  }
  int db_wrong = 0, bias_wrong = 0;
  for (int v : db) db_wrong += v == 1 ? 0 : 1;
  for (int v : bias) bias_wrong += v == (with_bias ? 1 : 0) ? 0 : 1;
  CHECK(out_of_order == 0);
  CHECK(db_wrong == 0);
  CHECK(bias_wrong == 0);
}

}  // namespace

TEST_CASE("GroupedGemmBackwardTiles::weight_tile: every db and d_bias element of every group written once") {
  for (int groups : {0, 1, 3})
    for (int n : {0, 1, 3, 64, 65, 130})
      for (int k : {0, 1, 3, 64, 65, 130})
        for (bool with_bias : {false, true}) check_weight_walk(groups, n, k, with_bias);
  // Many groups (> 256: the grid strides over them), ragged tails.
  for (int n : {1, 65, 130})
    for (int k : {0, 3, 130})
      for (bool with_bias : {false, true}) check_weight_walk(300, n, k, with_bias);
  // K = 0 with a bias gradient: one tile per (group, n-block), for the bias alone.
  static_assert(detail::weight_k_blocks(0, true) == 1 && detail::weight_k_blocks(0, false) == 0);
  static_assert(detail::weight_tiles(4096, 130, 0, true) == 4096LL * 3);
  static_assert(detail::weight_tiles(4096, 7168, 2048, false) == 4096LL * 112 * 32);  // no int overflow
  constexpr detail::WeightTile last = detail::weight_tile(4096LL * 112 * 32 - 1, 7168, 2048, false);
  static_assert(last.group == 4095 && last.n_begin == 7104 && last.k_begin == 1984 && !last.bias);
}

namespace {

//! Walks the data gradient's tiles (TileWalker over K) and counts the writes of every da element;
//! rows outside the (clamped) groups must get none.
void check_data_walk(std::vector<std::int32_t> const& offsets, std::int64_t num_rows, int k) {
  constexpr int BM = BackwardTileShape::kBM, BN = BackwardTileShape::kBN;
  int const groups = static_cast<int>(offsets.size()) - 1;
  CAPTURE(groups);
  CAPTURE(num_rows);
  CAPTURE(k);
  std::vector<long long> start(static_cast<std::size_t>(groups) + 1);
  detail::host_tile_prefix(start.data(), offsets.data(), groups, num_rows, BM, BN, k);
  detail::TileWalker<BM, BN> walker(start.data(), offsets.data(), groups, num_rows, k);
  CHECK(walker.num_tiles() <= detail::data_max_tiles(num_rows, groups, k));
  std::vector<int> da(static_cast<std::size_t>(num_rows * k), 0), owner(static_cast<std::size_t>(num_rows), -1);
  for (int g = 0; g < groups; ++g) {
    detail::GroupRows const r = detail::group_rows(offsets.data(), g, num_rows);
    for (std::int64_t row = r.begin; row < r.end; ++row) owner[static_cast<std::size_t>(row)] = g;
  }
  int foreign_rows = 0;
  for (long long t = 0; t < walker.num_tiles(); ++t) {
    detail::GemmTile const tile = walker.tile(t);
    if (tile.row_end - tile.row_begin > BM || tile.n_begin >= k) REQUIRE_MESSAGE(false, "tile " << t << " too large");
    for (int tid = 0; tid < kThreads; ++tid)
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) {
          FragmentCoord const o = BackwardTileShape::output_coord(tid, i, j);
          std::int64_t const row = tile.row_begin + o.row;
          int const col = tile.n_begin + o.col;
          if (row < tile.row_end && col < k) {
            if (row < 0 || row >= num_rows) REQUIRE_MESSAGE(false, "row " << row << " outside [0, num_rows)");
            foreign_rows += owner[static_cast<std::size_t>(row)] == tile.group ? 0 : 1;  // b[g] of the row's group
            ++da[static_cast<std::size_t>(row * k + col)];
          }
        }
  }
  int wrong = 0;
  for (std::int64_t row = 0; row < num_rows; ++row)
    for (int col = 0; col < k; ++col)
      wrong +=
          da[static_cast<std::size_t>(row * k + col)] == (owner[static_cast<std::size_t>(row)] >= 0 ? 1 : 0) ? 0 : 1;
  CHECK(foreign_rows == 0);
  CHECK(wrong == 0);
}

}  // namespace

TEST_CASE("GroupedGemmBackwardTiles::data walk: every row of every group written once, none outside") {
  EPX_TEST_SEEDED_RNG(rng);
  for (int k : {1, 3, 64, 65, 130}) {
    // Empty groups first, in the middle and last; rows before the first group and after the last.
    check_data_walk({3, 3, 10, 10, 74, 139, 139}, 150, k);
    check_data_walk({0, 1}, 1, k);               // one group, one row
    check_data_walk({0, 0}, 5, k);               // one empty group
    check_data_walk({0, 200}, 200, k);           // one group over every row
    check_data_walk({5, 2, 300, 40, 7}, 60, k);  // decreasing and out-of-range offsets: clamped
  }
  // Many ragged groups (> 256: several chunks of the scheduler's scan).
  std::uniform_int_distribution<int> rows(0, 70), pick(0, 3);
  std::vector<std::int32_t> offsets{2};
  for (int g = 0; g < 300; ++g) offsets.push_back(offsets.back() + (pick(rng) == 0 ? 0 : rows(rng)));
  check_data_walk(offsets, offsets.back() + 3, 65);
}

TEST_CASE("GroupedGemmBackwardTiles::padding: zero terms of a partial slice leave an fp32 sum bitwise unchanged") {
  // The kernels pad the slice past N (or past a group's rows) with 0 in both operands; the Host
  // sums only real terms. acc starts at +0 and x + y is -0 only when both are -0, so acc is never
  // -0 and acc + (+0 * +0) == acc bitwise: the sums agree.
  EPX_TEST_SEEDED_RNG(rng);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::uniform_int_distribution<int> length(0, 70), signed_zero(0, 5);
  for (int trial = 0; trial < 2000; ++trial) {
    int const len = length(rng);
    std::vector<float> x(static_cast<std::size_t>(len)), y(static_cast<std::size_t>(len));
    for (int i = 0; i < len; ++i) {
      int const z = signed_zero(rng);  // some exact zeros of both signs, and cancelling pairs
      x[static_cast<std::size_t>(i)] = z == 0 ? -0.0f : (z == 1 ? 0.0f : dist(rng));
      y[static_cast<std::size_t>(i)] = z == 2 && i > 0 ? -y[static_cast<std::size_t>(i - 1)] : dist(rng);
    }
    float host = 0.0f;
    for (int i = 0; i < len; ++i) host += x[static_cast<std::size_t>(i)] * y[static_cast<std::size_t>(i)];
    float padded = 0.0f;
    constexpr int BK = BackwardTileShape::kBK;
    for (int i0 = 0; i0 < len; i0 += BK)
      for (int kk = 0; kk < BK; ++kk) {
        int const i = i0 + kk;
        float const xi = i < len ? x[static_cast<std::size_t>(i)] : 0.0f,
                    yi = i < len ? y[static_cast<std::size_t>(i)] : 0.0f;
        float const prod = xi * yi;
        padded = padded + prod;
      }
    CAPTURE(len);
    CHECK(std::memcmp(&host, &padded, sizeof(float)) == 0);
  }
}
