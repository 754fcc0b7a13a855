// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! Loading one rank's experts of a layer into device memory: the host load's plan and decoding
//! (load_layer.hpp), each decoded chunk written into a pinned staging block and copied to the
//! device on the caller's stream. Two pinned blocks alternate, so the host decodes one while the
//! other is copied; each is reused only after the event recorded behind its copy has completed.
//! Pinned memory used: at most LoadOptions::staging_bytes in all (two halves), but never less
//! than one stored row of a tensor per block. Host code: needs the CUDA runtime's headers, not nvcc.
//! Dequantisation runs on the host (a device kernel may come later).

#include <epx/core/stream.hpp>
#include <epx/cuda/error.hpp>
#include <epx/io/load_layer.hpp>

#include <cuda_runtime_api.h>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <utility>

namespace epx::io {
namespace detail {

//! Two pinned blocks taking turns, each with the event recorded behind the copy that reads it.
class PinnedBlocks {
 public:
  PinnedBlocks() = default;
  PinnedBlocks(PinnedBlocks const&) = delete;
  PinnedBlocks& operator=(PinnedBlocks const&) = delete;
  //! Waits for every copy from the blocks (errors are not reported here: the load already failed
  //! or EPX_CUDA_CHECK reported them), then frees them.
  ~PinnedBlocks() {
    release();
    for (auto& e : events_)
      if (e != nullptr) (void)cudaEventDestroy(e);
  }

  //! The next block, at least `bytes` large, once the copy that last read it has completed.
  [[nodiscard]] std::byte* next(std::size_t bytes) {
    if (events_[0] == nullptr)
      for (auto& e : events_) EPX_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    if (bytes > capacity_) {
      release();
      for (auto& b : blocks_) EPX_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&b), bytes, cudaHostAllocDefault));
      capacity_ = bytes;
      peak_ = std::max(peak_, 2 * bytes);
    }
    current_ ^= 1;
    if (recorded_[static_cast<std::size_t>(current_)])
      EPX_CUDA_CHECK(cudaEventSynchronize(events_[static_cast<std::size_t>(current_)]));
    recorded_[static_cast<std::size_t>(current_)] = false;
    return blocks_[static_cast<std::size_t>(current_)];
  }
  //! Marks the current block busy until `stream` passes this point.
  void record(cudaStream_t stream) {
    EPX_CUDA_CHECK(cudaEventRecord(events_[static_cast<std::size_t>(current_)], stream));
    recorded_[static_cast<std::size_t>(current_)] = true;
  }
  //! The block next() returned last.
  [[nodiscard]] std::byte* current() const noexcept { return blocks_[static_cast<std::size_t>(current_)]; }
  [[nodiscard]] std::size_t peak_bytes() const noexcept { return peak_; }

 private:
  void release() noexcept {
    for (std::size_t k = 0; k < blocks_.size(); ++k) {
      if (recorded_[k]) (void)cudaEventSynchronize(events_[k]);
      recorded_[k] = false;
      if (blocks_[k] != nullptr) (void)cudaFreeHost(blocks_[k]);
      blocks_[k] = nullptr;
    }
    capacity_ = 0;
  }

  std::array<std::byte*, 2> blocks_ = {nullptr, nullptr};
  std::array<cudaEvent_t, 2> events_ = {nullptr, nullptr};
  std::array<bool, 2> recorded_ = {false, false};
  std::size_t capacity_ = 0;
  std::size_t peak_ = 0;
  int current_ = 1;
};

//! Decodes each chunk into a pinned block laid out as the destination sub-matrix it covers (row
//! major), then copies it to the device with cudaMemcpy2DAsync on the caller's stream.
template <class T>
class DeviceSink {
 public:
  DeviceSink(LayerBuffers<T> const& device, cudaStream_t stream, std::size_t block_bytes)
      : device_(device), stream_(stream), block_bytes_(std::max<std::size_t>(block_bytes, 1)) {}

