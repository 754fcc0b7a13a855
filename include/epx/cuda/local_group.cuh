// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! LocalGroup on CUDA devices: N ranks as threads of one process, exchanging device memory with
//! stream-ordered copies. NCCL refuses two ranks on one GPU, so this is how multi-rank expert
//! parallelism runs (tests, simulation) on a single GPU; it also spans several GPUs of one process.
//! The rendezvous, deadline, abort and mismatch verdict are LocalGroup's own (comm/local_group.hpp).

#include <epx/comm/local_group.hpp>
#include <epx/core/math.hpp>
#include <epx/core/stream.hpp>
#include <epx/cuda/element.cuh>
#include <epx/cuda/error.hpp>
#include <epx/cuda/launch.cuh>
#include <epx/cuda/scoped_device.hpp>
#include <epx/cuda/tuning.cuh>

#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string_view>
#include <type_traits>
#include <vector>

namespace epx {

//! Options of a CudaLocalGroup.
struct CudaLocalGroupOptions {
  std::chrono::milliseconds timeout{std::chrono::seconds(60)};  //!< longest host-side wait for a peer
  std::vector<int> devices = {};  //!< device of each rank; empty: every rank on the device current at construction
};

namespace detail {

template <class T>
__device__ __forceinline__ auto rank_sum_load(T v) {
  // Integers wrap (two's complement) instead of overflowing, so every order gives the same bits.
  if constexpr (std::is_integral_v<T>)
    return static_cast<std::make_unsigned_t<T>>(v);
  else
    return device_to_float(v);
}

template <class T, class Acc>
__device__ __forceinline__ T rank_sum_store(Acc acc) {
  if constexpr (std::is_integral_v<T>)
    return static_cast<T>(acc);
  else
    return device_from_float<T>(acc);
}

// data[i] = the sum over ranks q = 0, 1, ... of rank q's element i, accumulated in fp32 (exactly for
// integers) and rounded once: the host LocalGroup's order, hence its bits. This rank's own values
// are still in `data`; a peer q's were pulled into `others` slot q (q < me) or q - 1 (q > me).
template <class T>
__global__ void rank_order_sum_kernel(T* __restrict__ data, T const* __restrict__ others, std::size_t count,
                                      int num_ranks, int me) {
  for (std::size_t i = grid_thread<std::size_t>(); i < count; i += grid_threads<std::size_t>()) {
    auto value = [&](int q) {
      return q == me ? data[i] : others[static_cast<std::size_t>(q < me ? q : q - 1) * count + i];
    };
    auto acc = rank_sum_load(value(0));  // starting from the first term (not 0) keeps a lone -0.0
    for (int q = 1; q < num_ranks; ++q) acc += rank_sum_load(value(q));
    data[i] = rank_sum_store<T>(acc);
  }
}

}  // namespace detail

//! @brief LocalGroup on CUDA devices: N ranks in one process, one thread per rank, exchanging
//! device memory. Rank r's Communicator is `communicator(r)` (memory_space() == kDevice); drive it
//! from one thread per rank, e.g. with `run`, which makes each rank's device current in its thread.
//!
//! Every collective takes the rank's CUDA stream (a stream of `device(rank)`; StreamRef::host() is
//! refused) and is stream-ordered: the host call returns once the work is enqueued and never
//! synchronises the stream. The host threads still meet twice per call (as in LocalGroup), which
//! is where the deadline, abort and mismatch verdict act:
//!  - Phase A: each rank records its "ready" event on its stream and posts its buffers and sizes.
//!    After the rendezvous, each rank's stream waits on every peer's ready event, then **pulls**
//!    what it receives from the peers' buffers into its own (cudaMemcpyAsync on one device,
//!    cudaMemcpyPeerAsync across devices) and records its "done" event.
//!  - Phase B: after the second rendezvous, each rank's stream waits on every peer's done event, so
//!    no rank's later work overwrites a buffer a peer is still reading.
//! all_reduce_sum pulls the peers' data into the rank's scratch, and after phase B a kernel writes
//! the rank-order sum (fp32 accumulation for fp16/bf16, rounded once) into `data`: the same bits on
//! every rank and every run, and the same as the host LocalGroup. barrier is phase A's waits alone.
//!
//! Events are created once per rank (cudaEventDisableTiming) and reused by every call. That is
//! safe because cudaStreamWaitEvent captures the event's latest record at the time of the call: a
//! rank re-records its ready (done) event only in its next collective, after the next host
//! rendezvous, and every peer has enqueued its wait on the previous record before arriving there.
//! Each wait refers to work enqueued before it, so the streams can never wait on each other in a
//! cycle. Across devices, peer access is enabled where cudaDeviceCanAccessPeer allows (and left
//! enabled); otherwise cudaMemcpyPeerAsync is staged by the driver.
//!
//! Allocation: all_reduce_sum keeps per-rank scratch of (size() - 1) × count × size_of(dtype) bytes,
//! grown only when a larger call comes: the first call of a new, larger size waits for this rank's
//! previous all_reduce_sum and allocates (cudaMalloc). `reserve(bytes)` preallocates it up front, so
//! a runtime's forward path allocates nothing. The other collectives never allocate.
//!
//! Failures are LocalGroup's: a rank that never arrives makes the others throw Errc::kTimeout after
//! `Options::timeout` (a host-side deadline: it does not bound the device work); a rank that throws
//! inside `run`, or whose CUDA call fails inside a collective, aborts the group, so the others throw
//! Errc::kPeerFailed; mismatched collectives or sizes throw Errc::kCollectiveMismatch on every rank.
//! After a failure the group stays aborted: destroy it and build a new one.
class CudaLocalGroup {
 public:
  using Options = CudaLocalGroupOptions;

