// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// Built (never run: build machines have no GPU) by the find_package consumer with
// -DEPX_CONSUMER_CUDA=ON: epx's headers, {fmt} included, compile under nvcc -std=c++20 through
// epx::nccl (which must carry FMT_USE_CONSTEXPR=1 to nvcc), and the program links.

#include <epx/cuda/error.hpp>
#include <epx/epx.hpp>
#include <epx/nccl/error.hpp>

#include <cstdio>

__global__ void scale(float* data, float factor, int n) {
  int const i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (i < n) data[i] = epx::detail::activate(epx::Activation::kReLU, data[i], 0.0f, {}) * factor;
}

int main() {
  try {
    int version = 0;
    EPX_CUDA_CHECK(cudaRuntimeGetVersion(&version));
    float* data = nullptr;
    EPX_CUDA_CHECK(cudaMalloc(&data, 256 * sizeof(float)));
    scale<<<1, 256>>>(data, 2.0f, 256);
    EPX_CUDA_CHECK_LAUNCH(scale);
    EPX_CUDA_CHECK(cudaFree(data));
    int nccl_version = 0;
    EPX_NCCL_CHECK(ncclGetVersion(&nccl_version));
    std::printf("%s\n", fmt::format("epx {}.{}: CUDA runtime {}, NCCL {}", EPX_VERSION_MAJOR, EPX_VERSION_MINOR,
                                    version, nccl_version)
                            .c_str());
  } catch (epx::Error const& e) {
    std::printf("%s\n", e.what());
    return 1;
  }
  return 0;
}
