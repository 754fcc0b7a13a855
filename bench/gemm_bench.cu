// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
//
// The expert GEMMs on the four model shapes x T in {128, 4096, 16384}, uniform and Zipf(1.2)
// routing, all experts on one GPU (ep = 1), bf16. Rows per expert come from real routing ids.
//   gemm1       gate_up with the SwiGLU epilogue fused: [rows, H] -> [rows, I]   (epx Grouped)
//   gemm2       down: [rows, I] -> [rows, H]                                    (epx Grouped)
//   expert_mlp  both, through expert_mlp(StreamRef, ...) (Grouped) and CublasGrouped
// Counters (../shared/PERFORMANCE.md):
//   us, tflops      median time per call (CUDA-graph replays; CublasGrouped eagerly: it syncs)
//   tc_ratio        dense cuBLAS time / epx time for the same FLOPs ([rows, N, K] in one cublasGemmEx,
//                   random data, measured in this process): the fraction of the dense rate reached
//   hbm_ratio       (weights of the experts that have rows + activations in and out) / time / copy bandwidth
//   vs_cublas_grouped  cublasGemmGroupedBatchedEx time / epx time (gemm1: without activation, so the
//                      baseline does less work; expert_mlp: the CublasGrouped policy, its sync included)
//   vs_cublas_loop  a loop of cublasGemmEx, one per expert with rows / epx time
// Output: --benchmark_format=json > bench/results/gemm-h100.json (see bench/README.md).

#include "bench_common.cuh"
#include "device_random.cuh"
#include "gemm_case.cuh"

#include <epx/cuda.cuh>

#include <benchmark/benchmark.h>
#include <cublas_v2.h>

#include <cstdio>
#include <map>
#include <numeric>
#include <string>
#include <vector>