  //! Creates the ranks' events on their devices and enables peer access between distinct devices.
  //! Throws kInvalidArgument for num_ranks < 1, a non-positive timeout, `options.devices` whose size
  //! is neither 0 nor num_ranks or that names a device outside [0, cudaGetDeviceCount()).
  explicit CudaLocalGroup(int num_ranks, Options options = {}) : core_("CudaLocalGroup", num_ranks, options.timeout) {
    devices_ = resolve_devices(num_ranks, std::move(options.devices));
    enable_peer_access();
    for (int r = 0; r < num_ranks; ++r)
      ranks_.push_back(std::make_unique<Rank>(core_.state(), r, devices_[static_cast<std::size_t>(r)], ranks_));
  }
  CudaLocalGroup(CudaLocalGroup const&) = delete;
  CudaLocalGroup& operator=(CudaLocalGroup const&) = delete;
  //! Waits for each rank's last all_reduce_sum kernel (it reads the scratch), then frees the scratch
  //! and events. Other enqueued work may still be running: the events outlive it (CUDA defers
  //! their destruction), and the caller's buffers are the caller's.
  ~CudaLocalGroup() = default;

  [[nodiscard]] int size() const noexcept { return core_.size(); }

  //! The CUDA device of `rank`.
  [[nodiscard]] int device(int rank) const {
    core_.check_rank(rank, "CudaLocalGroup::device");
    return devices_[static_cast<std::size_t>(rank)];
  }

  [[nodiscard]] Communicator& communicator(int rank) {
    core_.check_rank(rank, "CudaLocalGroup::communicator");
    return *ranks_[static_cast<std::size_t>(rank)];
  }

  //! Preallocates every rank's all_reduce_sum scratch for calls of up to `bytes` bytes per rank
  //! (count × size_of(dtype)), so that they allocate nothing. Call it while no collective is in
  //! flight (e.g. before `run`). May wait for each rank's previous all_reduce_sum.
  void reserve(std::size_t bytes) {
    for (auto& rank : ranks_) rank->reserve_scratch(bytes);
  }

  //! Aborts the group on behalf of `rank`: every rank waiting in or later calling a collective
  //! throws Errc::kPeerFailed with `reason`. Work already enqueued on the streams still runs.
  void abort(int rank, std::string_view reason) noexcept { core_.state().abort(rank, reason); }

  [[nodiscard]] bool aborted() const { return core_.state().aborted(); }

  //! Runs `fn(rank, communicator(rank))` on one thread per rank, with `device(rank)` current in
  //! that thread, and joins them. A rank whose fn throws aborts the group; once all threads end,
  //! the first failure's exception is rethrown. Does not synchronise any stream.
  template <class Fn>
  void run(Fn&& fn) {
    core_.run([&](int r) {
      EPX_CUDA_CHECK(cudaSetDevice(devices_[static_cast<std::size_t>(r)]));
      fn(r, communicator(r));
    });
  }

