// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! NcclCommunicator: epx's Communicator over NCCL, with a deadline on every wait. Host code:
//! needs cuda_runtime_api.h and nccl.h, not nvcc.

#include <epx/comm/communicator.hpp>
#include <epx/core/error.hpp>
#include <epx/core/stream.hpp>
#include <epx/cuda/error.hpp>
#include <epx/cuda/scoped_device.hpp>
#include <epx/nccl/bootstrap.hpp>
#include <epx/nccl/error.hpp>
#include <epx/nccl/launch_env.hpp>
#include <epx/nccl/options.hpp>
#include <epx/nccl/poll.hpp>

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <utility>

namespace epx {

namespace detail {

//! cudaFree as a deleter (never throws; a failure here has nobody left to report to).
struct CudaFreeDeleter {
  void operator()(void* p) const noexcept {
    if (p != nullptr) (void)cudaFree(p);
  }
};

[[nodiscard]] constexpr ncclDataType_t nccl_dtype(DType dtype) noexcept {
  switch (dtype) {
    case DType::kF32: return ncclFloat32;
    case DType::kF16: return ncclFloat16;
    case DType::kBF16: return ncclBfloat16;
    case DType::kI32: return ncclInt32;
    case DType::kI64: return ncclInt64;
  }
  return ncclFloat32;
}

[[nodiscard]] constexpr bool nccl_failed(ncclResult_t r) noexcept { return r != ncclSuccess && r != ncclInProgress; }

}  // namespace detail

//! @brief epx's Communicator over NCCL: device memory, work ordered on a caller's CUDA stream, and
//! a deadline (NcclOptions::timeout) on every wait, so that a failed or absent peer becomes an
//! Error instead of a hang.
//!
//! **Creating.** `NcclCommunicator(rank, size, id, device)` creates and owns an NCCL communicator
//! (ncclCommInitRankConfig with `blocking = 0`, so that creation and every call can be polled
//! and abandoned); `from_env()` does the same from torchrun's or mpirun's variables (see
//! docs/nccl.md). `NcclCommunicator(comm)` borrows a communicator the caller created: epx never
//! destroys it, but on a timeout or an NCCL failure epx **aborts it** (ncclCommAbort), because
//! only an abort stops NCCL kernels that wait for a dead peer and so unblocks the GPU; the
//! caller's handle is then dead and must not be used again. A borrowed blocking communicator
//! (created without `blocking = 0`, e.g. by ncclCommInitRank or ncclCommInitAll) works, but
//! NCCL may block inside a call there and no deadline can interrupt that.
//!
//! **Stream ordering.** Every collective enqueues on `stream` (a CUDA stream on this
//! communicator's device; StreamRef::host() is refused) and returns once NCCL has accepted the
//! work, without waiting for it. Buffers must stay alive and untouched until the stream reaches
//! that point. `wait(stream)` is the only blocking call: it polls the stream and NCCL's error
//! state until the stream's work is done, and is how a caller turns a dead peer into an Error
//! (a peer on the same node that dies is seen by nothing but this deadline).
//!
//! **Failure.** When a deadline passes while NCCL is still in progress, or NCCL reports an error,
//! epx snapshots NCCL's last-error text, aborts the communicator and throws Errc::kTimeout or
//! Errc::kNccl naming the call, its sequence number, the rank and the device. Results of work in
//! flight are then undefined. From then on every call throws Errc::kPeerFailed: destroy the
//! object and build a new communicator (every rank must, with a fresh unique id). Every rank
//! must also abort: a survivor does so at its own deadline.
//!
//! **CUDA graphs.** The collectives can be captured (NCCL supports capture; sizes and pointers
//! are frozen into the graph, and every rank must capture and launch the same operations).
//! `wait` refuses a capturing stream. NCCL's abort waits until every graph that captured work
//! on the communicator is destroyed: destroy those graph execs (cudaGraphExecDestroy) before a
//! failure can trigger an abort, i.e. before calling `wait` on a stream that replays them, or
//! the abort itself can block for tens of seconds or hang.
//!
//! **all_reduce_sum** uses ncclAllReduce(ncclSum). NCCL guarantees run-to-run reproducibility
//! for a fixed configuration: the same communicator size and topology, NCCL version, count,
//! element type and NCCL_* environment (which fix algorithm, protocol and channel count) give
//! the same bits, and every rank receives the same bits. It does not sum in rank order, and f16
//! and bf16 are rounded at each step in their own type, so results differ in the last bits from
//! LocalGroup's rank-ordered float sum and between configurations (a different world size, count
//! or NCCL version). In-network reductions (NVLS, CollNet) leave the order to hardware: pin
//! NCCL_ALGO (e.g. Ring) where bitwise reproducibility across machines matters.
//!
//! **Threads.** One thread at a time per communicator (NCCL's rule); keep its current device the
//! communicator's device while calling.
class NcclCommunicator final : public Communicator {
 public:
  using Options = NcclOptions;

