// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// The grouped GEMM's shared-memory and register layouts, on the host, against the PTX ISA's
// definitions written out below (namespace isa) independently of the kernels' index functions:
//   - the stage swizzle is the ISA's 128-byte swizzle of a K-major operand, and ldmatrix reads it
//     without bank conflicts;
//   - the cp.async copy placement fills every (row, chunk) of a stage exactly once, from the
//     global element a plain loop would read, and zero-fills exactly the rows and K past the ends;
//   - ldmatrix.x4 at the kernels' lane addresses hands each lane exactly the elements mma.m16n8k16
//     expects in its A and B fragment registers (checked with element labels, not values);
//   - the mma m16n8 accumulator map is the ISA's, covers its tile once, and registers (2h, 2h + 1)
//     are adjacent columns (p, p + 1), p even: the epilogue's pairs; the SIMT thread maps tile once;
//   - end to end: random integer tiles copied by the placement into emulated shared memory, read
//     by emulated ldmatrix + mma.m16n8k16 (every mma tile shape), stored through the epilogue maps,
//     equal a plain matmul exactly, with rows past the group's end, K tails, N edges, padded lda and
//     both gated layouts.
// The kernels call these very functions (include/epx/cuda/gemm/*.hpp); the loops below are the
// kernels' loops with threadIdx and the lane made host loop variables.

#include "../common/test_util.hpp"

#include <epx/cuda/gemm/mma_fragments.hpp>
#include <epx/cuda/gemm/simt_layout.hpp>
#include <epx/cuda/gemm/smem_layout.hpp>
#include <epx/cuda/gemm/stage_copy.hpp>
#include <epx/cuda/gemm/tile_shapes.hpp>
#include <epx/cuda/gemm/tile_walk.hpp>

#include <array>
#include <set>
#include <tuple>

using namespace epx;
using namespace epx::detail;

namespace isa {

// PTX ISA, "Shared Memory Matrix Layout" of the asynchronous warpgroup MMA (the layout TMA's 128-byte
// swizzle writes): with the 128-byte swizzle mode, byte address bits [4, 7) (the 16-byte unit within
// a 128-byte row) are XORed with bits [7, 10) (the row within the 1024-byte repeating pattern).
constexpr std::uint32_t swizzle_128b(std::uint32_t address) { return address ^ (((address >> 7) & 7u) << 4); }

// The canonical K-major layout of 16-bit elements with the 128-byte swizzle: element (r, k) of an
// operand whose 8-row core-matrix groups are `sbo` bytes apart, rows 128 bytes apart within a
// group, 16-byte units of K side by side in the row; then the swizzle of the absolute address.
constexpr std::uint32_t k_major_sw128_address(std::uint32_t start, std::uint32_t sbo, int r, int k) {
  std::uint32_t const linear =
      start + static_cast<std::uint32_t>((r % 8) * 128 + (r / 8) * static_cast<int>(sbo) + (k / 8) * 16 + (k % 8) * 2);
  return swizzle_128b(linear);
}

// mma.m16n8k16 with .bf16/.f16 inputs: groupID = lane / 4, threadID_in_group = lane % 4. A (16 x 16,
// row-major): register i (0-3) holds elements (row, col) and (row, col + 1) with row = groupID +
// 8 * (i % 2), col = 2 * threadID_in_group + 8 * (i / 2).
constexpr std::pair<int, int> mma_a_element(int lane, int reg, int half) {
  return {lane / 4 + 8 * (reg % 2), 2 * (lane % 4) + 8 * (reg / 2) + half};
}
// B (16 x 8, K x N, "col"): register i (0-1) holds (k, n) and (k + 1, n) with k = 2 *
// threadID_in_group + 8 * i, n = groupID.
constexpr std::pair<int, int> mma_b_element(int lane, int reg, int half) {
  return {2 * (lane % 4) + 8 * reg + half, lane / 4};
}
// C/D (16 x 8 f32): register i (0-3) is (groupID + 8 * (i / 2), 2 * threadID_in_group + i % 2).
constexpr std::pair<int, int> mma_d_element(int lane, int reg) {
  return {lane / 4 + 8 * (reg / 2), 2 * (lane % 4) + reg % 2};
}

// ldmatrix.sync.aligned.m8n8.x4.b16: lanes 8i..8i+7 give the row addresses of matrix i; lane t
// receives, in register i, the two 16-bit elements at 2 * (t % 4) and +1 of row t / 4 of matrix i.
// `element_at(byte address)` reads the emulated shared memory.
template <class ElementAt>
auto ldmatrix_x4(std::array<std::uint32_t, 32> const& row_address, ElementAt&& element_at) {
  using E = decltype(element_at(0u));
  std::array<std::array<std::array<E, 2>, 4>, 32> regs{};
  for (int t = 0; t < 32; ++t)
    for (int i = 0; i < 4; ++i)
      for (int h = 0; h < 2; ++h)
        regs[static_cast<std::size_t>(t)][static_cast<std::size_t>(i)][static_cast<std::size_t>(h)] = element_at(
            row_address[static_cast<std::size_t>(8 * i + t / 4)] + static_cast<std::uint32_t>(2 * (2 * (t % 4) + h)));
  return regs;
}

}  // namespace isa

