// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

// One (shape, T, routing) case of the expert-GEMM benchmarks and its in-process baselines (dense
// cuBLAS, cuBLAS grouped, a cuBLAS loop), shared by gemm_bench.cu and cutlass_bench.cu so that both
// measure against the same references.

#include "bench_common.cuh"
#include "device_random.cuh"

#include <epx/cuda.cuh>

#include <benchmark/benchmark.h>
#include <cublas_v2.h>

#include <cmath>
#include <map>
#include <numeric>
#include <span>
#include <string>
#include <vector>

namespace {

using namespace epx::bench;
using epx::bfloat16;

// Every expert's weights of one shape, allocated once per process (DeepSeek-V3: 22 GB).
struct ExpertWeightsOnDevice {
  bfloat16* gate_up;  // [E, 2I, H]
  bfloat16* down;     // [E, H, I]
};

ExpertWeightsOnDevice const& weights_of(Shape const& shape) {
  static std::map<std::string, ExpertWeightsOnDevice> cache;
  auto it = cache.find(shape.name);
  if (it == cache.end()) {
    std::size_t const e = shape.num_experts, h = shape.hidden, i = shape.intermediate;
    it = cache
             .emplace(shape.name, ExpertWeightsOnDevice{random_device(e * 2 * i * h, 11, 1.0f / std::sqrt(float(h))),
                                                        random_device(e * h * i, 12, 1.0f / std::sqrt(float(i)))})
             .first;
  }
  return it->second;
}

#define BENCH_CUBLAS(call) EPX_CUBLAS_CHECK(call)

// Rows per expert from real routing, and the buffers of one (shape, T, routing) case.
struct GemmCase {
  Shape shape;
  int t;
  cudaStream_t s{};
  cublasHandle_t blas{};
  std::vector<std::int32_t> offsets;  // [E + 1], host copy (baselines only: epx reads the device copy)
  std::int32_t* d_offsets{};
  std::int64_t rows{};
  int touched{};  // experts with at least one row
  double skew{};
  bfloat16 *x{}, *act{}, *h{}, *out{};
  std::byte* ws{};
  std::size_t ws_bytes{};
  ExpertWeightsOnDevice w;

  GemmCase(Shape sh, int tokens, bool zipf) : shape(sh), t(tokens), w(weights_of(sh)) {
    std::mt19937_64 rng(2026);
    auto const ids = make_ids(t, shape.top_k, shape.num_experts, zipf, rng);
    skew = max_over_mean(ids, shape.num_experts);
    std::vector<std::int32_t> counts(static_cast<std::size_t>(shape.num_experts));
    for (auto id : ids) ++counts[static_cast<std::size_t>(id)];
    offsets.assign(counts.size() + 1, 0);
    std::partial_sum(counts.begin(), counts.end(), offsets.begin() + 1);
    rows = offsets.back();
    touched = static_cast<int>(std::count_if(counts.begin(), counts.end(), [](int c) { return c > 0; }));
    d_offsets = device_copy(offsets);
    std::size_t const r = static_cast<std::size_t>(rows), hh = shape.hidden, ii = shape.intermediate;
    x = random_device(r * hh, 21, 1.0f);
    act = random_device(r * ii, 22, 1.0f);
    h = device_alloc<bfloat16>(r * 2 * ii);
    out = device_alloc<bfloat16>(r * hh);
    ws_bytes = epx::cuda_expert_mlp_workspace_bytes<bfloat16>(mlp(), rows);
    ws = device_alloc<std::byte>(ws_bytes);
    BENCH_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    BENCH_CUBLAS(cublasCreate(&blas));
    BENCH_CUBLAS(cublasSetStream(blas, s));
  }
  ~GemmCase() {
    for (void* p : std::initializer_list<void*>{d_offsets, x, act, h, out, ws}) (void)cudaFree(p);
    (void)cublasDestroy(blas);
    (void)cudaStreamDestroy(s);
  }
  [[nodiscard]] epx::ExpertMlpConfig mlp() const {
    return {.hidden = shape.hidden, .intermediate = shape.intermediate};
  }
  [[nodiscard]] epx::ExpertWeights weights() const {
    return epx::expert_weights<bfloat16>(shape.num_experts, w.gate_up, w.down);
  }
  [[nodiscard]] std::span<std::int32_t const> device_offsets() const { return {d_offsets, offsets.size()}; }

