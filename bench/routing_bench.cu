// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
//
// Router, plan, permute and unpermute on the four model shapes x T in {128, 4096, 16384}, uniform
// and Zipf(1.2)-skewed routing. Counters (../shared/PERFORMANCE.md):
//   us          median time per call (CUDA events around a CUDA-graph replay of 20 calls)
//   hbm_ratio   minimum bytes / time / copy bandwidth measured in this process (D2D memcpy)
//   speedup     baseline time / epx time, the baseline measured in the same run:
//               plan+permute: thrust::stable_sort_by_key + gather; unpermute: a thrust
//               scatter of weighted rows into fp32 + a conversion pass (what PyTorch's index_add does)
//   max_over_mean  tokens of the busiest expert / mean tokens per expert (routing skew)
// Output: --benchmark_format=json > bench/results/routing-h100.json (see bench/README.md).

#include "bench_common.cuh"
#include "device_random.cuh"

#include <epx/cuda.cuh>

#include <benchmark/benchmark.h>
#include <thrust/device_ptr.h>
#include <thrust/execution_policy.h>
#include <thrust/gather.h>
#include <thrust/sequence.h>
#include <thrust/sort.h>

#include <algorithm>
#include <cstdio>
#include <cmath>
#include <random>
#include <vector>

namespace {

using namespace epx::bench;
using epx::bfloat16;

// Everything one (shape, T, routing) case needs on the device.
struct Case {
  Shape shape;
  int t;
  bool zipf;
  cudaStream_t s{};
  std::int32_t* ids{};
  float* weights{};
  float* logits{};
  float* bias{};
  bfloat16 *x{}, *x_perm{}, *y{};
  std::byte* ws{};
  std::size_t ws_bytes{};
  epx::Status* status{};
  double skew{};

