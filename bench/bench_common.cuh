// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

// What every epx benchmark shares: the model shapes and token counts of ../shared/PERFORMANCE.md,
// device buffers, the copy bandwidth measured in-process, routing ids (uniform or Zipf), and the
// timing of a call captured in a CUDA graph (or, for calls that synchronise, timed eagerly).

#include <epx/cuda/error.hpp>

#include <benchmark/benchmark.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <string_view>
#include <vector>

namespace epx::bench {

#define BENCH_CHECK(call) EPX_CUDA_CHECK(call)

struct Shape {
  char const* name;
  int hidden, num_experts, top_k;
  int intermediate;
  bool deepseek;  // sigmoid + bias, 8 groups, top-4 groups
};
inline constexpr Shape kShapes[] = {{"qwen3-30b-a3b", 2048, 128, 8, 768, false},
                                    {"mixtral-8x7b", 4096, 8, 2, 14336, false},
                                    {"gpt-oss-120b", 2880, 128, 4, 2880, false},
                                    {"deepseek-v3", 7168, 256, 8, 2048, true}};
inline constexpr int kTokens[] = {128, 4096, 16384};

template <class T>
T* device_alloc(std::size_t n) {
  T* p = nullptr;
  BENCH_CHECK(cudaMalloc(&p, std::max<std::size_t>(n, 1) * sizeof(T)));
  return p;
}

template <class T>
T* device_copy(std::vector<T> const& v) {
  T* p = device_alloc<T>(v.size());
  BENCH_CHECK(cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  return p;
}

// Device-to-device copy bandwidth (read + write), bytes per second, measured once.
inline double copy_bandwidth() {
  static double const bw = [] {
    std::size_t const bytes = std::size_t{1} << 30;
    void *a = device_alloc<std::byte>(bytes), *b = device_alloc<std::byte>(bytes);
    cudaEvent_t start, stop;
    BENCH_CHECK(cudaEventCreate(&start));
    BENCH_CHECK(cudaEventCreate(&stop));
    BENCH_CHECK(cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice));
    std::vector<float> ms;
    for (int i = 0; i < 10; ++i) {
      BENCH_CHECK(cudaEventRecord(start));
      BENCH_CHECK(cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice));
      BENCH_CHECK(cudaEventRecord(stop));
      BENCH_CHECK(cudaEventSynchronize(stop));
      float t = 0;
      BENCH_CHECK(cudaEventElapsedTime(&t, start, stop));
      ms.push_back(t);
    }
    std::sort(ms.begin(), ms.end());
    (void)cudaEventDestroy(start);
    (void)cudaEventDestroy(stop);
    BENCH_CHECK(cudaFree(a));
    BENCH_CHECK(cudaFree(b));
    return 2.0 * bytes / (ms[ms.size() / 2] * 1e-3);
  }();
  return bw;
}

// Routing ids: uniform, or Zipf(s) over experts (k distinct per token).
inline std::vector<std::int32_t> make_ids(int t, int k, int e, bool zipf, std::mt19937_64& rng) {
  std::vector<double> cdf(static_cast<std::size_t>(e));
  double acc = 0;
  for (int i = 0; i < e; ++i) cdf[static_cast<std::size_t>(i)] = (acc += zipf ? 1.0 / std::pow(i + 1, 1.2) : 1.0);
  std::uniform_real_distribution<double> u(0, acc);
  std::vector<std::int32_t> ids(static_cast<std::size_t>(t) * static_cast<std::size_t>(k));
  for (int tok = 0; tok < t; ++tok)
    for (int j = 0; j < k; ++j) {
      std::int32_t id;
      do {
        id = static_cast<std::int32_t>(std::lower_bound(cdf.begin(), cdf.end(), u(rng)) - cdf.begin());
      } while (std::find(ids.begin() + tok * k, ids.begin() + tok * k + j, id) != ids.begin() + tok * k + j);
      ids[static_cast<std::size_t>(tok * k + j)] = id;
    }
  return ids;
}

inline double max_over_mean(std::vector<std::int32_t> const& ids, int e) {
  std::vector<int> c(static_cast<std::size_t>(e));
  for (auto id : ids) ++c[static_cast<std::size_t>(id)];
  return *std::max_element(c.begin(), c.end()) / (static_cast<double>(ids.size()) / e);
}