 private:
  static std::vector<int> resolve_devices(int num_ranks, std::vector<int> devices) {
    constexpr std::string_view where = "CudaLocalGroup";
    if (devices.empty()) {
      int current = 0;
      EPX_CUDA_CHECK(cudaGetDevice(&current));
      return std::vector<int>(static_cast<std::size_t>(num_ranks), current);
    }
    detail::require(devices.size() == static_cast<std::size_t>(num_ranks), Errc::kInvalidArgument, where,
                    "options.devices.size()", devices.size(),
                    fmt::format("{} (one device per rank) or 0 (all on the current device)", num_ranks));
    int count = 0;
    EPX_CUDA_CHECK(cudaGetDeviceCount(&count));
    for (std::size_t r = 0; r < devices.size(); ++r)
      detail::require(devices[r] >= 0 && devices[r] < count, Errc::kInvalidArgument, where,
                      fmt::format("options.devices[{}]", r), devices[r],
                      fmt::format("in [0, {}) (cudaGetDeviceCount)", count));
    return devices;
  }

  // Direct loads over NVLink/PCIe where the hardware allows; cudaMemcpyPeerAsync works either way.
  void enable_peer_access() {
    std::vector<int> distinct = devices_;
    std::sort(distinct.begin(), distinct.end());
    distinct.erase(std::unique(distinct.begin(), distinct.end()), distinct.end());
    for (int a : distinct)
      for (int b : distinct) {
        if (a == b) continue;
        int can_access = 0;
        EPX_CUDA_CHECK(cudaDeviceCanAccessPeer(&can_access, a, b));
        if (can_access == 0) continue;
        detail::ScopedDevice const on_a(a);
        cudaError_t const status = cudaDeviceEnablePeerAccess(b, 0);
        if (status == cudaErrorPeerAccessAlreadyEnabled)
          (void)cudaGetLastError();  // by another group or the caller
        else if (status != cudaSuccess)
          detail::throw_cuda_error(status, "cudaDeviceEnablePeerAccess(peer, 0)", detail::SourceLocation::current());
      }
  }

  class Rank final : public detail::LocalRank {
   public:
    Rank(detail::LocalGroupState& state, int rank, int device, std::vector<std::unique_ptr<Rank>> const& peers)
        : LocalRank(state, rank), device_(device), peers_(peers) {
      try {
        detail::ScopedDevice const on_device(device_);
        EPX_CUDA_CHECK(cudaEventCreateWithFlags(&ready_, cudaEventDisableTiming));
        EPX_CUDA_CHECK(cudaEventCreateWithFlags(&done_, cudaEventDisableTiming));
        EPX_CUDA_CHECK(cudaEventCreateWithFlags(&scratch_free_, cudaEventDisableTiming));
      } catch (...) {
        release();
        throw;
      }
    }
    Rank(Rank const&) = delete;
    Rank& operator=(Rank const&) = delete;
    ~Rank() override { release(); }

    [[nodiscard]] MemorySpace memory_space() const noexcept override { return MemorySpace::kDevice; }

    void reserve_scratch(std::size_t bytes_per_rank) {
      detail::ScopedDevice const on_device(device_);
      ensure_scratch(static_cast<std::size_t>(size() - 1) * bytes_per_rank);
    }

   private:
    static cudaStream_t cuda(StreamRef stream) { return reinterpret_cast<cudaStream_t>(stream.get()); }

    // Every pull a peer makes is enqueued before its host call returns, so the stream's work always
    // completes: a plain synchronisation has no deadline to enforce here.
    void wait_stream(StreamRef stream) override {
      detail::ScopedDevice const on(device_);
      EPX_CUDA_CHECK(cudaStreamSynchronize(cuda(stream)));
    }

    void check_stream(StreamRef stream, std::string_view what) override {
      if (stream.is_host())
        fail_local(Errc::kInvalidArgument, fmt::format("{}: stream = StreamRef::host(), expected a CUDA stream of "
                                                       "device {} (this CudaLocalGroup moves device memory)",
                                                       what, device_));
    }

    // Before phase A: this rank's checks and allocation (a throw here aborts the group), then the
    // ready event that orders the peers' pulls after everything already enqueued on the stream.
    void prepare(detail::CollectivePost const& post, StreamRef stream) override {
      detail::ScopedDevice const on_device(device_);
      check_stream_device(stream, post.op);
      if (post.op == detail::CollectiveOp::kAllReduceSum)
        ensure_scratch(static_cast<std::size_t>(size() - 1) * post.count * size_of(post.dtype));
      EPX_CUDA_CHECK(cudaEventRecord(ready_, cuda(stream)));
    }

