// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

// The failure scenarios of a local group, written once for LocalGroup (host memory) and
// CudaLocalGroup (device memory): a rank that never arrives, a rank that throws, and ranks that
// disagree on the collective or its sizes must make every rank throw, within the deadline, instead
// of hanging; an aborted group stays aborted, and a new one works. The including file defines
// EPX_LG_BACKENDS (the backends to instantiate every case for) and includes this header once:
// tests/host/local_group_test.cpp (Host, in CI) and tests/cuda/local_group_test.cu (Cuda, on a GPU).

#include "test_util.hpp"

#include <atomic>
#include <chrono>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#ifndef EPX_LG_BACKENDS
#error "define EPX_LG_BACKENDS (a list of test backends) before including local_group_cases.hpp"
#endif

namespace epx::test {

// Each rank's epx::Error code (nullopt: it returned normally) and message, and how long run took.
struct GroupOutcome {
  std::vector<std::optional<Errc>> codes;
  std::vector<std::string> messages;
  std::chrono::steady_clock::duration elapsed{};
};

// Runs `body(rank, comm, on)` on every rank and records what each rank threw. `run` rethrows the
// first failure; the per-rank record is what the cases check.
template <class B, class Body>
GroupOutcome run_recording(typename B::Group& group, Body&& body) {
  GroupOutcome out;
  out.codes.resize(static_cast<std::size_t>(group.size()));
  out.messages.resize(static_cast<std::size_t>(group.size()));
  auto const start = std::chrono::steady_clock::now();
  try {
    group.run([&](int rank, Communicator& comm) {
      typename B::Rank on;
      try {
        body(rank, comm, on);
      } catch (Error const& e) {
        out.codes[static_cast<std::size_t>(rank)] = e.code();
        out.messages[static_cast<std::size_t>(rank)] = e.what();
        throw;
      }
    });
  } catch (...) {}
  out.elapsed = std::chrono::steady_clock::now() - start;
  return out;
}

}  // namespace epx::test

TEST_CASE_TEMPLATE("LocalGroup::barrier: a rank that never arrives makes the others time out", B, EPX_LG_BACKENDS) {
  using namespace epx;
  using namespace std::chrono_literals;
  auto const timeout = 300ms;
  typename B::Group group(3, {.timeout = timeout});
  auto const out = test::run_recording<B>(group, [](int rank, Communicator& comm, typename B::Rank const& on) {
    if (rank == 2) return;  // never calls
    comm.barrier(on.comm_stream());
  });
  CHECK(out.codes[0] == Errc::kTimeout);
  CHECK(out.codes[1] == Errc::kTimeout);
  CHECK_FALSE(out.codes[2].has_value());
  CHECK(out.messages[0].find("rank(s) [2]") != std::string::npos);
  CHECK(out.messages[1].find("rank(s) [2]") != std::string::npos);
  CHECK(out.elapsed >= timeout);
  CHECK(out.elapsed < timeout + 5s);
  CHECK(group.aborted());
  // The group stays aborted: rank 2 arriving late fails at once.
  {
    typename B::Rank const late;
    CHECK_THROWS_WITH_AS(group.communicator(2).barrier(late.comm_stream()), doctest::Contains("the group was aborted"),
                         Error);
  }
  // A new group in the same process works.
  typename B::Group fresh(3, {.timeout = 30s});
  CHECK_NOTHROW(fresh.run([](int, Communicator& comm) {
    typename B::Rank const on;
    comm.barrier(on.comm_stream());
    on.sync();
  }));
}

TEST_CASE_TEMPLATE("LocalGroup::run: a rank that throws aborts the group and its error is rethrown", B,
                   EPX_LG_BACKENDS) {
  using namespace epx;
  using namespace std::chrono_literals;
  typename B::Group group(4, {.timeout = 60s});
  std::atomic<int> peer_failed{0};
  auto const start = std::chrono::steady_clock::now();
  CHECK_THROWS_WITH_AS(group.run([&](int rank, Communicator& comm) {
    typename B::Rank const on;
    typename B::template Buffer<float> v(64);
    if (rank == 1) throw std::runtime_error("rank one broke");
    try {
      comm.all_reduce_sum(v.data(), v.size(), DType::kF32, on.comm_stream());
    } catch (Error const& e) {
      if (e.code() == Errc::kPeerFailed && std::string(e.what()).find("rank one broke") != std::string::npos)
        ++peer_failed;
      throw;
    }
  }),
                       "rank one broke", std::runtime_error);
  CHECK(peer_failed == 3);
  CHECK(std::chrono::steady_clock::now() - start < 10s);  // far below the 60 s timeout
}

TEST_CASE_TEMPLATE("LocalGroup::collectives: mismatched calls and sizes fail on every rank", B, EPX_LG_BACKENDS) {
  using namespace epx;
  using namespace std::chrono_literals;
  {  // another collective on one rank
    typename B::Group group(4, {.timeout = 30s});
    auto const out = test::run_recording<B>(group, [](int rank, Communicator& comm, typename B::Rank const& on) {
      typename B::template Buffer<float> v(8);
      if (rank == 2)
        comm.barrier(on.comm_stream());
      else
        comm.all_reduce_sum(v.data(), v.size(), DType::kF32, on.comm_stream());
    });
    for (int rank = 0; rank < 4; ++rank) {
      CAPTURE(rank);
      CAPTURE(out.messages[static_cast<std::size_t>(rank)]);
      CHECK(out.codes[static_cast<std::size_t>(rank)] == Errc::kCollectiveMismatch);
    }
    CHECK(out.messages[0].find("rank 2 called barrier") != std::string::npos);
    CHECK(group.aborted());
  }
  {  // an all_to_all_v whose sizes do not pair up
    typename B::Group group(2, {.timeout = 30s});
    auto const out = test::run_recording<B>(group, [](int rank, Communicator& comm, typename B::Rank const& on) {
      typename B::template Buffer<std::uint8_t> send(16), recv(16);
      std::vector<std::size_t> bytes{4, rank == 0 ? 5u : 4u}, expect{4, 4};  // rank 0 sends 5, rank 1 expects 4
      comm.all_to_all_v(send.data(), bytes, recv.data(), expect, on.comm_stream());
    });
    for (int rank = 0; rank < 2; ++rank) {
      CAPTURE(rank);
      CHECK(out.codes[static_cast<std::size_t>(rank)] == Errc::kCollectiveMismatch);
      CHECK(out.messages[static_cast<std::size_t>(rank)].find(
                "rank 0 sends 5 bytes to rank 1, which expects 4 bytes") != std::string::npos);
    }
  }
  {  // an all_reduce_sum of another count on one rank
    typename B::Group group(3, {.timeout = 30s});
    auto const out = test::run_recording<B>(group, [](int rank, Communicator& comm, typename B::Rank const& on) {
      typename B::template Buffer<float> v(16);
      comm.all_reduce_sum(v.data(), rank == 1 ? 15 : 16, DType::kF32, on.comm_stream());
    });
    for (int rank = 0; rank < 3; ++rank) CHECK(out.codes[static_cast<std::size_t>(rank)] == Errc::kCollectiveMismatch);
  }
}