namespace {

using namespace epx::bench;
using epx::bfloat16;

void bm_gemm1(benchmark::State& state, Shape shape, int t, bool zipf) {
  GemmCase c(shape, t, zipf);
  int const n = 2 * shape.intermediate, k = shape.hidden;
  auto const m = static_cast<int>(c.rows);
  // The expert MLP's first GEMM: gate_up with SwiGLU fused, [rows, H] -> [rows, I].
  auto args = epx::detail::linear_gemm_args<bfloat16, bfloat16>(
      epx::MatrixView<bfloat16 const>(c.x, c.rows, k),
      epx::BatchedMatrixView<bfloat16 const>{c.w.gate_up, shape.num_experts, n, k}, nullptr, c.device_offsets(),
      epx::MatrixView<bfloat16>(c.act, c.rows, shape.intermediate), nullptr);
  args.epilogue.concatenated = true;
  auto const g = c.grouped(c.x, c.w.gate_up, c.h, n, k);
  double const dense_us = time_us(c.s, [&] { c.dense(c.x, c.w.gate_up, c.h, n, k, m); });
  double const grouped_us = time_us(c.s, [&] { c.run(g); });
  double const loop_us = time_us(c.s, [&] { c.loop(c.x, c.w.gate_up, c.h, n, k); });
  double us = 0;
  for (auto _ : state) {
    us = time_us(c.s, [&] {
      epx::detail::run_grouped_gemm<epx::detail::EpilogueKind::kSwiGLU>(args, c.rows, {epx::StreamRef(c.s), "gemm1"},
                                                                        "gemm1");
    });
    state.SetIterationTime(us * 1e-6);
  }
  (void)cudaFree(g.ptrs);
  double const bytes = 2.0 * (double(c.touched) * n * k + double(m) * k + double(m) * shape.intermediate);
  set_counters(state, c, us, 2.0 * m * n * k, bytes, dense_us, grouped_us, loop_us);
}

void bm_gemm2(benchmark::State& state, Shape shape, int t, bool zipf) {
  GemmCase c(shape, t, zipf);
  int const n = shape.hidden, k = shape.intermediate;
  auto const m = static_cast<int>(c.rows);
  auto const g = c.grouped(c.act, c.w.down, c.out, n, k);
  double const dense_us = time_us(c.s, [&] { c.dense(c.act, c.w.down, c.out, n, k, m); });
  double const grouped_us = time_us(c.s, [&] { c.run(g); });
  double const loop_us = time_us(c.s, [&] { c.loop(c.act, c.w.down, c.out, n, k); });
  double us = 0;
  for (auto _ : state) {
    us = time_us(c.s, [&] {
      epx::grouped_gemm(epx::StreamRef(c.s), epx::MatrixView<bfloat16 const>(c.act, c.rows, k),
                        epx::BatchedMatrixView<bfloat16 const>{c.w.down, shape.num_experts, n, k}, nullptr,
                        c.device_offsets(), epx::MatrixView<bfloat16>(c.out, c.rows, n));
    });
    state.SetIterationTime(us * 1e-6);
  }
  (void)cudaFree(g.ptrs);
  double const bytes = 2.0 * (double(c.touched) * n * k + double(m) * k + double(m) * n);
  set_counters(state, c, us, 2.0 * m * n * k, bytes, dense_us, grouped_us, loop_us);
}

void bm_expert_mlp(benchmark::State& state, Shape shape, int t, bool zipf) {
  GemmCase c(shape, t, zipf);
  int const h = shape.hidden, i = shape.intermediate;
  auto const m = static_cast<int>(c.rows);
  double const dense_us = time_us(c.s, [&] {
    c.dense(c.x, c.w.gate_up, c.h, 2 * i, h, m);
    c.dense(c.act, c.w.down, c.out, h, i, m);
  });
  epx::detail::CudaCublasGroupedExperts cublas_experts;
  epx::Workspace const ws(c.ws, c.ws_bytes);
  std::size_t const cublas_ws_bytes = cublas_experts.workspace_bytes<bfloat16>(c.mlp(), c.shape.num_experts, c.rows);
  auto* cublas_ws = device_alloc<std::byte>(cublas_ws_bytes);
  double const cublas_us = time_eager_us(c.s, [&] {
    cublas_experts.run<bfloat16>({epx::StreamRef(c.s), "cublas_experts"}, c.mlp(), c.weights(),
                                 epx::MatrixView<bfloat16 const>(c.x, c.rows, h), c.device_offsets(),
                                 epx::MatrixView<bfloat16>(c.out, c.rows, h),
                                 epx::Workspace(cublas_ws, cublas_ws_bytes), c.rows);
  });
  double us = 0;
  for (auto _ : state) {
    us = time_us(c.s, [&] {
      epx::expert_mlp<bfloat16>(epx::StreamRef(c.s), c.mlp(), c.weights(),
                                epx::MatrixView<bfloat16 const>(c.x, c.rows, h), c.device_offsets(),
                                epx::MatrixView<bfloat16>(c.out, c.rows, h), ws);
    });
    state.SetIterationTime(us * 1e-6);
  }
  (void)cudaFree(cublas_ws);
  double const flops = 2.0 * m * (2.0 * i) * h + 2.0 * m * h * i;
  double const bytes = 2.0 * (double(c.touched) * 3.0 * i * h + 2.0 * double(m) * h + 2.0 * double(m) * i);
  set_counters(state, c, us, flops, bytes, dense_us, cublas_us, 0);
}

int register_all() {
  for (auto const& shape : kShapes)
    for (int t : kTokens)
      for (bool zipf : {false, true}) {
        std::string const name = std::string(shape.name) + "/T=" + std::to_string(t) + (zipf ? "/zipf1.2" : "/uniform");
        benchmark::RegisterBenchmark(("gemm1/" + name).c_str(), bm_gemm1, shape, t, zipf)
            ->UseManualTime()
            ->Iterations(1);
        benchmark::RegisterBenchmark(("gemm2/" + name).c_str(), bm_gemm2, shape, t, zipf)
            ->UseManualTime()
            ->Iterations(1);
        benchmark::RegisterBenchmark(("expert_mlp/" + name).c_str(), bm_expert_mlp, shape, t, zipf)
            ->UseManualTime()
            ->Iterations(1);
      }
  return 0;
}
int const registered = register_all();

}  // namespace

int main(int argc, char** argv) { return epx::bench::run_benchmarks(argc, argv, "gemm_bench"); }
