// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! A read-only file read by positioned reads (POSIX pread): each read names its offset, so reads of
//! a rank's expert slices need no seeks and no shared file position, copy straight from the page
//! cache into the caller's memory, and can be counted exactly. (A memory map would fault in and
//! read ahead whole pages around each slice, and cost address space per shard.)

#include <epx/io/checkpoint_error.hpp>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <utility>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

namespace epx::io {

class ReadOnlyFile {
 public:
  ReadOnlyFile() = default;
  //! Opens `path` for reading. @throws Error naming the path and the system's reason.
  explicit ReadOnlyFile(std::string path) : path_(std::move(path)) {
    do {
      fd_ = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
    } while (fd_ < 0 && errno == EINTR);
    if (fd_ < 0)
      detail::file_error(Errc::kInvalidArgument, path_, fmt::format("cannot open: {}", std::strerror(errno)));
    struct stat st {};
    if (::fstat(fd_, &st) != 0) {
      int const err = errno;
      close();
      detail::file_error(Errc::kInvalidArgument, path_, fmt::format("cannot stat: {}", std::strerror(err)));
    }
    if (!S_ISREG(st.st_mode)) {
      close();
      detail::file_error(Errc::kInvalidArgument, path_, "not a regular file");
    }
    size_ = static_cast<std::uint64_t>(st.st_size);
  }
  ReadOnlyFile(ReadOnlyFile&& other) noexcept
      : path_(std::move(other.path_)), fd_(std::exchange(other.fd_, -1)), size_(other.size_) {}
  ReadOnlyFile& operator=(ReadOnlyFile&& other) noexcept {
    if (this != &other) {
      close();
      path_ = std::move(other.path_);
      fd_ = std::exchange(other.fd_, -1);
      size_ = other.size_;
    }
    return *this;
  }
  ReadOnlyFile(ReadOnlyFile const&) = delete;
  ReadOnlyFile& operator=(ReadOnlyFile const&) = delete;
  ~ReadOnlyFile() { close(); }

  [[nodiscard]] std::string const& path() const noexcept { return path_; }
  [[nodiscard]] bool is_open() const noexcept { return fd_ >= 0; }
  //! The size when the file was opened.
  [[nodiscard]] std::uint64_t size() const noexcept { return size_; }

  //! Fills `out` with the bytes at [offset, offset + out.size()). Short reads are continued;
  //! @throws Error naming the file when the range passes the end of the file (it shrank since it
  //!         was opened) or the system reports an error.
  void read_at(std::uint64_t offset, std::span<std::byte> out) const {
    if (out.empty()) return;
    if (offset > size_ || out.size() > size_ - offset)
      detail::file_error(
          Errc::kInvalidArgument, path_,
          fmt::format("read of bytes [{}, {}) past the end of the {}-byte file", offset, offset + out.size(), size_));
    std::size_t done = 0;
    while (done < out.size()) {
      // Linux transfers at most 0x7ffff000 bytes per call; ask for no more than 1 GiB at a time.
      std::size_t const ask = std::min<std::size_t>(out.size() - done, std::size_t{1} << 30);
      ssize_t const got = ::pread(fd_, out.data() + done, ask, static_cast<off_t>(offset + done));
      if (got < 0 && errno == EINTR) continue;
      if (got < 0)
        detail::file_error(
            Errc::kInvalidArgument, path_,
            fmt::format("read of {} bytes at offset {} failed: {}", ask, offset + done, std::strerror(errno)));
      if (got == 0)
        detail::file_error(Errc::kInvalidArgument, path_,
                           fmt::format("read at offset {} found the end of the file ({} of {} bytes read): it "
                                       "was truncated after it was opened",
                                       offset + done, done, out.size()));
      done += static_cast<std::size_t>(got);
    }
  }

 private:
  void close() noexcept {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

  std::string path_;
  int fd_ = -1;
  std::uint64_t size_ = 0;
};

}  // namespace epx::io