  Case(Shape sh, int tokens, bool skewed) : shape(sh), t(tokens), zipf(skewed) {
    std::mt19937_64 rng(2026);
    BENCH_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    auto const host_ids = make_ids(t, shape.top_k, shape.num_experts, zipf, rng);
    skew = max_over_mean(host_ids, shape.num_experts);
    std::normal_distribution<float> n01;
    std::vector<float> w(host_ids.size()), l(static_cast<std::size_t>(t) * shape.num_experts), b(shape.num_experts);
    for (auto& v : w) v = std::abs(n01(rng));
    for (auto& v : l) v = n01(rng);
    for (auto& v : b) v = 0.1f * n01(rng);
    ids = device_copy(host_ids);
    weights = device_copy(w);
    logits = device_copy(l);
    bias = device_copy(b);
    // Made on the device: up to 117 M values per case, which the host would draw for seconds.
    x = random_device<bfloat16>(static_cast<std::size_t>(t) * shape.hidden, 31, 1.0f);
    std::size_t const slots = static_cast<std::size_t>(t) * shape.top_k;
    x_perm = device_alloc<bfloat16>(slots * shape.hidden);
    y = device_alloc<bfloat16>(static_cast<std::size_t>(t) * shape.hidden);
    ws_bytes = epx::cuda_plan_workspace_bytes(t, shape.top_k, shape.num_experts);
    ws = device_alloc<std::byte>(ws_bytes);
    status = device_alloc<epx::Status>(1);
    BENCH_CHECK(cudaMemset(status, 0, sizeof(epx::Status)));
    BENCH_CHECK(cudaMemset(x_perm, 0x3c, slots * shape.hidden * sizeof(bfloat16)));
  }
  ~Case() {
    for (void* p : std::initializer_list<void*>{ids, weights, logits, bias, x, x_perm, y, ws, status})
      (void)cudaFree(p);
    (void)cudaStreamDestroy(s);
  }
  epx::RoutingPlan plan() const {
    return epx::make_plan(epx::StreamRef(s), epx::MatrixView<std::int32_t const>(ids, t, shape.top_k),
                          shape.num_experts, {0, shape.num_experts}, epx::Workspace(ws, ws_bytes), status);
  }
  epx::RouterConfig router() const {
    if (shape.deepseek)
      return {.num_experts = shape.num_experts,
              .top_k = shape.top_k,
              .scoring = epx::Scoring::kSigmoidTopK,
              .renormalize = true,
              .num_groups = 8,
              .topk_groups = 4,
              .routed_scaling_factor = 2.5f};
    return {.num_experts = shape.num_experts, .top_k = shape.top_k, .renormalize = true};
  }
};

void set_counters(benchmark::State& state, Case const& c, double us, double bytes, double baseline_us) {
  state.counters["us"] = us;
  state.counters["hbm_ratio"] = bytes > 0 ? bytes / (us * 1e-6) / copy_bandwidth() : 0.0;
  if (baseline_us > 0) state.counters["speedup"] = baseline_us / us;
  state.counters["max_over_mean"] = c.skew;
  state.counters["copy_TBps"] = copy_bandwidth() / 1e12;
}

void bm_router(benchmark::State& state, Shape shape, int t) {
  Case c(shape, t, false);
  auto const cfg = c.router();
  std::span<float const> bias =
      shape.deepseek ? std::span<float const>(c.bias, shape.num_experts) : std::span<float const>{};
  double us = 0;
  for (auto _ : state) {
    us = time_us(c.s, [&] {
      epx::route(epx::StreamRef(c.s), cfg, epx::MatrixView<float const>(c.logits, t, shape.num_experts), bias,
                 epx::MatrixView<std::int32_t>(c.ids, t, shape.top_k),
                 epx::MatrixView<float>(c.weights, t, shape.top_k));
    });
    state.SetIterationTime(us * 1e-6);
  }
  set_counters(state, c, us, 4.0 * t * shape.num_experts + 8.0 * t * shape.top_k, 0);
}

// Baseline permute: stable sort of the slot keys with thrust, then a gather of the rows.
double baseline_permute_us(Case& c) {
  std::size_t const slots = static_cast<std::size_t>(c.t) * c.shape.top_k;
  auto* keys = device_alloc<std::int32_t>(slots);
  auto* order = device_alloc<std::int32_t>(slots);
  auto* rows = device_alloc<std::int32_t>(slots);
  auto const policy = thrust::cuda::par_nosync.on(c.s);
  double const us = time_us(c.s, [&] {
    BENCH_CHECK(cudaMemcpyAsync(keys, c.ids, slots * sizeof(std::int32_t), cudaMemcpyDeviceToDevice, c.s));
    thrust::sequence(policy, order, order + slots);
    thrust::stable_sort_by_key(policy, keys, keys + slots, order);
    // each row of the hidden vector, gathered as 16-byte words
    int const words = c.shape.hidden * 2 / 16;
    auto const* src = reinterpret_cast<uint4 const*>(c.x);
    auto* dst = reinterpret_cast<uint4*>(c.x_perm);
    int const k = c.shape.top_k;
    thrust::for_each_n(policy, thrust::counting_iterator<std::size_t>(0), slots * words,
                       [=] __device__(std::size_t i) { dst[i] = src[(order[i / words] / k) * words + i % words]; });
  });
  (void)rows;
  for (void* p : {static_cast<void*>(keys), static_cast<void*>(order), static_cast<void*>(rows)}) (void)cudaFree(p);
  return us;
}

void bm_plan_permute(benchmark::State& state, Shape shape, int t, bool zipf) {
  Case c(shape, t, zipf);
  double const base = baseline_permute_us(c);
  double plan_us = 0, us = 0;
  for (auto _ : state) {
    plan_us = time_us(c.s, [&] { (void)c.plan(); });
    us = time_us(c.s, [&] {
      auto const p = c.plan();
      epx::permute(epx::StreamRef(c.s), p, epx::MatrixView<bfloat16 const>(c.x, t, shape.hidden),
                   epx::MatrixView<bfloat16>(c.x_perm, static_cast<std::int64_t>(t) * shape.top_k, shape.hidden));
    });
    state.SetIterationTime(us * 1e-6);
  }
  set_counters(state, c, us, (1.0 + shape.top_k) * t * shape.hidden * 2, base);
  state.counters["plan_us"] = plan_us;
}

void bm_unpermute(benchmark::State& state, Shape shape, int t, bool zipf) {
  Case c(shape, t, zipf);
  auto const p = c.plan();
  BENCH_CHECK(cudaStreamSynchronize(c.s));
  // Baseline: scatter-add of weighted rows into fp32 (index_add style, atomics), then to bf16.
  std::size_t const n = static_cast<std::size_t>(t) * shape.hidden;
  float* acc = device_alloc<float>(n);
  auto const policy = thrust::cuda::par_nosync.on(c.s);
  int const h = shape.hidden, k = shape.top_k;
  auto const* xp = c.x_perm;
  auto const* rows = p.slot_rows.data();
  auto const* w = c.weights;
  auto* y = c.y;
  double const base = time_us(c.s, [&] {
    BENCH_CHECK(cudaMemsetAsync(acc, 0, n * sizeof(float), c.s));
    thrust::for_each_n(policy, thrust::counting_iterator<std::size_t>(0), static_cast<std::size_t>(t) * k * h,
                       [=] __device__(std::size_t i) {
                         std::size_t const slot = i / h, col = i % h;
                         int const row = rows[slot];
                         if (row >= 0)
                           atomicAdd(
                               acc + (slot / k) * h + col,
                               w[slot] * __uint_as_float(std::uint32_t{xp[std::size_t(row) * h + col].bits} << 16));
                       });
    thrust::for_each_n(policy, thrust::counting_iterator<std::size_t>(0), n,
                       [=] __device__(std::size_t i) { y[i] = epx::detail::device_from_float<bfloat16>(acc[i]); });
  });
  double us = 0;
  for (auto _ : state) {
    us = time_us(c.s, [&] {
      epx::unpermute(epx::StreamRef(c.s), p,
                     epx::MatrixView<bfloat16 const>(c.x_perm, static_cast<std::int64_t>(t) * k, h),
                     epx::MatrixView<float const>(c.weights, t, k), epx::MatrixView<bfloat16>(c.y, t, h));
    });
    state.SetIterationTime(us * 1e-6);
  }
  (void)cudaFree(acc);
  set_counters(state, c, us, (k + 1.0) * t * h * 2 + 4.0 * t * k, base);
}

int register_all() {
  for (auto const& shape : kShapes)
    for (int t : kTokens) {
      std::string const base = std::string(shape.name) + "/T=" + std::to_string(t);
      benchmark::RegisterBenchmark(("router/" + base).c_str(), bm_router, shape, t)->UseManualTime()->Iterations(1);
      for (bool zipf : {false, true}) {
        std::string const suffix = base + (zipf ? "/zipf1.2" : "/uniform");
        benchmark::RegisterBenchmark(("plan+permute/" + suffix).c_str(), bm_plan_permute, shape, t, zipf)
            ->UseManualTime()
            ->Iterations(1);
        benchmark::RegisterBenchmark(("unpermute/" + suffix).c_str(), bm_unpermute, shape, t, zipf)
            ->UseManualTime()
            ->Iterations(1);
      }
    }
  return 0;
}
int const registered = register_all();

}  // namespace

int main(int argc, char** argv) { return epx::bench::run_benchmarks(argc, argv, "routing_bench"); }
