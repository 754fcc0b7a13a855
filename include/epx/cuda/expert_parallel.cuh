// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! ExpertParallel<Experts, Dispatch, Cuda>: the MoE layer on the GPU. It sequences the CUDA stages
//! (route, make_plan, permute, the expert MLP, unpermute) and the Communicator's collectives on the
//! caller's stream, with the same public API and the same semantics as the Host backend
//! (host/expert_parallel.hpp), which is its test oracle.
//!
//! Host synchronisation, all of it:
//!   - AllToAll: exactly one device->host copy per forward (the gathered count table and the
//!     device Status, laid out adjacently) followed by one wait for the caller's stream
//!     (Communicator::wait: a stream synchronisation bounded by the communicator's deadline): the send and receive sizes of the all-to-all-v are host arguments, so the host has
//!     to know the counts. Nothing else waits (except CublasGrouped's run, which reads the expert
//!     offsets on the host: one more copy and sync, inside the expert step).
//!   - AllGather: none (the CublasGrouped expert policy adds its own: it reads the expert offsets
//!     on the host). Counters are read on request by status(StreamRef), which synchronises.

#include <epx/core/math.hpp>
#include <epx/core/stream.hpp>
#include <epx/cuda/cublas_grouped.cuh>
#include <epx/cuda/element.cuh>
#include <epx/cuda/error.hpp>
#include <epx/cuda/expert_mlp.cuh>
#include <epx/cuda/nvtx.hpp>
#include <epx/cuda/permute.cuh>
#include <epx/cuda/plan.cuh>
#include <epx/cuda/router.cuh>
#include <epx/cuda/row_blocks.hpp>
#include <epx/parallel/exchange_layout.hpp>
#include <epx/parallel/expert_parallel.hpp>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <span>
#include <type_traits>
#include <vector>

namespace epx {
namespace detail {

//! Tuning of the layer's own small kernels (count row, regroup, fp32 -> T).
struct ExpertParallelPolicy {
  int threads_per_block = 256;
  int max_blocks = 65535;
};

//! What forward leaves on the device for the host to read: the Status and the first invalid
//! (slot, id), adjacent so that one copy fetches them (AllToAll: with the count table after them).
struct DeviceControl {
  Status status;
  //! (slot << 32) | uint32(id) of the lowest slot with an invalid id; kNoInvalidId when none.
  std::uint64_t first_invalid = 0;
};
static_assert(sizeof(DeviceControl) % sizeof(std::int64_t) == 0 && std::is_trivially_copyable_v<DeviceControl>);

inline constexpr std::uint64_t kNoInvalidId = ~std::uint64_t{0};
inline constexpr std::size_t kControlWords = sizeof(DeviceControl) / sizeof(std::int64_t);

//! Pinned host memory (cudaMallocHost), so the device->host copy is a true async DMA. Freed
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

//! Lowest (slot, id) with an id that is neither -1 nor in [0, num_experts), for the Error message
//! (the plan counts them; this remembers which came first, as the Host message says). A template
//! over the id type only so that the header can be included by several translation units.
template <class Id>
__global__ void first_invalid_id_kernel(Id const* __restrict__ ids, std::int64_t ld, std::int32_t num_tokens,
                                        std::int32_t top_k, std::int32_t num_experts,
                                        unsigned long long* __restrict__ first) {
  // Slot indices fit an int32 (check_plan_args): 32-bit division.
  auto const n = static_cast<std::uint32_t>(num_tokens) * static_cast<std::uint32_t>(top_k);
  for (std::uint32_t s = blockIdx.x * blockDim.x + threadIdx.x; s < n; s += gridDim.x * blockDim.x) {
    std::uint32_t const t = s / static_cast<std::uint32_t>(top_k), j = s - t * static_cast<std::uint32_t>(top_k);
    Id const id = ids[std::int64_t{t} * ld + j];
    if (id != -1 && (id < 0 || id >= num_experts))
      atomicMin(first, (static_cast<unsigned long long>(s) << 32) | static_cast<std::uint32_t>(id));
  }
}

//! This rank's row of the count table: (num_tokens, capacity, tokens_per_expert[E]); the counts
//! are zeros when this rank made no plan (tokens_per_expert == nullptr). A template over the count
//! type for the same reason as first_invalid_id_kernel.
template <class Count>
__global__ void count_table_row_kernel(Count const* __restrict__ tokens_per_expert, std::int32_t num_experts,
                                       std::int64_t num_tokens, std::int64_t capacity, std::int64_t* __restrict__ row) {
  for (std::int64_t i = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; i < kCountTableHeader + num_experts;
       i += std::int64_t{gridDim.x} * blockDim.x) {
    std::int64_t v = 0;
    if (i == 0) v = num_tokens;
    else if (i == 1) v = capacity;
    else if (tokens_per_expert != nullptr) v = tokens_per_expert[i - kCountTableHeader];
    row[i] = v;
  }
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
  for (std::int64_t row = blockIdx.x * std::int64_t{blockDim.y} + threadIdx.y; row < num_rows;
       row += std::int64_t{gridDim.x} * blockDim.y) {
    std::int64_t const other = expert_major_row(segments[segment_of_row(segments, num_segments, row)], row);
    Unit const* const from = inverse ? expert_major + other * units_per_row : rank_major + row * units_per_row;
    Unit* const to = inverse ? rank_major + row * units_per_row : expert_major + other * units_per_row;
    for (std::int32_t u = threadIdx.x; u < units_per_row; u += blockDim.x) to[u] = from[u];
  }
}

//! y = T(partial): the all-reduced fp32 sum, rounded once (as the Host backend does). Rows over
//! threadIdx.y and the grid, columns over threadIdx.x (no 64-bit division per element).
template <class T>
__global__ void partial_to_output_kernel(float const* __restrict__ partial, std::int64_t rows, std::int32_t cols,
                                         T* __restrict__ y, std::int64_t ldy) {
  for (std::int64_t r = blockIdx.x * std::int64_t{blockDim.y} + threadIdx.y; r < rows;
       r += std::int64_t{gridDim.x} * blockDim.y)
    for (std::int32_t c = threadIdx.x; c < cols; c += blockDim.x)
      y[r * ldy + c] = device_from_float<T>(partial[r * cols + c]);
}

inline int grid_blocks(std::int64_t work, ExpertParallelPolicy const& policy) {
  return static_cast<int>(
      std::clamp<std::int64_t>(ceil_div<std::int64_t>(work, policy.threads_per_block), 1, policy.max_blocks));
}

//! The device table the host uploads after the count exchange: the local experts' row offsets
//! (expert-major, what the expert MLP reads) followed by the regroup segments.
struct UploadLayout {
  std::size_t offsets_bytes = 0;   // [num_local + 1] int32, padded to RowSegment's alignment
  std::size_t segments_bytes = 0;  // [num_ranks * num_local] RowSegment at most

