// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
//
// The whole MoE layer forward, router logits in, y out, on the four model shapes x T in {128, 4096,
// 16384}, bf16, random data; uniform routing (normal logits, as torch.randn) and, at T = 4096, Zipf(1.2)
// routing. Each model's own router and expert, as bench/torch_moe_block.py runs them: Qwen3-MoE and
// Mixtral softmax -> top-k -> renormalise, SwiGLU; gpt-oss top-k on the logits -> softmax over the k,
// clamped SwiGLU on interleaved gate/up with biases; DeepSeek-V3 sigmoid + correction bias, 8 groups,
// top-4 groups, scaling 2.5, SwiGLU.
//
//   layer/<shape>/T=<t>/ep1             ExpertParallel<Grouped, AllToAll, Cuda> over a 1-rank CudaLocalGroup
//   layer/<shape>/T=<t>/ep1_allgather   ExpertParallel<Grouped, AllGather, Cuda> over a 1-rank CudaLocalGroup
//   layer/<shape>/T=<t>/ep8_localgroup  8 CudaLocalGroup ranks on the one GPU, AllToAll, contiguous
//                                       placement, T/8 of the ep1 tokens per rank (the same total work)
//   .../ep1_zipf1.2, .../ep8_localgroup_zipf1.2   the same at T = 4096 with Zipf(1.2) routing
//   layer/<shape>/T=<t>/ep1_backward    training at ep = 1 (AllToAll, 1-rank CudaLocalGroup, uniform
//                                       routing): forward(..., SavedState), then backward with fp32 dy
//                                       and fp32 gradients (dx, d_logits, the experts' weights and, for
//                                       gpt-oss, biases) from that one saved state. Both programs: in
//                                       layer_bench the gradient GEMMs are the SIMT correctness path, in
//                                       layer_bench_cutlass CUTLASS's (whatever kernel the forward picked:
//                                       the label names the forward's). EPX_BENCH_QUICK: T = 128 and 4096
//                                       only. A case whose one backward would take more than 2 s by its
//                                       flops (16 x rows x H x I: GEMM 1 recomputed, two GEMMs per weight)
//                                       at kBackwardFlopRate (10 TFLOP/s SIMT, 200 on CUTLASS) is reported
//                                       as skipped, with the estimate, in its label (not an error).
//
// Two programs from this file (bench/CMakeLists.txt):
//   layer_bench           epx::cuda: Grouped runs epx's own grouped GEMM. Rows layer/...
//   layer_bench_cutlass   epx::cutlass (EPX_HAVE_CUTLASS), sm_90a only: Grouped picks CUTLASS's Hopper
//                         grouped GEMM at prefill (>= 128 rows per local expert; tuning.cuh). Its rows are
//                         named layer_cutlass/... (the family follows EPX_HAVE_CUTLASS), so that both
//                         programs' rows sit side by side in one bundle run's RESULTS. Its backward
//                         rows run CUTLASS's gradient GEMMs (cuda/cutlass_expert_mlp_backward.cuh).
// Every row's label says which expert kernel its forwards ran: "kernel=epx" or "kernel=cutlass"
// (ExpertParallel::expert_kernel() after the timed forwards; ep8: each rank's, "+"-joined when they
// differ); a skipped backward case says "skipped: ..." instead.
//
// Counters (../shared/PERFORMANCE.md, "How to measure"):
//   ms                median time of one forward.
//                     ep1: eager (its forward synchronises once for the count table), CUDA events
//                     around 20 forwards, median of 7, after a warm-up forward.
//                     ep1_allgather: no host sync, so CUDA-graph replays (bench_common's time_us);
//                     counter graph = 1. When the capture fails it is timed like ep1 (graph = 0) and
//                     the CUDA error saying why is printed to stderr.
//                     ep8: host wall clock of 10 forwards on all 8 rank threads (each on its own stream,
//                     paced by forward's own wait), from a barrier to the barrier after the last
//                     rank's stream is idle, / 10; median of 5, after 3 warm-up forwards.
//                     EPX_BENCH_QUICK=1 (the GPU check bundle): fewer of each (bench_common.cuh).
//   route_ms, plan_permute_ms, experts_ms, unpermute_ms   (ep1 rows)
//                     the stages alone on the same data, each as CUDA-graph replays: route;
//                     make_plan + permute; expert_mlp (Grouped); unpermute
//   dispatch_ms       ms minus those four: what the AllToAll layer adds at ep = 1 (count exchange, the
//                     device->host copy and wait, the all-to-all-v copies of every row to itself and
//                     back, the regroups)
//   glue_fraction     (route + plan_permute + unpermute) / ms; the target is <= 0.15
//   transformers_ms, floor_ms, target_ms   (uniform rows)
//                     RECORDED figures quoted from PERFORMANCE.md's block table (H100, 2026-11-22), NOT
//                     measured in this run. The in-session PyTorch baseline is bench/torch_moe_block.py.
//   vs_target         target / ms (>= 1 meets the target); ep8: ep8_target_ms / ms
//   max_over_mean     tokens of the busiest expert / mean, from the ids the router chose
//   ep8 rows: vs_ep1  ep1 ms (of this run) / ep8 ms
//             copy_bytes     rows sent to another rank x H x 2 bytes, dispatch and combine
//             copy_ms        the time to copy copy_bytes at the copy bandwidth measured in this process.
//                            That bandwidth counts read + write (bench_common.cuh), so a copy of B bytes
//                            is charged 2 B: copy_ms = 2 x copy_bytes / bandwidth.
//             ep8_target_ms  1.15 x ep1 ms + copy_ms (PERFORMANCE.md's 8-rank target)
//   On one GPU the ep1 layer also copies every row (a 1-rank all-to-all-v is a copy to itself), so
//   the copies ep8 makes between ranks are mostly already in the ep1 time.
//   ep1_backward rows: ms = bwd_ms
//             fwd_ms         median time of one training forward (with SavedState), eager, as ep1
//             bwd_ms         median time of one backward of that saved state, eager: CUDA events around
//                            N backwards (N as ep1's, fewer when one timing would pass ~0.5 s by the
//                            flop estimate; at least 1), median of 7 (quick: 3), after a warm-up backward
//             bwd_over_fwd   bwd_ms / fwd_ms (issue 15's goal: <= 2.2)
//             saved_mb       saved_bytes(T) / 2^20: the SavedState one forward keeps for its backward
//   layer_cutlass/<shape>/T=4096/ep1_backward_keep_h   the same with MoeConfig::save_gate_up_output:
//             the forward keeps GEMM 1's output h in saved, the backward skips GEMM 1 (its counters
//             as ep1_backward's, plus vs_recompute = the ep1_backward row's bwd_ms of this run / bwd_ms:
//             predicted ~1.25-1.3 at large shapes, the GEMM share of the backward dropping from 8/3 to 2)
//             est_bwd_ms     the flop estimate of one backward at 10 TFLOP/s (also on skipped rows)
// Memory: only one shape's weights live at a time (DeepSeek-V3: 22.5 GB); every workspace belongs to
// its case. The largest case, DeepSeek-V3 ep8 at T = 16384, needs about 22.5 + 8 x 4.5 GB. A backward
// case adds fp32 weight gradients, twice the bf16 weights (DeepSeek-V3: 45 GB), freed with the case.
// Output: --benchmark_format=json --benchmark_out=bench/results/layer-h100.json (see bench/README.md).

