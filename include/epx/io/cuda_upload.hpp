// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! Loading one rank's experts of a layer into device memory: the host load's plan and decoding
//! (load_layer.hpp), each decoded chunk written into a pinned staging block and copied to the
//! device on the caller's stream. Two pinned blocks alternate, so the host decodes one while the
//! other is copied; each is reused only after the event recorded behind its copy has completed.
//! Pinned memory used: at most LoadOptions::staging_bytes in all (two halves), but never less
//! than one stored row of a tensor per block. Host code: needs the CUDA runtime's headers, not nvcc.
//!
//! FP8 and MXFP4 tensors: when the call is compiled by nvcc (LoadOptions::dequantize kAuto or
//! kDevice), they are read as stored straight into the pinned blocks (values, and scales: MXFP4's
//! bytes, FP8's block rows decoded to fp32), copied to one device scratch buffer and decoded there
//! by cuda_dequantize.cuh's kernels into the destination: 1 byte per FP8 element, 0.53 per MXFP4
//! element over PCIe instead of sizeof(T). Compiled by a host compiler (or kHost), they are
//! decoded on the host like every other tensor. The two builds of load_layer_to_device live in
//! different inline namespaces, so a program may hold both.

#include <epx/core/stream.hpp>
#include <epx/cuda/error.hpp>
#include <epx/io/load_layer.hpp>

#include <cuda_runtime_api.h>

#if defined(__CUDACC__)
#include <epx/io/cuda_dequantize.cuh>
#endif

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

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
  //! The pinned blocks, for jobs uploaded as stored (run_quantised_job_on_device).
  [[nodiscard]] PinnedBlocks& blocks() noexcept { return blocks_; }
  [[nodiscard]] std::size_t block_bytes() const noexcept { return block_bytes_; }

 private:
  LayerBuffers<T> device_;
  cudaStream_t stream_;
  std::size_t block_bytes_;
  PinnedBlocks blocks_;
};

#if defined(__CUDACC__)

//! Device memory the stored bytes of a chunk are copied into before its kernel decodes them. One
//! buffer: each copy into it is ordered on the stream behind the kernel that read it last.
class DeviceScratch {
 public:
  explicit DeviceScratch(cudaStream_t stream) : stream_(stream) {}
  DeviceScratch(DeviceScratch const&) = delete;
  DeviceScratch& operator=(DeviceScratch const&) = delete;
  ~DeviceScratch() { release(); }
  //! At least `bytes` of device memory (grown after the stream has passed its last use).
  [[nodiscard]] std::byte* get(std::size_t bytes) {
    if (bytes > capacity_) {
      release();
      EPX_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&data_), bytes));
      capacity_ = bytes;
    }
    return data_;
  }

 private:
  void release() noexcept {
    if (data_ != nullptr) {
      (void)cudaStreamSynchronize(stream_);
      (void)cudaFree(data_);
    }
    data_ = nullptr;
    capacity_ = 0;
  }
  cudaStream_t stream_;
  std::byte* data_ = nullptr;
  std::size_t capacity_ = 0;
};

//! Offsets are rounded up to this inside a chunk (FP8's fp32 scales after the values).
inline constexpr std::size_t kChunkAlign = 16;
inline constexpr std::size_t align_up(std::size_t bytes) noexcept {
  return (bytes + kChunkAlign - 1) / kChunkAlign * kChunkAlign;
}

