// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
//
// A scaled-down Qwen3-MoE layer (64 experts, top-8, softmax router with renormalisation, SwiGLU
// experts) split over 4 expert-parallel ranks, run with both dispatch policies and checked against
// the dense single-rank layer computed by a plain loop. Prints one row per run: policy, ranks,
// element type, max relative error, time per forward.
//
// Where it runs: built as CUDA (epx's CUDA parts enabled, see examples/moe_layer/CMakeLists.txt)
// and with a GPU present, on the GPU: ExpertParallel<Grouped, Dispatch, Cuda> over the 4 ranks of
// a CudaLocalGroup on device 0. Otherwise on the Host backend (reference loops on the CPU) over a
// LocalGroup. Same layer, same inputs, same reference either way.

#include <epx/epx.hpp>
#if defined(__CUDACC__)
#include <epx/cuda.cuh>
#include <epx/cuda/expert_parallel.cuh>
#include <epx/cuda/local_group.cuh>
#endif

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <string_view>
#include <vector>

namespace {

constexpr int kExperts = 64, kTopK = 8, kHidden = 256, kIntermediate = 96, kRanks = 4, kTokensPerRank = 48;
constexpr std::size_t kGateUpSize = std::size_t{2} * kIntermediate * kHidden;  // one expert's gate_up
constexpr std::size_t kDownSize = std::size_t{kHidden} * kIntermediate;        // one expert's down

template <class T>
std::vector<T> random_values(std::size_t n, float scale, std::mt19937_64& rng) {
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<T> v(n);
  for (auto& x : v) x = epx::from_float<T>(dist(rng));
  return v;
}

// The whole layer and every rank's inputs, in host memory. Each rank hands epx only its own
// experts' slice of the weights.
template <class T>
struct Layer {
  epx::RouterConfig router{.num_experts = kExperts, .top_k = kTopK, .renormalize = true};
  epx::ExpertMlpConfig mlp{.hidden = kHidden, .intermediate = kIntermediate, .activation = epx::Activation::kSwiGLU};
  epx::ExpertPlacement placement = epx::ExpertPlacement::contiguous(kExperts, kRanks);
  std::vector<T> gate_up, down;            // [E, 2I, H] (gate rows, then up rows), [E, H, I]
  std::size_t tokens = 0;                  // per rank
  std::vector<std::vector<T>> x;           // [rank][tokens, H]
  std::vector<std::vector<float>> logits;  // [rank][tokens, E]
};

// AllToAll: each rank brings its own tokens. AllGather: every rank holds the same tokens.
template <class Dispatch, class T>
Layer<T> make_layer(std::mt19937_64& rng) {
  constexpr bool kAllToAll = std::is_same_v<Dispatch, epx::AllToAll>;
  Layer<T> layer;
  layer.gate_up = random_values<T>(kExperts * kGateUpSize, 0.0625f, rng);
  layer.down = random_values<T>(kExperts * kDownSize, 0.1f, rng);
  layer.tokens = kAllToAll ? kTokensPerRank : kTokensPerRank * kRanks;
  layer.x.resize(kRanks);
  layer.logits.resize(kRanks);
  for (int r = 0; r < kRanks; ++r) {
    layer.x[r] = (kAllToAll || r == 0) ? random_values<T>(layer.tokens * kHidden, 1.0f, rng) : layer.x[0];
    layer.logits[r] =
        (kAllToAll || r == 0) ? random_values<float>(layer.tokens * kExperts, 1.0f, rng) : layer.logits[0];
  }
  return layer;
}

// Experts [local.first, local.end()) of weights stacked from expert 0, as views with their
// extents, so that the layer checks them against its config (a transposed or mis-sized tensor is
// refused, not silently misread).
template <class T>
epx::ExpertWeights local_weights(epx::ExpertRange local, T* gate_up, T* down) {
  std::int64_t const count = local.count;
  return epx::expert_weights(epx::TensorView(gate_up + local.first * kGateUpSize, {count, 2 * kIntermediate, kHidden}),
                             epx::TensorView(down + local.first * kDownSize, {count, kHidden, kIntermediate}));
}

// The median of three timed forwards after a warm-up.
template <class F>
double median_ms(F&& forward) {
  forward();  // warm-up
  std::vector<double> times;
  for (int rep = 0; rep < 3; ++rep) {
    auto const start = std::chrono::steady_clock::now();
    forward();
    times.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
  }
  std::sort(times.begin(), times.end());
  return times[1];
}

// The Host backend over a LocalGroup: fills y[rank], returns the slowest rank's ms per forward.
template <class Dispatch, class T>
double run_host(Layer<T> const& layer, std::vector<std::vector<T>>& y) {
  std::vector<double> ms(kRanks);
  epx::LocalGroup group(kRanks);
  group.run([&](int rank, epx::Communicator& comm) {
    auto const local = layer.placement.local_range(rank);
    epx::ExpertParallel<epx::Grouped, Dispatch, epx::Host> moe(
        {.router = layer.router,
         .mlp = layer.mlp,
         .weights = local_weights<T const>(local, layer.gate_up.data(), layer.down.data()),
         .placement = layer.placement},
        comm);
    std::vector<std::byte> workspace(moe.workspace_bytes(static_cast<std::int64_t>(layer.tokens)));
    auto const tokens = static_cast<std::int64_t>(layer.tokens);
    ms[rank] = median_ms([&] {
      moe.forward(epx::Host{}, epx::MatrixView<float const>(layer.logits[rank].data(), tokens, kExperts),
                  epx::MatrixView<T const>(layer.x[rank].data(), tokens, kHidden),
                  epx::MatrixView<T>(y[rank].data(), tokens, kHidden), {workspace.data(), workspace.size()});
    });
  });
  return *std::max_element(ms.begin(), ms.end());
}

#if defined(__CUDACC__)
bool have_gpu() {
  int count = 0;
  bool const ok = cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
  (void)cudaGetLastError();  // "no device" is an answer here, not an error to report later
  return ok;
}

// Device memory for the example (a runtime would use its own allocator).
template <class T>
class DeviceArray {
 public:
  explicit DeviceArray(std::size_t count) : count_(count) {
    if (count > 0) EPX_CUDA_CHECK(cudaMalloc(&data_, count * sizeof(T)));
  }
  // Uploads on the stream that will read the data: a plain cudaMemcpy from pageable memory may
  // return before the bytes land, and work on a non-blocking stream is not ordered after it.
  DeviceArray(T const* host, std::size_t count, cudaStream_t stream) : DeviceArray(count) {
    if (count > 0) EPX_CUDA_CHECK(cudaMemcpyAsync(data_, host, count * sizeof(T), cudaMemcpyHostToDevice, stream));
  }
  DeviceArray(DeviceArray const&) = delete;
  DeviceArray& operator=(DeviceArray const&) = delete;
  ~DeviceArray() { (void)cudaFree(data_); }
  [[nodiscard]] T* data() const noexcept { return data_; }
  [[nodiscard]] std::size_t size() const noexcept { return count_; }