#include "bench_common.cuh"
#include "device_random.cuh"

#include <epx/cuda.cuh>

#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <exception>
#include <map>
#include <memory>
#include <random>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace {

using namespace epx::bench;
using epx::bfloat16;
using epx::MatrixView;

constexpr int kEpRanks = 8;
constexpr int kZipfTokens = 4096;  // the one T with a skewed-routing row

// The rows' family: layer_bench_cutlass (this file built with epx::cutlass) names its rows layer_cutlass/...
using Experts = epx::detail::CudaGroupedExperts;  // what Grouped runs on Cuda in this translation unit
constexpr std::string_view kFamily = Experts::kWithCutlass ? "layer_cutlass" : "layer";

// The backward rows' flop estimate: the rate of the gradient GEMMs this program runs (layer_bench: CUDA
// cores, the correctness path of cuda/grouped_gemm_backward.cuh; layer_bench_cutlass: CUTLASS's tensor
// cores, cuda/cutlass_expert_mlp_backward.cuh, whatever kernel its forward picked — a low guess of
// their rate), the longest backward a case may take, and about how long one timing of N backwards
// should last.
constexpr double kBackwardFlopRate = Experts::kWithCutlass ? 200e12 : 10e12;
constexpr double kBackwardSkipSeconds = 2.0;
constexpr double kBackwardTimingSeconds = 0.5;
constexpr int kQuickBackwardMaxTokens = 4096;  // EPX_BENCH_QUICK: backward rows at T = 128 and 4096 only

// PERFORMANCE.md's block table (H100, bf16, ms): recorded figures, not measured here.
struct BlockFigures {
  std::string_view shape;
  int tokens;
  double transformers_ms, floor_ms, target_ms;
};
constexpr BlockFigures kBlockTable[] = {
    {"qwen3-30b-a3b", 128, 0.69, 0.41, 0.45},   {"qwen3-30b-a3b", 4096, 2.19, 0.60, 1.09},
    {"qwen3-30b-a3b", 16384, 7.21, 1.65, 3.60}, {"mixtral-8x7b", 128, 1.30, 0.96, 1.05},
    {"mixtral-8x7b", 4096, 6.60, 3.85, 4.23},   {"mixtral-8x7b", 16384, 24.85, 15.39, 16.93},
    {"gpt-oss-120b", 128, 2.66, 2.09, 2.30},    {"gpt-oss-120b", 4096, 5.67, 2.39, 2.83},
    {"gpt-oss-120b", 16384, 14.27, 4.35, 7.14}, {"deepseek-v3", 128, 8.20, 7.40, 7.79},
    {"deepseek-v3", 4096, 17.59, 8.14, 8.95},   {"deepseek-v3", 16384, 43.02, 15.39, 21.51},
};

BlockFigures const* recorded_figures(Shape const& shape, int tokens) {
  for (auto const& f : kBlockTable)
    if (f.shape == shape.name && f.tokens == tokens) return &f;
  return nullptr;
}

// The router and expert semantics of each model.
enum class Family { kSoftmax, kGptOss, kDeepSeek };

Family family_of(Shape const& shape) {
  if (shape.deepseek) return Family::kDeepSeek;
  return std::string_view(shape.name).starts_with("gpt-oss") ? Family::kGptOss : Family::kSoftmax;
}

epx::RouterConfig router_of(Shape const& shape) {
  switch (family_of(shape)) {
    case Family::kDeepSeek:
      return {.num_experts = shape.num_experts,
              .top_k = shape.top_k,
              .scoring = epx::Scoring::kSigmoidTopK,
              .renormalize = true,
              .num_groups = 8,
              .topk_groups = 4,
              .routed_scaling_factor = 2.5f};
    case Family::kGptOss:
      return {.num_experts = shape.num_experts, .top_k = shape.top_k, .scoring = epx::Scoring::kTopKSoftmax};
    case Family::kSoftmax: break;
  }
  return {.num_experts = shape.num_experts, .top_k = shape.top_k, .renormalize = true};
}

