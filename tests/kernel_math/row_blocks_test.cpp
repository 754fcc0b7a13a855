// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// The index math of the row-moving kernels (permute, regroup, fp32 -> T output), on the host:
// the block shape and grid-stride walk cover every (row, chunk) exactly once, the 16-byte vector
// decision is safe, and the regroup's per-row segment search lands every received row where the
// AllToAll layout puts it. The kernels call these very functions (cuda/row_blocks.hpp,
// parallel/exchange_layout.hpp); the walks below are the kernels' loops with blockIdx/threadIdx
// made host loop variables.

#include "../common/test_util.hpp"

#include <epx/cuda/row_blocks.hpp>
#include <epx/parallel/exchange_layout.hpp>

#include <map>
#include <numeric>

using namespace epx;

namespace {

// The kernels' loop nest: for each block and thread (x, y), rows from blockIdx * rows_per_block + y
// striding by grid * rows_per_block, chunks from x striding by threads_x. Counts visits per cell.
std::vector<int> walk(std::int64_t rows, std::int64_t chunks, detail::RowBlock block, int grid) {
  std::vector<int> visits(static_cast<std::size_t>(rows * chunks), 0);
  for (int b = 0; b < grid; ++b)
    for (int ty = 0; ty < block.rows_per_block; ++ty)
      for (int tx = 0; tx < block.threads_x; ++tx)
        for (std::int64_t row = std::int64_t{b} * block.rows_per_block + ty; row < rows;
             row += std::int64_t{grid} * block.rows_per_block)
          for (std::int64_t c = tx; c < chunks; c += block.threads_x)
            ++visits[static_cast<std::size_t>(row * chunks + c)];
  return visits;
}

}  // namespace

TEST_CASE("RowBlocks::row_block: whole warps across a row, the rest of the block on more rows") {
  for (int threads : {32, 64, 128, 256, 512, 1024})
    for (std::int64_t chunks : {0, 1, 7, 31, 32, 33, 70, 96, 128, 255, 256, 257, 1000, 4096}) {
      CAPTURE(threads);
      CAPTURE(chunks);
      auto const b = detail::row_block(chunks, threads);
      CHECK(b.threads_x % 32 == 0);
      CHECK(b.threads_x >= 32);
      CHECK(b.threads_x <= threads);
      CHECK(b.rows_per_block >= 1);
      CHECK(b.threads_x * b.rows_per_block == threads);  // no idle thread slot in the block
      // No more warps across a row than it has chunks for (up to doubling), and as many as fit.
      CHECK((b.threads_x == 32 || b.threads_x / 2 < chunks));
      CHECK((b.threads_x >= chunks || b.threads_x == threads));
    }
}

TEST_CASE("RowBlocks::walk: every (row, chunk) is visited exactly once, whatever the grid cap") {
  EPX_TEST_SEEDED_RNG(rng);
  std::uniform_int_distribution<std::int64_t> rows_dist(0, 300), chunks_dist(1, 600);
  for (int trial = 0; trial < 200; ++trial) {
    std::int64_t const rows = rows_dist(rng), chunks = chunks_dist(rng);
    int const threads = 32 << std::uniform_int_distribution<int>(0, 4)(rng);
    int const max_blocks = std::uniform_int_distribution<int>(1, 40)(rng);  // small caps force the grid stride
    auto const block = detail::row_block(chunks, threads);
    int const grid = detail::grid_blocks(rows, block.rows_per_block, max_blocks);
    CAPTURE(rows);
    CAPTURE(chunks);
    CAPTURE(threads);
    CAPTURE(grid);
    CHECK(grid >= 1);
    CHECK(grid <= max_blocks);
    auto const visits = walk(rows, chunks, block, grid);
    CHECK(std::count(visits.begin(), visits.end(), 1) == static_cast<std::ptrdiff_t>(visits.size()));
  }
}