namespace {

// A label for element (row, k) of a stage (row < 1000).
constexpr int label(int row, int k) { return row * 1000 + k; }

// The stage image the copy placement builds, with labels (row, k) instead of data: the kernels'
// copy loop (stage_copy.hpp) with threadIdx a loop variable. Every chunk must be written once.
template <int kRows, int kThreads>
std::vector<int> labelled_stage(int& failures) {
  using Copy = StageCopy<kRows, kThreads>;
  std::vector<int> image(static_cast<std::size_t>(kRows * kStageRowElems), -1);
  for (int tid = 0; tid < kThreads; ++tid)
    for (int pass = 0; pass < Copy::kPasses; ++pass) {
      int const offset = Copy::smem_offset(tid, pass);
      if (offset < 0 || offset % kStageChunkBytes != 0 || offset >= kRows * kStageRowBytes) {
        ++failures;
        continue;
      }
      for (int e = 0; e < kStageChunkElems; ++e) {
        int& slot = image[static_cast<std::size_t>(offset / 2 + e)];
        if (slot != -1) ++failures;  // written twice
        slot = label(Copy::row(tid, pass), Copy::chunk(tid) * kStageChunkElems + e);
      }
    }
  failures += static_cast<int>(std::count(image.begin(), image.end(), -1));  // never written
  return image;
}

// ldmatrix.x4 (ISA) over a labelled stage at the addresses `chunk_of(lane)` names.
template <class ChunkOf>
auto ldmatrix_labels(std::vector<int> const& image, ChunkOf&& chunk_of) {
  std::array<std::uint32_t, 32> address{};
  for (int lane = 0; lane < 32; ++lane) {
    StageChunk const c = chunk_of(lane);
    address[static_cast<std::size_t>(lane)] = static_cast<std::uint32_t>(stage_byte_offset(c.row, c.chunk));
  }
  return isa::ldmatrix_x4(address, [&](std::uint32_t byte) { return byte / 2 < image.size() ? image[byte / 2] : -2; });
}

// Every ldmatrix.x4 phase (the 8 row addresses of one matrix) must touch 8 distinct 16-byte bank
// groups of the 128-byte bank window: no bank conflict.
template <class ChunkOf>
int bank_conflicts(ChunkOf&& chunk_of) {
  int conflicts = 0;
  for (int m = 0; m < 4; ++m) {
    std::set<int> groups;
    for (int i = 0; i < 8; ++i) {
      StageChunk const c = chunk_of(8 * m + i);
      groups.insert((stage_byte_offset(c.row, c.chunk) / kStageChunkBytes) % 8);
    }
    conflicts += 8 - static_cast<int>(groups.size());
  }
  return conflicts;
}

// ldmatrix + fragment checks of one mma tile shape: every warp, k16 step, m16 and n16 block.
template <class Shape>
void check_fragments() {
  CAPTURE(Shape::kBM);
  CAPTURE(Shape::kBN);
  int failures = 0;
  auto const a_image = labelled_stage<Shape::kBM, Shape::kThreads>(failures);
  auto const b_image = labelled_stage<Shape::kBN, Shape::kThreads>(failures);
  CHECK_MESSAGE(failures == 0, "stage chunks written other than once");
  int a_mismatches = 0, b_mismatches = 0, conflicts = 0;
  for (int warp = 0; warp < Shape::kThreads / 32; ++warp)
    for (int kk = 0; kk < kStageRowElems / 16; ++kk) {
      for (int mi = 0; mi < Shape::kMI; ++mi) {
        int const row0 = Shape::warp_row(warp, mi);
        auto chunk_of = [&](int lane) { return ldmatrix_a_chunk(row0, kk, lane); };
        auto const regs = ldmatrix_labels(a_image, chunk_of);
        conflicts += bank_conflicts(chunk_of);
        for (int lane = 0; lane < 32; ++lane)
          for (int r = 0; r < 4; ++r)
            for (int h = 0; h < 2; ++h) {
              auto const [row, col] = isa::mma_a_element(lane, r, h);
              a_mismatches +=
                  regs[static_cast<std::size_t>(lane)][static_cast<std::size_t>(r)][static_cast<std::size_t>(h)] !=
                  label(row0 + row, kk * 16 + col);
            }
      }
      for (int nj = 0; nj < Shape::kNI / 2; ++nj) {
        int const row0 = Shape::warp_col(warp, 2 * nj);
        auto chunk_of = [&](int lane) { return ldmatrix_b_chunk(row0, kk, lane); };
        auto const regs = ldmatrix_labels(b_image, chunk_of);
        conflicts += bank_conflicts(chunk_of);
        for (int r = 0; r < 4; ++r) {
          BFragmentSlot const slot = ldmatrix_b_slot(r);
          int const n0 = Shape::warp_col(warp, 2 * nj + slot.n8);  // the fragment's first column
          for (int lane = 0; lane < 32; ++lane)
            for (int h = 0; h < 2; ++h) {
              auto const [k, n] = isa::mma_b_element(lane, slot.reg, h);
              b_mismatches +=
                  regs[static_cast<std::size_t>(lane)][static_cast<std::size_t>(r)][static_cast<std::size_t>(h)] !=
                  label(n0 + n, kk * 16 + k);
            }
        }
      }
    }
  INFO("A fragment elements wrong: " << a_mismatches << ", B: " << b_mismatches << ", bank conflicts: " << conflicts);
  CHECK(a_mismatches == 0);
  CHECK(b_mismatches == 0);
  CHECK(conflicts == 0);
}

}  // namespace

