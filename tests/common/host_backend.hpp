// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

// The Host backend of the tests written once for every execution space (expert_parallel_cases.hpp,
// local_group_cases.hpp, routing_cases.hpp): what a test body needs from a space, on host memory.
// The Cuda backend (tests/cuda/cuda_backend.cuh) has the same members on device memory.

#include "test_util.hpp"

#include <chrono>
#include <cstddef>
#include <cstring>
#include <vector>

namespace epx::test {

//! Host memory with the interface of the CUDA tests' DeviceBuffer: filled from and read back into
//! host vectors, poisoned byte by byte.
template <class T>
class HostBuffer {
 public:
  HostBuffer() = default;
  explicit HostBuffer(std::size_t count) : data_(count) {}
  explicit HostBuffer(std::vector<T> const& host) : data_(host) {}

  //! Fills every byte with `byte`, so that unwritten outputs are caught.
  void poison(int byte) {
    if (!data_.empty()) std::memset(static_cast<void*>(data_.data()), byte, data_.size() * sizeof(T));
  }
  [[nodiscard]] std::vector<T> to_host() const { return data_; }
  [[nodiscard]] T* data() noexcept { return data_.empty() ? nullptr : data_.data(); }
  [[nodiscard]] T const* data() const noexcept { return data_.empty() ? nullptr : data_.data(); }
  [[nodiscard]] std::size_t size() const noexcept { return data_.size(); }

 private:
  std::vector<T> data_;
};

//! The Host execution space for test bodies.
struct HostBackend {
  using Space = Host;
  using Group = LocalGroup;
  template <class T>
  using Buffer = HostBuffer<T>;

  static constexpr char const* kName = "Host";

  //! Where one rank's work runs: the calling thread.
  struct Rank {
    [[nodiscard]] Host context() const noexcept { return {}; }
    [[nodiscard]] StreamRef comm_stream() const noexcept { return StreamRef::host(); }
    void sync() const noexcept {}
  };

  //! One rank's experts, read where they are.
  template <class T>
  struct Experts {
    ExpertWeights local;
    Experts(GlobalWeights<T> const& global, ExpertRange range) : local(global.local(range)) {}
    [[nodiscard]] ExpertWeights weights() const { return local; }
  };

  //! Rank counts the layer scenarios run on.
  static std::vector<int> rank_counts() { return {1, 2, 3, 4, 8}; }

  //! The layer's widths where a scenario does not set them.
  static ExpertMlpConfig default_mlp() { return {.hidden = 32, .intermediate = 24}; }

  //! Max-norm relative error allowed against the dense double reference and the Host layer: fp32
  //! loops in a fixed order, and one rounding of bf16/fp16 storage.
  template <class T>
  static double tolerance() {
    return std::is_same_v<T, float> ? 1e-5 : 1e-2;
  }

  //! Nothing to preallocate: LocalGroup's all-reduce works in host memory it owns.
  static void reserve(Group&, std::size_t) {}

  // The stages whose signatures differ between spaces.
  static std::size_t plan_workspace_bytes(std::int32_t num_tokens, std::int32_t top_k, std::int32_t num_experts) {
    return epx::plan_workspace_bytes(num_tokens, top_k, num_experts);
  }
  static RoutingPlan make_plan(Rank const&, MatrixView<std::int32_t const> ids, std::int32_t num_experts,
                               ExpertRange range, Workspace workspace, Status* status) {
    return epx::make_plan(Host{}, ids, num_experts, range, workspace, *status);
  }

  //! A span of the backend's memory, copied into a host vector.
  template <class T>
  static std::vector<std::remove_const_t<T>> to_host(std::span<T> values) {
    return {values.begin(), values.end()};
  }
};

}  // namespace epx::test