  //! Creates (and owns) rank `rank` of a `size`-rank communicator on CUDA device `device`, with
  //! the unique id every rank received from rank 0. Returns once every rank has joined; throws
  //! Errc::kTimeout (after aborting) when they have not within options.timeout.
  //! @pre no other rank of the communicator uses `device` (NCCL refuses two ranks on one GPU)
  NcclCommunicator(int rank, int size, ncclUniqueId const& id, int device, Options options = {})
      : owned_(true), rank_(rank), size_(size), device_(device), options_(options) {
    constexpr std::string_view where = "NcclCommunicator";
    check_options(where);
    detail::require(size >= 1, Errc::kInvalidArgument, where, "size", size, ">= 1");
    detail::require(rank >= 0 && rank < size, Errc::kInvalidArgument, where, "rank", rank,
                    fmt::format("in [0, size = {})", size));
    detail::require(device >= 0, Errc::kInvalidArgument, where, "device", device, ">= 0 (a CUDA device ordinal)");
    detail::check_comm_blocking(detail::process_environment(), where);
    detail::ScopedDevice const on_device(device);
    allocate_barrier_word();
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    ncclUniqueId id_copy = id;
    ncclComm_t comm = nullptr;
    ncclResult_t const started = ncclCommInitRankConfig(&comm, size, id_copy, rank, &config);
    // On an immediate failure NCCL frees the communicator itself and returns a null handle.
    if (detail::nccl_failed(started) || comm == nullptr) fail_unaborted(Errc::kNccl, "ncclCommInitRankConfig", started);
    comm_ = comm;
    wait_ready("ncclCommInitRankConfig (creating the communicator: waiting for every rank to join)", true);
  }

  //! Borrows `comm`, created by the caller (blocking or not) and already initialised or still
  //! initialising (then waits for it, up to options.timeout). Never destroyed by epx; aborted by
  //! epx on a timeout or an NCCL failure of a later call (see the class comment).
  explicit NcclCommunicator(ncclComm_t comm, Options options = {}) : owned_(false), options_(options) {
    constexpr std::string_view where = "NcclCommunicator";
    check_options(where);
    detail::require(comm != nullptr, Errc::kInvalidArgument, where, "comm", "nullptr",
                    "an initialised ncclComm_t (ncclCommInitRank*, ncclCommSplit)");
    comm_ = comm;
    // A communicator that failed or did not finish initialising is the caller's to abort: epx has
    // not used it yet.
    wait_ready("adopting the communicator (ncclCommGetAsyncError)", false);
    EPX_NCCL_CHECK_COMM(ncclCommCount(comm_, &size_), comm_);
    EPX_NCCL_CHECK_COMM(ncclCommUserRank(comm_, &rank_), comm_);
    EPX_NCCL_CHECK_COMM(ncclCommCuDevice(comm_, &device_), comm_);
    detail::ScopedDevice const on_device(device_);
    allocate_barrier_word();
  }