  template <class U>
  [[nodiscard]] std::span<std::byte> verbatim(CopyJob const&) const noexcept {
    return {};  // device memory: always through a pinned block
  }
  template <class U>
  [[nodiscard]] std::int64_t max_chunk_rows(CopyJob const& job) const noexcept {
    auto const row = static_cast<std::size_t>(job.stored_cols) * sizeof(U);
    return std::max<std::int64_t>(1, static_cast<std::int64_t>(block_bytes_ / std::max<std::size_t>(row, 1)));
  }
  template <class U>
  [[nodiscard]] StridedOut<U> begin_chunk(CopyJob const& job, std::int64_t, std::int64_t, std::int64_t n) {
    auto* block = reinterpret_cast<U*>(blocks_.next(static_cast<std::size_t>(n * job.stored_cols) * sizeof(U)));
    // Row-major in the destination's orientation: [n, cols] as stored, or [cols, n] transposed.
    return job.transposed ? StridedOut<U>{block, 1, n} : StridedOut<U>{block, job.stored_cols, 1};
  }
  template <class U>
  void end_chunk(CopyJob const& job, std::int64_t m, std::int64_t s0, std::int64_t n) {
    auto* const base = reinterpret_cast<U*>(device_.bytes(job.buffer).data());
    U* dst = base + job.offset + m * job.matrix_stride + s0 * (job.transposed ? job.col_stride : job.row_stride);
    std::int64_t const rows = job.transposed ? job.stored_cols : n;  // destination rows in this block
    std::int64_t const cols = job.transposed ? n : job.stored_cols;  // destination columns in this block
    auto const* src = reinterpret_cast<U const*>(blocks_.current());
    if (job.col_stride == 1) {
      EPX_CUDA_CHECK(cudaMemcpy2DAsync(
          dst, static_cast<std::size_t>(job.row_stride) * sizeof(U), src, static_cast<std::size_t>(cols) * sizeof(U),
          static_cast<std::size_t>(cols) * sizeof(U), static_cast<std::size_t>(rows), cudaMemcpyHostToDevice, stream_));
    } else {  // columns spread out (gate and up biases interleaved): one element per pitch step
      for (std::int64_t r = 0; r < rows; ++r)
        EPX_CUDA_CHECK(cudaMemcpy2DAsync(dst + r * job.row_stride, static_cast<std::size_t>(job.col_stride) * sizeof(U),
                                         src + r * cols, sizeof(U), sizeof(U), static_cast<std::size_t>(cols),
                                         cudaMemcpyHostToDevice, stream_));
    }
    blocks_.record(stream_);
  }
  [[nodiscard]] std::size_t pinned_peak_bytes() const noexcept { return blocks_.peak_bytes(); }

 private:
  LayerBuffers<T> device_;
  cudaStream_t stream_;
  std::size_t block_bytes_;
  PinnedBlocks blocks_;
};

}  // namespace detail

//! @brief load_layer into device memory: `device_buffers` are device pointers (at least
//! layer_sizes() elements each), filled by copies on `stream` through pinned staging blocks.
//! **Synchronises:** returns after `stream` has passed the last copy (the blocks are freed), so the
//! weights are in place for any later work; it is a load-time call, not for the forward path.
//! @return as load_layer, its views pointing into `device_buffers` (device memory), ready for
//!         ExpertParallel<..., Cuda>. `staging_bytes` counts pageable and pinned staging together.
//! @throws Error as load_layer, and Error(kCuda) naming a failed CUDA call.
template <float_element T>
LoadedLayer<T> load_layer_to_device(Checkpoint& ckpt, MoeModel const& model, LayerRequest const& request,
                                    LayerBuffers<T> const& device_buffers, StreamRef stream,
                                    LoadOptions const& options = {}) {
  constexpr std::string_view where = "epx::io::load_layer_to_device";
  epx::detail::require(!stream.is_host(), Errc::kInvalidArgument, where, "stream", "StreamRef::host()",
                       "a CUDA stream (StreamRef(stream))");
  ExpertRange const experts = detail::check_request(model, request, where);
  ReadStats const before = ckpt.stats();
  LayerPlan const plan = plan_layer(ckpt, model, request.layer, experts);
  detail::check_buffers(plan.sizes, device_buffers, where);
  // Half of the staging budget reads raw bytes, the other half is the two pinned blocks.
  std::size_t const half = std::max<std::size_t>(options.staging_bytes / 2, 1);
  detail::Staging staging(half);
  std::size_t pinned_peak = 0;
  {
    detail::DeviceSink<T> sink(device_buffers, stream.get(), half / 2);
    detail::run_plan<T>(ckpt, plan, sink, staging);
    EPX_CUDA_CHECK(cudaStreamSynchronize(stream.get()));
    pinned_peak = sink.pinned_peak_bytes();
  }
  LoadedLayer<T> out = detail::loaded_layer(model, request, plan, device_buffers);
  out.stats = detail::stats_since(before, ckpt.stats());
  out.staging_bytes = staging.peak_bytes() + pinned_peak;
  return out;
}

}  // namespace epx::io
