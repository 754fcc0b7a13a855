// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

// A test's own NVTX tool (nvtx_recorder.cpp): it records every push and pop of a domain range, so
// a test sees the ranges a profiler would, on a machine with no profiler and no GPU.

#include <ostream>
#include <string>
#include <vector>

namespace epx::test {

struct NvtxEvent {
  enum class Kind { kPush, kPop };
  Kind kind = Kind::kPush;
  std::string domain;       // the domain's name; "" for NVTX's default domain
  std::string message;      // pushes only
  bool registered = false;  // pushes only: the message was a registered string (a handle), not text

  friend bool operator==(NvtxEvent const&, NvtxEvent const&) = default;
  friend std::ostream& operator<<(std::ostream& os, NvtxEvent const& e) {
    if (e.kind == Kind::kPop) return os << "pop(" << e.domain << ")";
    return os << "push(" << e.domain << ", \"" << e.message << "\", " << (e.registered ? "registered" : "text") << ")";
  }
};

//! Whether NVTX initialised with this recorder as its tool (false: another tool was injected, e.g.
//! through NVTX_INJECTION64_PATH when the test runs under a profiler). Initialises NVTX.
bool nvtx_recorder_attached();

//! Takes the events recorded since the last call (all threads, in order).
std::vector<NvtxEvent> take_nvtx_events();

}  // namespace epx::test