  //! torchrun/mpirun bootstrap: reads RANK, WORLD_SIZE and LOCAL_RANK (or Open MPI's
  //! OMPI_COMM_WORLD_*), makes LOCAL_RANK the current device (left current on return), agrees on
  //! the unique id through NCCL_COMM_ID or a file in EPX_NCCL_ID_DIR, and creates the
  //! communicator. Every wait is bounded by options.timeout. See docs/nccl.md.
  [[nodiscard]] static NcclCommunicator from_env(Options options = {}) {
    detail::require(options.timeout.count() > 0, Errc::kInvalidArgument, detail::kFromEnv, "options.timeout (ms)",
                    options.timeout.count(), "> 0");
    auto const lookup = detail::process_environment();
    auto const env = detail::parse_launch_env(lookup);
    // Refused here too, before rank 0 publishes an id that the others would then wait on in vain.
    detail::check_comm_blocking(lookup, detail::kFromEnv);
    detail::select_launch_device(env);
    auto const exchange = detail::exchange_unique_id(env, options.timeout);
    bool const publisher = env.rank == 0 && !exchange.id_file.empty();
    try {
      NcclCommunicator comm(env.rank, env.size, exchange.id, env.local_rank, options);
      // Every rank has joined, so every rank has read the id: no later job may find the file.
      if (publisher) detail::remove_id_file(exchange.id_file);
      return comm;
    } catch (...) {
      if (publisher) detail::remove_id_file(exchange.id_file);  // its root is gone with the abort
      throw;
    }
  }

  NcclCommunicator(NcclCommunicator&& other) noexcept
      : comm_(std::exchange(other.comm_, nullptr)),
        owned_(other.owned_),
        rank_(other.rank_),
        size_(other.size_),
        device_(other.device_),
        options_(other.options_),
        barrier_word_(std::move(other.barrier_word_)),
        sequence_(other.sequence_),
        failure_(std::exchange(other.failure_, "moved from")) {}

  NcclCommunicator& operator=(NcclCommunicator&& other) noexcept {
    if (this != &other) {
      release();
      comm_ = std::exchange(other.comm_, nullptr);
      owned_ = other.owned_;
      rank_ = other.rank_;
      size_ = other.size_;
      device_ = other.device_;
      options_ = other.options_;
      barrier_word_ = std::move(other.barrier_word_);
      sequence_ = other.sequence_;
      failure_ = std::exchange(other.failure_, "moved from");
    }
    return *this;
  }

  NcclCommunicator(NcclCommunicator const&) = delete;
  NcclCommunicator& operator=(NcclCommunicator const&) = delete;

  //! An owned communicator is finalized and destroyed (ncclCommFinalize, polled up to the
  //! deadline, then ncclCommDestroy; ncclCommAbort if finalizing fails or overruns). A borrowed
  //! one is left to its owner. Never throws. Destroying a communicator is collective: every rank
  //! should destroy its own. Call `wait` first when work may still be in flight.
  ~NcclCommunicator() override { release(); }

  [[nodiscard]] int rank() const noexcept override { return rank_; }
  [[nodiscard]] int size() const noexcept override { return size_; }
  [[nodiscard]] MemorySpace memory_space() const noexcept override { return MemorySpace::kDevice; }

  //! The CUDA device of this rank.
  [[nodiscard]] int device() const noexcept { return device_; }
  //! Whether epx created (and destroys) the NCCL communicator.
  [[nodiscard]] bool owns_comm() const noexcept { return owned_; }
  //! Whether the communicator was aborted (or moved from): every collective then throws.
  [[nodiscard]] bool aborted() const noexcept { return !failure_.empty(); }
  //! The NCCL communicator, for calls epx does not wrap; nullptr once aborted.
  [[nodiscard]] ncclComm_t get() const noexcept { return comm_; }