    // Between the phases: wait for the peers' ready events, pull, record done.
    void exchange(std::span<detail::CollectivePost const> posts, detail::CollectivePost const& post,
                  StreamRef stream) override {
      detail::ScopedDevice const on_device(device_);
      cudaStream_t const s = cuda(stream);
      auto const n = posts.size();
      auto const me = static_cast<std::size_t>(rank());
      for (std::size_t q = 0; q < n; ++q)
        if (q != me) EPX_CUDA_CHECK(cudaStreamWaitEvent(s, peer(q).ready_, 0));
      switch (post.op) {
        case detail::CollectiveOp::kAllToAllV: {
          std::size_t dst = 0;
          for (std::size_t q = 0; q < n; ++q) {
            std::size_t src = 0;  // rank q's block for me follows its blocks for ranks 0 .. me-1
            for (std::size_t p = 0; p < me; ++p) src += posts[q].send_bytes[p];
            pull(static_cast<std::byte*>(post.recv) + dst, q, static_cast<std::byte const*>(posts[q].send) + src,
                 post.recv_bytes[q], s);
            dst += post.recv_bytes[q];
          }
          break;
        }
        case detail::CollectiveOp::kAllToAll:
        case detail::CollectiveOp::kAllGather: {
          std::size_t const offset = post.op == detail::CollectiveOp::kAllToAll ? me * post.bytes : 0;
          for (std::size_t q = 0; q < n; ++q)
            pull(static_cast<std::byte*>(post.recv) + q * post.bytes, q,
                 static_cast<std::byte const*>(posts[q].send) + offset, post.bytes, s);
          break;
        }
        case detail::CollectiveOp::kAllReduceSum: {
          if (n == 1) break;  // one rank: its data is the sum; no scratch, no wait (so a 1-rank group captures)
          // The scratch may still be read by this rank's previous sum kernel if that ran on another stream.
          EPX_CUDA_CHECK(cudaStreamWaitEvent(s, scratch_free_, 0));
          std::size_t const bytes = post.count * size_of(post.dtype);
          for (std::size_t q = 0; q < n; ++q)
            if (q != me)
              pull(static_cast<std::byte*>(scratch_) + (q < me ? q : q - 1) * bytes, q, posts[q].recv, bytes, s);
          break;
        }
        case detail::CollectiveOp::kBarrier: return;  // the waits above are the barrier; nothing was read
      }
      EPX_CUDA_CHECK(cudaEventRecord(done_, s));
    }

    // After phase B: wait until every peer has read this rank's buffers; then the sum may overwrite data.
    void complete(detail::CollectivePost const& post, StreamRef stream) override {
      if (post.op == detail::CollectiveOp::kBarrier) return;
      detail::ScopedDevice const on_device(device_);
      cudaStream_t const s = cuda(stream);
      auto const me = static_cast<std::size_t>(rank());
      for (std::size_t q = 0; q < static_cast<std::size_t>(size()); ++q)
        if (q != me) EPX_CUDA_CHECK(cudaStreamWaitEvent(s, peer(q).done_, 0));
      if (post.op != detail::CollectiveOp::kAllReduceSum || post.count == 0 || size() == 1) return;
      switch (post.dtype) {
        case DType::kF32: launch_sum<float>(post, s); break;
        case DType::kF16: launch_sum<half>(post, s); break;
        case DType::kBF16: launch_sum<bfloat16>(post, s); break;
        case DType::kI32: launch_sum<std::int32_t>(post, s); break;
        case DType::kI64: launch_sum<std::int64_t>(post, s); break;
      }
      EPX_CUDA_CHECK(cudaEventRecord(scratch_free_, s));
    }

    template <class T>
    void launch_sum(detail::CollectivePost const& post, cudaStream_t s) const {
      auto const policy = detail::policy_for<detail::RankSumPolicy>(detail::current_device_traits());
      int const blocks =
          detail::grid_blocks(static_cast<std::int64_t>(post.count), policy.threads_per_block, policy.max_blocks);
      detail::rank_order_sum_kernel<T><<<blocks, policy.threads_per_block, 0, s>>>(
          static_cast<T*>(post.recv), static_cast<T const*>(scratch_), post.count, size(), rank());
      EPX_CUDA_CHECK_LAUNCH(rank_order_sum_kernel);
    }

