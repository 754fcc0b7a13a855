// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// The CUDA stages used alone (docs/api.md, "Using the stages alone on the GPU"): route, plan,
// permute, expert MLP, unpermute on one stream, all experts on this GPU, then a check against the
// Host backend. Exits 77 (skipped) without a GPU.

#include <epx/cuda.cuh>

#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

namespace {

// Uploads on the stream that will read the data: a plain cudaMemcpy from pageable memory may return
// before the bytes land, and work on a non-blocking stream is not ordered after it.
template <class T>
T* upload(std::vector<T> const& v, cudaStream_t s) {
  T* p = nullptr;
  EPX_CUDA_CHECK(cudaMalloc(&p, v.size() * sizeof(T)));
  EPX_CUDA_CHECK(cudaMemcpyAsync(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice, s));
  return p;
}

template <class T>
T* device(std::size_t n) {
  T* p = nullptr;
  EPX_CUDA_CHECK(cudaMalloc(&p, n * sizeof(T)));
  return p;
}

}  // namespace

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("cuda_stages: no CUDA device, skipped\n");
    return 77;
  }
  using epx::bfloat16;
  constexpr std::int32_t kTokens = 256, kExperts = 16, kTopK = 4, kHidden = 128, kInter = 64;
  std::mt19937 rng(7);
  std::normal_distribution<float> n01;
  auto random = [&](std::size_t n, float scale) {
    std::vector<bfloat16> v(n);
    for (auto& e : v) e = bfloat16(scale * n01(rng));
    return v;
  };
  std::vector<float> logits(std::size_t{kTokens} * kExperts);
  for (auto& l : logits) l = n01(rng);
  auto const x = random(std::size_t{kTokens} * kHidden, 1.0f);
  auto const gate_up = random(std::size_t{kExperts} * 2 * kInter * kHidden, 0.09f);
  auto const down = random(std::size_t{kExperts} * kHidden * kInter, 0.12f);

  // example-begin cuda-stages
  epx::RouterConfig const router{.num_experts = kExperts, .top_k = kTopK, .renormalize = true};
  epx::ExpertMlpConfig const mlp{.hidden = kHidden, .intermediate = kInter};  // SwiGLU, gate then up
  cudaStream_t s = nullptr;
  EPX_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  epx::StreamRef const stream(s);
  float* d_logits = upload(logits, s);  // ordered on s, before the stages that read it
  bfloat16 *d_x = upload(x, s), *d_gate_up = upload(gate_up, s), *d_down = upload(down, s);
  auto* d_ids = device<std::int32_t>(kTokens * kTopK);
  auto* d_weights = device<float>(kTokens * kTopK);
  auto* d_perm = device<bfloat16>(std::size_t{kTokens} * kTopK * kHidden);  // room for every slot
  auto* d_out = device<bfloat16>(std::size_t{kTokens} * kTopK * kHidden);
  auto* d_y = device<bfloat16>(std::size_t{kTokens} * kHidden);
  auto* d_status = device<epx::Status>(1);
  EPX_CUDA_CHECK(cudaMemsetAsync(d_status, 0, sizeof(epx::Status), s));
  std::size_t const plan_bytes = epx::cuda_plan_workspace_bytes(kTokens, kTopK, kExperts);
  std::size_t const mlp_bytes = epx::cuda_expert_mlp_workspace_bytes<bfloat16>(mlp, kTokens * kTopK);
  auto* d_plan_ws = device<std::byte>(plan_bytes);
  auto* d_mlp_ws = device<std::byte>(mlp_bytes);

  // Every call below is ordered on `s`; none synchronises or allocates.
  epx::route(stream, router, epx::MatrixView<float const>(d_logits, kTokens, kExperts), {},
             epx::MatrixView<std::int32_t>(d_ids, kTokens, kTopK), epx::MatrixView<float>(d_weights, kTokens, kTopK));
  epx::RoutingPlan const plan =
      epx::make_plan(stream, epx::MatrixView<std::int32_t const>(d_ids, kTokens, kTopK), kExperts, {0, kExperts},
                     epx::Workspace(d_plan_ws, plan_bytes), d_status);
  std::int64_t const slots = std::int64_t{kTokens} * kTopK;  // the routed-row count stays on the device
  epx::permute(stream, plan, epx::MatrixView<bfloat16 const>(d_x, kTokens, kHidden),
               epx::MatrixView<bfloat16>(d_perm, slots, kHidden));
  auto const weights = epx::expert_weights(epx::TensorView(d_gate_up, {kExperts, 2 * kInter, kHidden}),
                                           epx::TensorView(d_down, {kExperts, kHidden, kInter}));  // shapes checked
  epx::expert_mlp<bfloat16>(stream, mlp, weights, epx::MatrixView<bfloat16 const>(d_perm, slots, kHidden),
                            plan.expert_offsets, epx::MatrixView<bfloat16>(d_out, slots, kHidden),
                            epx::Workspace(d_mlp_ws, mlp_bytes));
  epx::unpermute(stream, plan, epx::MatrixView<bfloat16 const>(d_out, slots, kHidden),
                 epx::MatrixView<float const>(d_weights, kTokens, kTopK),
                 epx::MatrixView<bfloat16>(d_y, kTokens, kHidden));
  EPX_CUDA_CHECK(cudaStreamSynchronize(s));  // the caller decides when to wait
  // example-end cuda-stages

  // The same layer on the Host backend (one rank), as the reference.
  epx::LocalGroup group(1);
  epx::MoeConfig const config{
      .router = router,
      .mlp = mlp,
      .weights = epx::expert_weights(epx::TensorView(gate_up.data(), {kExperts, 2 * kInter, kHidden}),
                                     epx::TensorView(down.data(), {kExperts, kHidden, kInter}))};
  epx::ExpertParallel<epx::Grouped, epx::AllToAll, epx::Host> layer(config, group.communicator(0));
  std::vector<std::byte> ws(layer.workspace_bytes(kTokens));
  std::vector<bfloat16> y_ref(x.size()), y(x.size());
  layer.forward(epx::Host{}, epx::MatrixView<float const>(logits.data(), kTokens, kExperts),
                epx::MatrixView<bfloat16 const>(x.data(), kTokens, kHidden),
                epx::MatrixView<bfloat16>(y_ref.data(), kTokens, kHidden), epx::Workspace(ws.data(), ws.size()));
  EPX_CUDA_CHECK(cudaMemcpy(y.data(), d_y, y.size() * sizeof(bfloat16), cudaMemcpyDeviceToHost));
  double diff = 0.0, ref = 0.0;
  for (std::size_t i = 0; i < y.size(); ++i) {
    diff = std::fmax(diff, std::fabs(double(epx::to_float(y[i])) - double(epx::to_float(y_ref[i]))));
    ref = std::fmax(ref, std::fabs(double(epx::to_float(y_ref[i]))));
  }
  std::printf("cuda_stages: max |y - y_host| / max |y_host| = %.2e\n", diff / ref);
  for (void* p : {static_cast<void*>(d_logits), static_cast<void*>(d_x), static_cast<void*>(d_gate_up),
                  static_cast<void*>(d_down), static_cast<void*>(d_ids), static_cast<void*>(d_weights),
                  static_cast<void*>(d_perm), static_cast<void*>(d_out), static_cast<void*>(d_y),
                  static_cast<void*>(d_status), static_cast<void*>(d_plan_ws), static_cast<void*>(d_mlp_ws)})
    EPX_CUDA_CHECK(cudaFree(p));
  EPX_CUDA_CHECK(cudaStreamDestroy(s));
  return diff / ref <= 2e-2 ? 0 : 1;  // the router may break near-ties differently: see router.cuh
}
