// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! ExpertParallel on the Cuda execution space: what the shared sequencer
//! (parallel/expert_parallel.hpp) needs from this space, and nothing else. The layer's steps, their
//! order, its collectives and its checks are the sequencer's, run by the Host tests; here are the
//! few small kernels and copies whose code differs from the Host's, on the caller's stream.
//!
//! Host synchronisation, all of it: AllToAll reads the control block and the gathered count table
//! once per forward (one device->host copy into pinned memory and one Communicator::wait, bounded by
//! the communicator's deadline), because all_to_all_v takes its sizes on the host. AllGather never
//! waits in forward; status() does, once. CublasGrouped adds its own (it reads the expert offsets
//! on the host).

#include <epx/core/math.hpp>
#include <epx/core/stream.hpp>
#include <epx/cuda/cublas_grouped.cuh>
#include <epx/cuda/element.cuh>
#include <epx/cuda/error.hpp>
#include <epx/cuda/expert_mlp.cuh>
#include <epx/cuda/grouped_experts.cuh>
#include <epx/cuda/permute_backward.cuh>
#include <epx/cuda/router_backward.cuh>
#include <epx/cuda/launch.cuh>
#include <epx/cuda/nvtx.hpp>
#include <epx/cuda/permute.cuh>
#include <epx/cuda/plan.cuh>
#include <epx/cuda/router.cuh>
#include <epx/cuda/row_blocks.hpp>
#include <epx/cuda/tuning.cuh>
#include <epx/parallel/exchange_layout.hpp>
#include <epx/parallel/execution.hpp>
#include <epx/parallel/expert_parallel.hpp>

#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <span>
#include <string_view>
#include <type_traits>

namespace epx::detail {

//! Pinned host memory (cudaMallocHost), so that copies to and from it are true async DMA. Freed
//! without throwing (a destructor must not; a failure there is not actionable).
class PinnedHostBuffer {
 public:
  PinnedHostBuffer() = default;
  explicit PinnedHostBuffer(std::size_t bytes) : bytes_(bytes) {
    void* p = nullptr;
    if (bytes > 0) EPX_CUDA_CHECK(cudaMallocHost(&p, bytes));
    data_.reset(static_cast<std::byte*>(p));
  }
  [[nodiscard]] std::byte* data() const noexcept { return data_.get(); }
  [[nodiscard]] std::size_t size() const noexcept { return bytes_; }

