// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

#include <epx/config.hpp>

#include <fmt/format.h>

#include <stdexcept>
#include <string>
#include <string_view>

namespace epx {

//! What kind of failure an `Error` reports; the message says the rest.
enum class Errc {
  kInvalidArgument,     //!< a parameter's value is outside what the call accepts
  kShapeMismatch,       //!< two views that must agree in a dimension do not
  kWorkspaceTooSmall,   //!< the caller's workspace is smaller than `workspace_bytes(...)`
  kInvalidExpertId,     //!< topk_ids held ids outside [0, num_experts) other than -1
  kTimeout,             //!< a peer did not arrive at a collective within the deadline
  kPeerFailed,          //!< another rank of the group failed or aborted the group
  kCollectiveMismatch,  //!< ranks called different collectives, or disagree on sizes
  kUnsupported,         //!< a valid request this build or backend cannot serve
  kCuda,                //!< a CUDA runtime or cuBLAS call failed
  kNccl,                //!< an NCCL call failed
};

//! The enumerator's name, e.g. "kInvalidArgument": what a caller writes to branch on the code, so
//! that a log line can be searched for in code and in docs/errors.md. ("unknown" for a value
//! outside the enumeration.) The message of an Error carries the words; the code is this name.
constexpr std::string_view to_string(Errc code) noexcept {
  switch (code) {
    case Errc::kInvalidArgument: return "kInvalidArgument";
    case Errc::kShapeMismatch: return "kShapeMismatch";
    case Errc::kWorkspaceTooSmall: return "kWorkspaceTooSmall";
    case Errc::kInvalidExpertId: return "kInvalidExpertId";
    case Errc::kTimeout: return "kTimeout";
    case Errc::kPeerFailed: return "kPeerFailed";
    case Errc::kCollectiveMismatch: return "kCollectiveMismatch";
    case Errc::kUnsupported: return "kUnsupported";
    case Errc::kCuda: return "kCuda";
    case Errc::kNccl: return "kNccl";
  }
  return "unknown";
}

//! The one exception type epx throws. The message names the call, the parameter, its value and
//! what was expected, and ends with the file:line that raised it.
class Error : public std::runtime_error {
 public:
  Error(Errc code, std::string const& message) : std::runtime_error(message), code_(code) {}
  [[nodiscard]] Errc code() const noexcept { return code_; }

 private:
  Errc code_;
};

namespace detail {

//! Where an error was raised. Like std::source_location, but built on __builtin_FILE/LINE so it
//! also works with standard libraries that lack <source_location> support for the compiler
//! (clang 14 with libstdc++ 12, for one).
struct SourceLocation {
  char const* file = "";
  int line = 0;

  [[nodiscard]] static constexpr SourceLocation current(char const* file = __builtin_FILE(),
                                                        int line = __builtin_LINE()) noexcept {
    return {file, line};
  }
  [[nodiscard]] constexpr char const* file_name() const noexcept { return file; }
  [[nodiscard]] constexpr int line_number() const noexcept { return line; }
};

constexpr std::string_view file_name(std::string_view path) noexcept {
  auto slash = path.find_last_of("/\\");
  return slash == std::string_view::npos ? path : path.substr(slash + 1);
}

//! Throws `Error(code, "epx: <message> [file:line]")`.
[[noreturn]] inline void throw_error(Errc code, std::string_view message,
                                     SourceLocation loc = SourceLocation::current()) {
  throw Error(code, fmt::format("epx: {} [{}:{}]", message, file_name(loc.file_name()), loc.line_number()));
}

//! Validates one parameter: when `ok` is false, throws
//! "epx: <where>: <param> = <value>, expected <expected> [file:line]".
template <class Value>
inline void require(bool ok, Errc code, std::string_view where, std::string_view param, Value const& value,
                    std::string_view expected, SourceLocation loc = SourceLocation::current()) {
  if (ok) return;
  throw_error(code, fmt::format("{}: {} = {}, expected {}", where, param, value, expected), loc);
}

}  // namespace detail
}  // namespace epx