// EPX_BENCH_QUICK=1 (the GPU check bundle, docs/gpu-bundle.md): every case, fewer timed calls, so that
// all shapes fit a short GPU session. The figures are noisier; the JSON context says which mode ran.
inline bool quick_mode() {
  static bool const quick = [] {
    char const* v = std::getenv("EPX_BENCH_QUICK");
    return v != nullptr && *v != '\0' && std::string_view(v) != "0";
  }();
  return quick;
}

// How many calls one timing takes and how many timings the median is of.
struct Repetitions {
  int calls, timings;
};
inline Repetitions repetitions() { return quick_mode() ? Repetitions{5, 3} : Repetitions{20, 7}; }

// Median microseconds per call of `body`, captured 20 times into one CUDA graph (5 in quick mode).
template <class Body>
double time_us(cudaStream_t s, Body&& body) {
  auto const [calls, timings] = repetitions();
  body();  // warm-up, and any lazy initialisation outside the capture
  BENCH_CHECK(cudaStreamSynchronize(s));
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  BENCH_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
  for (int i = 0; i < calls; ++i) body();
  BENCH_CHECK(cudaStreamEndCapture(s, &graph));
  BENCH_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  cudaEvent_t start, stop;
  BENCH_CHECK(cudaEventCreate(&start));
  BENCH_CHECK(cudaEventCreate(&stop));
  std::vector<float> ms;
  for (int rep = 0; rep < timings; ++rep) {
    BENCH_CHECK(cudaEventRecord(start, s));
    BENCH_CHECK(cudaGraphLaunch(exec, s));
    BENCH_CHECK(cudaEventRecord(stop, s));
    BENCH_CHECK(cudaEventSynchronize(stop));
    float t = 0;
    BENCH_CHECK(cudaEventElapsedTime(&t, start, stop));
    ms.push_back(t);
  }
  BENCH_CHECK(cudaGraphExecDestroy(exec));
  BENCH_CHECK(cudaGraphDestroy(graph));
  (void)cudaEventDestroy(start);
  (void)cudaEventDestroy(stop);
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2] * 1e3 / calls;
}

// Median microseconds per call of `body` run eagerly (for calls that synchronise, which a CUDA
// graph cannot hold): 20 calls between two events, 7 repetitions (quick mode: 5 and 3).
template <class Body>
double time_eager_us(cudaStream_t s, Body&& body) {
  auto const [calls, timings] = repetitions();
  body();
  BENCH_CHECK(cudaStreamSynchronize(s));
  cudaEvent_t start, stop;
  BENCH_CHECK(cudaEventCreate(&start));
  BENCH_CHECK(cudaEventCreate(&stop));
  std::vector<float> ms;
  for (int rep = 0; rep < timings; ++rep) {
    BENCH_CHECK(cudaEventRecord(start, s));
    for (int i = 0; i < calls; ++i) body();
    BENCH_CHECK(cudaEventRecord(stop, s));
    BENCH_CHECK(cudaEventSynchronize(stop));
    float t = 0;
    BENCH_CHECK(cudaEventElapsedTime(&t, start, stop));
    ms.push_back(t);
  }
  (void)cudaEventDestroy(start);
  (void)cudaEventDestroy(stop);
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2] * 1e3 / calls;
}

// The main of every benchmark: exits 1 with a message without a GPU, runs the registered
// benchmarks, turns an epx::Error into a message and exit code 1, and calls `before_exit` (e.g. to
// free cached weights while the CUDA runtime is still up).
template <class BeforeExit>
int run_benchmarks(int argc, char** argv, char const* name, BeforeExit&& before_exit) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    (void)cudaGetLastError();
    std::fprintf(stderr, "%s needs a CUDA GPU; none is visible\n", name);
    return 1;
  }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  auto const [calls, timings] = repetitions();
  benchmark::AddCustomContext("epx_repetitions", std::to_string(calls) + " calls per timing, median of " +
                                                     std::to_string(timings) +
                                                     (quick_mode() ? " (EPX_BENCH_QUICK)" : ""));
  try {
    benchmark::RunSpecifiedBenchmarks();
  } catch (epx::Error const& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
  before_exit();
  benchmark::Shutdown();
  return 0;
}

inline int run_benchmarks(int argc, char** argv, char const* name) {
  return run_benchmarks(argc, argv, name, [] {});
}

}  // namespace epx::bench