  UploadLayout(std::int32_t num_local, std::int32_t num_ranks)
      : offsets_bytes(align_up<std::size_t>((static_cast<std::size_t>(num_local) + 1) * sizeof(std::int32_t),
                                            alignof(RowSegment))),
        segments_bytes(static_cast<std::size_t>(num_local) * static_cast<std::size_t>(num_ranks) *
                       sizeof(RowSegment)) {}
  [[nodiscard]] std::size_t bytes() const noexcept { return offsets_bytes + segments_bytes; }
};

//! The Error of InvalidIds::kThrow (worded as the Host backend's, by the shared throw_invalid_ids),
//! from the device's record of the first invalid slot.
[[noreturn]] inline void throw_device_invalid_ids(std::string_view where, int rank, Status const& status,
                                                  std::uint64_t first, std::int32_t top_k, std::int32_t num_experts) {
  InvalidIdSite site;
  if (first != kNoInvalidId) {
    std::int64_t const slot = static_cast<std::int64_t>(first >> 32);
    site = {.token = slot / top_k,
            .slot = static_cast<std::int32_t>(slot % top_k),
            .id = static_cast<std::int32_t>(static_cast<std::uint32_t>(first & 0xffffffffu))};
  }
  throw_invalid_ids(where, rank, status.invalid_ids, site, num_experts);
}

}  // namespace detail

//! @brief The MoE layer on the GPU (the Cuda execution space): the same API and semantics as
//! ExpertParallel<Experts, Dispatch, Host>, on device memory, ordered on the caller's stream.
//!
//! One object per rank, used by one thread at a time. Collectives go through a Communicator whose
//! memory_space() is MemorySpace::kDevice (NcclCommunicator, a CudaLocalGroup rank); they are
//! stream-ordered on the stream passed to forward. The object owns a few hundred bytes of pinned
//! host memory (allocated in the constructor) for the count table; every other byte is the
//! caller's device Workspace. Consecutive forwards on one object must be ordered on the device
//! (one stream, or the caller's events): they share that pinned memory, as they share the workspace.
//!
//! @par Results and counters
//! forward returns nothing; the routing counters of the last forward are read by status(stream).
//! AllToAll reads them at its one synchronisation anyway (so status() costs nothing there) and
//! raises invalid ids from forward, as the Host backend does; AllGather cannot without a sync, so
//! its status() does.
//!
//! @par CUDA graphs
//! AllToAll synchronises the host inside forward and cannot be captured. AllGather with Grouped
//! makes no host synchronisation and allocates nothing, so it captures when the communicator's
//! all_reduce_sum does (NCCL: yes); with CublasGrouped it cannot (its run reads offsets on the host).
template <class Experts, class Dispatch>
class ExpertParallel<Experts, Dispatch, Cuda> {
  static_assert(detail::is_dispatch_tag<Dispatch>,
                "epx: ExpertParallel's second argument is the dispatch policy: epx::AllToAll or epx::AllGather");
  using ExpertKernel = typename detail::ExpertKernelSelector<Experts, Cuda>::type;
  static constexpr bool kAllToAll = std::is_same_v<Dispatch, AllToAll>;