TEST_CASE("GemmLayout::swizzle: the stage layout is the ISA's 128-byte swizzle of a K-major operand") {
  int mismatches = 0, not_permutation = 0;
  for (int row = 0; row < 256; ++row) {
    std::set<int> slots;
    for (int chunk = 0; chunk < kStageChunksPerRow; ++chunk) {
      slots.insert(swizzled_chunk(row, chunk));
      for (int e = 0; e < kStageChunkElems; ++e)
        for (std::uint32_t base : {0u, 1024u, 7u * 1024u, 200u * 1024u}) {  // any 1024-byte aligned stage
          std::uint32_t const ours = base + static_cast<std::uint32_t>(stage_byte_offset(row, chunk) + 2 * e);
          mismatches += ours != isa::k_major_sw128_address(base, 8 * kStageRowBytes, row, chunk * kStageChunkElems + e);
        }
    }
    not_permutation += slots.size() != static_cast<std::size_t>(kStageChunksPerRow) || *slots.rbegin() != 7;
  }
  INFO("elements at another address than the ISA's swizzle: " << mismatches);
  CHECK(mismatches == 0);
  CHECK(not_permutation == 0);
}

TEST_CASE("GemmLayout::copy_placement: every stage chunk once, from the element a plain loop reads") {
  EPX_TEST_SEEDED_RNG(rng);
  auto check = [&]<int kRows, int kThreads>() {
    CAPTURE(kRows);
    CAPTURE(kThreads);
    using Copy = StageCopy<kRows, kThreads>;
    int failures = 0;
    (void)labelled_stage<kRows, kThreads>(failures);
    CHECK(failures == 0);
    // Stores of one warp in one pass: 8 consecutive threads per 128-byte row, each row's 8 chunks
    // on distinct bank groups (the store phases are conflict-free).
    int store_conflicts = 0;
    for (int warp = 0; warp < kThreads / 32; ++warp)
      for (int pass = 0; pass < Copy::kPasses; ++pass)
        for (int phase = 0; phase < 4; ++phase) {
          std::set<int> groups;
          for (int i = 0; i < 8; ++i) groups.insert((Copy::smem_offset(warp * 32 + phase * 8 + i, pass) / 16) % 8);
          store_conflicts += 8 - static_cast<int>(groups.size());
        }
    CHECK(store_conflicts == 0);

    // Sources: A rows [row_begin, row_end) with row stride lda; weights of n columns (paired or not).
    std::uniform_int_distribution<int> dist(0, 1000);
    for (int trial = 0; trial < 200; ++trial) {
      std::int64_t const k = 8 * (1 + dist(rng) % 40), lda = k + 8 * (dist(rng) % 3);
      std::int64_t const row_begin = dist(rng), row_end = row_begin + dist(rng) % (kRows + 1);
      int const n = 2 * (1 + dist(rng) % 300), n_begin = kRows * (dist(rng) % (n / kRows + 1));
      bool const gated = dist(rng) % 2 == 0, concatenated = dist(rng) % 2 == 0;
      CAPTURE(k);
      CAPTURE(lda);
      CAPTURE(row_begin);
      CAPTURE(row_end);
      CAPTURE(n);
      CAPTURE(n_begin);
      CAPTURE(gated);
      CAPTURE(concatenated);
      int wrong = 0;
      for (int tid = 0; tid < kThreads; ++tid) {
        CopySource const a = activation_copy_source<Copy>(tid, row_begin, row_end, lda);
        CopySource const b = weight_copy_source<Copy>(tid, n_begin, n, static_cast<int>(k), gated, concatenated);
        for (int pass = 0; pass < Copy::kPasses; ++pass) {
          int const r = Copy::row(tid, pass);
          int const kc = Copy::chunk(tid) * kStageChunkElems;
          std::int64_t const a_row = row_begin + r;
          wrong += a.row_valid(pass) != (a_row < row_end);
          int const p = n_begin + r;
          wrong += b.row_valid(pass) != (p < n);
          // The weight row of product column p: gated GEMMs over [gate | up] halves read gate i
          // for column 2i and up i (row n/2 + i) for column 2i + 1.
          int const w_row = gated && concatenated ? (p % 2 == 0 ? p / 2 : n / 2 + p / 2) : p;
          for (int kt = 0; kt * 64 < k; ++kt) {
            wrong += Copy::in_k(tid, kt, static_cast<int>(k)) != (kt * 64 + kc < k);
            if (a.row_valid(pass)) wrong += a.offset(pass, kt) != a_row * lda + kt * 64 + kc;
            if (b.row_valid(pass)) wrong += b.offset(pass, kt) != std::int64_t{w_row} * k + kt * 64 + kc;
          }
        }
      }
      CHECK(wrong == 0);
    }
  };
  check.operator()<16, 128>();
  check.operator()<128, 128>();
  check.operator()<64, 128>();
  check.operator()<32, 64>();
  check.operator()<16, 64>();
  check.operator()<128, 256>();
  check.operator()<64, 256>();
}

