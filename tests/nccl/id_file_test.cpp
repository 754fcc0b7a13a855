// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// The unique-id file exchange (include/epx/nccl/id_file.hpp) and the polling deadline
// (include/epx/nccl/poll.hpp), with threads standing in for ranks; no NCCL call is made.

#include "../common/test_util.hpp"

#include <epx/nccl/id_file.hpp>
#include <epx/nccl/poll.hpp>

#include <doctest/doctest.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <thread>

using namespace epx;
using namespace std::chrono_literals;

namespace {

// A fresh directory under the system's temporary directory, removed with its files at scope exit.
struct TempDir {
  std::filesystem::path path;
  TempDir() {
    std::random_device rd;
    path = std::filesystem::temp_directory_path() / ("epx_nccl_id_test_" + std::to_string(rd()) + std::to_string(rd()));
    std::filesystem::create_directories(path);
  }
  TempDir(TempDir const&) = delete;
  TempDir& operator=(TempDir const&) = delete;
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  [[nodiscard]] std::string file(std::string const& name) const { return (path / name).string(); }
};

detail::IdRecord sample_record() {
  detail::IdRecord r{.num_ranks = 4, .nccl_version = 22803, .key_hash = detail::id_key_hash("job.g0")};
  for (std::size_t i = 0; i < sizeof(r.id.internal); ++i) r.id.internal[i] = static_cast<char>(i * 7 + 1);
  return r;
}

bool same_id(ncclUniqueId const& a, ncclUniqueId const& b) {
  return std::memcmp(a.internal, b.internal, sizeof(a.internal)) == 0;
}

void write_bytes(std::string const& path, std::string const& bytes) { std::ofstream(path, std::ios::binary) << bytes; }

// Reads `path` expecting Error(code) whose message contains `part`.
void check_read_refused(std::string const& path, detail::IdRecord const& expected, Errc code, std::string const& part) {
  test::check_throws(code, part, [&] { (void)detail::read_id_file(path, expected, 2000ms, 1); });
}

}  // namespace

TEST_CASE("NcclIdFile::encode_id_record: a record round-trips and is 160 bytes") {
  auto const record = sample_record();
  auto const bytes = detail::encode_id_record(record);
  CHECK(bytes.size() == 160);
  auto const back = detail::decode_id_record(bytes, "mem", record);
  CHECK(back.num_ranks == 4);
  CHECK(back.nccl_version == 22803);
  CHECK(back.key_hash == record.key_hash);
  CHECK(same_id(back.id, record.id));
}