epx::ExpertMlpConfig mlp_of(Shape const& shape) {
  epx::ExpertMlpConfig mlp{.hidden = shape.hidden, .intermediate = shape.intermediate};
  if (family_of(shape) == Family::kGptOss) {
    mlp.activation = epx::Activation::kClampedSwiGLU;
    mlp.gate_up_layout = epx::GateUpLayout::kInterleaved;
  }
  return mlp;
}

// Device memory owned by the code that made it, so that a case frees everything it allocated
// (also when it throws) before the next case allocates.
template <class T>
class DeviceArray {
 public:
  DeviceArray() = default;
  explicit DeviceArray(std::size_t n) : data_(device_alloc<T>(n)), size_(n) {}
  DeviceArray(T* adopted, std::size_t n) noexcept : data_(adopted), size_(n) {}
  DeviceArray(DeviceArray&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)) {}
  DeviceArray& operator=(DeviceArray&& other) noexcept {
    std::swap(data_, other.data_);
    std::swap(size_, other.size_);
    return *this;
  }
  ~DeviceArray() {
    if (data_ != nullptr) (void)cudaFree(data_);
  }
  [[nodiscard]] T* get() const noexcept { return data_; }
  [[nodiscard]] std::size_t size() const noexcept { return size_; }
  [[nodiscard]] epx::Workspace workspace() const noexcept { return {data_, size_ * sizeof(T)}; }

 private:
  T* data_ = nullptr;
  std::size_t size_ = 0;
};

template <class T>
DeviceArray<T> random_array(std::size_t n, std::uint64_t seed, float scale) {
  return {random_device<T>(n, seed, scale), n};
}

template <class T>
DeviceArray<T> copy_array(std::vector<T> const& v) {
  return {device_copy(v), v.size()};
}

// A non-blocking stream of the current device.
class Stream {
 public:
  Stream() { BENCH_CHECK(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking)); }
  Stream(Stream const&) = delete;
  Stream& operator=(Stream const&) = delete;
  ~Stream() {
    end_capture();
    (void)cudaStreamDestroy(s_);
    (void)cudaGetLastError();  // what a failed capture or teardown left, so later launch checks do not see it
  }
  [[nodiscard]] cudaStream_t get() const noexcept { return s_; }
  [[nodiscard]] epx::StreamRef ref() const { return epx::StreamRef(s_); }

  // Ends a capture that an exception left open: until then this thread may not free memory.
  void end_capture() noexcept {
    cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(s_, &capturing) != cudaSuccess || capturing == cudaStreamCaptureStatusNone) return;
    cudaGraph_t graph = nullptr;
    (void)cudaStreamEndCapture(s_, &graph);
    if (graph != nullptr) (void)cudaGraphDestroy(graph);
    (void)cudaGetLastError();
  }

 private:
  cudaStream_t s_{};
};

// bench_common's time_us (median microseconds per call over CUDA-graph replays), with the capture
// ended when the body throws inside it, before the caller's buffers are freed.
template <class Body>
double graph_us(Stream& stream, Body&& body) {
  try {
    return time_us(stream.get(), body);
  } catch (...) {
    stream.end_capture();
    throw;
  }
}

// Every expert of one shape, K-major as epx takes them: gate_up [E, 2I, H], down [E, H, I]; gpt-oss
// also gate_up_bias [E, 2I] and down_bias [E, H]; DeepSeek-V3 the router's correction bias [E]. An EP
// rank uses a slice: its contiguous experts.
struct LayerWeights {
  std::string shape;
  epx::ExpertMlpConfig mlp;
  DeviceArray<bfloat16> gate_up, down, gate_up_bias, down_bias;
  DeviceArray<float> correction_bias;

  [[nodiscard]] epx::ExpertWeights slice(epx::ExpertRange experts) const {
    auto const first = static_cast<std::size_t>(experts.first);
    auto const rows = static_cast<std::size_t>(mlp.gate_up_rows()), h = static_cast<std::size_t>(mlp.hidden);
    auto const i = static_cast<std::size_t>(mlp.intermediate);
    return epx::expert_weights<bfloat16>(experts.count, gate_up.get() + first * rows * h, down.get() + first * h * i,
                                         gate_up_bias.get() != nullptr ? gate_up_bias.get() + first * rows : nullptr,
                                         down_bias.get() != nullptr ? down_bias.get() + first * h : nullptr);
  }
  [[nodiscard]] std::span<float const> router_bias() const { return {correction_bias.get(), correction_bias.size()}; }
};

// One shape's weights at a time: asking for another shape frees the previous one first (all four
// together, 33 GB, would not leave room for DeepSeek-V3's 8-rank workspaces).
std::unique_ptr<LayerWeights>& cached_weights() {
  static std::unique_ptr<LayerWeights> cached;
  return cached;
}