 private:
  struct Free {
    void operator()(std::byte* p) const noexcept { (void)cudaFreeHost(p); }
  };
  std::unique_ptr<std::byte, Free> data_;
  std::size_t bytes_ = 0;
};

//! The lowest invalid_id_key over the ids (the plan counts invalid ids; this remembers which came
//! first, for the message). A template over the id type only so that several translation units
//! may include the header.
template <class Id>
__global__ void first_invalid_id_kernel(Id const* __restrict__ ids, std::int64_t ld, std::int32_t num_tokens,
                                        std::int32_t top_k, std::int32_t num_experts,
                                        unsigned long long* __restrict__ key) {
  // Slot indices fit an int32 (check_plan_args): 32-bit division.
  auto const n = static_cast<std::uint32_t>(num_tokens) * static_cast<std::uint32_t>(top_k);
  for (std::uint32_t s = grid_thread<std::uint32_t>(); s < n; s += grid_threads<std::uint32_t>()) {
    std::uint32_t const t = s / static_cast<std::uint32_t>(top_k), j = s - t * static_cast<std::uint32_t>(top_k);
    Id const id = ids[std::int64_t{t} * ld + j];
    if (is_invalid_expert_id(id, num_experts)) atomicMin(key, invalid_id_key(s, id));
  }
}

//! This rank's row of the count table (count_table_entry). A template over the count type for the
//! same reason as first_invalid_id_kernel.
template <class Count>
__global__ void count_table_row_kernel(Count const* __restrict__ counts, std::int32_t num_counts, CountRowHead head,
                                       std::int64_t* __restrict__ row, std::int64_t width) {
  for (std::int64_t i = grid_thread<std::int64_t>(); i < width; i += grid_threads<std::int64_t>())
    row[i] = count_table_entry(i, counts, num_counts, head);
}

//! Moves the received rows between rank-major (`rank_major`) and expert-major (`expert_major`)
//! order: one flat grid-stride over the rank-major rows (threadIdx.y a row, threadIdx.x its chunks,
//! row_blocks.hpp), each row finding its segment by a binary search (segment_of_row), so a hot
//! expert's long segment and many short ones cost the same per row. `inverse` copies expert-major
//! -> rank-major. Both buffers are contiguous [rows, units_per_row].
template <class Unit>
__global__ void regroup_rows_kernel(Unit* __restrict__ rank_major, Unit* __restrict__ expert_major,
                                    std::int32_t units_per_row, RowSegment const* __restrict__ segments,
                                    std::int32_t num_segments, std::int64_t num_rows, bool inverse) {
  for (std::int64_t row = grid_row<std::int64_t>(); row < num_rows; row += grid_rows<std::int64_t>()) {
    std::int64_t const other = expert_major_row(segments[segment_of_row(segments, num_segments, row)], row);
    Unit const* const from = inverse ? expert_major + other * units_per_row : rank_major + row * units_per_row;
    Unit* const to = inverse ? rank_major + row * units_per_row : expert_major + other * units_per_row;
    for (std::int32_t u = threadIdx.x; u < units_per_row; u += blockDim.x) to[u] = from[u];
  }
}

//! y = T(partial): the all-reduced fp32 sum, rounded once (as the Host backend does). Rows over
//! threadIdx.y and the grid, columns over threadIdx.x (no 64-bit division per element).
template <class T>
__global__ void partial_to_output_kernel(float const* __restrict__ partial, std::int64_t ldp, std::int64_t rows,
                                         std::int32_t cols, T* __restrict__ y, std::int64_t ldy) {
  for (std::int64_t r = grid_row<std::int64_t>(); r < rows; r += grid_rows<std::int64_t>())
    for (std::int32_t c = threadIdx.x; c < cols; c += blockDim.x)
      y[r * ldy + c] = device_from_float<T>(partial[r * ldp + c]);
}

//! *to = value: a few words written in the order of a stream, the value carried as a kernel argument
//! (no host staging buffer that a later call could overwrite before the copy runs).
template <class Words>
__global__ void write_words_kernel(Words* __restrict__ to, Words const value) {
  *to = value;
}

//! The NVTX range of each of the layer's own stages.
template <LayerStage>
struct NvtxLayerStage;
template <>
struct NvtxLayerStage<LayerStage::kForward> {
  using type = nvtx::Forward;
};
template <>
struct NvtxLayerStage<LayerStage::kDispatch> {
  using type = nvtx::Dispatch;
};
template <>
struct NvtxLayerStage<LayerStage::kCombine> {
  using type = nvtx::Combine;
};

//! The Cuda space of the layer: work ordered on the caller's stream, never waited for except where
//! the sequencer reads the control block (read_to_host), through the communicator's bounded wait.
//! Owns pinned host mirrors of the control block and of the upload, allocated at construction.
template <>
class LayerExecution<Cuda> {
 public:
  using Context = StreamRef;
  using Stream = CudaStream;
  template <LayerStage kStage>
  using Range = nvtx::ScopedRange<typename NvtxLayerStage<kStage>::type>;
  static constexpr bool kSynchronous = false;

  LayerExecution(std::size_t control_words, std::size_t upload_bytes)
      : control_(control_words * sizeof(std::int64_t)), upload_(upload_bytes) {}

  static Stream stream(Context context, std::string_view where) { return {context, where}; }
  static StreamRef comm_stream(Stream stream) { return stream; }

  static void check_communicator(Communicator const& comm) {
    require(comm.memory_space() == MemorySpace::kDevice, Errc::kInvalidArgument, "ExpertParallel<..., Cuda>",
            "comm.memory_space()", to_string(comm.memory_space()),
            "device (a device-memory Communicator: NcclCommunicator or a CudaLocalGroup rank)");
  }

  static std::size_t plan_workspace_bytes(std::int32_t num_tokens, std::int32_t top_k, std::int32_t num_experts) {
    return cuda_plan_workspace_bytes(num_tokens, top_k, num_experts);
  }