 private:
  T* data_ = nullptr;
  std::size_t count_ = 0;
};

// The same layer on the GPU: 4 ranks of a CudaLocalGroup on device 0, each with its own stream,
// its own experts' weights on the device and one workspace sized once.
template <class Dispatch, class T>
double run_cuda(Layer<T> const& layer, std::vector<std::vector<T>>& y) {
  std::vector<double> ms(kRanks);
  epx::CudaLocalGroup group(kRanks);
  group.reserve(layer.tokens * kHidden * sizeof(float));  // AllGather's all-reduce scratch, allocated up front
  group.run([&](int rank, epx::Communicator& comm) {
    auto const local = layer.placement.local_range(rank);
    auto const tokens = static_cast<std::int64_t>(layer.tokens);
    cudaStream_t stream = nullptr;
    EPX_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    {
      DeviceArray<T> const gate_up(layer.gate_up.data() + local.first * kGateUpSize, local.count * kGateUpSize, stream);
      DeviceArray<T> const down(layer.down.data() + local.first * kDownSize, local.count * kDownSize, stream);
      epx::ExpertParallel<epx::Grouped, Dispatch, epx::Cuda> moe(
          {.router = layer.router,
           .mlp = layer.mlp,
           .weights = local_weights<T const>({0, local.count}, gate_up.data(), down.data()),
           .placement = layer.placement},
          comm);
      DeviceArray<std::byte> workspace(moe.workspace_bytes(tokens));
      DeviceArray<float> const logits(layer.logits[rank].data(), layer.logits[rank].size(), stream);
      DeviceArray<T> const x(layer.x[rank].data(), layer.x[rank].size(), stream);
      DeviceArray<T> const out(y[rank].size());
      ms[rank] = median_ms([&] {
        moe.forward(epx::StreamRef(stream), epx::MatrixView<float const>(logits.data(), tokens, kExperts),
                    epx::MatrixView<T const>(x.data(), tokens, kHidden),
                    epx::MatrixView<T>(out.data(), tokens, kHidden), {workspace.data(), workspace.size()});
        EPX_CUDA_CHECK(cudaStreamSynchronize(stream));  // timing the whole forward, end to end
      });
      EPX_CUDA_CHECK(cudaMemcpy(y[rank].data(), out.data(), out.size() * sizeof(T), cudaMemcpyDeviceToHost));
    }
    EPX_CUDA_CHECK(cudaStreamDestroy(stream));
  });
  return *std::max_element(ms.begin(), ms.end());
}
#endif

// The layer as one would write it without epx: every token through its experts, in double.
template <class T>
std::vector<double> dense_layer(std::vector<T> const& x, std::vector<std::int32_t> const& ids,
                                std::vector<float> const& weights, std::vector<T> const& gate_up,
                                std::vector<T> const& down, std::size_t num_tokens) {
  std::vector<double> y(num_tokens * kHidden, 0.0), h(2 * kIntermediate), act(kIntermediate);
  for (std::size_t t = 0; t < num_tokens; ++t)
    for (std::size_t j = 0; j < kTopK; ++j) {
      int const e = ids[t * kTopK + j];
      if (e < 0) continue;
      for (std::size_t n = 0; n < 2 * kIntermediate; ++n) {
        double acc = 0;
        for (std::size_t k = 0; k < kHidden; ++k)
          acc += double(epx::to_float(x[t * kHidden + k])) *
                 epx::to_float(gate_up[(e * 2 * kIntermediate + n) * kHidden + k]);
        h[n] = acc;
      }
      for (std::size_t i = 0; i < kIntermediate; ++i)
        act[i] = h[i] / (1.0 + std::exp(-h[i])) * h[kIntermediate + i];  // silu(gate) * up
      for (std::size_t n = 0; n < kHidden; ++n) {
        double acc = 0;
        for (std::size_t i = 0; i < kIntermediate; ++i)
          acc += act[i] * epx::to_float(down[(e * kHidden + n) * kIntermediate + i]);
        y[t * kHidden + n] += weights[t * kTopK + j] * acc;
      }
    }
  return y;
}

// Every rank against the dense layer on its tokens, routed the same way (by the Host router).
template <class T>
double max_rel_error(Layer<T> const& layer, std::vector<std::vector<T>> const& y) {
  double max_rel = 0.0;
  for (int r = 0; r < kRanks; ++r) {
    std::vector<std::int32_t> ids(layer.tokens * kTopK);
    std::vector<float> weights(ids.size());
    epx::route(epx::Host{}, layer.router, epx::MatrixView<float const>(layer.logits[r].data(), layer.tokens, kExperts),
               {}, epx::MatrixView<std::int32_t>(ids.data(), layer.tokens, kTopK),
               epx::MatrixView<float>(weights.data(), layer.tokens, kTopK));
    auto const want = dense_layer(layer.x[r], ids, weights, layer.gate_up, layer.down, layer.tokens);
    double diff = 0, ref = 0;
    for (std::size_t i = 0; i < want.size(); ++i) {
      double const got = epx::to_float(y[r][i]);
      diff = std::isnan(got) ? INFINITY : std::max(diff, std::abs(got - want[i]));
      ref = std::max(ref, std::abs(want[i]));
    }
    max_rel = std::max(max_rel, diff / ref);
  }
  return max_rel;
}

struct Row {
  char const* policy;
  char const* dtype;
  double max_rel_error;
  double ms_per_forward;
};

template <class Dispatch, class T>
Row run(char const* policy, char const* dtype, bool on_gpu, std::mt19937_64& rng) {
  auto const layer = make_layer<Dispatch, T>(rng);
  std::vector<std::vector<T>> y(kRanks, std::vector<T>(layer.tokens * kHidden, epx::from_float<T>(NAN)));
  double ms = 0.0;
#if defined(__CUDACC__)
  if (on_gpu)
    ms = run_cuda<Dispatch, T>(layer, y);
  else
    ms = run_host<Dispatch, T>(layer, y);
#else
  (void)on_gpu;
  ms = run_host<Dispatch, T>(layer, y);
#endif
  return {policy, dtype, max_rel_error(layer, y), ms};
}

}  // namespace