LayerWeights const& weights_of(Shape const& shape) {
  auto& cached = cached_weights();
  if (cached != nullptr && cached->shape == shape.name) return *cached;
  cached.reset();
  auto w = std::make_unique<LayerWeights>();
  w->shape = shape.name;
  w->mlp = mlp_of(shape);
  std::size_t const e = shape.num_experts, h = shape.hidden, i = shape.intermediate;
  std::size_t const rows = static_cast<std::size_t>(w->mlp.gate_up_rows());
  w->gate_up = random_array<bfloat16>(e * rows * h, 11, 1.0f / std::sqrt(float(h)));
  w->down = random_array<bfloat16>(e * h * i, 12, 1.0f / std::sqrt(float(i)));
  if (family_of(shape) == Family::kGptOss) {
    w->gate_up_bias = random_array<bfloat16>(e * rows, 13, 0.1f);
    w->down_bias = random_array<bfloat16>(e * h, 14, 0.1f);
  }
  if (family_of(shape) == Family::kDeepSeek) {
    std::mt19937_64 rng(15);
    std::normal_distribution<float> n01;
    std::vector<float> bias(e);
    for (auto& b : bias) b = 0.1f * n01(rng);
    w->correction_bias = copy_array(bias);
  }
  cached = std::move(w);
  return *cached;
}

// One case's tokens: router logits [T, E] (normal; Zipf: k experts per token drawn from Zipf(1.2)
// get +8, so that the router picks them), x [T, H], y [T, H], and the ids the router chooses for
// them (routed once on the device and read back: max_over_mean, the ep8 copy bytes).
struct LayerInputs {
  int tokens = 0;
  DeviceArray<float> logits;
  DeviceArray<bfloat16> x, y;
  DeviceArray<std::int32_t> topk_ids;
  DeviceArray<float> topk_weights;
  std::vector<std::int32_t> host_ids;
  double skew = 0;
};

LayerInputs make_inputs(Shape const& shape, LayerWeights const& w, int t, bool zipf) {
  int const e = shape.num_experts, k = shape.top_k, h = shape.hidden;
  auto const slots = static_cast<std::size_t>(t) * static_cast<std::size_t>(k);
  std::mt19937_64 rng(2026 + static_cast<std::uint64_t>(t));
  std::normal_distribution<float> n01;
  std::vector<float> logits(static_cast<std::size_t>(t) * static_cast<std::size_t>(e));
  for (auto& v : logits) v = n01(rng);
  if (zipf) {
    auto const favoured = make_ids(t, k, e, true, rng);
    for (std::size_t s = 0; s < slots; ++s)
      logits[(s / static_cast<std::size_t>(k)) * static_cast<std::size_t>(e) + static_cast<std::size_t>(favoured[s])] +=
          8.0f;
  }
  LayerInputs in;
  in.tokens = t;
  in.logits = copy_array(logits);
  in.x = random_array<bfloat16>(static_cast<std::size_t>(t) * static_cast<std::size_t>(h), 31, 1.0f);
  in.y = DeviceArray<bfloat16>(static_cast<std::size_t>(t) * static_cast<std::size_t>(h));
  in.topk_ids = DeviceArray<std::int32_t>(slots);
  in.topk_weights = DeviceArray<float>(slots);
  Stream stream;
  epx::route(stream.ref(), router_of(shape), MatrixView<float const>(in.logits.get(), t, e), w.router_bias(),
             MatrixView<std::int32_t>(in.topk_ids.get(), t, k), MatrixView<float>(in.topk_weights.get(), t, k));
  in.host_ids.resize(slots);
  BENCH_CHECK(cudaMemcpyAsync(in.host_ids.data(), in.topk_ids.get(), slots * sizeof(std::int32_t),
                              cudaMemcpyDeviceToHost, stream.get()));
  BENCH_CHECK(cudaStreamSynchronize(stream.get()));
  for (std::size_t s = 0; s < slots; ++s)
    if (in.host_ids[s] < 0 || in.host_ids[s] >= e)
      throw std::runtime_error("layer_bench: the router chose expert " + std::to_string(in.host_ids[s]) +
                               " for token " + std::to_string(s / static_cast<std::size_t>(k)) +
                               ", expected an id in [0, " + std::to_string(e) +
                               ") (finite logits: every slot has an expert)");
  in.skew = max_over_mean(in.host_ids, e);
  return in;
}

epx::MoeConfig layer_config(Shape const& shape, LayerWeights const& w, epx::ExpertPlacement const& placement,
                            int rank) {
  return {.router = router_of(shape),
          .mlp = w.mlp,
          .weights = w.slice(placement.local_range(rank)),
          .correction_bias = w.router_bias(),
          .placement = placement};
}

// One forward of `ep` on tokens [first, first + count) of the case.
template <class Layer>
void layer_forward(Layer& ep, epx::StreamRef stream, Shape const& shape, LayerInputs const& in, int first, int count,
                   DeviceArray<std::byte> const& ws) {
  auto const e = static_cast<std::size_t>(shape.num_experts), h = static_cast<std::size_t>(shape.hidden);
  auto const row = static_cast<std::size_t>(first);
  ep.forward(stream, MatrixView<float const>(in.logits.get() + row * e, count, shape.num_experts),
             MatrixView<bfloat16 const>(in.x.get() + row * h, count, shape.hidden),
             MatrixView<bfloat16>(in.y.get() + row * h, count, shape.hidden), ws.workspace());
}

template <class Dispatch>
using CudaLayer = epx::ExpertParallel<epx::Grouped, Dispatch, epx::Cuda>;

struct Timing {
  double ms = 0;
  bool graph = false;
  std::string kernel;  // ExpertParallel::expert_kernel() after the timed forwards
};

