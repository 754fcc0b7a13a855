// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

// The Cuda backend of the tests written once for every execution space: the members of
// tests/common/host_backend.hpp's HostBackend, on device memory, CudaLocalGroup ranks and one
// non-blocking stream per rank.

#include "../common/test_util.hpp"
#include "device_buffer.cuh"

#include <epx/cuda.cuh>

#include <cstddef>
#include <vector>

namespace epx::test {

template <class T>
std::vector<T> slice(std::vector<T> const& v, std::size_t first, std::size_t count) {
  if (v.empty()) return {};
  return std::vector<T>(v.begin() + static_cast<std::ptrdiff_t>(first),
                        v.begin() + static_cast<std::ptrdiff_t>(first + count));
}

//! One rank's experts on its device (uploaded inside the rank's thread, with its device current).
template <class T>
struct DeviceExperts {
  DeviceBuffer<T> gate_up, down, gate_up_bias, down_bias;

  DeviceExperts(GlobalWeights<T> const& gw, ExpertRange range)
      : gate_up(slice(gw.gate_up, static_cast<std::size_t>(range.first) * gate_up_size(gw.mlp),
                      static_cast<std::size_t>(range.count) * gate_up_size(gw.mlp))),
        down(slice(gw.down, static_cast<std::size_t>(range.first) * down_size(gw.mlp),
                   static_cast<std::size_t>(range.count) * down_size(gw.mlp))),
        gate_up_bias(slice(gw.gate_up_bias, static_cast<std::size_t>(range.first) * gw.mlp.gate_up_rows(),
                           static_cast<std::size_t>(range.count) * gw.mlp.gate_up_rows())),
        down_bias(slice(gw.down_bias, static_cast<std::size_t>(range.first) * gw.mlp.hidden,
                        static_cast<std::size_t>(range.count) * gw.mlp.hidden)),
        mlp_(gw.mlp),
        count_(range.count) {}

  //! Built the checked way (TensorViews of device memory), as the docs show.
  [[nodiscard]] ExpertWeights weights() const {
    std::int64_t const l = count_, rows = mlp_.gate_up_rows(), h = mlp_.hidden, i = mlp_.intermediate;
    TensorView<T const, 2> gate_up_b, down_b;  // empty: no bias
    if (gate_up_bias.size() > 0) {
      gate_up_b = TensorView<T const, 2>(gate_up_bias.data(), {l, rows});
      down_b = TensorView<T const, 2>(down_bias.data(), {l, h});
    }
    return expert_weights(TensorView<T const, 3>(gate_up.data(), {l, rows, h}),
                          TensorView<T const, 3>(down.data(), {l, h, i}), gate_up_b, down_b);
  }

 private:
  static std::size_t gate_up_size(ExpertMlpConfig const& m) {
    return static_cast<std::size_t>(m.gate_up_rows()) * static_cast<std::size_t>(m.hidden);
  }
  static std::size_t down_size(ExpertMlpConfig const& m) {
    return static_cast<std::size_t>(m.hidden) * static_cast<std::size_t>(m.intermediate);
  }
  ExpertMlpConfig mlp_;
  std::int32_t count_;
};

//! The Cuda execution space for test bodies.
struct CudaBackend {
  using Space = Cuda;
  using Group = CudaLocalGroup;
  template <class T>
  using Buffer = DeviceBuffer<T>;
  template <class T>
  using Experts = DeviceExperts<T>;

  static constexpr char const* kName = "Cuda";

  //! Where one rank's work runs: its own non-blocking stream, on the device current in its thread.
  struct Rank {
    CudaStream stream;
    [[nodiscard]] StreamRef context() const { return stream.ref(); }
    [[nodiscard]] StreamRef comm_stream() const { return stream.ref(); }
    void sync() const { stream.sync(); }
  };

  static std::vector<int> rank_counts() { return {1, 2, 4, 8}; }

  //! Multiples of 8, so that bf16 and fp16 take the tensor-core path.
  static ExpertMlpConfig default_mlp() { return {.hidden = 64, .intermediate = 48}; }

  //! fp32 runs on CUDA cores in k order (not the Host's order); bf16/fp16 round once in storage.
  template <class T>
  static double tolerance() {
    return std::is_same_v<T, float> ? 1e-4 : 1e-2;
  }

  //! The all-reduce scratch up front, so that no forward allocates.
  static void reserve(Group& group, std::size_t bytes) { group.reserve(bytes); }

  // The stages whose signatures differ between spaces.
  static std::size_t plan_workspace_bytes(std::int32_t num_tokens, std::int32_t top_k, std::int32_t num_experts) {
    return cuda_plan_workspace_bytes(num_tokens, top_k, num_experts);
  }
  static RoutingPlan make_plan(Rank const& on, MatrixView<std::int32_t const> ids, std::int32_t num_experts,
                               ExpertRange range, Workspace workspace, Status* status) {
    return epx::make_plan(on.context(), ids, num_experts, range, workspace, status);
  }

  //! A span of device memory, copied into a host vector.
  template <class T>
  static std::vector<std::remove_const_t<T>> to_host(std::span<T> values) {
    std::vector<std::remove_const_t<T>> out(values.size());
    if (!out.empty())
      EPX_CUDA_CHECK(cudaMemcpy(out.data(), values.data(), out.size() * sizeof(T), cudaMemcpyDeviceToHost));
    return out;
  }
};

}  // namespace epx::test