 public:
  //! Validates `config` against `comm` (throws Error naming the first bad field). The weights and
  //! the correction bias are device memory on the device current when forward runs; they and
  //! `comm` must outlive this object and stay unchanged. Allocates the pinned host memory of the
  //! count table (and, for CublasGrouped, creates a cuBLAS handle on the current device).
  ExpertParallel(MoeConfig const& config, Communicator& comm) : config_(detail::resolve(config, comm)), comm_(&comm) {
    detail::require(comm.memory_space() == MemorySpace::kDevice, Errc::kInvalidArgument, "ExpertParallel<..., Cuda>",
                    "comm.memory_space()", to_string(comm.memory_space()),
                    "device (a device-memory Communicator: NcclCommunicator or a CudaLocalGroup rank)");
    auto const num_ranks = static_cast<std::size_t>(comm.size());
    auto const row_width = detail::kCountTableHeader + static_cast<std::size_t>(config_.router.num_experts);
    std::size_t const control_words = detail::kControlWords + (kAllToAll ? num_ranks * row_width : 0);
    host_control_ = detail::PinnedHostBuffer(control_words * sizeof(std::int64_t));
    if constexpr (kAllToAll) {
      host_upload_ = detail::PinnedHostBuffer(detail::UploadLayout(local_experts().count, comm.size()).bytes());
      send_bytes_.assign(num_ranks, 0);
      recv_bytes_.assign(num_ranks, 0);
    }
  }

  [[nodiscard]] MoeConfig const& config() const noexcept { return config_; }
  [[nodiscard]] ExpertRange local_experts() const { return config_.placement.local_range(comm_->rank()); }

  //! Device workspace bytes for forward calls of up to `max_tokens` tokens on every rank of the
  //! group: routing, plan, permute buffers, the count table, received rows and the expert MLP's
  //! scratch, for the dropless worst case (every token of every rank on this rank's experts).
  //! Host arithmetic plus CUB's size query, which reads the current device's properties: call it
  //! with the device of forward current. No allocation, no synchronisation.
  //! With AllToAll, `max_tokens` must bound every rank's num_tokens.
  [[nodiscard]] std::size_t workspace_bytes(std::int64_t max_tokens) const {
    detail::check_max_tokens(max_tokens, kAllToAll, comm_->size(), config_.router.top_k);
    return detail::dispatch_on_dtype(config_.weights.dtype, [&]<class T>(T*) { return layout_bytes<T>(max_tokens); });
  }

  //! @brief Forward from router logits: route on the device, then as the other overload.
  //! @param[in]  stream         the caller's CUDA stream; every kernel, copy and collective is
  //!                            ordered on it (AllToAll synchronises it once, see the header note)
  //! @param[in]  router_logits  [num_tokens, num_experts] device memory, fp32 or bf16
  //! @param[in]  x              [num_tokens, hidden] device memory
  //! @param[out] y              [num_tokens, hidden] device memory, every row written once the
  //!                            stream reaches the end of this call's work
  //! @param[in]  workspace      device memory, at least workspace_bytes(max_tokens) bytes; in use
  //!                            until the stream has passed this call
  //! @throws Error on bad shapes, a workspace too small (on every rank, when another rank's is:
  //!         AllToAll), a communicator or CUDA failure. Invalid ids cannot come from the router.
  template <class L, float_element T>
  void forward(StreamRef stream, MatrixView<L> router_logits, std::type_identity_t<MatrixView<T const>> x,
               MatrixView<T> y, Workspace workspace) {
    EPX_NVTX_RANGE(Forward);
    using Logit = std::remove_const_t<L>;
    static_assert(detail::router_logit<Logit>, "epx: router logits are float or epx::bfloat16");
    detail::check_matrix("forward", "router_logits", MatrixView<Logit const>(router_logits), x.rows,
                         config_.router.num_experts);
    run<T>(stream, x, y, workspace, [&](Parts<T> const& parts, std::int64_t num_tokens) {
      auto const k = config_.router.top_k;
      MatrixView<std::int32_t> ids(parts.topk_ids.data(), num_tokens, k);
      MatrixView<float> weights(parts.topk_weights.data(), num_tokens, k);
      route(stream, config_.router, MatrixView<Logit const>(router_logits), config_.correction_bias, ids, weights);
      return Routing{MatrixView<std::int32_t const>(ids), MatrixView<float const>(weights)};
    });
  }