TEST_CASE("NcclIdFile::exchange: one thread writes, another waiting for it reads the same id") {
  TempDir dir;
  std::string const path = dir.file("job.g0.ncclid");
  auto const record = sample_record();
  detail::IdRecord read;
  std::jthread reader([&] { read = detail::read_id_file(path, record, 10'000ms, 1); });
  std::this_thread::sleep_for(50ms);  // the reader polls a missing file first
  detail::write_id_file(path, record);
  reader.join();
  CHECK(same_id(read.id, record.id));
  CHECK(read.num_ranks == record.num_ranks);
  // The rename left no temporary file behind; removing the id file empties the directory.
  detail::remove_id_file(path);
  CHECK(std::filesystem::is_empty(dir.path));
}

TEST_CASE("NcclIdFile::read_id_file: a file that never appears times out within the deadline") {
  TempDir dir;
  std::string const path = dir.file("never.ncclid");
  auto const start = std::chrono::steady_clock::now();
  bool thrown = false;
  try {
    (void)detail::read_id_file(path, sample_record(), 300ms, 3);
  } catch (Error const& e) {
    thrown = true;
    INFO(e.what());
    CHECK(e.code() == Errc::kTimeout);
    std::string const what = e.what();
    CHECK(what.find("NcclCommunicator::from_env: rank 3 waited ") != std::string::npos);
    CHECK(what.find("ms for rank 0 to write the NCCL id file " + path +
                    ", which never appeared; expected rank 0 to "
                    "start and EPX_NCCL_ID_DIR to be one directory shared by every rank") != std::string::npos);
  }
  CHECK(thrown);
  auto const took = std::chrono::steady_clock::now() - start;
  CHECK(took >= 300ms);
  CHECK(took < 2s);  // the deadline plus one poll interval at most, with slack for a loaded machine
}

TEST_CASE("NcclIdFile::read_id_file: a truncated, overlong or foreign file is an error at once") {
  TempDir dir;
  auto const record = sample_record();
  auto const bytes = detail::encode_id_record(record);
  std::string const good(reinterpret_cast<char const*>(bytes.data()), bytes.size());

  std::string const truncated = dir.file("truncated.ncclid");
  write_bytes(truncated, good.substr(0, 100));
  check_read_refused(truncated, record, Errc::kInvalidArgument,
                     "from_env: id file " + truncated +
                         ": size = 100 bytes, expected 160 bytes (a truncated or "
                         "foreign file: delete it)");

  std::string const longer = dir.file("longer.ncclid");
  write_bytes(longer, good + "x");
  check_read_refused(longer, record, Errc::kInvalidArgument, "size = 161 bytes, expected 160 bytes");

  std::string const garbage = dir.file("garbage.ncclid");
  write_bytes(garbage, std::string(160, 'g'));
  check_read_refused(
      garbage, record, Errc::kInvalidArgument,
      "header = not an epx NCCL id record, expected format 1 written by epx (a foreign file: delete it)");

  std::string const empty = dir.file("empty.ncclid");
  write_bytes(empty, "");
  check_read_refused(empty, record, Errc::kInvalidArgument, "size = 0 bytes, expected 160 bytes");
}

TEST_CASE("NcclIdFile::read_id_file: a record of another world size, job or NCCL version is a mismatch") {
  TempDir dir;
  std::string const path = dir.file("job.g0.ncclid");
  auto const record = sample_record();
  detail::write_id_file(path, record);

  auto other = record;
  other.num_ranks = 8;
  check_read_refused(path, other, Errc::kCollectiveMismatch,
                     "world size = 4, expected this rank's 8 (rank 0 and this rank were launched with different world "
                     "sizes)");
  other = record;
  other.key_hash = detail::id_key_hash("job.g1");
  check_read_refused(path, other, Errc::kCollectiveMismatch, "(the file belongs to another job or generation)");
  other = record;
  other.nccl_version = 22809;
  check_read_refused(path, other, Errc::kCollectiveMismatch,
                     "NCCL version of rank 0 = 22803, expected this rank's 22809 (every rank must load the same NCCL)");
}

TEST_CASE("NcclIdFile::write_id_file: a directory that does not exist is named") {
  TempDir dir;
  std::string const path = dir.file("missing/job.g0.ncclid");
  bool thrown = false;
  try {
    detail::write_id_file(path, sample_record());
  } catch (Error const& e) {
    thrown = true;
    INFO(e.what());
    CHECK(e.code() == Errc::kInvalidArgument);
    std::string const what = e.what();
    CHECK(what.find("NcclCommunicator::from_env: creating " + path + ".tmp.") != std::string::npos);
    CHECK(what.find("failed: No such file or directory, expected EPX_NCCL_ID_DIR to be a directory that every rank "
                    "can read and rank 0 can write") != std::string::npos);
  }
  CHECK(thrown);
}

TEST_CASE("NcclPoll::PollDeadline: expires after the timeout and never sleeps past it") {
  auto const start = std::chrono::steady_clock::now();
  auto deadline = detail::PollDeadline::for_files(120ms);
  CHECK_FALSE(deadline.expired());
  int pauses = 0;
  while (!deadline.expired()) {
    deadline.pause();
    ++pauses;
  }
  auto const took = std::chrono::steady_clock::now() - start;
  CHECK(took >= 120ms);
  CHECK(took < 1s);  // the backoff (up to 100 ms) is clamped to the time left
  CHECK(pauses >= 3);
  CHECK(deadline.elapsed() >= 120ms);
}
