// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// NcclCommunicator on one GPU. NCCL refuses two ranks on one device, so the collectives run at
// world size 1 (send/recv to self, a one-rank all-reduce and all-gather), against host results;
// the deadline is tested with a 2-rank communicator whose rank 1 never joins.

#include "../common/test_util.hpp"
#include "device_buffer.cuh"

#include <epx/nccl.hpp>

#include <doctest/doctest.h>

#include <cuda_runtime.h>

#include <chrono>
#include <cstdint>
#include <exception>
#include <thread>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

using namespace epx;
using namespace std::chrono_literals;
using epx::test::DeviceBuffer;

namespace {

// Keeps the stream busy for `ns` nanoseconds of wall time: work that outlives a deadline without
// any peer being involved.
__global__ void spin_for(unsigned long long ns) {
  unsigned long long start = 0, now = 0;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
  do {
    __nanosleep(1000);
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  } while (now - start < ns);
}

// A non-blocking stream for one test case (never the legacy default stream).
using Stream = test::CudaStream;

// A fresh unique id: this process is rank 0 and hosts NCCL's root.
ncclUniqueId fresh_id() {
  ncclUniqueId id{};
  EPX_NCCL_CHECK(ncclGetUniqueId(&id));
  return id;
}

NcclCommunicator world_of_one(std::chrono::milliseconds timeout = 60s) {
  return NcclCommunicator(0, 1, fresh_id(), 0, NcclOptions{.timeout = timeout});
}

std::uint64_t seed_of_test() {
  if (char const* s = std::getenv("EPX_TEST_SEED")) return std::strtoull(s, nullptr, 10);
  return (std::uint64_t{std::random_device{}()} << 32) ^ std::random_device{}();
}

std::vector<std::uint8_t> random_bytes(std::size_t n, std::mt19937_64& rng) {
  std::vector<std::uint8_t> v(n);
  for (auto& b : v) b = static_cast<std::uint8_t>(rng() >> 56);
  return v;
}

template <class T>
std::vector<T> random_floats(std::size_t n, std::mt19937_64& rng) {
  std::normal_distribution<float> dist(0.0f, 3.0f);
  std::vector<T> v(n);
  for (auto& x : v) x = from_float<T>(dist(rng));
  return v;
}

// Fills `buffer` with `byte` on the test's stream, ordered before the collective that follows
// (DeviceBuffer::poison uses the legacy stream, which a non-blocking stream does not wait for).
template <class T>
void poison(DeviceBuffer<T>& buffer, int byte, Stream const& stream) {
  EPX_CUDA_CHECK(cudaMemsetAsync(buffer.data(), byte, buffer.size() * sizeof(T), stream.s));
}

template <class T>
bool same_bits(std::vector<T> const& a, std::vector<T> const& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

// Runs `f`, expecting Error(code) whose message contains `part`.
using test::check_throws;

}  // namespace

TEST_CASE("NcclCommunicator::all_to_all_v: world size 1 moves every byte to itself") {
  std::uint64_t const seed = seed_of_test();
  INFO("seed = " << seed << " (rerun with EPX_TEST_SEED=" << seed << ")");
  std::mt19937_64 rng(seed);
  Stream stream;
  auto comm = world_of_one();
  CHECK(comm.rank() == 0);
  CHECK(comm.size() == 1);
  CHECK(comm.device() == 0);
  CHECK(comm.owns_comm());
  CHECK(comm.memory_space() == MemorySpace::kDevice);

  for (std::size_t const n : {std::size_t{1}, std::size_t{4097}, std::size_t{3'000'017}}) {
    INFO("bytes = " << n);
    auto const host = random_bytes(n, rng);
    DeviceBuffer<std::uint8_t> send(host), recv(n);
    poison(recv, 0xA5, stream);
    std::size_t const bytes[] = {n};
    comm.all_to_all_v(send.data(), bytes, recv.data(), bytes, stream.ref());
    comm.wait(stream.ref());
    CHECK(recv.to_host() == host);
  }
  // Zero bytes: nothing is posted, and null buffers are fine.
  std::size_t const none[] = {0};
  comm.all_to_all_v(nullptr, none, nullptr, none, stream.ref());
  comm.wait(stream.ref());
}

TEST_CASE("NcclCommunicator::all_to_all and all_gather: world size 1 copies the block") {
  std::uint64_t const seed = seed_of_test();
  INFO("seed = " << seed);
  std::mt19937_64 rng(seed);
  Stream stream;
  auto comm = world_of_one();
  std::size_t const n = 65'539;
  auto const host = random_bytes(n, rng);
  DeviceBuffer<std::uint8_t> send(host), recv(n), gathered(n);
  poison(recv, 0x5A, stream);
  poison(gathered, 0x5A, stream);
  comm.all_to_all(send.data(), recv.data(), n, stream.ref());
  comm.all_gather(send.data(), gathered.data(), n, stream.ref());
  comm.wait(stream.ref());
  CHECK(recv.to_host() == host);
  CHECK(gathered.to_host() == host);
  comm.all_to_all(nullptr, nullptr, 0, stream.ref());  // zero bytes: nothing posted
  comm.all_gather(nullptr, nullptr, 0, stream.ref());
}

TEST_CASE("NcclCommunicator::all_reduce_sum: world size 1 leaves f32, f16 and bf16 bit-identical") {
  std::uint64_t const seed = seed_of_test();
  INFO("seed = " << seed);
  std::mt19937_64 rng(seed);
  Stream stream;
  auto comm = world_of_one();
  std::size_t const n = 100'003;
  auto run = [&]<class T>(std::vector<T> const& host) {
    DeviceBuffer<T> data(host);
    comm.all_reduce_sum(data.data(), host.size(), dtype_of_v<T>, stream.ref());
    comm.wait(stream.ref());
    CHECK(same_bits(data.to_host(), host));  // the sum over one rank is the input
  };
  run(random_floats<float>(n, rng));
  run(random_floats<epx::half>(n, rng));
  run(random_floats<epx::bfloat16>(n, rng));
  comm.all_reduce_sum(nullptr, 0, DType::kF32, stream.ref());
}

TEST_CASE("NcclCommunicator::barrier: orders the stream and completes, also after a move") {
  Stream stream;
  auto comm = world_of_one();
  for (int i = 0; i < 3; ++i) comm.barrier(stream.ref());
  comm.wait(stream.ref());
  // Moving hands the NCCL communicator over; the moved-from object refuses every call.
  NcclCommunicator moved = std::move(comm);
  moved.barrier(stream.ref());
  moved.wait(stream.ref());
  CHECK(comm.aborted());
  check_throws(Errc::kPeerFailed, "NcclCommunicator::barrier: rank 0 of 1: the communicator was aborted (moved from)",
               [&] { comm.barrier(stream.ref()); });
}

TEST_CASE("NcclCommunicator::collectives: bad arguments are named and leave the communicator usable") {
  Stream stream;
  auto comm = world_of_one();
  DeviceBuffer<std::uint8_t> buf(64);
  std::size_t const one[] = {64};
  std::size_t const two[] = {32, 32};
  std::size_t const other[] = {16};
  check_throws(Errc::kInvalidArgument,
               "NcclCommunicator::all_to_all_v: stream = StreamRef::host(), expected a CUDA stream on device 0",
               [&] { comm.all_to_all_v(buf.data(), one, buf.data(), one, StreamRef::host()); });
  check_throws(Errc::kInvalidArgument,
               "NcclCommunicator::all_to_all_v: send_bytes.size() = 2, expected the group size 1",
               [&] { comm.all_to_all_v(buf.data(), two, buf.data(), one, stream.ref()); });
  check_throws(Errc::kInvalidArgument,
               "NcclCommunicator::all_to_all_v: recv_bytes.size() = 2, expected the group size 1",
               [&] { comm.all_to_all_v(buf.data(), one, buf.data(), two, stream.ref()); });
  check_throws(Errc::kCollectiveMismatch,
               "NcclCommunicator::all_to_all_v: send_bytes[rank 0] = 64, expected recv_bytes[rank 0] = 16",
               [&] { comm.all_to_all_v(buf.data(), one, buf.data(), other, stream.ref()); });
  check_throws(Errc::kInvalidArgument,
               "NcclCommunicator::all_to_all_v: send = nullptr, expected 64 bytes of device memory",
               [&] { comm.all_to_all_v(nullptr, one, buf.data(), one, stream.ref()); });
  check_throws(Errc::kInvalidArgument, "NcclCommunicator::all_to_all: recv = nullptr, expected 8 bytes",
               [&] { comm.all_to_all(buf.data(), nullptr, 8, stream.ref()); });
  check_throws(Errc::kInvalidArgument, "NcclCommunicator::all_reduce_sum: data = nullptr, expected 40 bytes",
               [&] { comm.all_reduce_sum(nullptr, 10, DType::kF32, stream.ref()); });
  check_throws(Errc::kInvalidArgument, "NcclCommunicator::all_gather: send = nullptr, expected 4 bytes",
               [&] { comm.all_gather(nullptr, buf.data(), 4, stream.ref()); });
  check_throws(Errc::kInvalidArgument, "NcclCommunicator::barrier: stream = StreamRef::host()",
               [&] { comm.barrier(StreamRef::host()); });
  check_throws(Errc::kInvalidArgument, "NcclCommunicator::wait: stream = StreamRef::host()",
               [&] { comm.wait(StreamRef::host()); });
  CHECK_FALSE(comm.aborted());
  comm.all_to_all_v(buf.data(), one, buf.data(), one, stream.ref());
  comm.wait(stream.ref());
}

TEST_CASE("NcclCommunicator::NcclCommunicator: a borrowed blocking communicator is used and not destroyed") {
  std::uint64_t const seed = seed_of_test();
  INFO("seed = " << seed);
  std::mt19937_64 rng(seed);
  ncclComm_t raw = nullptr;
  int const devices[] = {0};
  EPX_NCCL_CHECK(ncclCommInitAll(&raw, 1, devices));  // blocking, created by "the caller"
  {
    Stream stream;
    NcclCommunicator comm(raw, NcclOptions{.timeout = 60s});
    CHECK_FALSE(comm.owns_comm());
    CHECK(comm.rank() == 0);
    CHECK(comm.size() == 1);
    CHECK(comm.device() == 0);
    CHECK(comm.get() == raw);
    auto const host = random_bytes(10'007, rng);
    DeviceBuffer<std::uint8_t> send(host), recv(host.size());
    poison(recv, 0, stream);
    comm.all_gather(send.data(), recv.data(), host.size(), stream.ref());
    comm.barrier(stream.ref());
    comm.wait(stream.ref());
    CHECK(recv.to_host() == host);
  }
  // Still the caller's: destroying it succeeds.
  CHECK(ncclCommDestroy(raw) == ncclSuccess);
}

TEST_CASE("NcclCommunicator::abort: every later call throws kPeerFailed naming the reason") {
  Stream stream;
  auto comm = world_of_one();
  comm.abort("a peer reported a failure");
  CHECK(comm.aborted());
  CHECK(comm.get() == nullptr);
  comm.abort("a second reason is ignored");
  DeviceBuffer<std::uint8_t> buf(16);
  std::size_t const bytes[] = {16};
  std::string const text =
      "NcclCommunicator::all_to_all_v: rank 0 of 1: the communicator was aborted (aborted by the caller: a peer "
      "reported a failure); destroy it and build a new one on every rank";
  check_throws(Errc::kPeerFailed, text, [&] { comm.all_to_all_v(buf.data(), bytes, buf.data(), bytes, stream.ref()); });
  check_throws(Errc::kPeerFailed, "NcclCommunicator::barrier: rank 0 of 1: the communicator was aborted",
               [&] { comm.barrier(stream.ref()); });
  check_throws(Errc::kPeerFailed, "NcclCommunicator::wait: rank 0 of 1: the communicator was aborted",
               [&] { comm.wait(stream.ref()); });
}

TEST_CASE("NcclCommunicator::NcclCommunicator: a rank that never joins times out, and a rebuild works") {
  if (std::getenv("NCCL_COMM_ID") != nullptr) {
    MESSAGE("NCCL_COMM_ID is set: this test needs NCCL's own random root address; skipped");
    return;
  }
  auto const timeout = 2000ms;
  auto const start = std::chrono::steady_clock::now();
  check_throws(
      Errc::kTimeout,
      "NcclCommunicator: rank 0 of 2 (device 0): ncclCommInitRankConfig (creating the communicator: waiting for "
      "every rank to join): not finished within the deadline of 2000 ms",
      [&] { NcclCommunicator never(0, 2, fresh_id(), 0, NcclOptions{.timeout = timeout}); });
  auto const took = std::chrono::steady_clock::now() - start;
  CHECK(took >= timeout);
  CHECK(took < timeout + 10s);  // abort of a pending init measured at 0-0.9 s
  // A new communicator with a new id works in the same process.
  Stream stream;
  auto comm = world_of_one();
  DeviceBuffer<std::uint8_t> buf(8);
  comm.all_to_all(buf.data(), buf.data(), 0, stream.ref());
  comm.barrier(stream.ref());
  comm.wait(stream.ref());
}

TEST_CASE("NcclCommunicator::all_to_all_v: captured into a CUDA graph and replayed") {
  std::uint64_t const seed = seed_of_test();
  INFO("seed = " << seed);
  std::mt19937_64 rng(seed);
  Stream stream;
  auto comm = world_of_one();
  std::size_t const n = 12'345;
  auto const host = random_bytes(n, rng);
  DeviceBuffer<std::uint8_t> send(host), recv(n);
  std::size_t const bytes[] = {n};
  comm.all_to_all_v(send.data(), bytes, recv.data(), bytes, stream.ref());  // connect outside the capture
  comm.wait(stream.ref());

  poison(recv, 0, stream);
  comm.wait(stream.ref());
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  EPX_CUDA_CHECK(cudaStreamBeginCapture(stream.s, cudaStreamCaptureModeThreadLocal));
  comm.all_to_all_v(send.data(), bytes, recv.data(), bytes, stream.ref());
  check_throws(Errc::kInvalidArgument, "NcclCommunicator::wait: stream = a stream being captured",
               [&] { comm.wait(stream.ref()); });
  EPX_CUDA_CHECK(cudaStreamEndCapture(stream.s, &graph));
  EPX_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  comm.wait(stream.ref());
  CHECK(recv.to_host() == std::vector<std::uint8_t>(n, 0));  // capturing ran nothing
  for (int replay = 0; replay < 3; ++replay) {
    poison(recv, replay + 1, stream);
    EPX_CUDA_CHECK(cudaGraphLaunch(exec, stream.s));
    comm.wait(stream.ref());
    CHECK(recv.to_host() == host);
  }
  // Graphs that captured NCCL work must die before the communicator is destroyed or aborted.
  EPX_CUDA_CHECK(cudaGraphExecDestroy(exec));
  EPX_CUDA_CHECK(cudaGraphDestroy(graph));
}

TEST_CASE("NcclCommunicator::wait: stream work past the deadline aborts and throws kTimeout") {
  Stream stream;
  auto comm = world_of_one(300ms);
  comm.barrier(stream.ref());
  spin_for<<<1, 1, 0, stream.s>>>(1'500'000'000ull);  // 1.5 s
  EPX_CUDA_CHECK_LAUNCH(spin_for);
  auto const start = std::chrono::steady_clock::now();
  check_throws(
      Errc::kTimeout,
      "NcclCommunicator: rank 0 of 1 (device 0), collective #1: NcclCommunicator::wait: not finished within the "
      "deadline of 300 ms: the stream's work did not finish",
      [&] { comm.wait(stream.ref()); });
  CHECK(std::chrono::steady_clock::now() - start >= 300ms);
  CHECK(comm.aborted());
  check_throws(Errc::kPeerFailed, "the communicator was aborted (NcclCommunicator: rank 0 of 1",
               [&] { comm.barrier(stream.ref()); });
  EPX_CUDA_CHECK(cudaStreamSynchronize(stream.s));  // let the spinning kernel end before the stream goes
}

TEST_CASE("NcclCommunicator::NcclCommunicator: two ranks on one GPU fail with kNccl on both, not a hang") {
  // NCCL 2.28 refuses two ranks on one device ("Duplicate GPU detected") during init; each rank
  // sees it through ncclCommGetAsyncError, so epx aborts and throws kNccl well before the deadline.
  ncclUniqueId const id = fresh_id();
  std::exception_ptr errors[2];
  auto const start = std::chrono::steady_clock::now();
  {
    std::jthread rank1([&] {
      try {
        NcclCommunicator c(1, 2, id, 0, NcclOptions{.timeout = 30s});
      } catch (...) {
        errors[1] = std::current_exception();
      }
    });
    try {
      NcclCommunicator c(0, 2, id, 0, NcclOptions{.timeout = 30s});
    } catch (...) {
      errors[0] = std::current_exception();
    }
  }
  CHECK(std::chrono::steady_clock::now() - start < 30s);
  for (int r = 0; r < 2; ++r) {
    CAPTURE(r);
    REQUIRE(errors[r] != nullptr);
    check_throws(Errc::kNccl, "NCCL call `ncclCommGetAsyncError` failed: ", [&] { std::rethrow_exception(errors[r]); });
    check_throws(Errc::kNccl, "; the communicator was aborted: destroy it and build a new one on every rank",
                 [&] { std::rethrow_exception(errors[r]); });
  }
}

TEST_CASE("NcclCommunicator::from_env: a LOCAL_RANK beyond the visible devices is named") {
  int count = 0;
  EPX_CUDA_CHECK(cudaGetDeviceCount(&count));
  detail::LaunchEnv env;
  env.launcher = "torchrun";
  env.size = 5000;
  env.local_rank = 4096;
  check_throws(Errc::kInvalidArgument,
               "NcclCommunicator::from_env: LOCAL_RANK = 4096, expected < " + std::to_string(count) +
                   ", the CUDA devices this process sees (one rank per GPU",
               [&] { detail::select_launch_device(env); });
  env.launcher = "mpirun";
  check_throws(Errc::kInvalidArgument, "from_env: OMPI_COMM_WORLD_LOCAL_RANK = 4096, expected < ",
               [&] { detail::select_launch_device(env); });
}