  //! @brief Forward from caller-given routing, read in place (any leading dimension).
  //! @param[in]  topk_ids      [num_tokens, top_k] device memory, global expert ids; -1 = no expert
  //! @param[in]  topk_weights  [num_tokens, top_k] device memory
  //! Other parameters as the router-logits overload.
  //! @throws as the router-logits overload; and with AllToAll and InvalidIds::kThrow,
  //!         Errc::kInvalidExpertId after the collectives on the rank whose ids were invalid (the
  //!         output is written without those slots). AllGather counts them for status().
  template <float_element T>
  void forward(StreamRef stream, MatrixView<std::int32_t const> topk_ids, MatrixView<float const> topk_weights,
               std::type_identity_t<MatrixView<T const>> x, MatrixView<T> y, Workspace workspace) {
    EPX_NVTX_RANGE(Forward);
    detail::check_matrix("forward", "topk_ids", topk_ids, x.rows, config_.router.top_k);
    detail::check_matrix("forward", "topk_weights", topk_weights, x.rows, config_.router.top_k);
    run<T>(stream, x, y, workspace, [&](Parts<T> const& parts, std::int64_t num_tokens) {
      if (num_tokens > 0) {
        detail::ExpertParallelPolicy const policy;
        detail::first_invalid_id_kernel<std::int32_t><<<detail::grid_blocks(num_tokens * topk_ids.cols, policy),
                                          policy.threads_per_block, 0, cuda_stream(stream)>>>(
            topk_ids.data, topk_ids.ld, static_cast<std::int32_t>(num_tokens), config_.router.top_k,
            config_.router.num_experts,
            reinterpret_cast<unsigned long long*>(&control(parts)->first_invalid));
        EPX_CUDA_CHECK_LAUNCH(first_invalid_id_kernel);
      }
      return Routing{topk_ids, topk_weights};
    });
  }

  //! @brief The routing counters of the last forward (all zeros before the first).
  //! AllToAll: read at forward's synchronisation; no device access, no sync. AllGather: one
  //! device->host copy from the last forward's workspace and a Communicator::wait(stream), so
  //! call it on the forward's stream (or one ordered after it) before that workspace is reused.
  //! @throws Error(Errc::kInvalidExpertId) under InvalidIds::kThrow when the counters hold invalid
  //!         ids that no forward has raised yet (AllGather: every rank that held them)
  [[nodiscard]] Status status(StreamRef stream) {
    if constexpr (!kAllToAll) {
      if (last_control_ != nullptr) {
        cudaStream_t const s = cuda_stream(stream, "status");
        EPX_CUDA_CHECK(cudaMemcpyAsync(host_control_.data(), last_control_, sizeof(detail::DeviceControl),
                                       cudaMemcpyDeviceToHost, s));
        comm_->wait(stream);  // the sync this accessor is for, bounded by the communicator's deadline
        std::memcpy(&last_, host_control_.data(), sizeof(last_));
      }
    }
    if (!invalid_reported_ && last_.status.invalid_ids > 0 && config_.on_invalid_ids == InvalidIds::kThrow) {
      invalid_reported_ = true;
      detail::throw_device_invalid_ids("status", comm_->rank(), last_.status, last_.first_invalid,
                                       config_.router.top_k, config_.router.num_experts);
    }
    return last_.status;
  }

 private:
  struct Routing {
    MatrixView<std::int32_t const> ids;
    MatrixView<float const> weights;
  };