// ms per forward at ep = 1 through AllToAll: eager (the forward waits for its count table).
Timing ep1_alltoall_ms(Shape const& shape, LayerWeights const& w, LayerInputs const& in) {
  Stream stream;
  epx::CudaLocalGroup group(1);
  CudaLayer<epx::AllToAll> ep(layer_config(shape, w, epx::ExpertPlacement::contiguous(shape.num_experts, 1), 0),
                              group.communicator(0));
  DeviceArray<std::byte> const ws(ep.workspace_bytes(in.tokens));
  double const ms =
      time_eager_us(stream.get(), [&] { layer_forward(ep, stream.ref(), shape, in, 0, in.tokens, ws); }) / 1e3;
  return {.ms = ms, .graph = false, .kernel = std::string(ep.expert_kernel())};
}

// ms per forward at ep = 1 through AllGather, which makes no host sync: captured in a CUDA graph
// when the 1-rank CudaLocalGroup's all_reduce_sum lets itself be captured, eagerly otherwise.
Timing ep1_allgather_ms(Shape const& shape, LayerWeights const& w, LayerInputs const& in) {
  auto measure = [&](bool capture) {
    Stream stream;
    epx::CudaLocalGroup group(1);  // fresh for each attempt: a failed capture aborts the group
    CudaLayer<epx::AllGather> ep(layer_config(shape, w, epx::ExpertPlacement::contiguous(shape.num_experts, 1), 0),
                                 group.communicator(0));
    DeviceArray<std::byte> const ws(ep.workspace_bytes(in.tokens));
    auto body = [&] { layer_forward(ep, stream.ref(), shape, in, 0, in.tokens, ws); };
    double const ms = (capture ? graph_us(stream, body) : time_eager_us(stream.get(), body)) / 1e3;
    return Timing{.ms = ms, .graph = capture, .kernel = std::string(ep.expert_kernel())};
  };
  try {
    return measure(true);
  } catch (epx::Error const& e) {
    std::fprintf(stderr, "layer_bench: %s/T=%d/ep1_allgather: the CUDA-graph capture failed, timed eagerly: %s\n",
                 shape.name, in.tokens, e.what());
  }
  return measure(false);
}

// The stages of the ep = 1 layer alone on the same data, each as CUDA-graph replays (ms). The experts
// stage is what Grouped runs in this program (epx's kernel, or CUTLASS in layer_bench_cutlass).
struct StageTimes {
  double route = 0, plan_permute = 0, experts = 0, unpermute = 0;
};

StageTimes stage_ms(Shape const& shape, LayerWeights const& w, LayerInputs const& in) {
  int const t = in.tokens, k = shape.top_k, e = shape.num_experts, h = shape.hidden;
  std::int64_t const rows = std::int64_t{t} * k;
  auto const rows_h = static_cast<std::size_t>(rows) * static_cast<std::size_t>(h);
  Stream stream;
  epx::StreamRef const s = stream.ref();
  DeviceArray<std::byte> const plan_ws(epx::cuda_plan_workspace_bytes(t, k, e));
  DeviceArray<epx::Status> const status(1);
  BENCH_CHECK(cudaMemsetAsync(status.get(), 0, sizeof(epx::Status), stream.get()));
  DeviceArray<bfloat16> const x_perm(rows_h), expert_out(rows_h);
  Experts experts;
  DeviceArray<std::byte> const mlp_ws(experts.workspace_bytes<bfloat16>(w.mlp, e, rows));
  auto const cfg = router_of(shape);
  MatrixView<std::int32_t> const ids(in.topk_ids.get(), t, k);
  MatrixView<float> const weights(in.topk_weights.get(), t, k);
  epx::RoutingPlan plan;
  StageTimes ms;
  ms.route =
      graph_us(
          stream,
          [&] { epx::route(s, cfg, MatrixView<float const>(in.logits.get(), t, e), w.router_bias(), ids, weights); }) /
      1e3;
  ms.plan_permute = graph_us(stream,
                             [&] {
                               plan = epx::make_plan(s, MatrixView<std::int32_t const>(ids), e, epx::ExpertRange{0, e},
                                                     plan_ws.workspace(), status.get());
                               epx::permute(s, plan, MatrixView<bfloat16 const>(in.x.get(), t, h),
                                            MatrixView<bfloat16>(x_perm.get(), rows, h));
                             }) /
                    1e3;
  ms.experts = graph_us(stream,
                        [&] {
                          experts.run<bfloat16>(
                              epx::detail::CudaStream(s, "layer_bench"), w.mlp, w.slice(epx::ExpertRange{0, e}),
                              MatrixView<bfloat16 const>(x_perm.get(), rows, h),
                              std::span<std::int32_t const>(plan.expert_offsets),
                              MatrixView<bfloat16>(expert_out.get(), rows, h), mlp_ws.workspace(), rows);
                        }) /
               1e3;
  ms.unpermute = graph_us(stream,
                          [&] {
                            epx::unpermute(s, plan, MatrixView<bfloat16 const>(expert_out.get(), rows, h),
                                           MatrixView<float const>(weights), MatrixView<bfloat16>(in.y.get(), t, h));
                          }) /
                 1e3;
  return ms;
}

// The kernels of several layers as one label value: "epx", or e.g. "cutlass+epx" when they differ.
std::string joined_kernels(std::vector<std::string> kernels) {
  std::sort(kernels.begin(), kernels.end());
  kernels.erase(std::unique(kernels.begin(), kernels.end()), kernels.end());
  std::string joined;
  for (auto const& k : kernels) joined += (joined.empty() ? "" : "+") + k;
  return joined;
}

