// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// CudaLocalGroup: every collective moves the right bytes on 1, 2, 4 and 8 ranks of device 0 (and
// across devices when there are several), each rank on its own stream and syncing only that
// stream; all_reduce_sum is bitwise the host rank-order fp32 sum. Ranks are made slow on purpose
// (a spin kernel before their inputs are written) and senders overwrite their buffers right after
// each call, so a missing ready or done wait shows up as wrong bytes. Failures (a host stream, a
// stream of another device here; mismatch, a rank that never arrives or throws in the shared cases
// of ../common/local_group_cases.hpp) throw on every rank instead of hanging.
//
// Rank threads only do CUDA work and store what they saw; the checks run on the main thread, so
// every failure prints the seed.

#include "../common/test_util.hpp"
#include "cuda_backend.cuh"
#include "device_buffer.cuh"

// The failure scenarios every local group shares (../common/local_group_cases.hpp), on device memory.
TYPE_TO_STRING_AS("Cuda", epx::test::CudaBackend);
#define EPX_LG_BACKENDS epx::test::CudaBackend
#include "../common/local_group_cases.hpp"

#include <epx/cuda/local_group.cuh>

#include <atomic>
#include <chrono>
#include <cstring>
#include <numeric>
#include <optional>
#include <string>

using namespace epx;
using namespace std::chrono_literals;
using test::DeviceBuffer;

