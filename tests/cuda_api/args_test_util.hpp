// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

// What the CUDA argument-check tests share: a call expected to throw epx::Error, and stream and
// device pointers that are never touched (every call fails its host-side checks first).

#include <epx/core/error.hpp>
#include <epx/core/stream.hpp>

#include <doctest/doctest.h>

#include <cstdint>
#include <string>

namespace epx::test {

template <class F>
Error caught(F&& f) {
  try {
    f();
  } catch (Error const& e) {
    return e;
  }
  FAIL("no epx::Error was thrown");
  return Error(Errc::kInvalidArgument, "unreachable");
}

inline bool contains(std::string const& text, std::string const& part) { return text.find(part) != std::string::npos; }

inline StreamRef fake_stream() { return StreamRef(reinterpret_cast<CUstream_st*>(std::uintptr_t{0x1000})); }

// Device pointers that are never dereferenced.
template <class T>
T* fake(std::uintptr_t address = 0x10000) {
  return reinterpret_cast<T*>(address);
}

}  // namespace epx::test