// ms of 8 ranks of CudaLocalGroup on this GPU, AllToAll, each rank on its own thread and stream with
// tokens [rank * T/8, (rank + 1) * T/8) and its contiguous experts (a slice of the one weight array).
Timing ep8_ms(Shape const& shape, LayerWeights const& w, LayerInputs const& in) {
  bool const quick = quick_mode();  // EPX_BENCH_QUICK: 1 warm-up, median of 3 x 3 forwards
  int const warmup = quick ? 1 : 3, forwards = quick ? 3 : 10, repeats = quick ? 3 : 5;
  int const per_rank = in.tokens / kEpRanks;
  auto const placement = epx::ExpertPlacement::contiguous(shape.num_experts, kEpRanks);
  // Generous: the first collective waits for every rank's workspace allocation (up to 4.5 GB each).
  epx::CudaLocalGroup group(kEpRanks, {.timeout = std::chrono::seconds(300)});
  std::vector<double> per_forward_ms;                                    // rank 0's measurements
  std::vector<std::string> kernels(static_cast<std::size_t>(kEpRanks));  // each rank's, after its forwards
  group.run([&](int rank, epx::Communicator& comm) {
    Stream stream;
    CudaLayer<epx::AllToAll> ep(layer_config(shape, w, placement, rank), comm);
    DeviceArray<std::byte> const ws(ep.workspace_bytes(per_rank));
    auto const forward = [&] { layer_forward(ep, stream.ref(), shape, in, rank * per_rank, per_rank, ws); };
    for (int i = 0; i < warmup; ++i) forward();
    comm.wait(stream.ref());
    for (int rep = 0; rep < repeats; ++rep) {
      comm.barrier(stream.ref());  // every thread is here and every stream idle: the clocks start together
      auto const start = std::chrono::steady_clock::now();
      for (int i = 0; i < forwards; ++i) forward();
      comm.wait(stream.ref());
      comm.barrier(stream.ref());  // the last rank's stream is idle
      auto const stop = std::chrono::steady_clock::now();
      if (rank == 0)
        per_forward_ms.push_back(std::chrono::duration<double, std::milli>(stop - start).count() / forwards);
    }
    comm.wait(stream.ref());  // the barrier's event waits, before the stream and workspace go
    kernels[static_cast<std::size_t>(rank)] = ep.expert_kernel();
  });
  std::sort(per_forward_ms.begin(), per_forward_ms.end());
  return {.ms = per_forward_ms[per_forward_ms.size() / 2], .graph = false, .kernel = joined_kernels(kernels)};
}

// Rows that leave their rank in the 8-rank layer: slots whose expert another rank owns.
std::int64_t cross_rank_rows(Shape const& shape, LayerInputs const& in) {
  auto const placement = epx::ExpertPlacement::contiguous(shape.num_experts, kEpRanks);
  std::size_t const per_rank = static_cast<std::size_t>(in.tokens / kEpRanks) * static_cast<std::size_t>(shape.top_k);
  std::int64_t rows = 0;
  for (std::size_t s = 0; s < in.host_ids.size(); ++s)
    if (placement.rank_of(in.host_ids[s]) != static_cast<std::int32_t>(s / per_rank)) ++rows;
  return rows;
}

// Median ms per call of `body`, eager: CUDA events around `calls` calls, median of `timings`, after
// one warm-up call (bench_common's time_eager_us with the counts given).
template <class Body>
double eager_ms(Stream const& stream, int calls, int timings, Body&& body) {
  body();
  BENCH_CHECK(cudaStreamSynchronize(stream.get()));
  cudaEvent_t start, stop;
  BENCH_CHECK(cudaEventCreate(&start));
  BENCH_CHECK(cudaEventCreate(&stop));
  std::vector<float> ms;
  try {
    for (int rep = 0; rep < timings; ++rep) {
      BENCH_CHECK(cudaEventRecord(start, stream.get()));
      for (int i = 0; i < calls; ++i) body();
      BENCH_CHECK(cudaEventRecord(stop, stream.get()));
      BENCH_CHECK(cudaEventSynchronize(stop));
      float t = 0;
      BENCH_CHECK(cudaEventElapsedTime(&t, start, stop));
      ms.push_back(t);
    }
  } catch (...) {
    (void)cudaEventDestroy(start);
    (void)cudaEventDestroy(stop);
    throw;
  }
  (void)cudaEventDestroy(start);
  (void)cudaEventDestroy(stop);
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2] / calls;
}

// Flops of one backward of the experts at ep = 1: GEMM 1 recomputed (2 x rows x 2I x H), then for
// each of the two weights its data gradient and its weight gradient: 16 x rows x H x I in all.
double backward_flops(Shape const& shape, int t) {
  return 16.0 * t * shape.top_k * static_cast<double>(shape.hidden) * shape.intermediate;
}

struct BackwardTiming {
  double fwd_ms = 0, bwd_ms = 0;
  std::size_t saved_bytes = 0;
  std::string kernel;  // the training forwards' expert kernel
};

