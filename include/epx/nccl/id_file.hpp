// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! Moving NCCL's unique id from rank 0 to the other ranks through a shared directory: rank 0
//! writes a fixed-size record to a temporary file and renames it into place (rename(2) replaces
//! atomically, so a reader never sees half a record); the others poll for the file until the
//! deadline and check every header field, since a stale or foreign file is worse than none.
//! POSIX (open/fsync/rename), like NCCL itself.

#include <epx/core/error.hpp>
#include <epx/nccl/poll.hpp>

#include <nccl.h>

#include <fcntl.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <string_view>

namespace epx::detail {

//! What rank 0 publishes: the id, and what every reader checks it against.
struct IdRecord {
  ncclUniqueId id{};
  int num_ranks = 0;           //!< WORLD_SIZE of the writer
  int nccl_version = 0;        //!< ncclGetVersion of the writer (ranks must run the same NCCL)
  std::uint64_t key_hash = 0;  //!< id_key_hash of the job key and generation in the file name
};

// Layout (native byte order: every rank of an NCCL job runs on the same architecture):
// magic[8] | format u32 | nccl_version i32 | num_ranks i32 | reserved u32 | key_hash u64 | id[128]
inline constexpr std::array<char, 8> kIdRecordMagic{'E', 'P', 'X', 'N', 'C', 'C', 'L', 'I'};
inline constexpr std::uint32_t kIdRecordFormat = 1;
inline constexpr std::size_t kIdRecordBytes = 8 + 4 + 4 + 4 + 4 + 8 + sizeof(ncclUniqueId);

//! FNV-1a of `key`: ties a record to the job and generation that named its file.
[[nodiscard]] constexpr std::uint64_t id_key_hash(std::string_view key) noexcept {
  std::uint64_t h = 0xcbf29ce484222325ull;
  for (char c : key) {
    h ^= static_cast<unsigned char>(c);
    h *= 0x100000001b3ull;
  }
  return h;
}

[[nodiscard]] inline std::array<std::byte, kIdRecordBytes> encode_id_record(IdRecord const& record) noexcept {
  std::array<std::byte, kIdRecordBytes> out{};
  std::size_t at = 0;
  auto put = [&](void const* p, std::size_t n) {
    std::memcpy(out.data() + at, p, n);
    at += n;
  };
  std::uint32_t const reserved = 0;
  put(kIdRecordMagic.data(), kIdRecordMagic.size());
  put(&kIdRecordFormat, 4);
  put(&record.nccl_version, 4);
  put(&record.num_ranks, 4);
  put(&reserved, 4);
  put(&record.key_hash, 8);
  put(&record.id, sizeof(ncclUniqueId));
  return out;
}

//! Decodes and checks a record read from `path`. Throws Errc::kInvalidArgument for a file that is
//! not one (wrong size, magic or format) and Errc::kCollectiveMismatch for one written by another
//! job, world size or NCCL version.
[[nodiscard]] inline IdRecord decode_id_record(std::span<std::byte const> bytes, std::string_view path,
                                               IdRecord const& expected) {
  auto const where = fmt::format("NcclCommunicator::from_env: id file {}", path);
  require(bytes.size() == kIdRecordBytes, Errc::kInvalidArgument, where, "size", fmt::format("{} bytes", bytes.size()),
          fmt::format("{} bytes (a truncated or foreign file: delete it)", kIdRecordBytes));
  IdRecord record;
  std::array<char, 8> magic{};
  std::uint32_t format = 0;
  std::size_t at = 0;
  auto get = [&](void* p, std::size_t n) {
    std::memcpy(p, bytes.data() + at, n);
    at += n;
  };
  std::uint32_t reserved = 0;
  get(magic.data(), magic.size());
  get(&format, 4);
  get(&record.nccl_version, 4);
  get(&record.num_ranks, 4);
  get(&reserved, 4);
  get(&record.key_hash, 8);
  get(&record.id, sizeof(ncclUniqueId));
  require(magic == kIdRecordMagic && format == kIdRecordFormat, Errc::kInvalidArgument, where, "header",
          "not an epx NCCL id record",
          fmt::format("format {} written by epx (a foreign file: delete it)", kIdRecordFormat));
  require(record.num_ranks == expected.num_ranks, Errc::kCollectiveMismatch, where, "world size", record.num_ranks,
          fmt::format("this rank's {} (rank 0 and this rank were launched with different world sizes)",
                      expected.num_ranks));
  require(record.key_hash == expected.key_hash, Errc::kCollectiveMismatch, where, "job key hash", record.key_hash,
          fmt::format("{} (the file belongs to another job or generation)", expected.key_hash));
  require(record.nccl_version == expected.nccl_version, Errc::kCollectiveMismatch, where, "NCCL version of rank 0",
          record.nccl_version,
          fmt::format("this rank's {} (every rank must load the same NCCL)", expected.nccl_version));
  return record;
}

namespace id_file_detail {

// Closes a file descriptor on scope exit.
struct Fd {
  int fd = -1;
  ~Fd() {
    if (fd >= 0) (void)::close(fd);
  }
};

[[noreturn]] inline void throw_io(std::string_view what, std::string const& path, int error) {
  throw_error(Errc::kInvalidArgument,
              fmt::format("NcclCommunicator::from_env: {} {} failed: {}, expected EPX_NCCL_ID_DIR to be a directory "
                          "that every rank can read and rank 0 can write",
                          what, path, std::strerror(error)));
}

}  // namespace id_file_detail

//! Rank 0: publishes `record` at `path` atomically (write `path.tmp.<pid>`, fsync, rename).
inline void write_id_file(std::string const& path, IdRecord const& record) {
  using id_file_detail::throw_io;
  auto const bytes = encode_id_record(record);
  std::string const tmp = fmt::format("{}.tmp.{}", path, static_cast<long>(::getpid()));
  {
    id_file_detail::Fd file{::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644)};
    if (file.fd < 0) throw_io("creating", tmp, errno);
    std::size_t written = 0;
    while (written < bytes.size()) {
      auto const n = ::write(file.fd, bytes.data() + written, bytes.size() - written);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        int const error = n < 0 ? errno : EIO;
        (void)::unlink(tmp.c_str());
        throw_io("writing", tmp, error);
      }
      written += static_cast<std::size_t>(n);
    }
    // Durable before visible: on a network file system another node may read it at once.
    if (::fsync(file.fd) != 0) {
      int const error = errno;
      (void)::unlink(tmp.c_str());
      throw_io("fsync of", tmp, error);
    }
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    int const error = errno;
    (void)::unlink(tmp.c_str());
    throw_io("renaming to", path, error);
  }
}

