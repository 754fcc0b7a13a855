// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! Checking CUDA runtime and cuBLAS calls. Host code: needs the CUDA toolkit's headers, not nvcc.

#include <epx/core/error.hpp>

#include <cublas_api.h>
#include <cuda_runtime_api.h>

#include <string>
#include <string_view>

namespace epx::detail {

//! Errors after which the CUDA context is unusable until the process restarts.
constexpr bool is_sticky_cuda_error(cudaError_t e) noexcept {
  return e == cudaErrorIllegalAddress || e == cudaErrorLaunchFailure || e == cudaErrorIllegalInstruction ||
         e == cudaErrorMisalignedAddress || e == cudaErrorInvalidAddressSpace || e == cudaErrorInvalidPc ||
         e == cudaErrorHardwareStackError || e == cudaErrorAssert || e == cudaErrorLaunchTimeout ||
         e == cudaErrorECCUncorrectable;
}

//! Throws Error(kCuda) for a failed CUDA call, after clearing the thread's last-error state so the
//! next call does not report it again. Never exits or aborts.
[[noreturn]] inline void throw_cuda_error(cudaError_t code, std::string_view call, SourceLocation loc) {
  (void)cudaGetLastError();  // clear the (non-sticky) error so it is reported once
  throw_error(Errc::kCuda,
              fmt::format("CUDA call `{}` failed: {} ({}){}", call, cudaGetErrorName(code), cudaGetErrorString(code),
                          is_sticky_cuda_error(code) ? "; the CUDA context is lost, restart the process" : ""),
              loc);
}

//! The message of a failed launch check. A launch itself fails only with configuration errors
//! (grid, block, shared memory, no kernel image), which are not sticky; a sticky error seen at a
//! launch comes from an earlier asynchronous fault (this thread's or any kernel's on the context),
//! so the message does not blame `kernel` for it.
inline std::string launch_error_message(cudaError_t code, std::string_view kernel) {
  if (is_sticky_cuda_error(code))
    return fmt::format(
        "CUDA error {} ({}) seen when launching `{}`: an earlier asynchronous failure on this "
        "device (not necessarily this kernel) lost the CUDA context; restart the process "
        "(compute-sanitizer names the kernel that failed)",
        cudaGetErrorName(code), cudaGetErrorString(code), kernel);
  return fmt::format("launch of `{}` failed: {} ({})", kernel, cudaGetErrorName(code), cudaGetErrorString(code));
}

//! Checks the launch just made on this thread (cudaPeekAtLastError); the Error names `kernel`.
inline void check_launch(std::string_view kernel, SourceLocation loc) {
  cudaError_t const code = cudaPeekAtLastError();
  if (code == cudaSuccess) return;
  (void)cudaGetLastError();  // clear a non-sticky error so it is reported once
  throw_error(Errc::kCuda, launch_error_message(code, kernel), loc);
}

constexpr std::string_view cublas_status_name(cublasStatus_t s) noexcept {
  switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    case CUBLAS_STATUS_LICENSE_ERROR: return "CUBLAS_STATUS_LICENSE_ERROR";
  }
  return "unknown cublasStatus_t";
}

[[noreturn]] inline void throw_cublas_error(cublasStatus_t code, std::string_view call, SourceLocation loc) {
  throw_error(Errc::kCuda,
              fmt::format("cuBLAS call `{}` failed: {} ({})", call, cublas_status_name(code), static_cast<int>(code)),
              loc);
}

}  // namespace epx::detail

//! Evaluates a CUDA runtime call once; on failure throws epx::Error(Errc::kCuda) naming the call,
//! the error and file:line, and clears CUDA's last-error state.
#define EPX_CUDA_CHECK(call)                                                                                    \
  do {                                                                                                          \
    cudaError_t const epx_cuda_check_status_ = (call);                                                          \
    if (epx_cuda_check_status_ != cudaSuccess)                                                                  \
      ::epx::detail::throw_cuda_error(epx_cuda_check_status_, #call, ::epx::detail::SourceLocation::current()); \
  } while (0)

//! Checks the launch just made on this thread (cudaPeekAtLastError), e.g. after `kernel<<<...>>>`;
//! the Error names `kernel_name` (a sticky error from an earlier fault is reported as such, see
//! launch_error_message). Code that launches one of several kernels calls detail::check_launch
//! with the name of the one it launched.
#define EPX_CUDA_CHECK_LAUNCH(kernel_name) \
  ::epx::detail::check_launch(#kernel_name, ::epx::detail::SourceLocation::current())

//! Evaluates a cuBLAS call once; on failure throws epx::Error(Errc::kCuda).
#define EPX_CUBLAS_CHECK(call)                                                                                      \
  do {                                                                                                              \
    cublasStatus_t const epx_cublas_check_status_ = (call);                                                         \
    if (epx_cublas_check_status_ != CUBLAS_STATUS_SUCCESS)                                                          \
      ::epx::detail::throw_cublas_error(epx_cublas_check_status_, #call, ::epx::detail::SourceLocation::current()); \
  } while (0)
