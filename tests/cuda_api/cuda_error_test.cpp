// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// EPX_CUDA_CHECK and EPX_CUBLAS_CHECK (include/epx/cuda/error.hpp), on any machine: the failing
// calls here fail with or without a GPU and driver, and none needs a device to succeed.

#include <epx/cuda/error.hpp>

#include <doctest/doctest.h>

#include <string>

namespace {

// Runs `f`, which must throw epx::Error, and returns it.
template <class F>
epx::Error caught(F&& f) {
  try {
    f();
  } catch (epx::Error const& e) {
    return e;
  }
  FAIL("no epx::Error was thrown");
  return epx::Error(epx::Errc::kInvalidArgument, "unreachable");
}

bool contains(std::string const& text, std::string const& part) { return text.find(part) != std::string::npos; }

// What cudaGetLastError() reports with no error pending: cudaSuccess wherever a driver is
// installed. Without one, every runtime call (cudaGetLastError too) returns
// cudaErrorInsufficientDriver, which nothing can clear; the checks below then compare with that.
cudaError_t no_pending_error() {
  (void)cudaGetLastError();
  return cudaGetLastError();
}

}  // namespace

TEST_CASE("Cuda::check: a succeeding call does not throw") {
  int version = 0;
  CHECK_NOTHROW(EPX_CUDA_CHECK(cudaRuntimeGetVersion(&version)));
  CHECK(version > 0);
}

TEST_CASE("Cuda::check: a failing call throws Errc::kCuda naming the call and the file") {
  cudaError_t const clear = no_pending_error();
  // No device has this index: fails with a GPU (invalid device) and without (no driver / device).
  auto const e = caught([] { EPX_CUDA_CHECK(cudaSetDevice(1 << 20)); });
  INFO(std::string(e.what()));
  CHECK(e.code() == epx::Errc::kCuda);
  CHECK(contains(e.what(), "CUDA call `cudaSetDevice(1 << 20)` failed: cuda"));
  CHECK(contains(e.what(), "cuda_error_test.cpp:"));
  CHECK(contains(e.what(), "epx: "));
  // The error was reported once: the thread's last-error state is clear again.
  CHECK(cudaGetLastError() == clear);
}

TEST_CASE("Cuda::check: device 0 without a usable GPU throws") {
  int count = 0;
  if (cudaGetDeviceCount(&count) == cudaSuccess && count > 0) {
    MESSAGE("a GPU is present: cudaSetDevice(0) succeeds here, skipping");
    return;
  }
  cudaError_t const clear = no_pending_error();
  auto const e = caught([] { EPX_CUDA_CHECK(cudaSetDevice(0)); });
  INFO(std::string(e.what()));
  CHECK(e.code() == epx::Errc::kCuda);
  CHECK(contains(e.what(), "CUDA call `cudaSetDevice(0)` failed: cuda"));
  CHECK(cudaGetLastError() == clear);
}

TEST_CASE("Cuda::check: cudaMemcpy with an invalid kind and null pointers throws") {
  cudaError_t const clear = no_pending_error();
  auto const e = caught([] { EPX_CUDA_CHECK(cudaMemcpy(nullptr, nullptr, 16, static_cast<cudaMemcpyKind>(42))); });
  INFO(std::string(e.what()));
  CHECK(e.code() == epx::Errc::kCuda);
  CHECK(contains(e.what(), "cudaMemcpy(nullptr, nullptr, 16, static_cast<cudaMemcpyKind>(42))"));
  CHECK(contains(e.what(), "cuda_error_test.cpp:"));
  CHECK(cudaGetLastError() == clear);
}

TEST_CASE("Cuda::check: the call is evaluated exactly once") {
  int calls = 0;
  auto fails = [&] {
    ++calls;
    return cudaErrorInvalidValue;
  };
  auto succeeds = [&] {
    ++calls;
    return cudaSuccess;
  };
  CHECK_THROWS_AS(EPX_CUDA_CHECK(fails()), epx::Error);
  CHECK(calls == 1);
  CHECK_NOTHROW(EPX_CUDA_CHECK(succeeds()));
  CHECK(calls == 2);
}

