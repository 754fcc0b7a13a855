// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! A safetensors checkpoint on disk, one file or sharded with an index, opened lazily: the index
//! is read when the checkpoint is opened, a shard's header only when one of its tensors is first
//! asked for, and tensor data only by explicit positioned reads of the byte ranges asked for. So a
//! rank that loads its experts of one layer touches only the shards holding them, and every byte it
//! reads is counted (ReadStats), which is what the tests check.

#include <epx/io/checkpoint_error.hpp>
#include <epx/io/file.hpp>
#include <epx/io/safetensors.hpp>
#include <epx/io/safetensors_index.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace epx::io {

//! Bytes a Checkpoint has read from disk, by kind.
struct ReadStats {
  std::uint64_t index_bytes = 0;   //!< the index file (model.safetensors.index.json), whole
  std::uint64_t header_bytes = 0;  //!< 8-byte length + JSON header of each shard opened
  std::uint64_t data_bytes = 0;    //!< tensor data
  std::uint64_t data_reads = 0;    //!< positioned reads of tensor data (system calls asked for)
  std::int32_t shards_opened = 0;

  [[nodiscard]] std::uint64_t total_bytes() const noexcept { return index_bytes + header_bytes + data_bytes; }
};

//! A tensor of a checkpoint: its checked header entry and the shard that holds it.
struct TensorRef {
  TensorInfo const* info = nullptr;
  std::int32_t shard = -1;
};

//! File names transformers gives a checkpoint (its SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME).
inline constexpr std::string_view kSafetensorsFileName = "model.safetensors";
inline constexpr std::string_view kSafetensorsIndexName = "model.safetensors.index.json";

//! One checkpoint, read by one thread at a time (each rank opens its own).
class Checkpoint {
 public:
  //! @brief Opens a checkpoint at `path`: a folder holding `model.safetensors.index.json` (sharded) or
  //! `model.safetensors`, an index file, or a single `.safetensors` file. Reads the index, or the
  //! single file's header, now.
  //! @throws Error naming the path when there is no checkpoint there or its index or header is bad.
  explicit Checkpoint(std::filesystem::path const& path) {
    namespace fs = std::filesystem;
    std::error_code ec;
    fs::path file = path;
    if (fs::is_directory(path, ec)) {
      if (fs::exists(path / kSafetensorsIndexName, ec))
        file = path / kSafetensorsIndexName;
      else if (fs::exists(path / kSafetensorsFileName, ec))
        file = path / kSafetensorsFileName;
      else
        detail::file_error(Errc::kInvalidArgument, path.string(),
                           fmt::format("a folder without {} or {}, expected a safetensors checkpoint",
                                       kSafetensorsIndexName, kSafetensorsFileName));
    }
    folder_ = file.parent_path();
    if (file.extension() == ".json") {
      ReadOnlyFile index_file(file.string());
      if (index_file.size() > kMaxIndexBytes)
        detail::file_error(Errc::kInvalidArgument, file.string(),
                           fmt::format("{} bytes, expected an index of at most {}", index_file.size(), kMaxIndexBytes));
      std::string text(static_cast<std::size_t>(index_file.size()), '\0');
      index_file.read_at(0, std::as_writable_bytes(std::span(text)));
      stats_.index_bytes += text.size();
      index_ = parse_safetensors_index(text, file.string());
      index_path_ = file.string();
      for (auto const& name : index_->shards) shards_.push_back({.path = (folder_ / name).string()});
    } else {
      shards_.push_back({.path = file.string()});
      open_shard(0);
    }
  }

  Checkpoint(Checkpoint&&) noexcept = default;
  Checkpoint& operator=(Checkpoint&&) noexcept = default;
  Checkpoint(Checkpoint const&) = delete;  // owns open files; TensorRefs point into it
  Checkpoint& operator=(Checkpoint const&) = delete;

  //! The folder of the checkpoint (where config.json is).
  [[nodiscard]] std::filesystem::path const& folder() const noexcept { return folder_; }
  [[nodiscard]] bool sharded() const noexcept { return index_.has_value(); }
  [[nodiscard]] std::int32_t num_shards() const noexcept { return static_cast<std::int32_t>(shards_.size()); }
  //! The path of shard `shard`.
  [[nodiscard]] std::string const& shard_path(std::int32_t shard) const { return shards_.at(check(shard)).path; }
  //! Where tensors are looked up, for messages: the index, or the single file.
  [[nodiscard]] std::string const& source() const noexcept { return index_ ? index_path_ : shards_[0].path; }
  [[nodiscard]] ReadStats const& stats() const noexcept { return stats_; }