TEST_CASE("RowBlocks::rows_move_in_vectors: 16-byte vectors only where every row start is 16-byte aligned") {
  EPX_TEST_SEEDED_RNG(rng);
  std::uniform_int_distribution<std::int64_t> small(1, 200);
  for (int trial = 0; trial < 2000; ++trial) {
    std::int64_t const elem = std::int64_t{1} << std::uniform_int_distribution<int>(1, 2)(rng);  // 2 or 4 bytes
    std::uintptr_t const a = 4096 + static_cast<std::uintptr_t>(elem * small(rng) % 64);
    std::uintptr_t const b = 8192 + static_cast<std::uintptr_t>(elem * small(rng) % 64);
    std::int64_t const cols = small(rng), lda = cols + small(rng) % 9, ldb = cols + small(rng) % 9;
    bool const vec = detail::rows_move_in_vectors(a, lda, b, ldb, cols, elem);
    // Independent statement of the rule: every row of both matrices starts on a 16-byte boundary
    // and a row's bytes are a whole number of vectors.
    bool every_row_aligned = (cols * elem) % 16 == 0;
    for (std::int64_t r = 0; r < 32 && every_row_aligned; ++r)
      every_row_aligned = (a + static_cast<std::uintptr_t>(r * lda * elem)) % 16 == 0 &&
                          (b + static_cast<std::uintptr_t>(r * ldb * elem)) % 16 == 0;
    CAPTURE(a);
    CAPTURE(b);
    CAPTURE(cols);
    CAPTURE(lda);
    CAPTURE(ldb);
    CHECK(vec == every_row_aligned);
  }
}

TEST_CASE("RowBlocks::segment_of_row: the regroup sends every received row where the AllToAll layout says") {
  EPX_TEST_SEEDED_RNG(rng);
  for (int trial = 0; trial < 300; ++trial) {
    std::int32_t const num_ranks = std::uniform_int_distribution<std::int32_t>(1, 8)(rng);
    std::int32_t const num_experts = std::uniform_int_distribution<std::int32_t>(num_ranks, 40)(rng);
    // An uneven placement: random cut points (some ranks may own nothing when experts are few).
    std::vector<std::int32_t> counts(static_cast<std::size_t>(num_ranks), 0);
    for (std::int32_t e = 0; e < num_experts; ++e)
      ++counts[static_cast<std::size_t>(std::uniform_int_distribution<std::int32_t>(0, num_ranks - 1)(rng))];
    ExpertPlacement const placement = ExpertPlacement::from_counts(counts);
    // The gathered count table: every rank's tokens per expert, many zeros, a hot expert sometimes.
    auto const width = detail::kCountTableHeader + static_cast<std::size_t>(num_experts);
    std::vector<std::int64_t> table(static_cast<std::size_t>(num_ranks) * width, 0);
    std::uniform_int_distribution<int> cnt(0, 6);
    std::int32_t const hot = std::uniform_int_distribution<std::int32_t>(0, num_experts - 1)(rng);
    for (std::int32_t q = 0; q < num_ranks; ++q) {
      table[q * width] = 100;
      table[q * width + 1] = 100;
      for (std::int32_t e = 0; e < num_experts; ++e) {
        int const c = cnt(rng);
        table[q * width + detail::kCountTableHeader + static_cast<std::size_t>(e)] =
            c < 3 ? 0 : c + (e == hot ? 50 : 0);
      }
    }
    std::int32_t const rank = std::uniform_int_distribution<std::int32_t>(0, num_ranks - 1)(rng);
    CAPTURE(num_ranks);
    CAPTURE(num_experts);
    CAPTURE(rank);
    auto const layout = detail::make_all_to_all_layout(table, placement, rank);
    auto const& segs = layout.regroup;
    // The kernel's walk: each rank-major row finds its segment, then its expert-major row.
    std::vector<std::int64_t> dst(static_cast<std::size_t>(layout.num_recv_rows), -1);
    for (std::int64_t row = 0; row < layout.num_recv_rows; ++row) {
      int const s = detail::segment_of_row(segs.data(), static_cast<int>(segs.size()), row);
      REQUIRE(s >= 0);
      REQUIRE(s < static_cast<int>(segs.size()));
      CHECK(segs[static_cast<std::size_t>(s)].src_row <= row);
      CHECK(row < segs[static_cast<std::size_t>(s)].src_row + segs[static_cast<std::size_t>(s)].num_rows);
      dst[static_cast<std::size_t>(row)] = detail::expert_major_row(segs[static_cast<std::size_t>(s)], row);
    }
    // Independently: received rows arrive rank-major (rank q's rows for local experts in order);
    // expert-major puts local expert l's rows from rank 0, 1, ... in order.
    std::int32_t const first = placement.first_expert(rank), local = placement.num_local_experts(rank);
    auto count = [&](std::int32_t q, std::int32_t e) { return table[q * width + detail::kCountTableHeader + e]; };
    std::vector<std::int64_t> want;
    std::vector<std::int64_t> expert_start(static_cast<std::size_t>(local) + 1, 0);
    for (std::int32_t l = 0; l < local; ++l) {
      std::int64_t rows = 0;
      for (std::int32_t q = 0; q < num_ranks; ++q) rows += count(q, first + l);
      expert_start[static_cast<std::size_t>(l) + 1] = expert_start[static_cast<std::size_t>(l)] + rows;
    }
    std::vector<std::int64_t> filled(expert_start.begin(), expert_start.end() - 1);
    for (std::int32_t q = 0; q < num_ranks; ++q)
      for (std::int32_t l = 0; l < local; ++l)
        for (std::int64_t i = 0; i < count(q, first + l); ++i) want.push_back(filled[static_cast<std::size_t>(l)]++);
    CHECK(dst == want);
  }
}