  //! @pre send_bytes[rank()] == recv_bytes[rank()] (checked); peer p's recv_bytes[rank()] ==
  //!      send_bytes[p] (not checkable locally: a mismatch hangs that pair until the deadline).
  //! Pairs with 0 bytes post nothing (on both sides, by the precondition); this rank's own block is
  //! a send/recv to itself inside the same NCCL group.
  void all_to_all_v(void const* send, std::span<std::size_t const> send_bytes, void* recv,
                    std::span<std::size_t const> recv_bytes, StreamRef stream) override {
    constexpr std::string_view where = "NcclCommunicator::all_to_all_v";
    check_call(where, stream);
    auto const n = static_cast<std::size_t>(size_);
    auto const me = static_cast<std::size_t>(rank_);
    detail::require(send_bytes.size() == n, Errc::kInvalidArgument, where, "send_bytes.size()", send_bytes.size(),
                    fmt::format("the group size {}", n));
    detail::require(recv_bytes.size() == n, Errc::kInvalidArgument, where, "recv_bytes.size()", recv_bytes.size(),
                    fmt::format("the group size {}", n));
    detail::require(
        send_bytes[me] == recv_bytes[me], Errc::kCollectiveMismatch, where, fmt::format("send_bytes[rank {}]", me),
        send_bytes[me],
        fmt::format("recv_bytes[rank {}] = {} (what this rank sends itself it also receives)", me, recv_bytes[me]));
    std::size_t send_total = 0, recv_total = 0;
    for (std::size_t p = 0; p < n; ++p) {
      send_total += send_bytes[p];
      recv_total += recv_bytes[p];
    }
    check_buffer(where, "send", send, send_total);
    check_buffer(where, "recv", recv, recv_total);
    auto* const s = stream.get();
    issue(where, [&]() -> Posted {
      std::size_t send_at = 0, recv_at = 0;
      for (std::size_t p = 0; p < n; ++p) {
        int const peer = static_cast<int>(p);
        if (send_bytes[p] > 0) {
          ncclResult_t const r =
              ncclSend(static_cast<std::byte const*>(send) + send_at, send_bytes[p], ncclUint8, peer, comm_, s);
          if (detail::nccl_failed(r)) return {r, "ncclSend"};
        }
        if (recv_bytes[p] > 0) {
          ncclResult_t const r =
              ncclRecv(static_cast<std::byte*>(recv) + recv_at, recv_bytes[p], ncclUint8, peer, comm_, s);
          if (detail::nccl_failed(r)) return {r, "ncclRecv"};
        }
        send_at += send_bytes[p];
        recv_at += recv_bytes[p];
      }
      return {};
    });
  }

  void all_to_all(void const* send, void* recv, std::size_t bytes_per_rank, StreamRef stream) override {
    constexpr std::string_view where = "NcclCommunicator::all_to_all";
    check_call(where, stream);
    auto const n = static_cast<std::size_t>(size_);
    check_buffer(where, "send", send, bytes_per_rank * n);
    check_buffer(where, "recv", recv, bytes_per_rank * n);
    if (bytes_per_rank == 0) return;  // every rank passes the same size, so none posts anything
    auto* const s = stream.get();
    issue(where, [&]() -> Posted {
      for (std::size_t p = 0; p < n; ++p) {
        int const peer = static_cast<int>(p);
        ncclResult_t r = ncclSend(static_cast<std::byte const*>(send) + p * bytes_per_rank, bytes_per_rank, ncclUint8,
                                  peer, comm_, s);
        if (detail::nccl_failed(r)) return {r, "ncclSend"};
        r = ncclRecv(static_cast<std::byte*>(recv) + p * bytes_per_rank, bytes_per_rank, ncclUint8, peer, comm_, s);
        if (detail::nccl_failed(r)) return {r, "ncclRecv"};
      }
      return {};
    });
  }

  //! ncclAllReduce(ncclSum), in place, for f32, f16, bf16 (and i32, i64). Reduction order: see the
  //! class comment (reproducible for a fixed configuration, not rank-ordered).
  void all_reduce_sum(void* data, std::size_t count, DType dtype, StreamRef stream) override {
    constexpr std::string_view where = "NcclCommunicator::all_reduce_sum";
    check_call(where, stream);
    check_buffer(where, "data", data, count * size_of(dtype));
    if (count == 0) return;
    auto* const s = stream.get();
    issue(where, [&]() -> Posted {
      ncclResult_t const r = ncclAllReduce(data, data, count, detail::nccl_dtype(dtype), ncclSum, comm_, s);
      return {r, "ncclAllReduce"};
    });
  }

