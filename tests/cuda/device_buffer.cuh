// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

// A test-only owner of device memory, filled from and read back into host vectors.

#include <epx/core/stream.hpp>
#include <epx/cuda/error.hpp>

#include <cuda_runtime.h>

#include <cstdio>
#include <vector>

namespace epx::test {

template <class T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(std::size_t count) : count_(count) {
    if (count > 0) EPX_CUDA_CHECK(cudaMalloc(&data_, count * sizeof(T)));
  }
  explicit DeviceBuffer(std::vector<T> const& host) : DeviceBuffer(host.size()) {
    if (count_ == 0) return;
    EPX_CUDA_CHECK(cudaMemcpy(data_, host.data(), count_ * sizeof(T), cudaMemcpyHostToDevice));
    // A pageable upload may return before the copy lands; the tests' non-blocking streams would not wait.
    EPX_CUDA_CHECK(cudaDeviceSynchronize());
  }
  DeviceBuffer(DeviceBuffer const&) = delete;
  DeviceBuffer& operator=(DeviceBuffer const&) = delete;
  ~DeviceBuffer() {
    if (data_ != nullptr && cudaFree(data_) != cudaSuccess) std::fprintf(stderr, "epx test: cudaFree failed\n");
  }

  //! Fills every byte with `byte` (a poison pattern, so unwritten outputs are caught). Waits for
  //! the fill: cudaMemset may return early, and the tests' non-blocking streams do not wait for it.
  void poison(int byte) {
    if (count_ == 0) return;
    EPX_CUDA_CHECK(cudaMemset(data_, byte, count_ * sizeof(T)));
    EPX_CUDA_CHECK(cudaDeviceSynchronize());
  }
  [[nodiscard]] std::vector<T> to_host() const {
    std::vector<T> out(count_);
    if (count_ > 0) EPX_CUDA_CHECK(cudaMemcpy(out.data(), data_, count_ * sizeof(T), cudaMemcpyDeviceToHost));
    return out;
  }
  [[nodiscard]] T* data() const noexcept { return data_; }
  [[nodiscard]] std::size_t size() const noexcept { return count_; }

 private:
  T* data_ = nullptr;
  std::size_t count_ = 0;
};

//! A test-only non-blocking CUDA stream.
struct CudaStream {
  cudaStream_t s = nullptr;
  CudaStream() { EPX_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking)); }
  CudaStream(CudaStream const&) = delete;
  CudaStream& operator=(CudaStream const&) = delete;
  ~CudaStream() { (void)cudaStreamDestroy(s); }
  [[nodiscard]] StreamRef ref() const { return StreamRef(s); }
  void sync() const { EPX_CUDA_CHECK(cudaStreamSynchronize(s)); }
};

}  // namespace epx::test