TEST_CASE("GemmLayout::ldmatrix: lanes receive exactly mma.m16n8k16's A and B fragments, without bank conflicts") {
  check_fragments<MmaDecodeTile>();
  check_fragments<MmaDecodeN64Tile>();
  check_fragments<MmaDecodeN32Tile>();
  check_fragments<MmaMediumTile>();
  check_fragments<MmaLargeTile>();
}

TEST_CASE("GemmLayout::accumulators: the mma map is the ISA's, covers its tile once, in column pairs") {
  int wrong = 0;
  std::set<std::pair<int, int>> mma_cells;
  for (int lane = 0; lane < 32; ++lane)
    for (int e = 0; e < 4; ++e) {
      FragmentCoord const c = mma_accumulator_coord(lane, e);
      wrong += std::make_pair(c.row, c.col) != isa::mma_d_element(lane, e);
      mma_cells.insert({c.row, c.col});
      if (e % 2 == 1) {  // the pair the epilogue stores: (p, p + 1) of one row, p even
        FragmentCoord const first = mma_accumulator_coord(lane, e - 1);
        wrong += first.row != c.row || first.col + 1 != c.col || first.col % 2 != 0;
      }
    }
  CHECK(mma_cells.size() == 16u * 8u);
  // The mma epilogue takes the pair's column from register 0 and its row from register 2h.
  for (int lane = 0; lane < 32; ++lane)
    for (int e = 0; e < 4; ++e) {
      FragmentCoord const c = mma_accumulator_coord(lane, e);
      wrong +=
          mma_accumulator_coord(lane, 0).col + e % 2 != c.col || mma_accumulator_coord(lane, 2 * (e / 2)).row != c.row;
    }
  CHECK(wrong == 0);
}