  void all_gather(void const* send, void* recv, std::size_t bytes_per_rank, StreamRef stream) override {
    constexpr std::string_view where = "NcclCommunicator::all_gather";
    check_call(where, stream);
    check_buffer(where, "send", send, bytes_per_rank);
    check_buffer(where, "recv", recv, bytes_per_rank * static_cast<std::size_t>(size_));
    if (bytes_per_rank == 0) return;
    auto* const s = stream.get();
    issue(where, [&]() -> Posted {
      ncclResult_t const r = ncclAllGather(send, recv, bytes_per_rank, ncclUint8, comm_, s);
      return {r, "ncclAllGather"};
    });
  }

  //! Orders `stream` after every rank's barrier: an all-reduce of one int32 in a word this object
  //! allocated at construction (zeroed on the stream first, so no uninitialised memory is read).
  void barrier(StreamRef stream) override {
    constexpr std::string_view where = "NcclCommunicator::barrier";
    check_call(where, stream);
    auto* const s = stream.get();
    void* const word = barrier_word_.get();
    EPX_CUDA_CHECK(cudaMemsetAsync(word, 0, sizeof(std::int32_t), s));
    issue(where, [&]() -> Posted {
      ncclResult_t const r = ncclAllReduce(word, word, 1, ncclInt32, ncclSum, comm_, s);
      return {r, "ncclAllReduce"};
    });
  }

  //! Blocks until everything enqueued on `stream` so far has finished, polling cudaStreamQuery and
  //! ncclCommGetAsyncError. When NCCL reports an error, or the work has not finished within
  //! options.timeout, aborts the communicator and throws Errc::kNccl / Errc::kTimeout. A failed
  //! kernel on the stream throws Errc::kCuda (the communicator is left alone). The deadline
  //! covers all work on the stream, not only NCCL's.
  //! @pre `stream` is not being captured into a graph (refused: querying it would end the capture)
  void wait(StreamRef stream) override {
    constexpr std::string_view where = "NcclCommunicator::wait";
    check_call(where, stream);
    auto* const s = stream.get();
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    EPX_CUDA_CHECK(cudaStreamIsCapturing(s, &capture));
    detail::require(capture == cudaStreamCaptureStatusNone, Errc::kInvalidArgument, where, "stream",
                    "a stream being captured",
                    "a stream that is not capturing (wait on the stream that launches the "
                    "graph, after the launch)");
    auto deadline = detail::PollDeadline::for_device(options_.timeout);
    for (;;) {
      ncclResult_t async = ncclSuccess;
      ncclResult_t const queried = ncclCommGetAsyncError(comm_, &async);
      if (detail::nccl_failed(queried)) fail(Errc::kNccl, where, "ncclCommGetAsyncError", queried);
      if (detail::nccl_failed(async))
        fail(Errc::kNccl, where, "ncclCommGetAsyncError (the communicator's state)", async);
      cudaError_t const state = cudaStreamQuery(s);
      if (state == cudaSuccess) return;
      if (state != cudaErrorNotReady)
        detail::throw_cuda_error(state, "cudaStreamQuery(stream)", detail::SourceLocation::current());
      if (deadline.expired())
        fail_timeout(where,
                     "the stream's work did not finish (a peer failed, or never posted its matching operation; a "
                     "peer on the same node that dies is seen by nothing but this deadline)");
      deadline.pause();
    }
  }