TEST_CASE("Cuda::check: an error that loses the context says to restart") {
  auto const sticky = caught([] { EPX_CUDA_CHECK(cudaErrorIllegalAddress); });
  CHECK(contains(sticky.what(), "cudaErrorIllegalAddress"));
  CHECK(contains(sticky.what(), "restart the process"));
  auto const plain = caught([] { EPX_CUDA_CHECK(cudaErrorInvalidValue); });
  CHECK(contains(plain.what(), "cudaErrorInvalidValue"));
  CHECK_FALSE(contains(plain.what(), "restart the process"));
}

TEST_CASE("Cuda::check: a launch check blames the launch only for launch errors") {
  // Every error that loses the context is named as such (the list grew by two: a watchdog timeout
  // and an uncorrectable ECC error end the context as surely as an illegal address).
  for (cudaError_t const e : {cudaErrorIllegalAddress, cudaErrorLaunchFailure, cudaErrorLaunchTimeout,
                              cudaErrorECCUncorrectable, cudaErrorAssert, cudaErrorMisalignedAddress})
    CHECK(epx::detail::is_sticky_cuda_error(e));
  for (cudaError_t const e : {cudaErrorInvalidValue, cudaErrorInvalidConfiguration, cudaErrorNoKernelImageForDevice,
                              cudaErrorLaunchOutOfResources})
    CHECK_FALSE(epx::detail::is_sticky_cuda_error(e));
  // A configuration error is this launch's own.
  std::string const own = epx::detail::launch_error_message(cudaErrorInvalidConfiguration, "permute_kernel");
  CHECK(contains(own, "launch of `permute_kernel` failed"));
  CHECK(contains(own, "cudaErrorInvalidConfiguration"));
  // A sticky error seen at a launch came from an earlier asynchronous fault: not blamed on it.
  std::string const earlier = epx::detail::launch_error_message(cudaErrorIllegalAddress, "grouped_gemm_mma_kernel");
  CHECK(contains(earlier, "cudaErrorIllegalAddress"));
  CHECK(contains(earlier, "seen when launching `grouped_gemm_mma_kernel`"));
  CHECK(contains(earlier, "not necessarily this kernel"));
  CHECK(contains(earlier, "restart the process"));
  CHECK_FALSE(contains(earlier, "launch of `grouped_gemm_mma_kernel` failed"));
}

TEST_CASE("Cuda::check: EPX_CUDA_CHECK works as a single statement") {
  int branch = 0;
  for (bool const fail : {false, true}) {
    try {
      if (fail)
        EPX_CUDA_CHECK(cudaErrorInvalidValue);
      else
        EPX_CUDA_CHECK(cudaSuccess);
      branch += 1;
    } catch (epx::Error const&) {
      branch += 10;
    }
  }
  CHECK(branch == 11);
}

TEST_CASE("Cuda::check: EPX_CUBLAS_CHECK throws naming the status") {
  auto returns_invalid = [] { return CUBLAS_STATUS_INVALID_VALUE; };
  auto const e = caught([&] { EPX_CUBLAS_CHECK(returns_invalid()); });
  INFO(std::string(e.what()));
  CHECK(e.code() == epx::Errc::kCuda);
  CHECK(contains(e.what(), "cuBLAS call `returns_invalid()` failed: CUBLAS_STATUS_INVALID_VALUE"));
  CHECK(contains(e.what(), "cuda_error_test.cpp:"));

  auto const literal = caught([] { EPX_CUBLAS_CHECK(CUBLAS_STATUS_INVALID_VALUE); });
  CHECK(contains(literal.what(), "CUBLAS_STATUS_INVALID_VALUE"));
  CHECK_NOTHROW(EPX_CUBLAS_CHECK(CUBLAS_STATUS_SUCCESS));
}

TEST_CASE("Cuda::check: EPX_CUBLAS_CHECK on a real call without a handle throws") {
  // A null handle is rejected by cuBLAS itself, GPU or not.
  auto const e = caught([] { EPX_CUBLAS_CHECK(cublasSetMathMode(nullptr, CUBLAS_DEFAULT_MATH)); });
  INFO(std::string(e.what()));
  CHECK(e.code() == epx::Errc::kCuda);
  CHECK(contains(e.what(), "cublasSetMathMode(nullptr, CUBLAS_DEFAULT_MATH)"));
  CHECK(contains(e.what(), "CUBLAS_STATUS_"));
}
