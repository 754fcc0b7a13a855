// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

// Random device data made on the device: a hash of the element index, so that the 22 GB of
// DeepSeek-V3's experts need neither a host copy nor a host generator. Never zeros (zeros make
// GEMMs run 10-15% faster and hide unwritten outputs, ../shared/PERFORMANCE.md).

#include "bench_common.cuh"

#include <epx/cuda/element.cuh>

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace epx::bench {

// p[i] = uniform in [-scale, scale), from splitmix64 of (seed, i): the same values on every run.
template <class T>
__global__ void fill_random_kernel(T* p, std::size_t n, std::uint64_t seed, float scale) {
  for (std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; i < n;
       i += std::size_t{gridDim.x} * blockDim.x) {
    std::uint64_t z = seed + i * 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    float const u = static_cast<float>(z >> 40) * (1.0f / 16777216.0f);  // 24 random bits in [0, 1)
    p[i] = epx::detail::device_from_float<T>((2.0f * u - 1.0f) * scale);
  }
}

// Fills n elements at p on stream s (asynchronously).
template <class T>
void fill_random(cudaStream_t s, T* p, std::size_t n, std::uint64_t seed, float scale) {
  if (n == 0) return;
  fill_random_kernel<T><<<1024, 256, 0, s>>>(p, n, seed, scale);
  BENCH_CHECK(cudaGetLastError());
}

// A new device array of n random elements, filled on a stream of its own and waited for (setup
// code, outside every timed region).
template <class T = epx::bfloat16>
T* random_device(std::size_t n, std::uint64_t seed, float scale) {
  T* p = device_alloc<T>(n);
  cudaStream_t s{};
  BENCH_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  fill_random(s, p, n, seed, scale);
  BENCH_CHECK(cudaStreamSynchronize(s));
  BENCH_CHECK(cudaStreamDestroy(s));
  return p;
}

}  // namespace epx::bench