  template <class T>
  struct Parts {
    std::span<std::int32_t> topk_ids;  // [M, k] (from logits)
    std::span<float> topk_weights;     // [M, k]
    Workspace plan;
    std::span<std::int64_t> control;     // DeviceControl, then (AllToAll) the gathered table [R, E + 2]
    std::span<std::int64_t> table_send;  // AllToAll: [E + 2]
    std::span<std::byte> upload;         // AllToAll: local offsets + regroup segments
    std::span<T> x_perm;                 // [M * k, H] rows sent, and received back (AllToAll)
    std::span<T> recv, x_local;          // AllToAll: [R * M * k, H] each; AllGather: x_local [M * k, H]
    std::span<float> partial;            // AllGather: [M, H]
    Workspace experts;
  };

  static cudaStream_t cuda_stream(StreamRef stream, std::string_view where = "forward") {
    return detail::cuda_stream(stream, where);
  }
  template <class T>
  static detail::DeviceControl* control(Parts<T> const& parts) {
    return reinterpret_cast<detail::DeviceControl*>(parts.control.data());
  }

  // `bytes` bytes carved as one part, handed to a stage as its own Workspace.
  template <class Carver>
  static Workspace sub_workspace(Carver& c, std::size_t bytes) {
    auto const part = c.template take<std::byte>(bytes);
    return {part.data(), part.size()};
  }

  // The one layout of the workspace, for `max_tokens` tokens (M) per rank. `plan_bytes` is
  // cuda_plan_workspace_bytes for M tokens (it holds CUB's size query, asked once per layout).
  template <class T, class Carver>
  Parts<T> carve(Carver& c, std::int64_t max_tokens, std::size_t plan_bytes) const {
    auto const m = static_cast<std::size_t>(max_tokens);
    auto const k = static_cast<std::size_t>(config_.router.top_k);
    auto const h = static_cast<std::size_t>(config_.mlp.hidden);
    auto const num_ranks = static_cast<std::size_t>(comm_->size());
    auto const row_width = detail::kCountTableHeader + static_cast<std::size_t>(config_.router.num_experts);
    std::size_t const expert_rows = kAllToAll ? num_ranks * m * k : m * k;
    Parts<T> p;
    p.topk_ids = c.template take<std::int32_t>(m * k);
    p.topk_weights = c.template take<float>(m * k);
    p.plan = sub_workspace(c, plan_bytes);
    p.control = c.template take<std::int64_t>(detail::kControlWords + (kAllToAll ? num_ranks * row_width : 0));
    if constexpr (kAllToAll) {
      p.table_send = c.template take<std::int64_t>(row_width);
      p.upload = c.template take<std::byte>(detail::UploadLayout(local_experts().count, comm_->size()).bytes());
    }
    p.x_perm = c.template take<T>(m * k * h);
    if constexpr (kAllToAll) p.recv = c.template take<T>(expert_rows * h);
    else p.partial = c.template take<float>(m * h);
    p.x_local = c.template take<T>(expert_rows * h);
    p.experts =
        sub_workspace(c, experts_.template workspace_bytes<T>(config_.mlp, static_cast<std::int64_t>(expert_rows)));
    return p;
  }

  [[nodiscard]] std::int32_t plan_experts() const {
    return kAllToAll ? config_.router.num_experts : local_experts().count;
  }

  template <class T>
  std::size_t layout_bytes(std::int64_t max_tokens) const {
    std::size_t const plan_bytes =
        cuda_plan_workspace_bytes(static_cast<std::int32_t>(max_tokens), config_.router.top_k, plan_experts());
    return detail::layout_bytes([&](auto& c) { return carve<T>(c, max_tokens, plan_bytes); });
  }


  // The tokens this workspace holds: the largest M with layout_bytes(M) <= workspace.size().
  // A binary search of host arithmetic and CUB size queries, so it is cached per workspace size.
  template <class T>
  std::int64_t capacity_tokens(Workspace workspace) {
    if (workspace.size() == cached_workspace_bytes_ && cached_capacity_ >= 0) return cached_capacity_;
    if (layout_bytes<T>(0) > workspace.size())
      detail::throw_error(Errc::kWorkspaceTooSmall,
                          fmt::format("forward: workspace.size() = {} bytes, expected at least {} bytes "
                                      "(workspace_bytes(0); ask workspace_bytes(max_tokens))",
                                      workspace.size(), layout_bytes<T>(0)));
    std::int64_t lo = 0, hi = detail::max_tokens_limit(kAllToAll, comm_->size(), config_.router.top_k);
    while (lo < hi) {
      std::int64_t const mid = lo + (hi - lo + 1) / 2;
      if (layout_bytes<T>(mid) <= workspace.size()) lo = mid;
      else hi = mid - 1;
    }
    cached_workspace_bytes_ = workspace.size();
    cached_capacity_ = lo;
    return lo;
  }