  //! Aborts the communicator now (e.g. when the caller learns out of band that a peer failed), so
  //! that NCCL kernels waiting on the GPU quit. Later calls throw Errc::kPeerFailed with `reason`.
  //! Results of work in flight are undefined. Never throws. See the class comment on graphs.
  void abort(std::string_view reason) noexcept {
    if (aborted()) return;  // the first reason stays
    try {
      abort_comm(fmt::format("aborted by the caller: {}", reason));
    } catch (...) {  // formatting failed (out of memory): abort all the same
      abort_comm_noexcept();
    }
  }

 private:
  // The first failing call of a group: its result and name.
  struct Posted {
    ncclResult_t result = ncclSuccess;
    std::string_view call = {};
  };

  void check_options(std::string_view where) const {
    detail::require(options_.timeout.count() > 0, Errc::kInvalidArgument, where, "options.timeout (ms)",
                    options_.timeout.count(), "> 0");
  }

  void allocate_barrier_word() {
    void* word = nullptr;
    EPX_CUDA_CHECK(cudaMalloc(&word, sizeof(std::int32_t)));
    barrier_word_.reset(word);
  }

  // Every collective starts here: a usable communicator and a CUDA stream.
  void check_call(std::string_view where, StreamRef stream) const {
    if (aborted())
      detail::throw_error(
          Errc::kPeerFailed,
          fmt::format("{}: rank {} of {}: the communicator was aborted ({}); destroy it and build a new "
                      "one on every rank",
                      where, rank_, size_, failure_));
    detail::require(!stream.is_host(), Errc::kInvalidArgument, where, "stream", "StreamRef::host()",
                    fmt::format("a CUDA stream on device {} (NCCL moves device memory)", device_));
  }

  static void check_buffer(std::string_view where, std::string_view name, void const* p, std::size_t bytes) {
    detail::require(p != nullptr || bytes == 0, Errc::kInvalidArgument, where, name, "nullptr",
                    fmt::format("{} bytes of device memory", bytes));
  }

  // Posts one NCCL group and waits (up to the deadline) until NCCL has accepted it: on a
  // nonblocking communicator ncclGroupEnd may return ncclInProgress, and until the state reads
  // ncclSuccess nothing else may be launched on the stream.
  template <class Post>
  void issue(std::string_view where, Post&& post) {
    ++sequence_;
    ncclResult_t const started = ncclGroupStart();
    if (detail::nccl_failed(started)) fail(Errc::kNccl, where, "ncclGroupStart", started);
    Posted const posted = post();
    // Always close the group, even after a failed post: the group depth is per thread, and an
    // open group would swallow this thread's next NCCL calls.
    ncclResult_t const ended = ncclGroupEnd();
    if (detail::nccl_failed(posted.result)) fail(Errc::kNccl, where, posted.call, posted.result);
    if (detail::nccl_failed(ended)) fail(Errc::kNccl, where, "ncclGroupEnd", ended);
    wait_ready(where, true);
  }

  // Polls ncclCommGetAsyncError until it leaves ncclInProgress. On an error or at the deadline,
  // aborts (when `abort_on_failure`) and throws.
  void wait_ready(std::string_view what, bool abort_on_failure) {
    auto deadline = detail::PollDeadline::for_device(options_.timeout);
    for (;;) {
      ncclResult_t async = ncclSuccess;
      ncclResult_t const queried = ncclCommGetAsyncError(comm_, &async);
      ncclResult_t const failure = detail::nccl_failed(queried) ? queried : async;
      if (failure == ncclSuccess) return;
      if (failure != ncclInProgress) {
        if (abort_on_failure) fail(Errc::kNccl, what, "ncclCommGetAsyncError", failure);
        fail_unaborted(Errc::kNccl, what, failure);
      }
      if (deadline.expired()) {
        std::string_view const why = "NCCL still reports ncclInProgress (a peer never arrived, or failed)";
        if (abort_on_failure) fail_timeout(what, why);
        detail::throw_error(
            Errc::kTimeout,
            fmt::format("NcclCommunicator: adopted communicator: {}: waited {} ms, {}; the communicator "
                        "was not aborted (it is the caller's)",
                        what, deadline.elapsed().count(), why));
      }
      deadline.pause();
    }
  }