int main() {
#if defined(__CUDACC__)
  bool const on_gpu = have_gpu();
#else
  bool const on_gpu = false;
#endif
  std::mt19937_64 rng(2026);
  std::vector<Row> rows;
  rows.push_back(run<epx::AllToAll, float>("AllToAll", "f32", on_gpu, rng));
  rows.push_back(run<epx::AllGather, float>("AllGather", "f32", on_gpu, rng));
  rows.push_back(run<epx::AllToAll, epx::bfloat16>("AllToAll", "bf16", on_gpu, rng));
  rows.push_back(run<epx::AllGather, epx::bfloat16>("AllGather", "bf16", on_gpu, rng));

  char const* const where = on_gpu ? "Cuda backend (GPU, CudaLocalGroup)" : "Host backend (CPU)";
  fmt::print("epx {}.{}.{} demo: Qwen3-style MoE layer, {} experts, top-{}, hidden {}, intermediate {}, {}\n\n",
             EPX_VERSION_MAJOR, EPX_VERSION_MINOR, EPX_VERSION_PATCH, kExperts, kTopK, kHidden, kIntermediate, where);
  fmt::print("| policy    | ranks | dtype | tokens/rank | max rel. error | ms / forward ({}) |\n",
             on_gpu ? "GPU" : "CPU");
  fmt::print("|-----------|-------|-------|-------------|----------------|--------------------|\n");
  bool ok = true;
  for (auto const& r : rows) {
    // fp32: the CPU sums in the reference's order up to rounding; the GPU's fp32 sums run in
    // another order (tiles, fp32 all-reduce), a few ulps more. bf16: one rounding of each output.
    bool const exact = std::string_view(r.dtype) == "f32";
    double const tolerance = exact ? (on_gpu ? 1e-4 : 1e-5) : 1e-2;
    bool const pass = r.max_rel_error <= tolerance;
    ok = ok && pass;
    int const tokens = std::string_view(r.policy) == "AllToAll" ? kTokensPerRank : kTokensPerRank * kRanks;
    fmt::print("| {:<9} | {:>5} | {:<5} | {:>11} | {:>14.2e} | {:>18.2f} |{}\n", r.policy, kRanks, r.dtype, tokens,
               r.max_rel_error, r.ms_per_forward, pass ? "" : "  <- above tolerance");
  }
  fmt::print("\n{}\n", ok ? "all runs match the dense layer" : "MISMATCH against the dense layer");
  return ok ? 0 : 1;
}