// A training forward at ep = 1 (AllToAll) into one SavedState, timed as ep1 (eager), then backwards of
// that saved state with fp32 dy and fp32 gradients, `calls` per timing. Every buffer, the weight
// gradients among them (twice the bf16 weights), is freed on return.
BackwardTiming ep1_backward_ms(Shape const& shape, LayerWeights const& w, LayerInputs const& in, int calls,
                               bool keep_h) {
  using Layer = CudaLayer<epx::AllToAll>;
  static_assert(Layer::kHasBackward, "layer_bench: ExpertParallel<Grouped, AllToAll, Cuda> has no backward here");
  int const t = in.tokens, e = shape.num_experts, h = shape.hidden;
  auto const th = static_cast<std::size_t>(t) * static_cast<std::size_t>(h);
  Stream stream;
  epx::CudaLocalGroup group(1);
  epx::MoeConfig config = layer_config(shape, w, epx::ExpertPlacement::contiguous(e, 1), 0);
  config.save_gate_up_output = keep_h;
  Layer ep(config, group.communicator(0));
  DeviceArray<std::byte> const ws(ep.workspace_bytes(t)), saved(ep.saved_bytes(t)), bws(ep.backward_workspace_bytes(t));
  epx::SavedState const state(saved.get(), saved.size());
  std::size_t const experts = static_cast<std::size_t>(e), rows = static_cast<std::size_t>(w.mlp.gate_up_rows());
  std::size_t const hidden = static_cast<std::size_t>(h), inter = static_cast<std::size_t>(w.mlp.intermediate);
  DeviceArray<float> const dy = random_array<float>(th, 41, 1.0f);
  DeviceArray<float> const dx(th), d_logits(static_cast<std::size_t>(t) * experts);
  DeviceArray<float> const g_gate_up(experts * rows * hidden), g_down(experts * hidden * inter);
  DeviceArray<float> g_gate_up_bias, g_down_bias;
  if (w.gate_up_bias.get() != nullptr) g_gate_up_bias = DeviceArray<float>(experts * rows);
  if (w.down_bias.get() != nullptr) g_down_bias = DeviceArray<float>(experts * hidden);
  epx::ExpertWeightGrads<float> const grads{.gate_up = {g_gate_up.get(), e, w.mlp.gate_up_rows(), h},
                                            .down = {g_down.get(), e, h, w.mlp.intermediate},
                                            .gate_up_bias = g_gate_up_bias.get(),
                                            .down_bias = g_down_bias.get()};
  MatrixView<float const> const logits(in.logits.get(), t, e);
  auto const [forwards, timings] = repetitions();
  BackwardTiming timing;
  timing.saved_bytes = saved.size();
  timing.fwd_ms = eager_ms(stream, forwards, timings, [&] {
    ep.forward(stream.ref(), logits, MatrixView<bfloat16 const>(in.x.get(), t, h),
               MatrixView<bfloat16>(in.y.get(), t, h), ws.workspace(), state);
  });
  timing.kernel = ep.expert_kernel();
  // Every backward reads the last forward's saved state and writes the same gradients.
  timing.bwd_ms = eager_ms(stream, calls, timings, [&] {
    ep.backward(stream.ref(), logits, MatrixView<float const>(dy.get(), t, h), MatrixView<float>(dx.get(), t, h),
                MatrixView<float>(d_logits.get(), t, e), grads, state, bws.workspace());
  });
  return timing;
}

std::string case_key(Shape const& shape, int t, bool zipf) {
  return std::string(shape.name) + "/" + std::to_string(t) + (zipf ? "/zipf" : "");
}

// ep1 ms of this run, per case, for the ep8 rows' ratios.
std::map<std::string, double>& ep1_results() {
  static std::map<std::string, double> results;
  return results;
}

// Runs a case; a failure skips it with the message (and frees what it allocated) instead of ending the run.
template <class Body>
void run_case(benchmark::State& state, Body&& body) {
  try {
    body();
  } catch (std::exception const& e) {
    state.SkipWithError(e.what());
  }
}

void report_ms(benchmark::State& state, double ms) {
  for (auto _ : state) state.SetIterationTime(ms * 1e-3);
  state.counters["ms"] = ms;
}

// The label of every measured row: the expert kernel its forwards ran.
void set_kernel(benchmark::State& state, std::string const& kernel) { state.SetLabel("kernel=" + kernel); }

void set_block_counters(benchmark::State& state, Shape const& shape, int t, bool zipf, double ms) {
  BlockFigures const* f = zipf ? nullptr : recorded_figures(shape, t);
  if (f == nullptr) return;
  state.counters["transformers_ms"] = f->transformers_ms;
  state.counters["floor_ms"] = f->floor_ms;
  state.counters["target_ms"] = f->target_ms;
  state.counters["vs_target"] = f->target_ms / ms;
}

void bm_ep1(benchmark::State& state, Shape shape, int t, bool zipf) {
  run_case(state, [&] {
    auto const& w = weights_of(shape);
    auto const in = make_inputs(shape, w, t, zipf);
    Timing const timing = ep1_alltoall_ms(shape, w, in);
    double const ms = timing.ms;
    ep1_results()[case_key(shape, t, zipf)] = ms;
    StageTimes const st = stage_ms(shape, w, in);
    report_ms(state, ms);
    set_kernel(state, timing.kernel);
    state.counters["route_ms"] = st.route;
    state.counters["plan_permute_ms"] = st.plan_permute;
    state.counters["experts_ms"] = st.experts;
    state.counters["unpermute_ms"] = st.unpermute;
    state.counters["dispatch_ms"] = ms - (st.route + st.plan_permute + st.experts + st.unpermute);
    state.counters["glue_fraction"] = (st.route + st.plan_permute + st.unpermute) / ms;
    state.counters["max_over_mean"] = in.skew;
    set_block_counters(state, shape, t, zipf, ms);
  });
}

void bm_ep1_allgather(benchmark::State& state, Shape shape, int t) {
  run_case(state, [&] {
    auto const& w = weights_of(shape);
    auto const in = make_inputs(shape, w, t, false);
    Timing const timing = ep1_allgather_ms(shape, w, in);
    report_ms(state, timing.ms);
    set_kernel(state, timing.kernel);
    state.counters["graph"] = timing.graph ? 1 : 0;
    state.counters["max_over_mean"] = in.skew;
    set_block_counters(state, shape, t, false, timing.ms);
  });
}

