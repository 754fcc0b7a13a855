// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

#include <cstdint>
#include <string_view>

namespace epx {

//! Execution space: the plain-C++ reference backend. Runs everywhere, synchronously, on host
//! memory; it is the oracle every CUDA test compares against. Also the execution context of the
//! host stage functions: `epx::route(epx::Host{}, ...)`.
struct Host {};

//! Execution space: the CUDA backend (include <epx/cuda.cuh>, compile with nvcc).
struct Cuda {};

//! Where a buffer lives; a Communicator moves bytes of one kind.
enum class MemorySpace : std::uint8_t { kHost, kDevice };

constexpr std::string_view to_string(MemorySpace m) noexcept { return m == MemorySpace::kHost ? "host" : "device"; }

}  // namespace epx