  static RoutingPlan make_plan(Stream stream, MatrixView<std::int32_t const> ids, std::int32_t num_experts,
                               ExpertRange range, Workspace workspace, Status* status) {
    return epx::make_plan(stream, ids, num_experts, range, workspace, status);
  }

  //! route_backward on the stream. The ids are the saved forward's (route() wrote them); a token
  //! whose ids it would reject anyway gets zero gradients and counts in `status` (the backward's
  //! control block), not an Error: reading it back would cost a sync.
  template <class L>
  static void route_backward(Stream stream, RouterConfig const& config, MatrixView<L const> logits,
                             MatrixView<std::int32_t const> ids, MatrixView<float const> d_topk_weights,
                             MatrixView<float> d_logits, Status* status) {
    epx::route_backward(stream, config, logits, ids, d_topk_weights, d_logits, status);
  }

  static void reset_control(Stream stream, ForwardControl* control) {
    EPX_CUDA_CHECK(cudaMemsetAsync(&control->status, 0, sizeof(Status), stream.get()));
    static_assert(kNoInvalidId == ~std::uint64_t{0}, "all-ones bytes");
    EPX_CUDA_CHECK(cudaMemsetAsync(&control->first_invalid, 0xff, sizeof(control->first_invalid), stream.get()));
  }

  static void record_first_invalid(Stream stream, MatrixView<std::int32_t const> ids, std::int32_t num_experts,
                                   std::uint64_t* key) {
    if (ids.rows == 0) return;
    auto const policy = policy_for<LayerPolicy>(current_device_traits());
    first_invalid_id_kernel<std::int32_t>
        <<<grid_blocks(ids.rows * ids.cols, policy.threads_per_block, policy.max_blocks), policy.threads_per_block, 0,
           stream.get()>>>(ids.data, ids.ld, static_cast<std::int32_t>(ids.rows), static_cast<std::int32_t>(ids.cols),
                           num_experts, reinterpret_cast<unsigned long long*>(key));
    EPX_CUDA_CHECK_LAUNCH(first_invalid_id_kernel);
  }

  static void write_count_row(Stream stream, std::int32_t const* counts, std::int32_t num_counts,
                              CountRowHead const& head, std::span<std::int64_t> row) {
    if (row.empty()) return;
    auto const policy = policy_for<LayerPolicy>(current_device_traits());
    auto const width = static_cast<std::int64_t>(row.size());
    count_table_row_kernel<std::int32_t>
        <<<grid_blocks(width, policy.threads_per_block, policy.max_blocks), policy.threads_per_block, 0,
           stream.get()>>>(counts, num_counts, head, row.data(), width);
    EPX_CUDA_CHECK_LAUNCH(count_table_row_kernel);
  }

  //! One device->host copy into pinned memory and one wait for the stream (everything enqueued on it
  //! so far, collectives included).
  std::span<std::int64_t const> read_to_host(Stream stream, Communicator& comm, std::span<std::int64_t const> words) {
    require(words.size_bytes() <= control_.size(), Errc::kInvalidArgument, "ExpertParallel<..., Cuda>",
            "control words read", words.size(), fmt::format("<= {} (the pinned mirror)", control_.size() / 8));
    EPX_CUDA_CHECK(
        cudaMemcpyAsync(control_.data(), words.data(), words.size_bytes(), cudaMemcpyDeviceToHost, stream.get()));
    comm.wait(stream);  // not cudaStreamSynchronize: a dead peer must end in an Error, not a hang
    return {reinterpret_cast<std::int64_t const*>(control_.data()), words.size()};
  }

  //! The saved state's header: one single-thread kernel on the stream, the words as its argument.
  template <class Header>
  static void write_header(Stream stream, std::span<std::int64_t> words, Header const& header) {
    static_assert(std::is_trivially_copyable_v<Header> && sizeof(Header) <= 256, "a small kernel argument");
    require(words.size_bytes() >= sizeof(Header), Errc::kInvalidArgument, "ExpertParallel<..., Cuda>",
            "saved header words", words.size(), fmt::format(">= {}", sizeof(Header) / sizeof(std::int64_t)));
    write_words_kernel<Header><<<1, 1, 0, stream.get()>>>(reinterpret_cast<Header*>(words.data()), header);
    EPX_CUDA_CHECK_LAUNCH(write_words_kernel);
  }

