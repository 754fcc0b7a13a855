// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! What every CUDA launcher of epx shares: the stream type work is ordered on, grid sizes and
//! grid-stride loops, the device's traits, persistent launches, and whether rows move in 16-byte
//! vectors. The stage files (router, plan, permute, grouped_gemm, ...) hold only their own kernels.

#include <epx/core/error.hpp>
#include <epx/core/stream.hpp>
#include <epx/cuda/error.hpp>
#include <epx/cuda/row_blocks.hpp>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <string_view>
#include <utility>

namespace epx::detail {

//! A CUDA stream that work is ordered on: never the host (and never the legacy default stream,
//! which StreamRef refuses). The public CUDA functions take a StreamRef, the vocabulary they share
//! with the communicators, and turn it into a CudaStream once, on entry; everything below them
//! takes a CudaStream, so "a host stream given to a CUDA launcher" cannot happen there.
class CudaStream {
 public:
  //! Throws Errc::kInvalidArgument naming `where` for StreamRef::host(): the one place epx raises
  //! that error (communicators check their own streams, with their device in the message).
  CudaStream(StreamRef stream, std::string_view where) : stream_(checked(stream, where)) {}

  [[nodiscard]] cudaStream_t get() const noexcept { return stream_; }

  //! For the collectives and the public stage functions, which take a StreamRef.
  operator StreamRef() const { return StreamRef(stream_); }  // NOLINT(google-explicit-constructor)

 private:
  static cudaStream_t checked(StreamRef stream, std::string_view where) {
    require(!stream.is_host(), Errc::kInvalidArgument, where, "stream", "StreamRef::host()",
            "a CUDA stream (device memory in, device memory out)");
    return reinterpret_cast<cudaStream_t>(stream.get());
  }

  cudaStream_t stream_;
};

// ---- Grid-stride loops ----
// A grid-stride loop starts at this thread's index and steps by the grid's size, so any grid (the
// launcher caps it, grid_blocks) covers any amount of work. `I` is the index type: 32 bits where
// the work is known to fit (no 64-bit arithmetic per element), 64 bits otherwise.

//! This thread's index in a 1-D grid: where its grid-stride loop starts.
template <class I>
__device__ __forceinline__ I grid_thread() {
  return static_cast<I>(blockIdx.x) * static_cast<I>(blockDim.x) + static_cast<I>(threadIdx.x);
}

//! The threads of a 1-D grid: the step of its grid-stride loop.
template <class I>
__device__ __forceinline__ I grid_threads() {
  return static_cast<I>(gridDim.x) * static_cast<I>(blockDim.x);
}

//! The first row of this thread in a grid of 2-D row blocks (threadIdx.y a row of the block's,
//! threadIdx.x the row's chunks: row_blocks.hpp).
template <class I>
__device__ __forceinline__ I grid_row() {
  return static_cast<I>(blockIdx.x) * static_cast<I>(blockDim.y) + static_cast<I>(threadIdx.y);
}

//! The rows a grid of 2-D row blocks covers per step.
template <class I>
__device__ __forceinline__ I grid_rows() {
  return static_cast<I>(gridDim.x) * static_cast<I>(blockDim.y);
}

// ---- The device ----

//! The device's SM count and compute capability: what tuning (cuda/tuning.cuh) and the GEMM's
//! persistent grid are chosen from.
struct DeviceTraits {
  int device = 0;
  int sms = 0;
  int major = 0;
  int minor = 0;
};

//! The current device's traits: read once per device and process (they never change), so a
//! launch costs one cudaGetDevice, not four attribute queries.
inline DeviceTraits current_device_traits() {
  DeviceTraits d;
  EPX_CUDA_CHECK(cudaGetDevice(&d.device));
  static std::mutex mutex;
  static std::map<int, DeviceTraits> known;
  std::lock_guard const lock(mutex);
  if (auto const it = known.find(d.device); it != known.end()) return it->second;
  EPX_CUDA_CHECK(cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, d.device));
  EPX_CUDA_CHECK(cudaDeviceGetAttribute(&d.major, cudaDevAttrComputeCapabilityMajor, d.device));
  EPX_CUDA_CHECK(cudaDeviceGetAttribute(&d.minor, cudaDevAttrComputeCapabilityMinor, d.device));
  known.emplace(d.device, d);
  return d;
}

// ---- Launches ----

//! Lets `kernel` launch with `bytes` of dynamic shared memory on `device`. The attribute is one
//! value per kernel and device, shared by every thread (the ranks of a CudaLocalGroup launch the
//! same kernel with different sizes at once), so it only ever grows, under a lock: a thread can
//! never lower it between another thread's setting and launch.
inline void allow_dynamic_smem(void const* kernel, int device, std::size_t bytes) {
  static std::mutex mutex;
  static std::map<std::pair<void const*, int>, std::size_t> allowed;
  std::lock_guard const lock(mutex);
  std::size_t& current = allowed[{kernel, device}];
  if (bytes <= current) return;
  EPX_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  current = bytes;
}

//! Launches a persistent grid of `kernel` (named `name` in errors): as many CTAs as fit on the
//! device at once, or fewer when the work items (`max_items`, bounded by the caller) are fewer.
template <class Kernel, class Args>
void launch_persistent(Kernel kernel, std::string_view name, Args const& args, int threads, std::size_t smem_bytes,
                       long long max_items, DeviceTraits const& dev, CudaStream stream, std::string_view where) {
  if (max_items <= 0) return;
  allow_dynamic_smem(reinterpret_cast<void const*>(kernel), dev.device, smem_bytes);
  int per_sm = 0;
  EPX_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem_bytes));
  require(
      per_sm > 0, Errc::kUnsupported, where, "shared memory per CTA (bytes)", smem_bytes,
      fmt::format("a size that fits on device {} (the tile shape or the number of groups is too large)", dev.device));
  long long const grid = std::min<long long>(max_items, static_cast<long long>(dev.sms) * per_sm);
  kernel<<<static_cast<unsigned>(grid), threads, smem_bytes, stream.get()>>>(args);
  check_launch(name, SourceLocation::current());
}

// ---- Rows in 16-byte vectors ----

//! Elements of T per 16-byte vector.
template <class T>
inline constexpr int kVectorElems = 16 / static_cast<int>(sizeof(T));

//! Whether rows of `cols` elements of T, `lda` and `ldb` apart from `a` and `b`, move in 16-byte
//! vectors (row_blocks.hpp: rows_move_in_vectors).
template <class T>
bool vector_friendly(void const* a, std::int64_t lda, void const* b, std::int64_t ldb, std::int64_t cols) {
  return rows_move_in_vectors(reinterpret_cast<std::uintptr_t>(a), lda, reinterpret_cast<std::uintptr_t>(b), ldb, cols,
                              sizeof(T));
}

}  // namespace epx::detail