//! Runs an FP8 or MXFP4 job with the decoding on the device: per chunk of stored rows, the stored
//! bytes (+ MXFP4's scale bytes, or the fp32 FP8 block rows the chunk's rows use) go into a pinned
//! block, one copy to the scratch buffer, one kernel into the destination (as DeviceSink would
//! place the host-decoded elements). Reads the same bytes as run_copy_job.
template <class T>
void run_quantised_job_on_device(Checkpoint& ckpt, CopyJob const& job, LayerBuffers<T> const& device,
                                 DeviceSink<T>& sink, DeviceScratch& scratch, cudaStream_t stream) {
  bool const fp8 = job.encoding == WeightEncoding::kFp8BlockScaled;
  auto const row_bytes = static_cast<std::size_t>(job.value_row_bytes());
  auto const scale_row_bytes = static_cast<std::size_t>(job.scale_row_bytes());  // MXFP4
  std::uint64_t const matrix_bytes = std::uint64_t{row_bytes} * static_cast<std::uint64_t>(job.stored_rows);
  std::uint64_t const scale_matrix_bytes = std::uint64_t{scale_row_bytes} * static_cast<std::uint64_t>(job.stored_rows);
  std::int64_t const block_rows = job.fp8_block[0];
  std::int64_t const scale_cols = fp8 ? job.fp8_scale_cols() : 0;
  auto const scale_block_row_bytes = static_cast<std::size_t>(scale_cols) * sizeof(float);
  // Bytes of a chunk of n rows: values (+ MXFP4 scales), then FP8's block rows (at most n / block + 2).
  auto const chunk_bytes = [&](std::int64_t n) {
    auto const un = static_cast<std::size_t>(n);
    std::size_t bytes = align_up(un * (row_bytes + scale_row_bytes));
    if (fp8) bytes += static_cast<std::size_t>((n + block_rows - 1) / block_rows + 1) * scale_block_row_bytes;
    return bytes;
  };
  std::size_t const per_row =
      row_bytes + scale_row_bytes +
      (fp8 ? (scale_block_row_bytes + static_cast<std::size_t>(block_rows) - 1) / static_cast<std::size_t>(block_rows)
           : 0);
  std::int64_t rows_per_chunk =
      std::max<std::int64_t>(1, static_cast<std::int64_t>(sink.block_bytes() / std::max<std::size_t>(per_row, 1)));
  rows_per_chunk = std::max<std::int64_t>(1, std::min(rows_per_chunk, job.stored_rows));
  std::byte* const device_chunk = scratch.get(chunk_bytes(rows_per_chunk));
  std::vector<std::byte> fp8_scale_bytes;
  std::vector<float> fp8_scales;
  T* const base = reinterpret_cast<T*>(device.bytes(job.buffer).data());
  for (std::int64_t m = 0; m < job.count; ++m) {
    auto const matrix = static_cast<std::uint64_t>(job.first + m);
    if (fp8) {  // the matrix's block scales, whole (a few KB), decoded to fp32 as on the host
      auto const scale_dtype = job.scales.info->dtype;
      auto const esize = bits_of(scale_dtype) / 8;
      auto const n = static_cast<std::size_t>(job.fp8_scale_rows() * scale_cols);
      fp8_scale_bytes.resize(n * esize);
      ckpt.read(job.scales, matrix * n * esize, fp8_scale_bytes);
      fp8_scales.resize(n);
      for (std::size_t k = 0; k < n; ++k) fp8_scales[k] = decode_plain(scale_dtype, fp8_scale_bytes.data() + k * esize);
    }
    for (std::int64_t s0 = 0; s0 < job.stored_rows; s0 += rows_per_chunk) {
      std::int64_t const n = std::min(rows_per_chunk, job.stored_rows - s0);
      auto const un = static_cast<std::size_t>(n), us0 = static_cast<std::uint64_t>(s0);
      std::size_t const bytes = chunk_bytes(n);
      std::byte* const block = sink.blocks().next(chunk_bytes(rows_per_chunk));
      ckpt.read(job.values, matrix * matrix_bytes + us0 * row_bytes, std::span<std::byte>(block, un * row_bytes));
      if (!fp8)
        ckpt.read(job.scales, matrix * scale_matrix_bytes + us0 * scale_row_bytes,
                  std::span<std::byte>(block + un * row_bytes, un * scale_row_bytes));
      std::size_t const scales_at = align_up(un * (row_bytes + scale_row_bytes));
      std::int64_t const b0 = s0 / block_rows;
      if (fp8) {
        std::int64_t const b1 = (s0 + n - 1) / block_rows;
        std::memcpy(block + scales_at, fp8_scales.data() + b0 * scale_cols,
                    static_cast<std::size_t>(b1 - b0 + 1) * scale_block_row_bytes);
      }
      EPX_CUDA_CHECK(cudaMemcpyAsync(device_chunk, block, bytes, cudaMemcpyHostToDevice, stream));
      // Stored row s0 + i, column j -> the destination as DeviceSink / HostSink place it.
      T* const dst =
          base + job.offset + m * job.matrix_stride + s0 * (job.transposed ? job.col_stride : job.row_stride);
      DequantizeOut<T> const out = job.transposed ? DequantizeOut<T>{dst, job.col_stride, job.row_stride}
                                                  : DequantizeOut<T>{dst, job.row_stride, job.col_stride};
      auto const* const values = reinterpret_cast<std::uint8_t const*>(device_chunk);
      if (fp8) {
        Fp8Source const src{.values = values,
                            .values_ld = static_cast<std::int64_t>(row_bytes),
                            .scales = reinterpret_cast<float const*>(device_chunk + scales_at),
                            .scale_ld = scale_cols,
                            .row0 = s0 - b0 * block_rows,
                            .col0 = 0,
                            .block_rows = block_rows,
                            .block_cols = job.fp8_block[1]};
        dequantize_fp8_on_device<T>(src, n, job.stored_cols, out, StreamRef(stream));
      } else {
        Mxfp4Source const src{.blocks = values,
                              .blocks_ld = static_cast<std::int64_t>(row_bytes),
                              .scales = values + un * row_bytes,
                              .scale_ld = static_cast<std::int64_t>(scale_row_bytes),
                              .col0 = 0};
        dequantize_mxfp4_on_device<T>(src, n, job.stored_cols, out, StreamRef(stream));
      }
      sink.blocks().record(stream);
    }
  }
}