  // Shared by both forwards: `make_routing(parts, num_tokens)` enqueues this rank's routing (when
  // its tokens fit the workspace) and returns the device views of ids and weights.
  template <class T, class MakeRouting>
  void run(StreamRef stream, MatrixView<T const> x, MatrixView<T> y, Workspace workspace, MakeRouting&& make_routing) {
    detail::require(config_.weights.dtype == dtype_of_v<T>, Errc::kInvalidArgument, "forward", "x's element type",
                    dtype_of_v<T>, fmt::format("the weights' dtype {}", config_.weights.dtype));
    detail::check_matrix("forward", "x", x, -1, config_.mlp.hidden);
    detail::check_matrix("forward", "y", y, x.rows, config_.mlp.hidden);
    cudaStream_t const s = cuda_stream(stream);
    std::int64_t const num_tokens = x.rows, capacity = capacity_tokens<T>(workspace);
    std::size_t const plan_bytes =
        cuda_plan_workspace_bytes(static_cast<std::int32_t>(capacity), config_.router.top_k, plan_experts());
    Parts<T> const parts =
        detail::carve_layout(workspace, "forward", [&](auto& c) { return carve<T>(c, capacity, plan_bytes); });
    // Fresh counters for this call: Status zero, no invalid id seen.
    auto* ctrl = control(parts);
    EPX_CUDA_CHECK(cudaMemsetAsync(&ctrl->status, 0, sizeof(Status), s));
    EPX_CUDA_CHECK(cudaMemsetAsync(&ctrl->first_invalid, 0xff, sizeof(ctrl->first_invalid), s));
    last_control_ = ctrl;
    invalid_reported_ = false;
    if constexpr (kAllToAll) {
      all_to_all<T>(stream, parts, num_tokens, capacity, x, y, make_routing);
    } else {
      // What can be checked without a sync is checked here, before any collective: this rank's
      // room. That every rank holds the same tokens is a precondition that needs a sync to check;
      // a different num_tokens gives the ranks different all_reduce_sum counts (a CudaLocalGroup
      // reports the mismatch; NCCL cannot), and different token values give a wrong sum.
      if (num_tokens > capacity)
        detail::throw_error(Errc::kWorkspaceTooSmall,
                            fmt::format("forward: rank {}: num_tokens = {}, expected <= {} (the tokens its workspace "
                                        "holds; ask workspace_bytes(max_tokens)); the other ranks' collectives of "
                                        "this forward then fail by the communicator's deadline",
                                        comm_->rank(), num_tokens, capacity));
      all_gather<T>(stream, parts, num_tokens, x, y, make_routing(parts, num_tokens));
    }
  }

