// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! Skipping a JSON value a schema does not use, inside a SAX handler (nlohmann::json::sax_parse):
//! safetensors headers and index files may carry keys epx does not read, and any JSON value may
//! stand there. The nesting of a skipped value is bounded, so a hostile file cannot make the
//! reader keep state for millions of levels.

#include <fmt/format.h>

#include <string_view>

namespace epx::io::detail {

class JsonValueSkipper {
 public:
  //! Deepest nesting of arrays and objects accepted inside a skipped value.
  static constexpr int kMaxDepth = 64;

  //! The next event starts the value to skip.
  void start() noexcept {
    active_ = true;
    depth_ = 0;
  }
  [[nodiscard]] bool active() const noexcept { return active_; }

  //! A scalar (null, boolean, number, string) or an object key.
  void scalar() noexcept {
    if (depth_ == 0) active_ = false;
  }
  //! '[' or '{'; false when that nests deeper than kMaxDepth.
  [[nodiscard]] bool open() noexcept { return ++depth_ <= kMaxDepth; }
  //! ']' or '}'.
  void close() noexcept {
    if (--depth_ == 0) active_ = false;
  }

 private:
  bool active_ = false;
  int depth_ = 0;
};

//! The skipping half of a schema's SAX handler, shared by the header and index readers. CRTP:
//! Derived supplies `unexpected(what)` (the schema's message for a value it does not allow where it
//! stands) and `fail(message)` (records the first problem, returns false), and befriends this class.
template <class Derived>
class SkippingSaxHandler {
 protected:
  //! A scalar event (null, boolean, number, binary): part of a value being skipped, else the
  //! schema's to judge.
  bool scalar(std::string_view what) {
    if (skipper_.active()) return skip_scalar();
    return self().unexpected(what);
  }
  bool skip_scalar() noexcept {
    skipper_.scalar();
    return true;
  }
  bool skip_open() {
    if (!skipper_.open())
      return self().fail(fmt::format("a value nests deeper than {} levels", JsonValueSkipper::kMaxDepth));
    return true;
  }
  bool skip_close() noexcept {
    skipper_.close();
    return true;
  }

  JsonValueSkipper skipper_;

 private:
  Derived& self() noexcept { return static_cast<Derived&>(*this); }
};

}  // namespace epx::io::detail
