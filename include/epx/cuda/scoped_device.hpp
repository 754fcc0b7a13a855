// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! A scope in which one CUDA device is current. Host code: needs the CUDA runtime's headers, not nvcc.

#include <epx/cuda/error.hpp>

#include <cuda_runtime_api.h>

namespace epx::detail {

//! Makes `device` current for a scope and restores the caller's device after, so that work for a
//! rank or a communicator on one GPU never moves the calling thread to another GPU behind its back.
class ScopedDevice {
 public:
  explicit ScopedDevice(int device) {
    EPX_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device) EPX_CUDA_CHECK(cudaSetDevice(device));
    changed_ = previous_ != device;
  }
  ScopedDevice(ScopedDevice const&) = delete;
  ScopedDevice& operator=(ScopedDevice const&) = delete;
  ~ScopedDevice() {
    if (changed_) (void)cudaSetDevice(previous_);  // a destructor must not throw; the next CUDA call reports
  }

 private:
  int previous_ = 0;
  bool changed_ = false;
};

}  // namespace epx::detail
