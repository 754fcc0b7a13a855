// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// LocalGroup: every collective moves the right bytes; local misuse is named at once; and the
// failure scenarios every local group shares: a rank that fails, never arrives or disagrees makes
// the others throw instead of hanging, and a new group works afterwards.

#include "../common/host_backend.hpp"

#include <atomic>
#include <chrono>
#include <limits>

using namespace epx;
using namespace std::chrono_literals;

namespace {

// A byte that identifies (source rank, destination rank, index).
std::uint8_t pattern(int src, int dst, std::size_t i) {
  return static_cast<std::uint8_t>(src * 31 + dst * 7 + i * 13 + 1);
}

}  // namespace

TEST_CASE("LocalGroup::all_to_all_v: every rank receives its blocks in rank order") {
  EPX_TEST_SEEDED_RNG(rng);
  for (int n : {1, 2, 3, 5}) {
    CAPTURE(n);
    std::vector<std::vector<std::size_t>> sizes(static_cast<std::size_t>(n),
                                                std::vector<std::size_t>(static_cast<std::size_t>(n)));
    std::uniform_int_distribution<std::size_t> size_dist(0, 40);
    for (auto& row : sizes)
      for (auto& s : row) s = size_dist(rng);  // sizes[p][q]: bytes p sends to q (0 allowed)
    LocalGroup group(n, {.timeout = 10s});
    group.run([&](int rank, Communicator& comm) {
      auto const r = static_cast<std::size_t>(rank);
      std::vector<std::size_t> send_bytes = sizes[r], recv_bytes(static_cast<std::size_t>(n));
      for (std::size_t q = 0; q < recv_bytes.size(); ++q) recv_bytes[q] = sizes[q][r];
      std::vector<std::uint8_t> send, recv(std::accumulate(recv_bytes.begin(), recv_bytes.end(), std::size_t{0}), 0);
      for (std::size_t p = 0; p < send_bytes.size(); ++p)
        for (std::size_t i = 0; i < send_bytes[p]; ++i) send.push_back(pattern(rank, static_cast<int>(p), i));
      comm.all_to_all_v(send.data(), send_bytes, recv.data(), recv_bytes, StreamRef::host());
      std::size_t off = 0;
      for (std::size_t q = 0; q < recv_bytes.size(); ++q)
        for (std::size_t i = 0; i < recv_bytes[q]; ++i) REQUIRE(recv[off++] == pattern(static_cast<int>(q), rank, i));
    });
  }
}

TEST_CASE("LocalGroup::all_to_all and all_gather: fixed-size blocks") {
  int const n = 4;
  std::size_t const b = 9;
  LocalGroup group(n, {.timeout = 10s});
  group.run([&](int rank, Communicator& comm) {
    std::vector<std::uint8_t> send(n * b), recv(n * b);
    for (int p = 0; p < n; ++p)
      for (std::size_t i = 0; i < b; ++i) send[p * b + i] = pattern(rank, p, i);
    comm.all_to_all(send.data(), recv.data(), b, StreamRef::host());
    for (int q = 0; q < n; ++q)
      for (std::size_t i = 0; i < b; ++i) REQUIRE(recv[q * b + i] == pattern(q, rank, i));
    std::vector<std::uint8_t> mine(b), all(n * b);
    for (std::size_t i = 0; i < b; ++i) mine[i] = pattern(rank, 99, i);
    comm.all_gather(mine.data(), all.data(), b, StreamRef::host());
    for (int q = 0; q < n; ++q)
      for (std::size_t i = 0; i < b; ++i) REQUIRE(all[q * b + i] == pattern(q, 99, i));
    comm.barrier(StreamRef::host());
  });
}