  [[nodiscard]] std::string context() const {
    if (sequence_ == 0) return fmt::format("rank {} of {} (device {})", rank_, size_, device_);
    return fmt::format("rank {} of {} (device {}), collective #{}", rank_, size_, device_, sequence_);
  }

  // NCCL's own text for the failure; read at once, since the next WARN anywhere overwrites it.
  [[nodiscard]] std::string last_nccl_error() const {
    char const* last = ncclGetLastError(comm_);
    return (last != nullptr && *last != '\0') ? fmt::format(": {}", last) : std::string();
  }

  [[noreturn]] void fail(Errc code, std::string_view what, std::string_view call, ncclResult_t result,
                         detail::SourceLocation loc = detail::SourceLocation::current()) {
    std::string const message =
        fmt::format("NcclCommunicator: {}: {}: NCCL call `{}` failed: {} ({}){}", context(), what, call,
                    ncclGetErrorString(result), static_cast<int>(result), last_nccl_error());
    abort_comm(message);
    detail::throw_error(code,
                        fmt::format("{}; the communicator was aborted: destroy it and build a new one on every "
                                    "rank",
                                    message),
                        loc);
  }

  [[noreturn]] void fail_timeout(std::string_view what, std::string_view why,
                                 detail::SourceLocation loc = detail::SourceLocation::current()) {
    std::string const message = fmt::format("NcclCommunicator: {}: {}: not finished within the deadline of {} ms: {}",
                                            context(), what, options_.timeout.count(), why);
    abort_comm(message);
    detail::throw_error(Errc::kTimeout,
                        fmt::format("{}; the communicator was aborted: destroy it and build a new one "
                                    "on every rank",
                                    message),
                        loc);
  }

  // A failure before epx holds the communicator (creation failed at once; adoption).
  [[noreturn]] void fail_unaborted(Errc code, std::string_view what, ncclResult_t result,
                                   detail::SourceLocation loc = detail::SourceLocation::current()) {
    // While adopting, rank and size are not known yet.
    std::string const who = size_ > 0 ? fmt::format("rank {} of {} (device {})", rank_, size_, device_)
                                      : std::string("adopted communicator");
    detail::throw_error(code,
                        fmt::format("NcclCommunicator: {}: {}: NCCL call failed: {} ({}){}", who, what,
                                    ncclGetErrorString(result), static_cast<int>(result), last_nccl_error()),
                        loc);
  }

  void abort_comm(std::string reason) {
    failure_ = std::move(reason);
    abort_comm_noexcept();
  }

  void abort_comm_noexcept() noexcept {
    if (failure_.empty()) failure_ = "aborted";
    // After ncclCommAbort the handle is freed: never pass it to NCCL again.
    if (comm_ != nullptr) (void)ncclCommAbort(comm_);
    comm_ = nullptr;
  }

  void release() noexcept {
    if (comm_ != nullptr && owned_) {
      ncclResult_t state = ncclCommFinalize(comm_);
      auto deadline = detail::PollDeadline::for_device(options_.timeout);
      while (state == ncclInProgress && !deadline.expired()) {
        ncclResult_t async = ncclSuccess;
        state = ncclCommGetAsyncError(comm_, &async);
        if (state == ncclSuccess) state = async;
        if (state == ncclInProgress) deadline.pause();
      }
      if (state == ncclSuccess)
        (void)ncclCommDestroy(comm_);
      else
        (void)ncclCommAbort(comm_);
    }
    comm_ = nullptr;
    barrier_word_.reset();
  }

  ncclComm_t comm_ = nullptr;
  bool owned_ = false;
  int rank_ = 0;
  int size_ = 0;
  int device_ = -1;
  Options options_;
  std::unique_ptr<void, detail::CudaFreeDeleter> barrier_word_;  // one int32 on device_
  std::uint64_t sequence_ = 0;                                   // collectives issued, for messages
  std::string failure_;                                          // why the communicator was aborted; empty while usable
};

}  // namespace epx
