// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
//
// The CUTLASS Hopper path (CutlassGrouped, docs/cutlass.md) on gemm_bench's cases (the four model
// shapes x T in {128, 4096, 16384}, uniform and Zipf(1.2) routing, ep = 1, bf16), against the same
// in-process baselines, and against epx's own kernel in the same process:
//   cutlass_gemm2       down, [rows, I] -> [rows, H], cutlass_grouped_gemm with the tile the policy picks
//   cutlass_expert_mlp  GEMM 1 (fp32 h) + activation + GEMM 2 (cutlass_expert_mlp)
//   cutlass_switch/<shape>/rows_per_expert=<r>   the expert MLP at r rows per expert on epx's kernel and
//                       on CUTLASS with each tile (where Grouped should switch; Pingpong or Cooperative)
// Counters as gemm_bench's, plus vs_epx_grouped: epx's own kernel's time / CUTLASS's (expert_mlp:
// expert_mlp(StreamRef, ...) with Grouped; gemm2: grouped_gemm), and tile (0 Pingpong, 1 Cooperative).
// Built for sm_90a with epx::cutlass; on other devices every case is skipped with a message.

#include <epx/cuda/cutlass_grouped.cuh>
// CUTLASS's headers first (read under NDEBUG)
#include <epx/cuda.cuh>

#include "gemm_case.cuh"