TEST_CASE("LocalGroup::all_reduce_sum: sums in rank order, the same bits on every rank") {
  EPX_TEST_SEEDED_RNG(rng);
  int const n = 5;
  std::size_t const count = 333;
  std::vector<std::vector<float>> data(n);
  for (auto& d : data) d = test::random_vector<float>(count, rng, 100.0f);
  std::vector<float> expected(count);
  for (std::size_t i = 0; i < count; ++i) {
    float acc = data[0][i];
    for (int q = 1; q < n; ++q) acc += data[static_cast<std::size_t>(q)][i];
    expected[i] = acc;
  }
  std::vector<std::vector<bfloat16>> bdata(n);
  for (int q = 0; q < n; ++q)
    for (float v : data[static_cast<std::size_t>(q)]) bdata[static_cast<std::size_t>(q)].push_back(bfloat16(v));
  auto const bdata_in = bdata;
  LocalGroup group(n, {.timeout = 10s});
  group.run([&](int rank, Communicator& comm) {
    auto& d = data[static_cast<std::size_t>(rank)];
    comm.all_reduce_sum(d.data(), count, DType::kF32, StreamRef::host());
    REQUIRE(std::memcmp(d.data(), expected.data(), count * sizeof(float)) == 0);
    std::vector<std::int64_t> ints(7, rank + 1);
    comm.all_reduce_sum(ints.data(), ints.size(), DType::kI64, StreamRef::host());
    for (auto v : ints) REQUIRE(v == n * (n + 1) / 2);
    auto& bd = bdata[static_cast<std::size_t>(rank)];
    comm.all_reduce_sum(bd.data(), count, DType::kBF16, StreamRef::host());
    for (std::size_t i = 0; i < count; ++i) {  // fp32 accumulation of the bf16 inputs, one rounding
      float acc = static_cast<float>(bdata_in[0][i]);
      for (int q = 1; q < n; ++q) acc += static_cast<float>(bdata_in[static_cast<std::size_t>(q)][i]);
      REQUIRE(bd[i].bits == bfloat16(acc).bits);
    }
  });
}

TEST_CASE("LocalGroup::all_reduce_sum: integers wrap as two's complement, as on the GPU") {
  // A signed overflow would be undefined behaviour (UBSan in CI fails on it); the CUDA backend sums
  // integers as unsigned, so the host does too and both give the wrapped bits.
  EPX_TEST_SEEDED_RNG(rng);
  int const n = 3;
  std::uniform_int_distribution<std::int32_t> i32;
  std::uniform_int_distribution<std::int64_t> i64;
  std::vector<std::vector<std::int32_t>> a(n, std::vector<std::int32_t>(50));
  std::vector<std::vector<std::int64_t>> b(n, std::vector<std::int64_t>(50));
  for (int q = 0; q < n; ++q)
    for (std::size_t i = 0; i < 50; ++i) {
      a[static_cast<std::size_t>(q)][i] = i < 2 ? std::numeric_limits<std::int32_t>::max() : i32(rng);
      b[static_cast<std::size_t>(q)][i] = i < 2 ? std::numeric_limits<std::int64_t>::min() : i64(rng);
    }
  std::vector<std::int32_t> want_a(50);
  std::vector<std::int64_t> want_b(50);
  for (std::size_t i = 0; i < 50; ++i) {
    std::uint32_t ua = 0;
    std::uint64_t ub = 0;
    for (int q = 0; q < n; ++q) {
      ua += static_cast<std::uint32_t>(a[static_cast<std::size_t>(q)][i]);
      ub += static_cast<std::uint64_t>(b[static_cast<std::size_t>(q)][i]);
    }
    want_a[i] = static_cast<std::int32_t>(ua);
    want_b[i] = static_cast<std::int64_t>(ub);
  }
  CHECK(want_a[0] == std::numeric_limits<std::int32_t>::max() - 2);  // 3 * INT32_MAX wrapped
  LocalGroup group(n, {.timeout = 10s});
  group.run([&](int rank, Communicator& comm) {
    auto& x = a[static_cast<std::size_t>(rank)];
    auto& y = b[static_cast<std::size_t>(rank)];
    comm.all_reduce_sum(x.data(), x.size(), DType::kI32, StreamRef::host());
    comm.all_reduce_sum(y.data(), y.size(), DType::kI64, StreamRef::host());
    REQUIRE(x == want_a);
    REQUIRE(y == want_b);
  });
}

TEST_CASE("LocalGroup::collectives: local misuse aborts the group at once, naming what is wrong") {
  {
    LocalGroup group(2, {.timeout = 10s});
    std::vector<std::size_t> wrong_size{1};
    std::uint8_t b = 0;
    CHECK_THROWS_WITH_AS(group.communicator(0).all_to_all_v(&b, wrong_size, &b, wrong_size, StreamRef::host()),
                         doctest::Contains("expected both = group size 2"), Error);
    CHECK(group.aborted());  // so the peer does not wait for the full timeout
  }
  {
    LocalGroup group(1, {.timeout = 10s});
    auto* fake = reinterpret_cast<CUstream_st*>(std::uintptr_t{0x2});
    CHECK_THROWS_WITH_AS(group.communicator(0).barrier(StreamRef(fake)),
                         doctest::Contains("expected StreamRef::host()"), Error);
  }
  CHECK_THROWS_WITH_AS(LocalGroup(0), doctest::Contains("num_ranks = 0, expected >= 1"), Error);
}

// The failure scenarios every local group shares (../common/local_group_cases.hpp), on host memory.
TYPE_TO_STRING_AS("Host", epx::test::HostBackend);
#define EPX_LG_BACKENDS epx::test::HostBackend
#include "../common/local_group_cases.hpp"