#endif  // __CUDACC__

}  // namespace detail

#if defined(__CUDACC__)
#define EPX_IO_UPLOAD_BUILD nvcc_build
#else
#define EPX_IO_UPLOAD_BUILD host_compiler_build
#endif

// Which compiler built load_layer_to_device decides what it can do (device dequantisation needs
// nvcc): its two builds are different functions, never one function defined two ways.
inline namespace EPX_IO_UPLOAD_BUILD {

//! @brief load_layer into device memory: `device_buffers` are device pointers (at least
//! layer_sizes() elements each), filled by copies on `stream` through pinned staging blocks.
//! **Synchronises:** returns after `stream` has passed the last copy (the blocks are freed), so the
//! weights are in place for any later work; it is a load-time call, not for the forward path.
//! @return as load_layer, its views pointing into `device_buffers` (device memory), ready for
//!         ExpertParallel<..., Cuda>. `staging_bytes` counts pageable and pinned staging together.
//! Quantised tensors are decoded on the device or the host per `options.dequantize` (see the top of
//! this file); the destination's bits are the same either way.
//! @throws Error as load_layer, Error(kUnsupported) for Dequantize::kDevice in a call not compiled
//!         by nvcc, and Error(kCuda) naming a failed CUDA call.
template <float_element T>
LoadedLayer<T> load_layer_to_device(Checkpoint& ckpt, MoeModel const& model, LayerRequest const& request,
                                    LayerBuffers<T> const& device_buffers, StreamRef stream,
                                    LoadOptions const& options = {}) {
  constexpr std::string_view where = "epx::io::load_layer_to_device";
  epx::detail::require(!stream.is_host(), Errc::kInvalidArgument, where, "stream", "StreamRef::host()",
                       "a CUDA stream (StreamRef(stream))");
  ExpertRange const experts = detail::check_request(model, request, where);
  ReadStats const before = ckpt.stats();
#if defined(__CUDACC__)
  bool const on_device = options.dequantize != Dequantize::kHost;
#else
  epx::detail::require(options.dequantize != Dequantize::kDevice, Errc::kUnsupported, where, "options.dequantize",
                       "Dequantize::kDevice",
                       "kAuto or kHost in a call compiled by a host compiler (device dequantisation needs the call "
                       "compiled by nvcc: <epx/io/cuda_upload.hpp> in a .cu file)");
#endif
  LayerPlan const plan = plan_layer(ckpt, model, request.layer, experts);
  detail::check_buffers(plan.sizes, device_buffers, where);
  // Half of the staging budget reads raw bytes, the other half is the two pinned blocks.
  std::size_t const half = std::max<std::size_t>(options.staging_bytes / 2, 1);
  detail::Staging staging(half);
  std::size_t pinned_peak = 0;
  {
    detail::DeviceSink<T> sink(device_buffers, stream.get(), half / 2);
#if defined(__CUDACC__)
    detail::DeviceScratch scratch(stream.get());
    for (auto const& job : plan.jobs) {
      if (job.buffer == LayerBuffer::kCorrectionBias)
        detail::run_copy_job<float>(ckpt, job, sink, staging);
      else if (on_device && job.encoding != WeightEncoding::kPlain)
        detail::run_quantised_job_on_device<T>(ckpt, job, device_buffers, sink, scratch, stream.get());
      else
        detail::run_copy_job<T>(ckpt, job, sink, staging);
    }
#else
    detail::run_plan<T>(ckpt, plan, sink, staging);
#endif
    EPX_CUDA_CHECK(cudaStreamSynchronize(stream.get()));
    pinned_peak = sink.pinned_peak_bytes();
  }
  LoadedLayer<T> out = detail::loaded_layer(model, request, plan, device_buffers);
  out.stats = detail::stats_since(before, ckpt.stats());
  out.staging_bytes = staging.peak_bytes() + pinned_peak;
  return out;
}

}  // namespace EPX_IO_UPLOAD_BUILD
#undef EPX_IO_UPLOAD_BUILD

}  // namespace epx::io