  //! Whether the checkpoint has a tensor `name` (the index decides when there is one; no shard is opened).
  [[nodiscard]] bool contains(std::string_view name) {
    if (index_) return index_->shard_of.find(name) != index_->shard_of.end();
    return shards_[0].header->find(name) != nullptr;
  }

  //! @brief The tensor `name`, or nothing when the checkpoint has none. Opens its shard (reading the
  //! shard's header) the first time one of its tensors is asked for.
  //! @throws Error when the index names a shard that does not hold the tensor, or the shard is bad.
  [[nodiscard]] std::optional<TensorRef> find(std::string_view name) {
    std::int32_t shard = 0;
    if (index_) {
      auto const it = index_->shard_of.find(name);
      if (it == index_->shard_of.end()) return std::nullopt;
      shard = it->second;
    }
    auto const& header = open_shard(shard);
    TensorInfo const* info = header.find(name);
    if (info == nullptr) {
      if (!index_) return std::nullopt;
      detail::tensor_error(Errc::kInvalidArgument, shards_[static_cast<std::size_t>(shard)].path, name,
                           fmt::format("not in this shard, but the index {} says it is", index_path_));
    }
    return TensorRef{info, shard};
  }

  //! Where tensor `t`'s data starts in its shard file (for a runtime that reads the bytes itself,
  //! e.g. straight to the GPU with cuFile).
  [[nodiscard]] std::uint64_t file_offset(TensorRef const& t) const {
    auto const& shard = shards_.at(check(t.shard));
    epx::detail::require(t.info != nullptr && shard.header.has_value(), Errc::kInvalidArgument,
                         "Checkpoint::file_offset", "t", "a tensor this checkpoint did not find",
                         "a TensorRef from find()");
    return shard.header->data_start() + t.info->begin;
  }

  //! @brief Reads bytes [offset, offset + out.size()) of tensor `t`'s data into `out`.
  //! @throws Error when the range is not inside the tensor, or the read fails.
  void read(TensorRef const& t, std::uint64_t offset, std::span<std::byte> out) {
    auto& shard = shards_.at(check(t.shard));
    if (t.info == nullptr || offset > t.info->num_bytes() || out.size() > t.info->num_bytes() - offset)
      detail::tensor_error(Errc::kInvalidArgument, shard.path, t.info ? t.info->name : "?",
                           fmt::format("read of bytes [{}, {}) outside the tensor's {} bytes", offset,
                                       offset + out.size(), t.info ? t.info->num_bytes() : 0));
    shard.file.read_at(shard.header->data_start() + t.info->begin + offset, out);
    stats_.data_bytes += out.size();
    stats_.data_reads += 1;
  }

 private:
  struct Shard {
    std::string path;
    ReadOnlyFile file = {};
    std::optional<SafetensorsHeader> header = {};
  };

  std::size_t check(std::int32_t shard) const {
    epx::detail::require(shard >= 0 && shard < num_shards(), Errc::kInvalidArgument, "Checkpoint", "shard", shard,
                         fmt::format("in [0, {})", num_shards()));
    return static_cast<std::size_t>(shard);
  }

  SafetensorsHeader const& open_shard(std::int32_t id) {
    auto& shard = shards_.at(check(id));
    if (shard.header) return *shard.header;
    shard.file = ReadOnlyFile(shard.path);
    std::byte prefix[kSafetensorsPrefixBytes];
    std::uint64_t const readable = std::min<std::uint64_t>(shard.file.size(), kSafetensorsPrefixBytes);
    shard.file.read_at(0, std::span(prefix, static_cast<std::size_t>(readable)));
    stats_.header_bytes += readable;
    std::uint64_t const n = safetensors_header_length(
        std::span<std::byte const>(prefix, static_cast<std::size_t>(readable)), shard.file.size(), shard.path);
    std::string text(static_cast<std::size_t>(n), '\0');
    shard.file.read_at(kSafetensorsPrefixBytes, std::as_writable_bytes(std::span(text)));
    stats_.header_bytes += n;
    shard.header = parse_safetensors_header(text, shard.file.size(), shard.path);
    stats_.shards_opened += 1;
    return *shard.header;
  }

  std::filesystem::path folder_;
  std::optional<SafetensorsIndex> index_;
  std::string index_path_;
  std::vector<Shard> shards_;
  ReadStats stats_;
};

}  // namespace epx::io