  // c[rows, n] = a[rows, k] · b[n, k]ᵀ as one dense cuBLAS call (column-major: cᵀ = b · aᵀ).
  void dense(bfloat16 const* a, bfloat16 const* b, bfloat16* c, int n, int k, int m) const {
    float const one = 1.0f, zero = 0.0f;
    BENCH_CUBLAS(cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, n, m, k, &one, b, CUDA_R_16BF, k, a, CUDA_R_16BF, k,
                              &zero, c, CUDA_R_16BF, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  }
  // One cublasGemmEx per expert with rows.
  void loop(bfloat16 const* a, bfloat16 const* b, bfloat16* c, int n, int k) const {
    for (int e = 0; e < shape.num_experts; ++e) {
      int const m = offsets[e + 1] - offsets[e];
      if (m > 0)
        dense(a + std::int64_t{offsets[e]} * k, b + std::int64_t{e} * n * k, c + std::int64_t{offsets[e]} * n, n, k, m);
    }
  }
  // cublasGemmGroupedBatchedEx over the experts with rows; pointer arrays built once (capturable).
  struct Grouped {
    std::vector<int> m, n, k, lda, ldb, ldc, size;
    std::vector<float> alpha, beta;
    std::vector<cublasOperation_t> ta, tb;
    void const** ptrs{};
    int groups{};
  };
  Grouped grouped(bfloat16 const* a, bfloat16 const* b, bfloat16* c, int n, int k) const {
    Grouped g;
    std::vector<void const*> pa, pb, pc;
    for (int e = 0; e < shape.num_experts; ++e) {
      int const m = offsets[e + 1] - offsets[e];
      if (m == 0) continue;
      pa.push_back(b + std::int64_t{e} * n * k);
      pb.push_back(a + std::int64_t{offsets[e]} * k);
      pc.push_back(c + std::int64_t{offsets[e]} * n);
      g.m.push_back(n), g.n.push_back(m), g.k.push_back(k), g.lda.push_back(k), g.ldb.push_back(k), g.ldc.push_back(n);
      g.size.push_back(1), g.alpha.push_back(1.0f), g.beta.push_back(0.0f);
      g.ta.push_back(CUBLAS_OP_T), g.tb.push_back(CUBLAS_OP_N);
    }
    g.groups = static_cast<int>(pa.size());
    pa.insert(pa.end(), pb.begin(), pb.end());
    pa.insert(pa.end(), pc.begin(), pc.end());
    g.ptrs = device_copy(pa);
    return g;
  }
  void run(Grouped const& g) const {
    BENCH_CUBLAS(cublasGemmGroupedBatchedEx(blas, g.ta.data(), g.tb.data(), g.m.data(), g.n.data(), g.k.data(),
                                            g.alpha.data(), g.ptrs, CUDA_R_16BF, g.lda.data(), g.ptrs + g.groups,
                                            CUDA_R_16BF, g.ldb.data(), g.beta.data(),
                                            const_cast<void* const*>(g.ptrs + 2 * g.groups), CUDA_R_16BF, g.ldc.data(),
                                            g.groups, g.size.data(), CUBLAS_COMPUTE_32F));
  }
};

void set_counters(benchmark::State& state, GemmCase const& c, double us, double flops, double bytes, double dense_us,
                  double grouped_us, double loop_us) {
  state.counters["us"] = us;
  state.counters["tflops"] = flops / (us * 1e-6) / 1e12;
  state.counters["tc_ratio"] = dense_us / us;
  state.counters["dense_tflops"] = flops / (dense_us * 1e-6) / 1e12;
  state.counters["hbm_ratio"] = bytes / (us * 1e-6) / copy_bandwidth();
  state.counters["vs_cublas_grouped"] = grouped_us / us;
  if (loop_us > 0) state.counters["vs_cublas_loop"] = loop_us / us;
  state.counters["rows"] = static_cast<double>(c.rows);
  state.counters["max_over_mean"] = c.skew;
}

}  // namespace