//! Other ranks: polls for `path` until `timeout` has passed, then reads and checks its record
//! against `expected` (all fields but the id). A missing file is waited for; a present file that
//! is not a valid record fails at once. Throws Errc::kTimeout naming the path when rank 0 never
//! wrote it.
[[nodiscard]] inline IdRecord read_id_file(std::string const& path, IdRecord const& expected,
                                           std::chrono::milliseconds timeout, int rank) {
  auto deadline = PollDeadline::for_files(timeout);
  for (;;) {
    id_file_detail::Fd file{::open(path.c_str(), O_RDONLY | O_CLOEXEC)};
    if (file.fd >= 0) {
      // One byte more than a record, so a longer (foreign) file is told apart from a record.
      std::array<std::byte, kIdRecordBytes + 1> buffer{};
      std::size_t got = 0;
      while (got < buffer.size()) {
        auto const n = ::read(file.fd, buffer.data() + got, buffer.size() - got);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) id_file_detail::throw_io("reading", path, errno);
        if (n == 0) break;
        got += static_cast<std::size_t>(n);
      }
      return decode_id_record(std::span<std::byte const>(buffer.data(), got), path, expected);
    }
    if (errno != ENOENT) id_file_detail::throw_io("opening", path, errno);
    if (deadline.expired())
      throw_error(
          Errc::kTimeout,
          fmt::format("NcclCommunicator::from_env: rank {} waited {} ms for rank 0 to write the NCCL id file {}, "
                      "which never appeared; expected rank 0 to start and EPX_NCCL_ID_DIR to be one directory "
                      "shared by every rank (the same path on every node) and writable by rank 0",
                      rank, deadline.elapsed().count(), path));
    deadline.pause();
  }
}

//! Rank 0, once every rank has joined the communicator (so every rank has read the id): removes
//! the file, so that no later job or generation can pick it up. Never throws.
inline void remove_id_file(std::string const& path) noexcept { (void)::unlink(path.c_str()); }

}  // namespace epx::detail