TEST_CASE("GemmLayout::simt: loads cover each [64, 16] slice once, outputs the 64 x 64 tile once in column pairs") {
  using S = SimtTileShape;
  std::vector<int> loads(S::kBM * S::kBK, 0), outputs(S::kBM * S::kBN, 0);
  int wrong = 0;
  for (int tid = 0; tid < S::kThreads; ++tid) {
    for (int pass = 0; pass < S::kLoadPasses; ++pass) {
      FragmentCoord const c = S::load_coord(tid, pass);
      if (c.row < 0 || c.row >= S::kBM || c.col < 0 || c.col >= S::kBK) {
        ++wrong;
        continue;
      }
      ++loads[static_cast<std::size_t>(c.row * S::kBK + c.col)];
    }
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) {
        FragmentCoord const c = S::output_coord(tid, i, j);
        ++outputs[static_cast<std::size_t>(c.row * S::kBN + c.col)];
        if (j % 2 == 1) wrong += S::output_coord(tid, i, j - 1).col + 1 != c.col || c.col % 2 != 1;
      }
  }
  CHECK(wrong == 0);
  CHECK(std::count(loads.begin(), loads.end(), 1) == static_cast<std::ptrdiff_t>(loads.size()));
  CHECK(std::count(outputs.begin(), outputs.end(), 1) == static_cast<std::ptrdiff_t>(outputs.size()));
  // Consecutive threads of a warp read consecutive k (coalesced).
  for (int tid = 1; tid < 32; ++tid) {
    FragmentCoord const a = S::load_coord(tid - 1, 0), b = S::load_coord(tid, 0);
    CHECK((b.col == a.col + 1 || (b.col == 0 && b.row == a.row + 1)));
  }
}

// ---------------------------------------------------------------------------------------------
// End to end: random tiles moved through the copy placement into emulated shared memory, read by
// emulated ldmatrix + mma.m16n8k16, accumulated over the k-tiles, stored through the kernel's
// epilogue maps, and compared with a plain matmul - for every tile shape, with rows past the
// group's end, K tails, N edges, padded lda and both gated layouts. Values are small integers, so
// every sum is exact and a single misplaced element shows.

namespace isa {

// mma.m16n8k16 (f32 accumulate) on whole-warp fragments: A from a[lane][reg][half], B from
// b[lane][reg][half], D added to d[lane][reg], with the fragment maps above.
void mma_m16n8k16(std::array<std::array<std::array<float, 2>, 4>, 32> const& a,
                  std::array<std::array<std::array<float, 2>, 2>, 32> const& b,
                  std::array<std::array<double, 4>, 32>& d) {
  double am[16][16] = {}, bm[16][8] = {};
  for (int lane = 0; lane < 32; ++lane)
    for (int h = 0; h < 2; ++h) {
      for (int r = 0; r < 4; ++r) {
        auto const [row, col] = mma_a_element(lane, r, h);
        am[row][col] = a[static_cast<std::size_t>(lane)][static_cast<std::size_t>(r)][static_cast<std::size_t>(h)];
      }
      for (int r = 0; r < 2; ++r) {
        auto const [k, n] = mma_b_element(lane, r, h);
        bm[k][n] = b[static_cast<std::size_t>(lane)][static_cast<std::size_t>(r)][static_cast<std::size_t>(h)];
      }
    }
  for (int lane = 0; lane < 32; ++lane)
    for (int r = 0; r < 4; ++r) {
      auto const [row, col] = mma_d_element(lane, r);
      double sum = 0.0;
      for (int k = 0; k < 16; ++k) sum += am[row][k] * bm[k][col];
      d[static_cast<std::size_t>(lane)][static_cast<std::size_t>(r)] += sum;
    }
}

}  // namespace isa

namespace {

// One group's GEMM: rows [group_begin, group_begin + group_rows) of A ([num_rows, lda], extra rows
// after the group), weights [n, k]; gated GEMMs read paired columns.
struct GemmProblem {
  std::int64_t group_begin;
  std::int64_t group_rows;
  std::int64_t extra_rows;
  int k;
  int lda;
  int n;
  bool gated;
  bool concatenated;
};

std::ostream& operator<<(std::ostream& os, GemmProblem const& p) {
  return os << "{group rows [" << p.group_begin << ", " << p.group_begin + p.group_rows << ") of "
            << p.group_begin + p.group_rows + p.extra_rows << ", k " << p.k << ", lda " << p.lda << ", n " << p.n
            << (p.gated ? (p.concatenated ? ", gated concatenated" : ", gated interleaved") : "") << "}";
}

struct GemmData {
  GemmProblem problem;
  std::int64_t num_rows;
  std::vector<float> a;  // [num_rows, lda]: K padding is NaN (a read of it poisons the sums)
  std::vector<float> w;  // [n, k]