TEST_CASE("check_count_table: every rank's rows against the capacity_rows its row carries, the same verdict on all") {
  EPX_TEST_SEEDED_RNG(rng);
  // recv_capacity_rows: the worst case at factor 0 and from num_ranks on, else ceil(f * c * k),
  // never above the worst case, monotone in the capacity.
  for (std::int32_t ranks : {1, 3, 8})
    for (std::int32_t k : {1, 2, 8})
      for (double f : {0.0, 0.3, 1.0, 1.7, 2.5, 7.99, 8.0, 40.0}) {
        std::int64_t last = 0;
        for (std::int64_t c = 0; c < 300; c += 7) {
          std::int64_t const rows = detail::recv_capacity_rows(c, ranks, k, f);
          std::int64_t const worst = c * ranks * k;
          if (f == 0.0 || f >= ranks)
            CHECK(rows == worst);
          else
            CHECK(rows == std::min(worst, static_cast<std::int64_t>(std::ceil(f * static_cast<double>(c * k)))));
          CHECK(rows <= worst);
          CHECK(rows >= last);
          last = rows;
        }
      }
  for (int trial = 0; trial < 400; ++trial) {
    std::int32_t const num_ranks = std::uniform_int_distribution<std::int32_t>(1, 6)(rng);
    std::int32_t const num_experts = std::uniform_int_distribution<std::int32_t>(num_ranks, 20)(rng);
    std::int32_t const top_k = std::uniform_int_distribution<std::int32_t>(1, std::min(num_experts, 4))(rng);
    std::vector<std::int32_t> per_rank(static_cast<std::size_t>(num_ranks), 0);
    for (std::int32_t e = 0; e < num_experts; ++e)
      ++per_rank[static_cast<std::size_t>(std::uniform_int_distribution<std::int32_t>(0, num_ranks - 1)(rng))];
    ExpertPlacement const placement = ExpertPlacement::from_counts(per_rank);
    CAPTURE(trial);
    // Each rank's row as its forward writes it (count_table_entry), with its own factor and capacity.
    auto const width = detail::kCountTableHeader + static_cast<std::size_t>(num_experts);
    std::vector<std::int64_t> table(static_cast<std::size_t>(num_ranks) * width);
    std::vector<std::int64_t> capacity_rows(static_cast<std::size_t>(num_ranks)),
        tokens(static_cast<std::size_t>(num_ranks)), capacity(static_cast<std::size_t>(num_ranks));
    std::vector<std::int32_t> counts(static_cast<std::size_t>(num_experts));
    std::vector<std::int64_t> received(static_cast<std::size_t>(num_ranks), 0);
    for (std::int32_t q = 0; q < num_ranks; ++q) {
      auto const uq = static_cast<std::size_t>(q);
      tokens[uq] = std::uniform_int_distribution<std::int64_t>(0, 12)(rng);
      capacity[uq] = tokens[uq] + std::uniform_int_distribution<std::int64_t>(rng() % 9 == 0 ? -2 : 0, 3)(rng);
      capacity[uq] = std::max<std::int64_t>(capacity[uq], 0);
      double const factor = rng() % 3 == 0 ? 0.0 : std::uniform_real_distribution<double>(0.2, num_ranks + 1.0)(rng);
      capacity_rows[uq] = detail::recv_capacity_rows(capacity[uq], num_ranks, top_k, factor);
      // tokens * top_k slots spread over the experts (some -1: fewer rows).
      std::fill(counts.begin(), counts.end(), 0);
      for (std::int64_t s = 0; s < tokens[uq] * top_k; ++s)
        if (rng() % 5 != 0) ++counts[static_cast<std::size_t>(rng() % static_cast<std::uint64_t>(num_experts))];
      detail::CountRowHead const head{
          .num_tokens = tokens[uq], .capacity = capacity[uq], .capacity_rows = capacity_rows[uq]};
      for (std::size_t i = 0; i < width; ++i)
        table[uq * width + i] =
            detail::count_table_entry(static_cast<std::int64_t>(i), counts.data(), num_experts, head);
      CHECK(table[uq * width] == tokens[uq]);
      CHECK(table[uq * width + 1] == capacity[uq]);
      CHECK(table[uq * width + 2] == capacity_rows[uq]);
      for (std::int32_t p = 0; p < num_ranks; ++p) {
        ExpertRange const local = placement.local_range(p);
        for (std::int32_t e = local.first; e < local.first + local.count; ++e)
          received[static_cast<std::size_t>(p)] += counts[static_cast<std::size_t>(e)];
      }
    }
    // The verdict, independently: the first rank whose tokens or received rows do not fit.
    std::int32_t failing = -1;
    bool rows_failed = false;
    for (std::int32_t q = 0; q < num_ranks && failing < 0; ++q) {
      auto const uq = static_cast<std::size_t>(q);
      if (tokens[uq] > capacity[uq] || received[uq] > capacity_rows[uq]) {
        failing = q;
        rows_failed = tokens[uq] <= capacity[uq];
      }
    }
    CAPTURE(failing);
    if (failing < 0) {
      CHECK_NOTHROW(detail::check_count_table(table, placement, top_k));
      continue;
    }
    auto const uf = static_cast<std::size_t>(failing);
    std::string const named =
        rows_failed
            ? fmt::format("rank {} would receive {} rows, expected <= {}", failing, received[uf], capacity_rows[uf])
            : fmt::format("rank {}: num_tokens = {}, expected <= {}", failing, tokens[uf], capacity[uf]);
    test::check_throws(Errc::kWorkspaceTooSmall, named, [&] { detail::check_count_table(table, placement, top_k); });
    // Below a worst case that would hold the rows, the message names the factor the rank would
    // need, and that factor fits; beyond the worst case only more tokens of memory do.
    std::int64_t const worst = capacity[uf] * num_ranks * top_k;
    if (rows_failed && capacity_rows[uf] < worst && received[uf] <= worst) {
      std::string message;
      try {
        detail::check_count_table(table, placement, top_k);
      } catch (Error const& e) {
        CHECK(e.code() == Errc::kWorkspaceTooSmall);
        message = e.what();
      }
      CAPTURE(message);
      std::string const prefix = "nothing was dropped: set received_rows_factor >= ";
      auto const at = message.find(prefix);
      REQUIRE(at != std::string::npos);
      double const needed = std::stod(message.substr(at + prefix.size()));
      // It holds the rows in any memory sized for the largest rank's tokens (what every rank's must
      // hold at least), and it is no larger than that needs (rounded up to 3 decimals).
      std::int64_t const largest = *std::max_element(tokens.begin(), tokens.end());
      CAPTURE(largest);
      for (std::int64_t memory = largest; memory <= largest + 4; ++memory)
        CHECK(detail::recv_capacity_rows(memory, num_ranks, top_k, needed) >= received[uf]);
      CHECK(needed < static_cast<double>(received[uf]) / static_cast<double>(largest * top_k) + 0.0011);
      CHECK(needed <= num_ranks);
    } else if (rows_failed) {
      test::check_throws(Errc::kWorkspaceTooSmall, "size every rank's workspace with workspace_bytes(max_tokens)",
                         [&] { detail::check_count_table(table, placement, top_k); });
    }
  }
}
