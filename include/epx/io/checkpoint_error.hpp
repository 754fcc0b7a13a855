// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! How checkpoint loading reports a problem: an epx::Error whose message names the file and, when
//! there is one, the tensor, so that a bad shard of a 160-file checkpoint can be found. Names and
//! values that come from a file are printed escaped and shortened: a hostile file cannot write
//! control characters or megabytes into a log line.

#include <epx/core/error.hpp>

#include <cstddef>
#include <string>
#include <string_view>

namespace epx::io::detail {

using epx::detail::SourceLocation;

//! `text` as a log line can hold it: bytes below 0x20 and 0x7f as \xNN, at most `max_bytes` bytes
//! (then "..."). UTF-8 above ASCII is kept (the JSON parser has checked it).
inline std::string printable(std::string_view text, std::size_t max_bytes = 160) {
  std::string out;
  for (std::size_t i = 0; i < text.size(); ++i) {
    if (out.size() >= max_bytes) return out + "...";
    auto const c = static_cast<unsigned char>(text[i]);
    if (c < 0x20 || c == 0x7f)
      out += fmt::format("\\x{:02x}", c);
    else
      out += static_cast<char>(c);
  }
  return out;
}

//! Throws Error(code, "checkpoint file <file>: <message>").
[[noreturn]] inline void file_error(Errc code, std::string_view file, std::string_view message,
                                    SourceLocation loc = SourceLocation::current()) {
  epx::detail::throw_error(code, fmt::format("checkpoint file {}: {}", printable(file, 400), message), loc);
}

//! Throws Error(code, "checkpoint file <file>: tensor '<tensor>': <message>").
[[noreturn]] inline void tensor_error(Errc code, std::string_view file, std::string_view tensor,
                                      std::string_view message, SourceLocation loc = SourceLocation::current()) {
  epx::detail::throw_error(
      code, fmt::format("checkpoint file {}: tensor '{}': {}", printable(file, 400), printable(tensor), message), loc);
}

}  // namespace epx::io::detail
