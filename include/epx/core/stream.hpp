// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

#include <epx/core/error.hpp>

#include <cstddef>
#include <cstdint>

// cudaStream_t is `CUstream_st*`; naming the struct lets core headers carry a stream without
// including any CUDA header.
struct CUstream_st;

namespace epx {

//! A non-owning reference to where work is ordered: a CUDA stream, or the calling host thread.
//! There is no default: the legacy default stream (0) is refused, and host work says so with
//! `StreamRef::host()`.
class StreamRef {
 public:
  //! Work runs synchronously on the calling thread (Host execution space, host-memory communicators).
  [[nodiscard]] static constexpr StreamRef host() noexcept { return StreamRef(); }

  //! A CUDA stream created by the caller (or cudaStreamPerThread). Throws for the legacy default
  //! stream, whether passed as 0 or as cudaStreamLegacy.
  explicit StreamRef(CUstream_st* stream) : stream_(stream), is_host_(false) {
    auto const handle = reinterpret_cast<std::uintptr_t>(stream);
    detail::require(handle != 0 && handle != kLegacyStreamHandle, Errc::kInvalidArgument, "StreamRef", "stream",
                    handle == 0 ? "0 (the legacy default stream)" : "cudaStreamLegacy",
                    "a stream the caller created, or cudaStreamPerThread");
  }
  StreamRef(int) = delete;
  StreamRef(std::nullptr_t) = delete;

  [[nodiscard]] constexpr bool is_host() const noexcept { return is_host_; }
  //! The CUDA stream; nullptr for a host StreamRef.
  [[nodiscard]] constexpr CUstream_st* get() const noexcept { return stream_; }

  friend constexpr bool operator==(StreamRef, StreamRef) = default;

 private:
  static constexpr std::uintptr_t kLegacyStreamHandle = 0x1;  // cudaStreamLegacy
  constexpr StreamRef() = default;
  CUstream_st* stream_ = nullptr;
  bool is_host_ = true;
};

}  // namespace epx