void bm_ep8(benchmark::State& state, Shape shape, int t, bool zipf) {
  run_case(state, [&] {
    double const bandwidth = copy_bandwidth();  // its 2 GiB come and go before the big allocations
    auto const& w = weights_of(shape);
    auto const in = make_inputs(shape, w, t, zipf);
    auto const cached = ep1_results().find(case_key(shape, t, zipf));
    // Filtered runs may skip the ep1 row: then measure it here (its workspace is freed before ep8's).
    double const ep1 = cached != ep1_results().end() ? cached->second : ep1_alltoall_ms(shape, w, in).ms;
    Timing const timing = ep8_ms(shape, w, in);
    double const ms = timing.ms;
    double const copy_bytes =
        2.0 * static_cast<double>(cross_rank_rows(shape, in)) * shape.hidden * sizeof(bfloat16);  // dispatch + combine
    double const copy_ms = 2.0 * copy_bytes / bandwidth * 1e3;  // read + write of each byte copied
    double const target = 1.15 * ep1 + copy_ms;
    report_ms(state, ms);
    set_kernel(state, timing.kernel);
    state.counters["ep1_ms"] = ep1;
    state.counters["vs_ep1"] = ep1 / ms;
    state.counters["copy_bytes"] = copy_bytes;
    state.counters["copy_ms"] = copy_ms;
    state.counters["ep8_target_ms"] = target;
    state.counters["vs_target"] = target / ms;
    state.counters["max_over_mean"] = in.skew;
  });
}

// bwd_ms of this run's ep1_backward rows, per case, for the keep_h rows' ratio.
std::map<std::string, double>& backward_results() {
  static std::map<std::string, double> results;
  return results;
}

void bm_ep1_backward(benchmark::State& state, Shape shape, int t, bool keep_h) {
  double const est_s = backward_flops(shape, t) / kBackwardFlopRate;
  if (est_s > kBackwardSkipSeconds) {
    char reason[160];
    std::snprintf(reason, sizeof reason, "skipped: one backward ~%.1f s by its flops at %.0f TFLOP/s (> %.0f s)", est_s,
                  kBackwardFlopRate / 1e12, kBackwardSkipSeconds);
    std::fprintf(stderr, "layer_bench: %s/T=%d/ep1_backward%s %s\n", shape.name, t, keep_h ? "_keep_h" : "", reason);
    for (auto _ : state) state.SetIterationTime(0);
    state.SetLabel(reason);
    state.counters["est_bwd_ms"] = est_s * 1e3;
    return;
  }
  run_case(state, [&] {
    auto const& w = weights_of(shape);
    auto const in = make_inputs(shape, w, t, false);
    // One timing of about kBackwardTimingSeconds at most by the estimate, and no more calls than ep1's.
    int const calls = std::clamp(static_cast<int>(kBackwardTimingSeconds / est_s), 1, repetitions().calls);
    BackwardTiming const timing = ep1_backward_ms(shape, w, in, calls, keep_h);
    std::string const key = case_key(shape, t, false);
    if (!keep_h) backward_results()[key] = timing.bwd_ms;
    if (keep_h && backward_results().count(key) != 0)
      state.counters["vs_recompute"] = backward_results()[key] / timing.bwd_ms;
    report_ms(state, timing.bwd_ms);
    set_kernel(state, timing.kernel);
    state.counters["fwd_ms"] = timing.fwd_ms;
    state.counters["bwd_ms"] = timing.bwd_ms;
    state.counters["bwd_over_fwd"] = timing.bwd_ms / timing.fwd_ms;
    state.counters["saved_mb"] = static_cast<double>(timing.saved_bytes) / (1 << 20);
    state.counters["est_bwd_ms"] = est_s * 1e3;
    state.counters["max_over_mean"] = in.skew;
  });
}

int register_all() {
  auto add = [](std::string const& name, auto fn, auto... args) {
    benchmark::RegisterBenchmark(name.c_str(), fn, args...)
        ->UseManualTime()
        ->Iterations(1)
        ->Unit(benchmark::kMillisecond);
  };
  // Shape by shape, so that each shape's weights are made once (weights_of keeps one shape).
  for (auto const& shape : kShapes)
    for (int t : kTokens) {
      std::string const base = std::string(kFamily) + "/" + shape.name + "/T=" + std::to_string(t) + "/";
      add(base + "ep1", bm_ep1, shape, t, false);
      add(base + "ep1_allgather", bm_ep1_allgather, shape, t);
      // The backward runs the same kernels with or without CUTLASS: layer_bench's rows only.
      if (!(quick_mode() && t > kQuickBackwardMaxTokens)) add(base + "ep1_backward", bm_ep1_backward, shape, t, false);
      // Keeping h pays where the forward materialises it: CUTLASS's path, at a training size.
      if (Experts::kWithCutlass && t == 4096) add(base + "ep1_backward_keep_h", bm_ep1_backward, shape, t, true);
      add(base + "ep8_localgroup", bm_ep8, shape, t, false);
      if (t == kZipfTokens) {
        add(base + "ep1_zipf1.2", bm_ep1, shape, t, true);
        add(base + "ep8_localgroup_zipf1.2", bm_ep8, shape, t, true);
      }
    }
  return 0;
}
int const registered = register_all();

}  // namespace

int main(int argc, char** argv) {
  return epx::bench::run_benchmarks(argc, argv, Experts::kWithCutlass ? "layer_bench_cutlass" : "layer_bench",
                                    [] { cached_weights().reset(); });
}
