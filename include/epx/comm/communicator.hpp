// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

#include <epx/core/dtype.hpp>
#include <epx/core/space.hpp>
#include <epx/core/stream.hpp>

#include <cstddef>
#include <span>

namespace epx {

//! @brief The collectives expert parallelism needs, over any transport (NCCL, threads, a
//! runtime's own). Every rank of a group calls the same collectives in the same order; a rank
//! with nothing to send still calls (with zero counts).
//!
//! All calls are ordered on `stream`: a device-memory communicator enqueues the transfer and may
//! return before it finishes; a host-memory communicator (StreamRef::host()) finishes before it
//! returns. Buffers live in `memory_space()`. Failures (a peer that fails or never arrives, a
//! size mismatch) throw epx::Error within the implementation's deadline; they never hang.
class Communicator {
 public:
  virtual ~Communicator() = default;

  [[nodiscard]] virtual int rank() const noexcept = 0;
  [[nodiscard]] virtual int size() const noexcept = 0;
  [[nodiscard]] virtual MemorySpace memory_space() const noexcept = 0;

  //! Rank p receives `send_bytes[p]` bytes from `send` (blocks packed in rank order); this rank
  //! receives `recv_bytes[q]` bytes from rank q into `recv` (packed in rank order).
  //! @pre send_bytes.size() == recv_bytes.size() == size(); rank p's recv_bytes[rank()] equals
  //!      this rank's send_bytes[p]
  virtual void all_to_all_v(void const* send, std::span<std::size_t const> send_bytes, void* recv,
                            std::span<std::size_t const> recv_bytes, StreamRef stream) = 0;

  //! all_to_all_v with `bytes_per_rank` bytes to and from every rank.
  virtual void all_to_all(void const* send, void* recv, std::size_t bytes_per_rank, StreamRef stream) = 0;

  //! In place: data[i] = sum over ranks of data[i]. Deterministic: the same inputs give the same
  //! bits on every call and every rank (LocalGroup sums in rank order; other backends document
  //! their order).
  virtual void all_reduce_sum(void* data, std::size_t count, DType dtype, StreamRef stream) = 0;

  //! recv holds every rank's `bytes_per_rank` bytes of `send`, in rank order.
  virtual void all_gather(void const* send, void* recv, std::size_t bytes_per_rank, StreamRef stream) = 0;

  //! Returns (host) or orders the stream (device) after every rank has arrived.
  virtual void barrier(StreamRef stream) = 0;

  //! Blocks the calling thread until the work enqueued on `stream` so far (collectives included)
  //! has finished; throws instead (Errc::kTimeout, kPeerFailed, kNccl, kCuda) when it cannot finish
  //! within the implementation's deadline, e.g. because a peer died. Host-memory communicators
  //! return at once (their collectives finish before they return). Callers that must wait for a
  //! collective's result on the host (ExpertParallel's one sync) use this, never a bare
  //! cudaStreamSynchronize, so that a lost peer is an Error and not a hang.
  virtual void wait(StreamRef stream) = 0;

 protected:
  Communicator() = default;
  Communicator(Communicator const&) = default;
  Communicator& operator=(Communicator const&) = default;
};

}  // namespace epx
