// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! Checking NCCL calls. Host code: needs nccl.h, not nvcc.

#include <epx/core/error.hpp>

#include <nccl.h>

#include <string_view>

namespace epx::detail {

//! Throws Error(kNccl) for a failed NCCL call, with NCCL's own last-error text for `comm` (which
//! may be null) when it has one. Never exits or aborts.
[[noreturn]] inline void throw_nccl_error(ncclResult_t code, ncclComm_t comm, std::string_view call,
                                          SourceLocation loc) {
  char const* last = ncclGetLastError(comm);
  throw_error(Errc::kNccl,
              fmt::format("NCCL call `{}` failed: {} ({}){}{}", call, ncclGetErrorString(code), static_cast<int>(code),
                          (last != nullptr && *last != '\0') ? ": " : "", last != nullptr ? last : ""),
              loc);
}

}  // namespace epx::detail

//! Evaluates an NCCL call once; on failure (ncclInProgress counts as success: nonblocking
//! communicators report completion separately) throws epx::Error(Errc::kNccl).
#define EPX_NCCL_CHECK_COMM(call, comm)                                                    \
  do {                                                                                     \
    ncclResult_t const epx_nccl_check_status_ = (call);                                    \
    if (epx_nccl_check_status_ != ncclSuccess && epx_nccl_check_status_ != ncclInProgress) \
      ::epx::detail::throw_nccl_error(epx_nccl_check_status_, (comm), #call,               \
                                      ::epx::detail::SourceLocation::current());           \
  } while (0)

//! EPX_NCCL_CHECK_COMM without a communicator for the last-error text.
#define EPX_NCCL_CHECK(call) EPX_NCCL_CHECK_COMM(call, nullptr)