  static GemmData random(GemmProblem const& p, std::mt19937_64& rng) {
    GemmData d{p, p.group_begin + p.group_rows + p.extra_rows, {}, {}};
    std::uniform_int_distribution<int> value(1, 4), sign(0, 1);
    auto draw = [&] { return static_cast<float>(sign(rng) != 0 ? value(rng) : -value(rng)); };  // never 0
    d.a.assign(static_cast<std::size_t>(d.num_rows * p.lda), NAN);
    for (std::int64_t r = 0; r < d.num_rows; ++r)
      for (int c = 0; c < p.k; ++c) d.a[static_cast<std::size_t>(r * p.lda + c)] = draw();
    d.w.resize(static_cast<std::size_t>(p.n) * static_cast<std::size_t>(p.k));
    for (auto& v : d.w) v = draw();
    return d;
  }

  // The product column p of row r, as the GEMM's definition says: row r of A times the weight row
  // of p (gated over concatenated halves: column 2i is gate row i, 2i + 1 is up row n/2 + i).
  [[nodiscard]] double reference(std::int64_t r, int p) const {
    int const n = problem.n;
    int const w_row = problem.gated && problem.concatenated ? (p % 2 == 0 ? p / 2 : n / 2 + p / 2) : p;
    double sum = 0.0;
    for (int c = 0; c < problem.k; ++c)
      sum += double{a[static_cast<std::size_t>(r * problem.lda + c)]} *
             w[static_cast<std::size_t>(std::int64_t{w_row} * problem.k + c)];
    return sum;
  }
};

// What an emulated kernel produced: every product column it stored, with write counts.
struct Emulated {
  std::vector<double> out;  // [num_rows, n]
  std::vector<int> writes;
  int bad_reads = 0;  // copies that read outside the group's rows or past K