  //! `pack` fills the pinned staging buffer; one host->device copy follows on the stream, no wait.
  //! The next forward on this object rewrites the buffer only after its own wait (AllToAll), which
  //! covers this copy when both forwards are on one stream (the class's documented rule).
  template <class Pack>
  void write_to_device(Stream stream, std::span<std::byte> part, Pack&& pack) {
    if (part.empty()) return;
    require(part.size() <= upload_.size(), Errc::kInvalidArgument, "ExpertParallel<..., Cuda>", "upload bytes",
            part.size(), fmt::format("<= {} (the pinned staging buffer)", upload_.size()));
    std::span<std::byte> const staging(upload_.data(), part.size());
    pack(staging);
    EPX_CUDA_CHECK(cudaMemcpyAsync(part.data(), staging.data(), part.size(), cudaMemcpyHostToDevice, stream.get()));
  }

  template <class T>
  static void regroup(Stream stream, std::span<RowSegment const> segments, std::int64_t num_rows,
                      MatrixView<T> rank_major, MatrixView<T> expert_major, bool inverse) {
    if (segments.empty() || num_rows == 0) return;
    auto const policy = policy_for<RowPolicy>(current_device_traits());
    auto const num_segments = static_cast<std::int32_t>(segments.size());
    auto launch = [&]<class Unit>(Unit*) {
      auto const units = static_cast<std::int32_t>(rank_major.cols * static_cast<std::int64_t>(sizeof(T)) /
                                                   static_cast<std::int64_t>(sizeof(Unit)));
      RowBlock const block = row_block(units, policy.threads_per_block);
      regroup_rows_kernel<Unit><<<grid_blocks(num_rows, block.rows_per_block, policy.max_blocks),
                                  dim3(block.threads_x, block.rows_per_block), 0, stream.get()>>>(
          reinterpret_cast<Unit*>(rank_major.data), reinterpret_cast<Unit*>(expert_major.data), units, segments.data(),
          num_segments, num_rows, inverse);
    };
    // Both buffers are contiguous ([rows, hidden], workspace parts aligned to 256 bytes).
    if (vector_friendly<T>(rank_major.data, rank_major.cols, expert_major.data, expert_major.cols, rank_major.cols))
      launch(static_cast<uint4*>(nullptr));
    else
      launch(static_cast<T*>(nullptr));
    EPX_CUDA_CHECK_LAUNCH(regroup_rows_kernel);
  }

  //! dst = src on the stream (a training forward's copy of the given routing): one 2D copy.
  template <class T>
  static void copy(Stream stream, MatrixView<T const> src, MatrixView<T> dst) {
    if (src.rows == 0 || src.cols == 0) return;
    auto const row_bytes = static_cast<std::size_t>(src.cols) * sizeof(T);
    EPX_CUDA_CHECK(cudaMemcpy2DAsync(dst.data, static_cast<std::size_t>(dst.ld) * sizeof(T), src.data,
                                     static_cast<std::size_t>(src.ld) * sizeof(T), row_bytes,
                                     static_cast<std::size_t>(src.rows), cudaMemcpyDeviceToDevice, stream.get()));
  }

  template <class T>
  static void round_to(Stream stream, MatrixView<float const> partial, MatrixView<T> y) {
    if (y.rows == 0) return;
    auto const policy = policy_for<RowPolicy>(current_device_traits());
    RowBlock const block = row_block(y.cols, policy.threads_per_block);
    partial_to_output_kernel<T>
        <<<grid_blocks(y.rows, block.rows_per_block, policy.max_blocks), dim3(block.threads_x, block.rows_per_block), 0,
           stream.get()>>>(partial.data, partial.ld, y.rows, static_cast<std::int32_t>(y.cols), y.data, y.ld);
    EPX_CUDA_CHECK_LAUNCH(partial_to_output_kernel);
  }

 private:
  PinnedHostBuffer control_;  // the control block (+ AllToAll: the gathered count table), read back
  PinnedHostBuffer upload_;   // AllToAll: local offsets + regroup segments, written to the device
};

}  // namespace epx::detail