namespace {

bool skip_unless_available(benchmark::State& state) {
  if (epx::cutlass_grouped_gemm_available()) return false;
  state.SkipWithError("the CUTLASS path needs an sm_90 GPU and sm_90a code");
  return true;
}

void bm_cutlass_gemm2(benchmark::State& state, Shape shape, int t, bool zipf) {
  if (skip_unless_available(state)) return;
  GemmCase c(shape, t, zipf);
  int const n = shape.hidden, k = shape.intermediate;
  auto const m = static_cast<int>(c.rows);
  auto const tile = epx::detail::cutlass_tile_for(
      epx::detail::policy_for<epx::detail::CutlassTilePolicy>(epx::detail::current_device_traits()), c.rows,
      shape.num_experts);
  std::size_t const ws_bytes = epx::cutlass_grouped_gemm_workspace_bytes<bfloat16, bfloat16>(shape.num_experts, tile);
  auto* ws = device_alloc<std::byte>(ws_bytes);
  auto const g = c.grouped(c.act, c.w.down, c.out, n, k);
  epx::MatrixView<bfloat16 const> const a(c.act, c.rows, k);
  epx::BatchedMatrixView<bfloat16 const> const b{c.w.down, shape.num_experts, n, k};
  double const dense_us = time_us(c.s, [&] { c.dense(c.act, c.w.down, c.out, n, k, m); });
  double const grouped_us = time_us(c.s, [&] { c.run(g); });
  double const loop_us = time_us(c.s, [&] { c.loop(c.act, c.w.down, c.out, n, k); });
  double const epx_us = time_us(c.s, [&] {
    epx::grouped_gemm(epx::StreamRef(c.s), a, b, nullptr, c.device_offsets(),
                      epx::MatrixView<bfloat16>(c.out, c.rows, n));
  });
  double us = 0;
  for (auto _ : state) {
    us = time_us(c.s, [&] {
      epx::cutlass_grouped_gemm<bfloat16, bfloat16>(epx::StreamRef(c.s), a, b, c.device_offsets(),
                                                    epx::MatrixView<bfloat16>(c.out, c.rows, n),
                                                    epx::Workspace(ws, ws_bytes), tile);
    });
    state.SetIterationTime(us * 1e-6);
  }
  (void)cudaFree(g.ptrs);
  (void)cudaFree(ws);
  double const bytes = 2.0 * (double(c.touched) * n * k + double(m) * k + double(m) * n);
  set_counters(state, c, us, 2.0 * m * n * k, bytes, dense_us, grouped_us, loop_us);
  state.counters["vs_epx_grouped"] = epx_us / us;
  state.counters["tile"] = static_cast<double>(tile);
}

void bm_cutlass_expert_mlp(benchmark::State& state, Shape shape, int t, bool zipf) {
  if (skip_unless_available(state)) return;
  GemmCase c(shape, t, zipf);
  int const h = shape.hidden, i = shape.intermediate;
  auto const m = static_cast<int>(c.rows);
  double const dense_us = time_us(c.s, [&] {
    c.dense(c.x, c.w.gate_up, c.h, 2 * i, h, m);
    c.dense(c.act, c.w.down, c.out, h, i, m);
  });
  std::size_t const ws_bytes =
      epx::cutlass_expert_mlp_workspace_bytes<bfloat16>(c.mlp(), shape.num_experts, c.rows, false);
  auto* ws = device_alloc<std::byte>(ws_bytes);
  epx::detail::CudaCublasGroupedExperts cublas_experts;
  std::size_t const cublas_ws_bytes = cublas_experts.workspace_bytes<bfloat16>(c.mlp(), shape.num_experts, c.rows);
  auto* cublas_ws = device_alloc<std::byte>(cublas_ws_bytes);
  double const cublas_us = time_eager_us(c.s, [&] {
    cublas_experts.run<bfloat16>({epx::StreamRef(c.s), "cublas_experts"}, c.mlp(), c.weights(),
                                 epx::MatrixView<bfloat16 const>(c.x, c.rows, h), c.device_offsets(),
                                 epx::MatrixView<bfloat16>(c.out, c.rows, h),
                                 epx::Workspace(cublas_ws, cublas_ws_bytes), c.rows);
  });
  double const epx_us = time_us(c.s, [&] {
    epx::expert_mlp<bfloat16>(epx::StreamRef(c.s), c.mlp(), c.weights(),
                              epx::MatrixView<bfloat16 const>(c.x, c.rows, h), c.device_offsets(),
                              epx::MatrixView<bfloat16>(c.out, c.rows, h), epx::Workspace(c.ws, c.ws_bytes));
  });
  double us = 0;
  for (auto _ : state) {
    us = time_us(c.s, [&] {
      epx::cutlass_expert_mlp<bfloat16>(
          epx::StreamRef(c.s), c.mlp(), c.weights(), epx::MatrixView<bfloat16 const>(c.x, c.rows, h),
          c.device_offsets(), epx::MatrixView<bfloat16>(c.out, c.rows, h), epx::Workspace(ws, ws_bytes), c.rows);
    });
    state.SetIterationTime(us * 1e-6);
  }
  (void)cudaFree(ws);
  (void)cudaFree(cublas_ws);
  double const flops = 2.0 * m * (2.0 * i) * h + 2.0 * m * h * i;
  double const bytes = 2.0 * (double(c.touched) * 3.0 * i * h + 2.0 * double(m) * h + 2.0 * double(m) * i);
  set_counters(state, c, us, flops, bytes, dense_us, cublas_us, 0);
  state.counters["vs_epx_grouped"] = epx_us / us;
}

// Where Grouped should switch kernels, and CUTLASS tiles (tuning.cuh: GroupedKernelPolicy's
// cutlass_min_rows_per_expert = 128 and CutlassTilePolicy's pingpong_rows = 128 are guesses between
// measured points 32 and 128): the expert MLP at r rows per expert on average (T = r * E / k, uniform
// routing) on epx's own kernel and on CUTLASS with each tile, in one process. ms-free counters:
// epx_us, pingpong_us, cooperative_us; us = the faster CUTLASS tile; vs_epx_grouped = epx_us / us.
void bm_cutlass_switch(benchmark::State& state, Shape shape, int rows_per_expert) {
  if (skip_unless_available(state)) return;
  int const t = rows_per_expert * shape.num_experts / shape.top_k;
  GemmCase c(shape, t, false);
  int const h = shape.hidden, i = shape.intermediate;
  std::size_t const ws_bytes =
      epx::cutlass_expert_mlp_workspace_bytes<bfloat16>(c.mlp(), shape.num_experts, c.rows, false);
  auto* ws = device_alloc<std::byte>(ws_bytes);
  epx::MatrixView<bfloat16 const> const x(c.x, c.rows, h);
  epx::MatrixView<bfloat16> const out(c.out, c.rows, h);
  double const epx_us = time_us(c.s, [&] {
    epx::expert_mlp<bfloat16>(epx::StreamRef(c.s), c.mlp(), c.weights(), x, c.device_offsets(), out,
                              epx::Workspace(c.ws, c.ws_bytes));
  });
  // cutlass_expert_mlp picks the tile from its rows_hint: 1 row gives Pingpong, "all rows many times
  // over" Cooperative (cutlass_tile_for).
  auto cutlass_us = [&](std::int64_t rows_hint) {
    return time_us(c.s, [&] {
      epx::cutlass_expert_mlp<bfloat16>(epx::StreamRef(c.s), c.mlp(), c.weights(), x, c.device_offsets(), out,
                                        epx::Workspace(ws, ws_bytes), rows_hint);
    });
  };
  double const pingpong_us = cutlass_us(1);
  double const cooperative_us = cutlass_us(std::int64_t{1} << 40);
  double const us = std::min(pingpong_us, cooperative_us);
  for (auto _ : state) state.SetIterationTime(us * 1e-6);
  (void)cudaFree(ws);
  double const m = static_cast<double>(c.rows);
  state.counters["us"] = us;
  state.counters["tflops"] = (2.0 * m * (2.0 * i) * h + 2.0 * m * h * i) / (us * 1e-6) / 1e12;
  state.counters["rows_per_expert"] = m / shape.num_experts;
  state.counters["epx_us"] = epx_us;
  state.counters["pingpong_us"] = pingpong_us;
  state.counters["cooperative_us"] = cooperative_us;
  state.counters["vs_epx_grouped"] = epx_us / us;
}

int register_all() {
  for (auto const& shape : kShapes)
    for (int r : {16, 32, 48, 64, 96, 128, 192, 256, 384})
      benchmark::RegisterBenchmark(
          ("cutlass_switch/" + std::string(shape.name) + "/rows_per_expert=" + std::to_string(r)).c_str(),
          bm_cutlass_switch, shape, r)
          ->UseManualTime()
          ->Iterations(1);
  for (auto const& shape : kShapes)
    for (int t : kTokens)
      for (bool zipf : {false, true}) {
        std::string const name = std::string(shape.name) + "/T=" + std::to_string(t) + (zipf ? "/zipf1.2" : "/uniform");
        benchmark::RegisterBenchmark(("cutlass_gemm2/" + name).c_str(), bm_cutlass_gemm2, shape, t, zipf)
            ->UseManualTime()
            ->Iterations(1);
        benchmark::RegisterBenchmark(("cutlass_expert_mlp/" + name).c_str(), bm_cutlass_expert_mlp, shape, t, zipf)
            ->UseManualTime()
            ->Iterations(1);
      }
  return 0;
}
int const registered = register_all();

}  // namespace

int main(int argc, char** argv) { return epx::bench::run_benchmarks(argc, argv, "cutlass_bench"); }