    [[nodiscard]] Rank const& peer(std::size_t q) const { return *peers_[q]; }

    // The stream must belong to this rank's device. cudaStreamGetDevice exists from CUDA 12.8 on,
    // and some driver/runtime pairs refuse it while the stream is being captured
    // (cudaErrorStreamCaptureUnsupported), which would invalidate the capture. So the check runs
    // once per stream handle, outside capture (cudaStreamIsCapturing is legal during capture): a
    // stream seen eagerly first (the warm-up every capture needs anyway, for the scratch) is
    // already checked when captured. Before 12.8 the check is skipped (a stream of another device
    // then fails in the copies with a CUDA error instead of this message).
    void check_stream_device(StreamRef stream, detail::CollectiveOp op) {
#if CUDART_VERSION >= 12080
      cudaStream_t const s = cuda(stream);
      if (s == checked_stream_) return;
      cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
      EPX_CUDA_CHECK(cudaStreamIsCapturing(s, &capture));
      if (capture != cudaStreamCaptureStatusNone) return;
      int stream_device = -1;
      EPX_CUDA_CHECK(cudaStreamGetDevice(s, &stream_device));
      if (stream_device != device_)
        detail::throw_error(Errc::kInvalidArgument,
                            fmt::format("CudaLocalGroup: rank {}: {}: stream is on device {}, expected device {} "
                                        "(the rank's device)",
                                        rank(), to_string(op), stream_device, device_));
      checked_stream_ = s;
#else
      (void)stream;
      (void)op;
#endif
    }

    // Pulls `bytes` from rank q's device memory at `src` into this rank's `dst`, ordered on `s`.
    void pull(void* dst, std::size_t q, void const* src, std::size_t bytes, cudaStream_t s) const {
      if (bytes == 0) return;
      int const from = peer(q).device_;
      if (from == device_)
        EPX_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, s));
      else
        EPX_CUDA_CHECK(cudaMemcpyPeerAsync(dst, device_, src, from, bytes, s));
    }

    // Grows the scratch to `bytes` (current device: device_). The old scratch may still be read by
    // the previous sum kernel, so wait for it before freeing.
    void ensure_scratch(std::size_t bytes) {
      if (bytes <= scratch_bytes_) return;
      if (scratch_ != nullptr) {
        EPX_CUDA_CHECK(cudaEventSynchronize(scratch_free_));
        void* const old = scratch_;
        scratch_ = nullptr;
        scratch_bytes_ = 0;
        EPX_CUDA_CHECK(cudaFree(old));
      }
      EPX_CUDA_CHECK(cudaMalloc(&scratch_, bytes));
      scratch_bytes_ = bytes;
    }

    // Never throws: destructors and the constructor's cleanup call it. Errors are dropped, since
    // there is nobody left to report them to; a sticky error resurfaces at the next checked call.
    void release() noexcept {
      int previous = -1;
      bool const switched =
          cudaGetDevice(&previous) == cudaSuccess && previous != device_ && cudaSetDevice(device_) == cudaSuccess;
      if (scratch_ != nullptr) {
        if (scratch_free_ != nullptr) (void)cudaEventSynchronize(scratch_free_);
        (void)cudaFree(scratch_);
        scratch_ = nullptr;
      }
      for (cudaEvent_t* e : {&ready_, &done_, &scratch_free_})
        if (*e != nullptr) {
          (void)cudaEventDestroy(*e);
          *e = nullptr;
        }
      if (switched) (void)cudaSetDevice(previous);
    }

    int device_;
    std::vector<std::unique_ptr<Rank>> const& peers_;  // the group's ranks; complete before any collective
    cudaEvent_t ready_ = nullptr;                      // recorded before phase A: this rank's inputs are ready
    cudaEvent_t done_ = nullptr;                       // recorded after this rank's pulls: it has read its peers
    cudaEvent_t scratch_free_ = nullptr;               // recorded after the sum kernel: the scratch may be reused
    cudaStream_t checked_stream_ = nullptr;            // the last stream found to be on device_ (check_stream_device)
    void* scratch_ = nullptr;                          // [size() - 1][count] elements of the largest all_reduce_sum
    std::size_t scratch_bytes_ = 0;
  };

  detail::LocalGroupCore core_;
  std::vector<int> devices_;
  std::vector<std::unique_ptr<Rank>> ranks_;
};

}  // namespace epx
