// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! Skipping a JSON value a schema does not use, inside a SAX handler (nlohmann::json::sax_parse):
//! safetensors headers and index files may carry keys epx does not read, and any JSON value may
//! stand there. The nesting of a skipped value is bounded, so a hostile file cannot make the
//! reader keep state for millions of levels.

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

}  // namespace epx::io::detail