  template <class T, class MakeRouting>
  void all_to_all(StreamRef stream, Parts<T> const& parts, std::int64_t num_tokens, std::int64_t capacity,
                  MatrixView<T const> x, MatrixView<T> y, MakeRouting& make_routing) {
    cudaStream_t const s = cuda_stream(stream);
    detail::ExpertParallelPolicy const policy;
    auto const hidden = config_.mlp.hidden;
    auto const num_experts = config_.router.num_experts;
    auto const k = config_.router.top_k;
    auto const num_ranks = comm_->size();
    auto* ctrl = control(parts);
    std::int64_t* const table = parts.control.data() + detail::kControlWords;
    std::size_t const table_words = static_cast<std::size_t>(num_ranks) * parts.table_send.size();
    bool const fits = num_tokens <= capacity;
    // 1. Sort this rank's slots by global expert: the rows for each rank are then contiguous. A
    //    rank whose tokens do not fit routes nothing; the count table makes every rank throw.
    RoutingPlan plan;
    Routing routing;
    MatrixView<T> x_perm(parts.x_perm.data(), fits ? num_tokens * k : 0, hidden);
    if (fits) {
      routing = make_routing(parts, num_tokens);
      plan = make_plan(stream, routing.ids, num_experts, ExpertRange{0, num_experts}, parts.plan, &ctrl->status);
      permute(stream, plan, x, x_perm);
    }
    nvtx::ScopedRange<nvtx::Dispatch> dispatch;  // steps 2 to 4
    auto const row_width = static_cast<std::int64_t>(parts.table_send.size());
    detail::count_table_row_kernel<std::int32_t>
        <<<detail::grid_blocks(row_width, policy), policy.threads_per_block, 0, s>>>(
            fits ? plan.tokens_per_expert.data() : nullptr, num_experts, num_tokens, capacity,
            parts.table_send.data());
    EPX_CUDA_CHECK_LAUNCH(count_table_row_kernel);
    // 2. Count exchange, then the one device->host copy (control block + table, adjacent) and the
    //    one synchronisation of this forward: all_to_all_v takes its sizes on the host.
    comm_->all_gather(parts.table_send.data(), table, parts.table_send.size_bytes(), stream);
    std::size_t const copy_bytes = (detail::kControlWords + table_words) * sizeof(std::int64_t);
    EPX_CUDA_CHECK(cudaMemcpyAsync(host_control_.data(), ctrl, copy_bytes, cudaMemcpyDeviceToHost, s));
    comm_->wait(stream);  // not cudaStreamSynchronize: a dead peer must end in an Error, not a hang
    std::memcpy(&last_, host_control_.data(), sizeof(last_));
    std::span<std::int64_t const> const host_table(
        reinterpret_cast<std::int64_t const*>(host_control_.data()) + detail::kControlWords, table_words);
    detail::check_count_table(host_table, config_.placement, k);  // same verdict on every rank
    auto const layout = detail::make_all_to_all_layout(host_table, config_.placement, comm_->rank());
    last_.status.max_tokens_per_expert = layout.max_rows_per_local_expert;
    // 3. The local offsets and regroup segments to the device in one host->device copy.
    auto const num_local = local_experts().count;
    detail::UploadLayout const upload(num_local, num_ranks);
    std::memcpy(host_upload_.data(), layout.local_offsets.data(), layout.local_offsets.size() * sizeof(std::int32_t));
    std::memcpy(host_upload_.data() + upload.offsets_bytes, layout.regroup.data(),
                layout.regroup.size() * sizeof(detail::RowSegment));
    EPX_CUDA_CHECK(cudaMemcpyAsync(parts.upload.data(), host_upload_.data(),
                                   upload.offsets_bytes + layout.regroup.size() * sizeof(detail::RowSegment),
                                   cudaMemcpyHostToDevice, s));
    std::span<std::int32_t const> const device_offsets(reinterpret_cast<std::int32_t const*>(parts.upload.data()),
                                                       static_cast<std::size_t>(num_local) + 1);
    auto const* segments = reinterpret_cast<detail::RowSegment const*>(parts.upload.data() + upload.offsets_bytes);
    // 4. Rows to the experts' ranks: recv holds them rank-major; x_local gets them expert-major.
    auto const row_bytes = static_cast<std::size_t>(hidden) * sizeof(T);
    for (std::size_t p = 0; p < send_bytes_.size(); ++p) {
      send_bytes_[p] = layout.send_rows[p] * row_bytes;
      recv_bytes_[p] = layout.recv_rows[p] * row_bytes;
    }
    MatrixView<T> recv(parts.recv.data(), layout.num_recv_rows, hidden);
    MatrixView<T> x_local(parts.x_local.data(), layout.num_recv_rows, hidden);
    comm_->all_to_all_v(parts.x_perm.data(), send_bytes_, recv.data, recv_bytes_, stream);
    regroup<T>(s, layout, segments, recv, x_local, false);
    dispatch.end();
    // 5. Experts: x_local -> recv (expert-major); then recv -> x_local, back in rank-major order.
    if (num_local > 0)
      experts_.template run<T>(stream, config_.mlp, config_.weights, MatrixView<T const>(x_local), device_offsets,
                               recv, parts.experts, layout.num_recv_rows);
    nvtx::ScopedRange<nvtx::Combine> combine;  // the regroup back and step 6's all-to-all
    regroup<T>(s, layout, segments, x_local, recv, true);
    // 6. Rows back to the ranks they came from, in the order they were sent, then the weighted sum.
    comm_->all_to_all_v(parts.x_local.data(), recv_bytes_, parts.x_perm.data(), send_bytes_, stream);
    combine.end();
    unpermute(stream, plan, MatrixView<T const>(x_perm), routing.weights, y);
    if (last_.status.invalid_ids > 0 && config_.on_invalid_ids == InvalidIds::kThrow) {
      invalid_reported_ = true;
      detail::throw_device_invalid_ids("forward", comm_->rank(), last_.status, last_.first_invalid, k, num_experts);
    }
  }

