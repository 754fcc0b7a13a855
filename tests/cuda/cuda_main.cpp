// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// The main of every CUDA test executable. Without a usable device it prints why and returns 77,
// which CMake's SKIP_RETURN_CODE turns into a visible skip; with EPX_REQUIRE_GPU=1 (GPU runners)
// the same situation is a failure instead, so a GPU job can never pass by skipping.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cuda_runtime_api.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

int main(int argc, char** argv) {
  int count = 0;
  cudaError_t const status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess || count == 0) {
    (void)cudaGetLastError();
    char const* require = std::getenv("EPX_REQUIRE_GPU");
    bool const required = require != nullptr && std::strcmp(require, "0") != 0 && *require != '\0';
    std::printf("EPX_SKIP: no CUDA device (%s)%s\n",
                status != cudaSuccess ? cudaGetErrorString(status) : "cudaGetDeviceCount returned 0",
                required ? "; EPX_REQUIRE_GPU is set, so this is a failure" : "");
    return required ? 1 : 77;
  }
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, 0) == cudaSuccess)
    std::printf("epx CUDA tests on %s (sm_%d%d)\n", prop.name, prop.major, prop.minor);
  doctest::Context context(argc, argv);
  return context.run();
}