  explicit Emulated(GemmData const& d)
      : out(static_cast<std::size_t>(d.num_rows * d.problem.n), 0.0), writes(out.size(), 0) {}
  void store(GemmData const& d, std::int64_t row, int p, double v) {
    auto const i = static_cast<std::size_t>(row * d.problem.n + p);
    out[i] = v;
    ++writes[i];
  }
  // Wrong or missing outputs, writes outside the group's rows, bad reads.
  [[nodiscard]] long long failures(GemmData const& d) const {
    long long bad = bad_reads;
    GemmProblem const& p = d.problem;
    for (std::int64_t r = 0; r < d.num_rows; ++r) {
      bool const inside = r >= p.group_begin && r < p.group_begin + p.group_rows;
      for (int c = 0; c < p.n; ++c) {
        auto const i = static_cast<std::size_t>(r * p.n + c);
        if (!inside)
          bad += writes[i] != 0;
        else
          bad += writes[i] != 1 || out[i] != d.reference(r, c);
      }
    }
    return bad;
  }
};

// The kernels' copy of k-tile `kt` of one operand into a stage image (elements at byte / 2 of
// `image` from `base_byte`): thread `tid`'s passes at the placement's offsets, from the source
// offsets, zero-filled where invalid. `source_ok(offset)` says whether a global read is in bounds.
template <class Copy, class SourceOk>
void copy_stage(std::vector<float>& image, std::uint32_t base_byte, std::vector<CopySource> const& sources, int kt,
                int k, std::vector<float> const& global, SourceOk&& source_ok, Emulated& e) {
  for (int tid = 0; tid < static_cast<int>(sources.size()); ++tid) {
    bool const in_k = Copy::in_k(tid, kt, k);
    for (int pass = 0; pass < Copy::kPasses; ++pass) {
      std::size_t const dst = (base_byte + static_cast<std::uint32_t>(Copy::smem_offset(tid, pass))) / 2;
      bool const valid = in_k && sources[static_cast<std::size_t>(tid)].row_valid(pass);
      std::int64_t const src = sources[static_cast<std::size_t>(tid)].offset(pass, kt);
      if (valid && !source_ok(src)) ++e.bad_reads;
      for (int i = 0; i < kStageChunkElems; ++i)
        image[dst + static_cast<std::size_t>(i)] =
            valid && source_ok(src) ? global[static_cast<std::size_t>(src + i)] : (valid ? NAN : 0.0f);
    }
  }
}

// In-bounds checks of the copies' global reads: inside the group's rows (A) or the n weight rows,
// and whole 16-byte chunks before K.
auto a_source_ok(GemmData const& d) {
  return [&d](std::int64_t off) {
    std::int64_t const row = off / d.problem.lda, col = off % d.problem.lda;
    return off >= 0 && row >= d.problem.group_begin && row < d.problem.group_begin + d.problem.group_rows &&
           col + kStageChunkElems <= d.problem.k;
  };
}
auto w_source_ok(GemmData const& d) {
  return [&d](std::int64_t off) {
    return off >= 0 && off / d.problem.k < d.problem.n && off % d.problem.k + kStageChunkElems <= d.problem.k;
  };
}

// The tiles of the one group, as the persistent grid walks them.
template <int BM, int BN>
std::vector<GemmTile> tiles_of(GemmData const& d) {
  std::vector<std::int32_t> const offsets = {static_cast<std::int32_t>(d.problem.group_begin),
                                             static_cast<std::int32_t>(d.problem.group_begin + d.problem.group_rows)};
  std::vector<long long> start(2);
  host_tile_prefix(start.data(), offsets.data(), 1, d.num_rows, BM, BN, d.problem.n);
  TileWalker<BM, BN> walker(start.data(), offsets.data(), 1, d.num_rows, d.problem.n);
  std::vector<GemmTile> tiles;
  for (long long t = 0; t < walker.num_tiles(); ++t) tiles.push_back(walker.tile(t));
  return tiles;
}

// The mma.sync kernel (mma_sm80.cuh) on one group, emulated.
template <class Shape>
Emulated emulate_mma_kernel(GemmData const& d) {
  constexpr int BM = Shape::kBM, BN = Shape::kBN, kThreads = Shape::kThreads, MI = Shape::kMI, NI = Shape::kNI;
  using CopyA = StageCopy<BM, kThreads>;
  using CopyB = StageCopy<BN, kThreads>;
  GemmProblem const& p = d.problem;
  Emulated e(d);
  using Acc = std::array<std::array<double, 4>, 32>;
  for (GemmTile const& tile : tiles_of<BM, BN>(d)) {
    std::vector<CopySource> a_src, b_src;
    for (int tid = 0; tid < kThreads; ++tid) {
      a_src.push_back(activation_copy_source<CopyA>(tid, tile.row_begin, tile.row_end, p.lda));
      b_src.push_back(weight_copy_source<CopyB>(tid, tile.n_begin, p.n, p.k, p.gated, p.concatenated));
    }
    std::vector<Acc> acc(static_cast<std::size_t>(kThreads / 32 * MI * NI), Acc{});
    auto acc_of = [&](int warp, int mi, int ni) -> Acc& {
      return acc[static_cast<std::size_t>((warp * MI + mi) * NI + ni)];
    };
    for (int kt = 0; kt * kStageRowElems < p.k; ++kt) {
      std::vector<float> sa(static_cast<std::size_t>(BM * kStageRowElems), NAN),
          sb(static_cast<std::size_t>(BN * kStageRowElems), NAN);
      copy_stage<CopyA>(sa, 0, a_src, kt, p.k, d.a, a_source_ok(d), e);
      copy_stage<CopyB>(sb, 0, b_src, kt, p.k, d.w, w_source_ok(d), e);
      for (int warp = 0; warp < kThreads / 32; ++warp)
        for (int kk = 0; kk < kStageRowElems / 16; ++kk) {
          std::vector<std::array<std::array<std::array<float, 2>, 4>, 32>> af(MI);
          std::vector<std::array<std::array<std::array<float, 2>, 2>, 32>> bf(NI);
          for (int mi = 0; mi < MI; ++mi) {
            std::array<std::uint32_t, 32> address{};
            for (int lane = 0; lane < 32; ++lane) {
              StageChunk const c = ldmatrix_a_chunk(Shape::warp_row(warp, mi), kk, lane);
              address[static_cast<std::size_t>(lane)] = static_cast<std::uint32_t>(stage_byte_offset(c.row, c.chunk));
            }
            af[static_cast<std::size_t>(mi)] = isa::ldmatrix_x4(address, [&](std::uint32_t b) { return sa[b / 2]; });
          }
          for (int nj = 0; nj < NI / 2; ++nj) {
            std::array<std::uint32_t, 32> address{};
            for (int lane = 0; lane < 32; ++lane) {
              StageChunk const c = ldmatrix_b_chunk(Shape::warp_col(warp, 2 * nj), kk, lane);
              address[static_cast<std::size_t>(lane)] = static_cast<std::uint32_t>(stage_byte_offset(c.row, c.chunk));
            }
            auto const r = isa::ldmatrix_x4(address, [&](std::uint32_t b) { return sb[b / 2]; });
            for (int i = 0; i < 4; ++i) {
              BFragmentSlot const slot = ldmatrix_b_slot(i);
              for (int lane = 0; lane < 32; ++lane)
                bf[static_cast<std::size_t>(2 * nj + slot.n8)][static_cast<std::size_t>(lane)]
                  [static_cast<std::size_t>(slot.reg)] = r[static_cast<std::size_t>(lane)][static_cast<std::size_t>(i)];
            }
          }
          for (int mi = 0; mi < MI; ++mi)
            for (int ni = 0; ni < NI; ++ni)
              isa::mma_m16n8k16(af[static_cast<std::size_t>(mi)], bf[static_cast<std::size_t>(ni)],
                                acc_of(warp, mi, ni));
        }
    }
    // The kernel's epilogue: registers (2h, 2h + 1) are columns (p, p + 1) of one row.
    for (int warp = 0; warp < kThreads / 32; ++warp)
      for (int lane = 0; lane < 32; ++lane)
        for (int ni = 0; ni < NI; ++ni) {
          int const col = tile.n_begin + Shape::warp_col(warp, ni) + mma_accumulator_coord(lane, 0).col;
          if (col >= p.n) continue;
          for (int mi = 0; mi < MI; ++mi)
            for (int h = 0; h < 2; ++h) {
              std::int64_t const row =
                  tile.row_begin + Shape::warp_row(warp, mi) + mma_accumulator_coord(lane, 2 * h).row;
              if (row >= tile.row_end) continue;
              auto const& v = acc_of(warp, mi, ni)[static_cast<std::size_t>(lane)];
              e.store(d, row, col, v[static_cast<std::size_t>(2 * h)]);
              if (col + 1 < p.n) e.store(d, row, col + 1, v[static_cast<std::size_t>(2 * h + 1)]);
            }
        }
  }
  return e;
}

// Edge cases around a BM x BN tile, then random ones: rows past the group's end (and an empty
// group), K tails (k % 64 != 0), N edges (odd n for the linear GEMM), padded lda, both gated layouts.
std::vector<GemmProblem> problems(int bm, int bn, std::mt19937_64& rng) {
  std::vector<GemmProblem> list = {
      {3, bm + 1, 5, 72, 80, bn + 9, false, false}, {0, 1, 0, 8, 8, 8, false, false},
      {5, bm, 2, 128, 128, bn, false, false},       {2, 2 * bm - 1, 3, 200, 216, 2 * bn - 8, true, true},
      {1, bm - 1, 1, 64, 64, bn + 16, true, false}, {4, 0, 4, 16, 16, 24, false, false},
      {0, 17, 0, 8, 24, 2 * bn + 2, true, true},
  };
  std::uniform_int_distribution<int> u(0, 1 << 20);
  for (int i = 0; i < 4; ++i) {
    GemmProblem q{u(rng) % 9, u(rng) % (2 * bm + 4),      u(rng) % 4,      8 * (1 + u(rng) % 33),
                  0,          1 + u(rng) % (2 * bn + 40), u(rng) % 2 == 0, u(rng) % 2 == 0};
    q.lda = q.k + 8 * (u(rng) % 3);
    if (q.gated) q.n += q.n % 2;
    list.push_back(q);
  }
  return list;
}

template <class Shape>
long long emulated_mma_failures(std::mt19937_64& rng) {
  long long total = 0;
  for (GemmProblem const& p : problems(Shape::kBM, Shape::kBN, rng)) {
    CAPTURE(p);
    GemmData const d = GemmData::random(p, rng);
    long long const f = emulate_mma_kernel<Shape>(d).failures(d);
    CHECK(f == 0);
    total += f;
  }
  return total;
}

}  // namespace

TEST_CASE(
    "GemmLayout::mma_emulation: copies + ldmatrix + mma.m16n8k16 + epilogue equal a plain matmul, every tile shape") {
  EPX_TEST_SEEDED_RNG(rng);
  long long total = 0;
  total += emulated_mma_failures<MmaDecodeTile>(rng);
  total += emulated_mma_failures<MmaDecodeN64Tile>(rng);
  total += emulated_mma_failures<MmaDecodeN32Tile>(rng);
  total += emulated_mma_failures<MmaMediumTile>(rng);
  total += emulated_mma_failures<MmaLargeTile>(rng);
  INFO("mma emulation: wrong, missing or extra outputs and bad reads, all shapes");
  CHECK(total == 0);
}