  // Copies the rows of `layout.regroup` from `rank_major` to `expert_major`, or back (`inverse`).
  template <class T>
  void regroup(cudaStream_t s, detail::AllToAllLayout const& layout, detail::RowSegment const* segments,
               MatrixView<T> rank_major, MatrixView<T> expert_major, bool inverse) const {
    if (layout.regroup.empty()) return;
    detail::ExpertParallelPolicy const policy;
    auto const num_segments = static_cast<std::int32_t>(layout.regroup.size());
    auto launch = [&]<class Unit>(Unit*) {
      auto const units = static_cast<std::int32_t>(rank_major.cols * static_cast<std::int64_t>(sizeof(T)) /
                                                   static_cast<std::int64_t>(sizeof(Unit)));
      detail::RowBlock const block = detail::row_block(units, policy.threads_per_block);
      detail::regroup_rows_kernel<Unit>
          <<<detail::row_grid(layout.num_recv_rows, block, policy.max_blocks), dim3(block.threads_x, block.rows_per_block),
             0, s>>>(reinterpret_cast<Unit*>(rank_major.data), reinterpret_cast<Unit*>(expert_major.data), units,
                     segments, num_segments, layout.num_recv_rows, inverse);
    };
    // Both buffers are contiguous ([rows, hidden], workspace parts aligned to 256 bytes).
    if (detail::vector_friendly<T>(rank_major.data, rank_major.cols, expert_major.data, expert_major.cols,
                                   rank_major.cols))
      launch(static_cast<uint4*>(nullptr));
    else
      launch(static_cast<T*>(nullptr));
    EPX_CUDA_CHECK_LAUNCH(regroup_rows_kernel);
  }

  template <class T>
  void all_gather(StreamRef stream, Parts<T> const& parts, std::int64_t num_tokens, MatrixView<T const> x,
                  MatrixView<T> y, Routing const& routing) {
    cudaStream_t const s = cuda_stream(stream);
    detail::ExpertParallelPolicy const policy;
    auto const hidden = config_.mlp.hidden;
    auto const k = config_.router.top_k;
    auto* ctrl = control(parts);
    // 1. This rank's experts only: the plan sorts onto the local range, the rest have no row.
    ExpertRange const local = local_experts();
    RoutingPlan const plan =
        make_plan(stream, routing.ids, config_.router.num_experts, local, parts.plan, &ctrl->status);
    MatrixView<T> x_perm(parts.x_perm.data(), num_tokens * k, hidden);
    MatrixView<T> out(parts.x_local.data(), num_tokens * k, hidden);
    permute(stream, plan, x, x_perm);
    if (local.count > 0) {
      // The routed-row count stays on the device; the kernel's tile shapes are picked for the
      // count uniform routing would give.
      std::int64_t const expected_rows =
          ceil_div<std::int64_t>(num_tokens * k * local.count, config_.router.num_experts);
      experts_.template run<T>(stream, config_.mlp, config_.weights, MatrixView<T const>(x_perm),
                               std::span<std::int32_t const>(plan.expert_offsets), out, parts.experts, expected_rows);
    }
    // 2. This rank's share of every token in fp32 (every row written: zeros where it has none),
    //    summed over the ranks, then rounded once to T.
    MatrixView<float> partial(parts.partial.data(), num_tokens, hidden);
    unpermute(stream, plan, MatrixView<T const>(out), routing.weights, partial);
    EPX_NVTX_RANGE(Combine);  // to the end: the sum over ranks, then the rounding to T
    comm_->all_reduce_sum(partial.data, static_cast<std::size_t>(partial.size()), DType::kF32, stream);
    if (num_tokens > 0) {
      detail::RowBlock const block = detail::row_block(hidden, policy.threads_per_block);
      detail::partial_to_output_kernel<T>
          <<<detail::row_grid(num_tokens, block, policy.max_blocks), dim3(block.threads_x, block.rows_per_block), 0,
             s>>>(partial.data, num_tokens, hidden, y.data, y.ld);
      EPX_CUDA_CHECK_LAUNCH(partial_to_output_kernel);
    }
  }

  MoeConfig config_;
  Communicator* comm_;
  ExpertKernel experts_{};
  detail::PinnedHostBuffer host_control_;  // DeviceControl (+ AllToAll: the gathered count table)
  detail::PinnedHostBuffer host_upload_;   // AllToAll: local offsets + regroup segments
  std::vector<std::size_t> send_bytes_, recv_bytes_;  // AllToAll: [R], reused by every forward
  std::size_t cached_workspace_bytes_ = 0;
  std::int64_t cached_capacity_ = -1;
  detail::DeviceControl const* last_control_ = nullptr;  // AllGather: the last forward's, in its workspace
  detail::DeviceControl last_{.status = {}, .first_invalid = detail::kNoInvalidId};
  bool invalid_reported_ = false;
};

}  // namespace epx