namespace {

// A well-mixed byte for (seed, call, source rank, byte offset in the source's send buffer).
__host__ __device__ inline std::uint8_t pattern(std::uint64_t seed, std::uint64_t call, std::uint64_t src,
                                                std::uint64_t offset) {
  std::uint64_t z = seed ^ (call * 0x9e3779b97f4a7c15ull) ^ (src << 56) ^ (offset * 0xd1b54a32d192ed03ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return static_cast<std::uint8_t>(z ^ (z >> 31));
}

__global__ void fill_pattern_kernel(std::uint8_t* p, std::size_t bytes, std::uint64_t seed, std::uint64_t call,
                                    int src) {
  for (std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; i < bytes;
       i += std::size_t{gridDim.x} * blockDim.x)
    p[i] = pattern(seed, call, static_cast<std::uint64_t>(src), i);
}

__global__ void spin_kernel(long long cycles) {
  long long const start = clock64();
  while (clock64() - start < cycles) {}
}

__global__ void set_flag_kernel(std::int32_t* flag, std::int32_t value) { *flag = value; }

using Stream = test::CudaStream;

void fill_pattern(std::uint8_t* p, std::size_t bytes, std::uint64_t seed, std::uint64_t call, int src, cudaStream_t s) {
  if (bytes == 0) return;
  auto const blocks = static_cast<unsigned>(std::min<std::size_t>((bytes + 255) / 256, 1024));
  fill_pattern_kernel<<<blocks, 256, 0, s>>>(p, bytes, seed, call, src);
  EPX_CUDA_CHECK_LAUNCH(fill_pattern_kernel);
}

// Delays everything enqueued after it on `s`, by a different amount per rank and call, so ranks
// reach their collectives at different device times (~0 to 2 ms).
void make_late(int rank, std::uint64_t call, cudaStream_t s) {
  long long const cycles = static_cast<long long>((rank * 7 + call * 3) % 5) * 500'000;
  spin_kernel<<<1, 1, 0, s>>>(cycles);
  EPX_CUDA_CHECK_LAUNCH(spin_kernel);
}

// Uploads on `s` itself: the legacy-stream cudaMemcpy of DeviceBuffer(host) is not ordered before
// work on a non-blocking stream.
template <class T>
void upload(T* dst, std::vector<T> const& src, cudaStream_t s) {
  if (!src.empty()) EPX_CUDA_CHECK(cudaMemcpyAsync(dst, src.data(), src.size() * sizeof(T), cudaMemcpyHostToDevice, s));
}

template <class T>
std::vector<T> to_host(T const* p, std::size_t count) {
  std::vector<T> out(count);
  if (count > 0) EPX_CUDA_CHECK(cudaMemcpy(out.data(), p, count * sizeof(T), cudaMemcpyDeviceToHost));
  return out;
}

// Index of the first differing element, or -1.
template <class T>
long long first_mismatch(std::vector<T> const& got, std::vector<T> const& want) {
  if (got.size() != want.size()) return 0;
  for (std::size_t i = 0; i < got.size(); ++i)
    if (std::memcmp(&got[i], &want[i], sizeof(T)) != 0) return static_cast<long long>(i);
  return -1;
}

int device_count() {
  int count = 0;
  EPX_CUDA_CHECK(cudaGetDeviceCount(&count));
  return count;
}

// Group shapes every correctness test runs: 1, 2, 4, 8 ranks on device 0, and spread round-robin
// over the devices when there are several.
struct Config {
  int num_ranks = 1;
  std::vector<int> devices = {};
};

std::vector<Config> configs() {
  std::vector<Config> out;
  for (int n : {1, 2, 4, 8}) out.push_back({n, std::vector<int>(static_cast<std::size_t>(n), 0)});
  if (int const count = device_count(); count >= 2)
    for (int n : {2, 4, 8}) {
      std::vector<int> devices;
      for (int r = 0; r < n; ++r) devices.push_back(r % count);
      out.push_back({n, devices});
    }
  return out;
}

std::string describe(Config const& c) {
  std::string devices;
  for (int d : c.devices) devices += fmt::format("{}{}", devices.empty() ? "" : ", ", d);
  return fmt::format("{} ranks on devices [{}]", c.num_ranks, devices);
}

// sizes[p][q]: bytes rank p sends to rank q. Uneven, odd sizes, ~1/4 zeros, and when there are
// peers the last rank sends and receives nothing at all (it still makes the call).
std::vector<std::vector<std::size_t>> random_sizes(int n, std::mt19937_64& rng) {
  std::uniform_int_distribution<std::size_t> size_dist(1, 5000);
  std::bernoulli_distribution zero(0.25);
  std::vector<std::vector<std::size_t>> sizes(static_cast<std::size_t>(n),
                                              std::vector<std::size_t>(static_cast<std::size_t>(n)));
  for (int p = 0; p < n; ++p)
    for (int q = 0; q < n; ++q) {
      bool const idle = n > 1 && (p == n - 1 || q == n - 1);
      sizes[static_cast<std::size_t>(p)][static_cast<std::size_t>(q)] = idle || zero(rng) ? 0 : size_dist(rng);
    }
  return sizes;
}

// What rank `me` receives in an all_to_all_v of `sizes` whose send buffers hold pattern(seed, call, p, .).
std::vector<std::uint8_t> expected_all_to_all_v(std::vector<std::vector<std::size_t>> const& sizes, int me,
                                                std::uint64_t seed, std::uint64_t call) {
  std::vector<std::uint8_t> out;
  auto const m = static_cast<std::size_t>(me);
  for (std::size_t q = 0; q < sizes.size(); ++q) {
    std::size_t offset = 0;
    for (std::size_t p = 0; p < m; ++p) offset += sizes[q][p];
    for (std::size_t i = 0; i < sizes[q][m]; ++i) out.push_back(pattern(seed, call, q, offset + i));
  }
  return out;
}

std::size_t row_sum(std::vector<std::size_t> const& v) { return std::accumulate(v.begin(), v.end(), std::size_t{0}); }

template <class T>
std::vector<T> random_inputs(std::size_t count, std::mt19937_64& rng) {
  if constexpr (std::is_integral_v<T>) {
    std::uniform_int_distribution<T> dist(-100000, 100000);
    std::vector<T> v(count);
    for (auto& x : v) x = dist(rng);
    return v;
  } else {
    return test::random_vector<T>(count, rng, 10.0f);
  }
}

// The host LocalGroup's sum: rank order, fp32 accumulation (exact for integers), rounded once.
template <class T>
std::vector<T> rank_order_sum(std::vector<std::vector<T>> const& inputs) {
  std::vector<T> out(inputs[0].size());
  for (std::size_t i = 0; i < out.size(); ++i) {
    if constexpr (std::is_integral_v<T>) {
      T acc = inputs[0][i];
      for (std::size_t q = 1; q < inputs.size(); ++q) acc += inputs[q][i];
      out[i] = acc;
    } else {
      float acc = to_float(inputs[0][i]);
      for (std::size_t q = 1; q < inputs.size(); ++q) acc += to_float(inputs[q][i]);
      out[i] = from_float<T>(acc);
    }
  }
  return out;
}

}  // namespace

TEST_CASE("CudaLocalGroup::all_to_all_v[cuda]: uneven sizes, idle ranks, each rank syncing only its own stream") {
  EPX_TEST_SEEDED_RNG(rng);
  int const kCalls = 4;
  for (Config const& config : configs()) {
    CAPTURE(describe(config));
    int const n = config.num_ranks;
    std::vector<std::vector<std::vector<std::size_t>>> sizes;  // [call][p][q]
    for (int c = 0; c < kCalls; ++c) sizes.push_back(random_sizes(n, rng));
    std::uint64_t const seed = rng();
    std::vector<std::vector<std::vector<std::uint8_t>>> got(
        kCalls, std::vector<std::vector<std::uint8_t>>(static_cast<std::size_t>(n)));
    CudaLocalGroup group(n, {.timeout = 30s, .devices = config.devices});
    group.run([&](int rank, Communicator& comm) {
      auto const r = static_cast<std::size_t>(rank);
      REQUIRE(comm.memory_space() == MemorySpace::kDevice);
      Stream stream;
      std::size_t max_send = 0, max_recv = 0;
      for (auto const& s : sizes) {
        std::vector<std::size_t> recv(static_cast<std::size_t>(n));
        for (std::size_t q = 0; q < recv.size(); ++q) recv[q] = s[q][r];
        max_send = std::max(max_send, row_sum(s[r]));
        max_recv = std::max(max_recv, row_sum(recv));
      }
      DeviceBuffer<std::uint8_t> send(max_send), recv(max_recv);  // empty (nullptr) on an idle rank
      for (int c = 0; c < kCalls; ++c) {
        auto const& s = sizes[static_cast<std::size_t>(c)];
        std::vector<std::size_t> send_bytes = s[r], recv_bytes(static_cast<std::size_t>(n));
        for (std::size_t q = 0; q < recv_bytes.size(); ++q) recv_bytes[q] = s[q][r];
        make_late(rank, static_cast<std::uint64_t>(c), stream.s);  // peers must wait for what follows
        fill_pattern(send.data(), row_sum(send_bytes), seed, static_cast<std::uint64_t>(c), rank, stream.s);
        if (max_recv > 0) EPX_CUDA_CHECK(cudaMemsetAsync(recv.data(), 0xcd, max_recv, stream.s));
        comm.all_to_all_v(send.data(), send_bytes, recv.data(), recv_bytes, stream.ref());
        // Reusing the send buffer at once must not corrupt what the peers receive (phase B).
        if (max_send > 0) EPX_CUDA_CHECK(cudaMemsetAsync(send.data(), 0xee, max_send, stream.s));
        stream.sync();  // only this rank's stream
        got[static_cast<std::size_t>(c)][r] = to_host(recv.data(), row_sum(recv_bytes));
      }
    });
    for (int c = 0; c < kCalls; ++c)
      for (int rank = 0; rank < n; ++rank) {
        CAPTURE(c);
        CAPTURE(rank);
        auto const want =
            expected_all_to_all_v(sizes[static_cast<std::size_t>(c)], rank, seed, static_cast<std::uint64_t>(c));
        CHECK(first_mismatch(got[static_cast<std::size_t>(c)][static_cast<std::size_t>(rank)], want) == -1);
      }
  }
}

TEST_CASE("CudaLocalGroup::all_to_all and all_gather[cuda]: fixed-size blocks, zero bytes included") {
  EPX_TEST_SEEDED_RNG(rng);
  for (Config const& config : configs()) {
    CAPTURE(describe(config));
    int const n = config.num_ranks;
    auto const un = static_cast<std::size_t>(n);
    std::uint64_t const seed = rng();
    std::vector<std::size_t> const block_sizes{1003, 0, 1, 65536 + 5};
    // [call][rank]: call 2b is all_to_all, 2b+1 all_gather
    std::vector<std::vector<std::vector<std::uint8_t>>> got(2 * block_sizes.size(),
                                                            std::vector<std::vector<std::uint8_t>>(un));
    CudaLocalGroup group(n, {.timeout = 30s, .devices = config.devices});
    group.run([&](int rank, Communicator& comm) {
      Stream stream;
      std::size_t const max_b = *std::max_element(block_sizes.begin(), block_sizes.end());
      DeviceBuffer<std::uint8_t> send(max_b * un), recv(max_b * un);
      for (std::size_t i = 0; i < block_sizes.size(); ++i) {
        std::size_t const b = block_sizes[i];
        for (std::uint64_t call : {2 * i, 2 * i + 1}) {
          bool const gather = call % 2 == 1;
          std::size_t const send_bytes = gather ? b : b * un;
          make_late(rank, call, stream.s);
          fill_pattern(send.data(), send_bytes, seed, call, rank, stream.s);
          EPX_CUDA_CHECK(cudaMemsetAsync(recv.data(), 0xcd, max_b * un, stream.s));
          if (gather)
            comm.all_gather(send.data(), recv.data(), b, stream.ref());
          else
            comm.all_to_all(send.data(), recv.data(), b, stream.ref());
          EPX_CUDA_CHECK(cudaMemsetAsync(send.data(), 0xee, max_b * un, stream.s));
          stream.sync();
          got[call][static_cast<std::size_t>(rank)] = to_host(recv.data(), b * un);
        }
      }
    });
    for (std::size_t i = 0; i < block_sizes.size(); ++i)
      for (int rank = 0; rank < n; ++rank) {
        std::size_t const b = block_sizes[i];
        CAPTURE(b);
        CAPTURE(rank);
        std::vector<std::uint8_t> want_a2a, want_gather;
        for (std::size_t q = 0; q < un; ++q)
          for (std::size_t j = 0; j < b; ++j) {
            want_a2a.push_back(pattern(seed, 2 * i, q, static_cast<std::size_t>(rank) * b + j));
            want_gather.push_back(pattern(seed, 2 * i + 1, q, j));
          }
        CHECK(first_mismatch(got[2 * i][static_cast<std::size_t>(rank)], want_a2a) == -1);
        CHECK(first_mismatch(got[2 * i + 1][static_cast<std::size_t>(rank)], want_gather) == -1);
      }
  }
}

TEST_CASE_TEMPLATE("CudaLocalGroup::all_reduce_sum[cuda]: bitwise the host rank-order fp32 sum on every rank", T, float,
                   bfloat16, epx::half, std::int32_t, std::int64_t) {
  EPX_TEST_SEEDED_RNG(rng);
  // Growing, then empty, then smaller again: the scratch grows twice and is reused.
  std::size_t const big = test::pick_size<std::size_t>(300'001, 30'001);  // sanitizer runs: smaller
  std::vector<std::size_t> const counts{1, 1000, big, 0, 4096, big};
  for (Config const& config : configs()) {
    CAPTURE(describe(config));
    int const n = config.num_ranks;
    auto const un = static_cast<std::size_t>(n);
    std::vector<std::vector<std::vector<T>>> inputs(counts.size());  // [call][rank][i]
    for (std::size_t c = 0; c < counts.size(); ++c)
      for (int r = 0; r < n; ++r) inputs[c].push_back(random_inputs<T>(counts[c], rng));
    std::vector<std::vector<std::vector<T>>> got(counts.size(), std::vector<std::vector<T>>(un));
    CudaLocalGroup group(n, {.timeout = 30s, .devices = config.devices});
    group.run([&](int rank, Communicator& comm) {
      auto const r = static_cast<std::size_t>(rank);
      Stream stream;
      std::size_t const max_count = *std::max_element(counts.begin(), counts.end());
      DeviceBuffer<T> data(max_count);
      for (std::size_t c = 0; c < counts.size(); ++c) {
        DeviceBuffer<T> source(counts[c]);
        upload(source.data(), inputs[c][r], stream.s);
        EPX_CUDA_CHECK(cudaMemsetAsync(data.data(), 0xff, max_count * sizeof(T), stream.s));  // NaN / -1 poison
        make_late(rank, c, stream.s);
        if (counts[c] > 0)
          EPX_CUDA_CHECK(
              cudaMemcpyAsync(data.data(), source.data(), counts[c] * sizeof(T), cudaMemcpyDeviceToDevice, stream.s));
        comm.all_reduce_sum(counts[c] > 0 ? data.data() : nullptr, counts[c], dtype_of_v<T>, stream.ref());
        stream.sync();
        got[c][r] = to_host(data.data(), counts[c]);
      }
    });
    for (std::size_t c = 0; c < counts.size(); ++c) {
      CAPTURE(counts[c]);
      auto const want = rank_order_sum(inputs[c]);
      for (int rank = 0; rank < n; ++rank) {
        CAPTURE(rank);
        CHECK(first_mismatch(got[c][static_cast<std::size_t>(rank)], want) == -1);
      }
    }
  }
}

TEST_CASE("CudaLocalGroup::collectives[cuda]: a 1-rank group's collectives capture in a CUDA graph") {
  // A one-rank group is how a single-GPU runtime (and the AllGather layer at ep = 1) uses epx in a
  // CUDA graph: after an eager warm-up (which sizes the scratch and checks the stream's device),
  // every collective must capture -- no allocation, no synchronisation, no query a driver refuses
  // during capture -- and each replay must give the eager result.
  EPX_TEST_SEEDED_RNG(rng);
  std::size_t const count = 1000;
  auto const input = random_inputs<float>(count, rng);
  std::vector<std::size_t> const sizes{count * sizeof(float)};
  std::vector<float> eager, replayed;
  CudaLocalGroup group(1, {.timeout = 30s});
  group.run([&](int, Communicator& comm) {
    Stream stream;
    DeviceBuffer<float> source(count), data(count), gathered(count), exchanged(count);
    upload(source.data(), input, stream.s);
    auto collectives = [&] {
      EPX_CUDA_CHECK(
          cudaMemcpyAsync(data.data(), source.data(), count * sizeof(float), cudaMemcpyDeviceToDevice, stream.s));
      comm.all_reduce_sum(data.data(), count, DType::kF32, stream.ref());
      comm.all_gather(data.data(), gathered.data(), count * sizeof(float), stream.ref());
      comm.all_to_all_v(gathered.data(), sizes, exchanged.data(), sizes, stream.ref());
      comm.barrier(stream.ref());
    };
    collectives();  // eager warm-up
    stream.sync();
    eager = to_host(exchanged.data(), count);
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    EPX_CUDA_CHECK(cudaStreamBeginCapture(stream.s, cudaStreamCaptureModeGlobal));
    collectives();
    EPX_CUDA_CHECK(cudaStreamEndCapture(stream.s, &graph));
    EPX_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    EPX_CUDA_CHECK(cudaMemsetAsync(exchanged.data(), 0xff, count * sizeof(float), stream.s));  // NaN poison
    for (int replay = 0; replay < 3; ++replay) EPX_CUDA_CHECK(cudaGraphLaunch(exec, stream.s));
    stream.sync();
    replayed = to_host(exchanged.data(), count);
    EPX_CUDA_CHECK(cudaGraphExecDestroy(exec));
    EPX_CUDA_CHECK(cudaGraphDestroy(graph));
  });
  CHECK(first_mismatch(eager, input) == -1);  // one rank: every collective is the identity
  CHECK(first_mismatch(replayed, eager) == -1);
}

TEST_CASE("CudaLocalGroup::reserve[cuda]: all_reduce_sum within the reservation allocates nothing") {
  EPX_TEST_SEEDED_RNG(rng);
  int const n = 4;
  std::size_t const max_count = 1 << 20;
  std::vector<std::vector<float>> inputs;
  for (int r = 0; r < n; ++r) inputs.push_back(random_inputs<float>(max_count, rng));
  auto const want = rank_order_sum(inputs);
  CudaLocalGroup group(n, {.timeout = 30s});
  group.reserve(max_count * sizeof(float));
  std::vector<std::vector<float>> got(n);
  std::vector<std::size_t> free_before(n), free_after(n);
  group.run([&](int rank, Communicator& comm) {
    auto const r = static_cast<std::size_t>(rank);
    Stream stream;
    DeviceBuffer<float> source(max_count), data(max_count);
    upload(source.data(), inputs[r], stream.s);
    auto reduce = [&](std::size_t count) {
      EPX_CUDA_CHECK(
          cudaMemcpyAsync(data.data(), source.data(), count * sizeof(float), cudaMemcpyDeviceToDevice, stream.s));
      comm.all_reduce_sum(data.data(), count, DType::kF32, stream.ref());
    };
    reduce(max_count);           // warm-up: lazily loaded kernels take device memory on first launch
    comm.barrier(stream.ref());  // every rank's buffers and warm-up done before measuring
    stream.sync();
    std::size_t total = 0;
    EPX_CUDA_CHECK(cudaMemGetInfo(&free_before[r], &total));
    for (std::size_t count : {std::size_t{17}, max_count / 2, max_count}) reduce(count);
    comm.barrier(stream.ref());
    stream.sync();
    EPX_CUDA_CHECK(cudaMemGetInfo(&free_after[r], &total));
    comm.barrier(stream.ref());  // every rank has measured before any frees its buffers
    stream.sync();
    got[r] = to_host(data.data(), max_count);
  });
  for (int rank = 0; rank < n; ++rank) {
    CAPTURE(rank);
    CHECK(first_mismatch(got[static_cast<std::size_t>(rank)], want) == -1);
  }
  CHECK(free_after[0] == free_before[0]);
}

TEST_CASE("CudaLocalGroup::barrier[cuda]: orders every rank's stream after every rank's earlier work") {
  for (Config const& config : configs()) {
    CAPTURE(describe(config));
    int const n = config.num_ranks;
    auto const un = static_cast<std::size_t>(n);
    int const kCalls = 6;
    std::vector<std::int32_t*> flags(un);  // rank q's flags, one slot per call, on q's device
    std::vector<std::vector<std::int32_t>> got(un);
    CudaLocalGroup group(n, {.timeout = 30s, .devices = config.devices});
    group.run([&](int rank, Communicator& comm) {
      auto const r = static_cast<std::size_t>(rank);
      Stream stream;
      DeviceBuffer<std::int32_t> mine(kCalls), seen(kCalls * un);
      EPX_CUDA_CHECK(cudaMemsetAsync(mine.data(), 0, mine.size() * sizeof(std::int32_t), stream.s));
      EPX_CUDA_CHECK(cudaMemsetAsync(seen.data(), 0, seen.size() * sizeof(std::int32_t), stream.s));
      flags[r] = mine.data();
      comm.barrier(stream.ref());  // its host rendezvous publishes every rank's flag pointer
      for (int c = 0; c < kCalls; ++c) {
        make_late(rank, static_cast<std::uint64_t>(c), stream.s);
        set_flag_kernel<<<1, 1, 0, stream.s>>>(mine.data() + c, 1000 * (c + 1) + rank);
        EPX_CUDA_CHECK_LAUNCH(set_flag_kernel);
        comm.barrier(stream.ref());
        for (std::size_t q = 0; q < un; ++q)  // read every peer's flag of this call, after the barrier
          EPX_CUDA_CHECK(cudaMemcpyPeerAsync(seen.data() + static_cast<std::size_t>(c) * un + q, group.device(rank),
                                             flags[q] + c, group.device(static_cast<int>(q)), sizeof(std::int32_t),
                                             stream.s));
      }
      comm.barrier(stream.ref());  // nobody frees its flags while a peer may still read them
      stream.sync();
      got[r] = seen.to_host();
    });
    for (int rank = 0; rank < n; ++rank)
      for (int c = 0; c < kCalls; ++c)
        for (int q = 0; q < n; ++q) {
          CAPTURE(rank);
          CAPTURE(c);
          CAPTURE(q);
          CHECK(got[static_cast<std::size_t>(rank)][static_cast<std::size_t>(c * n + q)] == 1000 * (c + 1) + q);
        }
  }
}

TEST_CASE("CudaLocalGroup::collectives[cuda]: many calls in a row reuse the events, one sync at the end") {
  EPX_TEST_SEEDED_RNG(rng);
  int const kCalls = 40;
  std::size_t const kCount = 777;  // all_reduce_sum elements per call
  std::size_t const kBlock = 333;  // all_gather bytes per rank per call
  for (Config const& config : configs()) {
    CAPTURE(describe(config));
    int const n = config.num_ranks;
    auto const un = static_cast<std::size_t>(n);
    std::vector<std::vector<std::vector<std::size_t>>> sizes;
    for (int c = 0; c < kCalls; ++c) sizes.push_back(random_sizes(n, rng));
    std::vector<std::vector<float>> reduce_in(un);  // [rank][call * kCount + i]
    for (auto& v : reduce_in) v = random_inputs<float>(kCalls * kCount, rng);
    std::uint64_t const seed = rng();
    struct Seen {
      std::vector<std::uint8_t> a2a, gather;
      std::vector<float> reduced;
    };
    std::vector<Seen> got(un);
    std::vector<std::vector<std::size_t>> recv_offsets(un);  // [rank][call]: where the call's a2a landed
    CudaLocalGroup group(n, {.timeout = 30s, .devices = config.devices});
    group.run([&](int rank, Communicator& comm) {
      auto const r = static_cast<std::size_t>(rank);
      Stream stream;
      std::size_t max_send = 0, total_recv = 0;
      for (auto const& s : sizes) {
        max_send = std::max(max_send, row_sum(s[r]));
        for (std::size_t q = 0; q < un; ++q) total_recv += s[q][r];
      }
      DeviceBuffer<std::uint8_t> send(std::max(max_send, kBlock)), recv(total_recv), gathered(kCalls * kBlock * un);
      DeviceBuffer<float> reduce_src(reduce_in[r].size()), reduced(kCalls * kCount);
      upload(reduce_src.data(), reduce_in[r], stream.s);
      std::size_t recv_at = 0;
      for (int c = 0; c < kCalls; ++c) {
        auto const call = static_cast<std::uint64_t>(c);
        auto const& s = sizes[static_cast<std::size_t>(c)];
        std::vector<std::size_t> send_bytes = s[r], recv_bytes(un);
        for (std::size_t q = 0; q < un; ++q) recv_bytes[q] = s[q][r];
        make_late(rank, call, stream.s);
        fill_pattern(send.data(), row_sum(send_bytes), seed, 2 * call, rank, stream.s);
        recv_offsets[r].push_back(recv_at);
        comm.all_to_all_v(send.data(), send_bytes, recv.data() + recv_at, recv_bytes, stream.ref());
        recv_at += row_sum(recv_bytes);
        fill_pattern(send.data(), kBlock, seed, 2 * call + 1, rank, stream.s);  // overwrites a2a's send at once
        comm.all_gather(send.data(), gathered.data() + call * kBlock * un, kBlock, stream.ref());
        float* const slice = reduced.data() + call * kCount;
        EPX_CUDA_CHECK(cudaMemcpyAsync(slice, reduce_src.data() + call * kCount, kCount * sizeof(float),
                                       cudaMemcpyDeviceToDevice, stream.s));
        comm.all_reduce_sum(slice, kCount, DType::kF32, stream.ref());
        comm.barrier(stream.ref());
        EPX_CUDA_CHECK(cudaMemsetAsync(send.data(), 0xee, send.size(), stream.s));
      }
      stream.sync();
      got[r] = {recv.to_host(), gathered.to_host(), reduced.to_host()};
    });
    for (int rank = 0; rank < n; ++rank) {
      auto const r = static_cast<std::size_t>(rank);
      CAPTURE(rank);
      for (int c = 0; c < kCalls; ++c) {
        CAPTURE(c);
        auto const call = static_cast<std::uint64_t>(c);
        auto const want = expected_all_to_all_v(sizes[static_cast<std::size_t>(c)], rank, seed, 2 * call);
        std::vector<std::uint8_t> const a2a(
            got[r].a2a.begin() + static_cast<std::ptrdiff_t>(recv_offsets[r][static_cast<std::size_t>(c)]),
            got[r].a2a.begin() +
                static_cast<std::ptrdiff_t>(recv_offsets[r][static_cast<std::size_t>(c)] + want.size()));
        CHECK(first_mismatch(a2a, want) == -1);
        std::vector<std::uint8_t> want_gather;
        for (std::size_t q = 0; q < un; ++q)
          for (std::size_t j = 0; j < kBlock; ++j) want_gather.push_back(pattern(seed, 2 * call + 1, q, j));
        std::vector<std::uint8_t> const gather(
            got[r].gather.begin() + static_cast<std::ptrdiff_t>(call * kBlock * un),
            got[r].gather.begin() + static_cast<std::ptrdiff_t>((call + 1) * kBlock * un));
        CHECK(first_mismatch(gather, want_gather) == -1);
        std::vector<std::vector<float>> slices;
        for (std::size_t q = 0; q < un; ++q)
          slices.emplace_back(reduce_in[q].begin() + static_cast<std::ptrdiff_t>(call * kCount),
                              reduce_in[q].begin() + static_cast<std::ptrdiff_t>((call + 1) * kCount));
        std::vector<float> const reduced(got[r].reduced.begin() + static_cast<std::ptrdiff_t>(call * kCount),
                                         got[r].reduced.begin() + static_cast<std::ptrdiff_t>((call + 1) * kCount));
        CHECK(first_mismatch(reduced, rank_order_sum(slices)) == -1);
      }
    }
  }
}

TEST_CASE("CudaLocalGroup::collectives[cuda]: a host stream is refused and aborts the group") {
  CudaLocalGroup group(2, {.timeout = 30s});
  float* none = nullptr;
  CHECK_THROWS_WITH_AS(
      group.communicator(0).all_reduce_sum(none, 0, DType::kF32, StreamRef::host()),
      doctest::Contains("CudaLocalGroup: rank 0: all_reduce_sum: stream = StreamRef::host(), expected a "
                        "CUDA stream"),
      Error);
  CHECK(group.aborted());  // so the peer does not wait for the full timeout
  Stream stream;
  CHECK_THROWS_AS(group.communicator(1).barrier(stream.ref()), Error);
}

TEST_CASE("CudaLocalGroup::CudaLocalGroup[cuda]: arguments, devices and memory space") {
  CHECK_THROWS_WITH_AS(CudaLocalGroup(0), doctest::Contains("CudaLocalGroup: num_ranks = 0, expected >= 1"), Error);
  CHECK_THROWS_WITH_AS(CudaLocalGroup(2, {.timeout = 0ms}), doctest::Contains("options.timeout (ms) = 0, expected > 0"),
                       Error);
  CHECK_THROWS_WITH_AS(CudaLocalGroup(2, {.devices = {0}}), doctest::Contains("options.devices.size() = 1, expected 2"),
                       Error);
  int const count = device_count();
  std::string const out_of_range = fmt::format("options.devices[1] = {}, expected in [0, {})", count, count);
  CHECK_THROWS_WITH_AS(CudaLocalGroup(2, {.devices = {0, count}}), doctest::Contains(out_of_range.c_str()), Error);
  int current = -1;
  EPX_CUDA_CHECK(cudaGetDevice(&current));
  CudaLocalGroup group(3);
  CHECK(group.size() == 3);
  for (int r = 0; r < 3; ++r) {
    CHECK(group.device(r) == current);
    CHECK(group.communicator(r).rank() == r);
    CHECK(group.communicator(r).size() == 3);
    CHECK(group.communicator(r).memory_space() == MemorySpace::kDevice);
  }
  CHECK_THROWS_WITH_AS((void)group.device(3), doctest::Contains("CudaLocalGroup::device: rank = 3, expected in [0, 3)"),
                       Error);
  CHECK_THROWS_WITH_AS((void)group.communicator(-1), doctest::Contains("rank = -1, expected in [0, 3)"), Error);
  CHECK(!group.aborted());
}

TEST_CASE("CudaLocalGroup::collectives[cuda]: a stream of another device is refused (several devices only)") {
  if (device_count() < 2) return;  // nothing to test on one device
  CudaLocalGroup group(2, {.timeout = 30s, .devices = {0, 1}});
  EPX_CUDA_CHECK(cudaSetDevice(0));
  Stream on_device0;
  auto const out = test::run_recording<test::CudaBackend>(
      group, [&](int rank, Communicator& comm, test::CudaBackend::Rank const& own) {
        comm.barrier(rank == 1 ? on_device0.ref() : own.comm_stream());
      });
  CHECK(out.codes[1] == Errc::kInvalidArgument);
  CHECK(out.messages[1].find("stream is on device 0, expected device 1") != std::string::npos);
  CHECK(out.codes[0] == Errc::kPeerFailed);
}
