// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

#include <epx/core/error.hpp>
#include <epx/core/math.hpp>

#include <cstddef>
#include <cstdint>
#include <span>

namespace epx {

//! Caller-owned scratch bytes (host or device memory, as the execution space requires). epx
//! never allocates on the forward path: every call that needs scratch takes a Workspace sized by
//! the matching pure host function (`workspace_bytes(...)`). Any base address works; parts are
//! aligned to `kAlignment` inside it.
class Workspace {
 public:
  static constexpr std::size_t kAlignment = 256;

  Workspace() = default;
  Workspace(void* data, std::size_t bytes) noexcept : data_(static_cast<std::byte*>(data)), bytes_(bytes) {}

  [[nodiscard]] std::byte* data() const noexcept { return data_; }
  [[nodiscard]] std::size_t size() const noexcept { return bytes_; }

 private:
  std::byte* data_ = nullptr;
  std::size_t bytes_ = 0;
};

namespace detail {

//! Lays parts out in a workspace. The same layout function runs twice: once on a sizing carver
//! (no memory, counts bytes) to answer `workspace_bytes`, once on a carving carver over the
//! caller's workspace to hand out the parts. So the size and the carving can never disagree.
class WorkspaceCarver {
 public:
  //! A carver that only counts: `take` returns empty spans.
  static WorkspaceCarver sizing() noexcept { return WorkspaceCarver(); }

  //! A carver over `ws`; throws Errc::kWorkspaceTooSmall when `required` bytes do not fit.
  WorkspaceCarver(Workspace ws, std::size_t required, std::string_view where) : sizing_(false) {
    if (ws.size() < required)
      throw_error(Errc::kWorkspaceTooSmall,
                  fmt::format("{}: workspace.size() = {} bytes, expected at least {} bytes (size it with the matching "
                              "*workspace_bytes function)",
                              where, ws.size(), required));
    if (required > 0 && ws.data() == nullptr)
      throw_error(Errc::kInvalidArgument,
                  fmt::format("{}: workspace.data() = nullptr, expected {} bytes of memory", where, required));
    auto const addr = reinterpret_cast<std::uintptr_t>(ws.data());
    base_ = ws.data() + (align_up<std::uintptr_t>(addr, Workspace::kAlignment) - addr);
  }

  //! The next `count` elements of T, aligned to Workspace::kAlignment.
  template <class T>
  std::span<T> take(std::size_t count) {
    std::size_t const offset = used_;
    used_ += align_up<std::size_t>(count * sizeof(T), Workspace::kAlignment);
    if (sizing_) return {};
    return {reinterpret_cast<T*>(base_ + offset), count};
  }

  //! Bytes a workspace needs for everything taken so far (alignment slack of the base included).
  [[nodiscard]] std::size_t required_bytes() const noexcept {
    return used_ == 0 ? 0 : used_ + Workspace::kAlignment - 1;
  }

 private:
  WorkspaceCarver() = default;
  bool sizing_ = true;
  std::byte* base_ = nullptr;
  std::size_t used_ = 0;
};

//! Runs `layout(carver)` in sizing mode and returns the bytes it needs.
template <class Layout>
std::size_t layout_bytes(Layout&& layout) {
  auto carver = WorkspaceCarver::sizing();
  layout(carver);
  return carver.required_bytes();
}

//! Sizes `layout`, checks `ws` against it, and runs it again over `ws`, returning its result.
template <class Layout>
auto carve_layout(Workspace ws, std::string_view where, Layout&& layout) {
  WorkspaceCarver carver(ws, layout_bytes(layout), where);
  return layout(carver);
}

}  // namespace detail
}  // namespace epx
