// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! The index of a sharded checkpoint, `model.safetensors.index.json` (transformers'
//! SAFE_WEIGHTS_INDEX_NAME): which shard file holds each tensor. Its form, as transformers' scripts
//! write it (e.g. convert_gpt_oss_weights_to_hf.py, create_safetensors_index):
//!   {"metadata": {"total_size": 1234, ...}, "weight_map": {"<tensor name>": "model-00001-of-00003.safetensors", ...}}
//! epx reads "weight_map" and skips everything else. A shard must be a plain file name beside the
//! index: a name with a path separator, "." or ".." is refused, so that a hostile index cannot send
//! the loader to any other file.

#include <epx/io/checkpoint_error.hpp>
#include <epx/io/json_value_skipper.hpp>

#include <nlohmann/json.hpp>

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

namespace epx::io {

//! A checked index: the shard files, and for each tensor the shard that holds it.
struct SafetensorsIndex {
  std::vector<std::string> shards = {};                            //!< file names, in order of first use
  std::map<std::string, std::int32_t, std::less<>> shard_of = {};  //!< tensor name -> index into shards
};

namespace detail {

//! Reads an index file event by event (nlohmann::json::sax_parse): "weight_map" must be an object
//! of strings; other keys are skipped.
class SafetensorsIndexReader : public SkippingSaxHandler<SafetensorsIndexReader> {
 public:
  using json = nlohmann::json;

  bool null() { return scalar("null"); }
  bool boolean(bool) { return scalar("a boolean"); }
  bool number_integer(json::number_integer_t) { return scalar("a number"); }
  bool number_unsigned(json::number_unsigned_t) { return scalar("a number"); }
  bool number_float(json::number_float_t, json::string_t const&) { return scalar("a number"); }
  bool binary(json::binary_t&) { return scalar("binary data"); }
  bool string(json::string_t& value) {
    if (skipper_.active()) return skip_scalar();
    if (state_ != State::kEntryValue) return unexpected("a string");
    if (auto const why = bad_shard_name(value); !why.empty())
      return fail(
          fmt::format("weight_map[\"{}\"] = \"{}\", expected {}", printable(tensor_, 120), printable(value, 120), why));
    auto [it, added] = shard_ids_.try_emplace(value, static_cast<std::int32_t>(index_.shards.size()));
    if (added) index_.shards.push_back(std::move(value));
    if (!index_.shard_of.try_emplace(std::move(tensor_), it->second).second)  // keeps tensor_ when refused
      return fail(fmt::format("weight_map names tensor \"{}\" twice", printable(tensor_, 120)));
    state_ = State::kWeightMap;
    return true;
  }
  bool start_object(std::size_t) {
    if (skipper_.active()) return skip_open();
    if (state_ == State::kStart) {
      state_ = State::kTop;
      return true;
    }
    if (state_ == State::kWeightMapValue) {
      state_ = State::kWeightMap;
      return true;
    }
    return unexpected("an object");
  }
  bool key(json::string_t& name) {
    if (skipper_.active()) return skip_scalar();
    if (state_ == State::kTop) {
      if (name == "weight_map") {
        if (have_weight_map_) return fail("\"weight_map\" appears twice");
        have_weight_map_ = true;
        state_ = State::kWeightMapValue;
      } else {
        skipper_.start();  // "metadata" and anything else
      }
      return true;
    }
    if (state_ == State::kWeightMap) {
      tensor_ = std::move(name);
      state_ = State::kEntryValue;
      return true;
    }
    return unexpected("a key");
  }
  bool end_object() {
    if (skipper_.active()) return skip_close();
    if (state_ == State::kTop) {
      state_ = State::kDone;
      return true;
    }
    if (state_ == State::kWeightMap) {
      state_ = State::kTop;
      return true;
    }
    return unexpected("'}'");
  }
  bool start_array(std::size_t) {
    if (skipper_.active()) return skip_open();
    return unexpected("an array");
  }
  bool end_array() {
    if (skipper_.active()) return skip_close();
    return unexpected("']'");
  }
  bool parse_error(std::size_t position, std::string const&, json::exception const& e) {
    return fail(fmt::format("not valid JSON (byte {}): {}", position, printable(e.what(), 200)));
  }

  [[nodiscard]] std::string const& error() const noexcept { return error_; }
  [[nodiscard]] bool done() const noexcept { return state_ == State::kDone; }
  [[nodiscard]] bool has_weight_map() const noexcept { return have_weight_map_; }

  SafetensorsIndex index_;

 private:
  friend class SkippingSaxHandler<SafetensorsIndexReader>;

  enum class State { kStart, kTop, kWeightMapValue, kWeightMap, kEntryValue, kDone };

  //! Why `name` cannot be a shard file ("" when it can).
  static std::string_view bad_shard_name(std::string_view name) {
    if (name.empty() || name == "." || name == "..") return "a shard file name";
    if (name.find('/') != std::string_view::npos || name.find('\\') != std::string_view::npos ||
        name.find('\0') != std::string_view::npos)
      return "a shard file name beside the index (no path separators)";
    return {};
  }
  bool fail(std::string message) {
    if (error_.empty()) error_ = std::move(message);
    return false;
  }
  bool unexpected(std::string_view what) {
    switch (state_) {
      case State::kStart: return fail(fmt::format("starts with {}, expected a JSON object", what));
      case State::kWeightMapValue: return fail(fmt::format("\"weight_map\" is {}, expected an object", what));
      case State::kEntryValue:
        return fail(fmt::format("weight_map[\"{}\"] is {}, expected a shard file name", printable(tensor_, 120), what));
      case State::kDone: return fail(fmt::format("{} follows the index's object", what));
      default: return fail(fmt::format("unexpected {}", what));
    }
  }

  State state_ = State::kStart;
  bool have_weight_map_ = false;
  std::string tensor_;
  std::map<std::string, std::int32_t, std::less<>> shard_ids_;
  std::string error_;
};

}  // namespace detail

//! The largest index file epx reads (DeepSeek-V3's, with 91k tensors, is under 10 MB).
inline constexpr std::uint64_t kMaxIndexBytes = 100'000'000;

//! @brief Parses and checks the text of a `model.safetensors.index.json`.
//! @throws Error(kInvalidArgument) naming `file`: not JSON, no "weight_map" object, a value that is
//!         not a plain file name, a tensor named twice.
inline SafetensorsIndex parse_safetensors_index(std::string_view json_text, std::string_view file) {
  if (json_text.size() > kMaxIndexBytes)
    detail::file_error(Errc::kInvalidArgument, file,
                       fmt::format("{} bytes, expected an index of at most {}", json_text.size(), kMaxIndexBytes));
  detail::SafetensorsIndexReader reader;
  bool const parsed = nlohmann::json::sax_parse(json_text.data(), json_text.data() + json_text.size(), &reader);
  if (!parsed || !reader.done())
    detail::file_error(Errc::kInvalidArgument, file,
                       reader.error().empty() ? std::string("not a complete JSON object") : reader.error());
  if (!reader.has_weight_map())
    detail::file_error(Errc::kInvalidArgument, file,
                       "no \"weight_map\", expected {\"weight_map\": {\"<tensor>\": \"<shard file>\", ...}}");
  return std::move(reader.index_);
}

}  // namespace epx::io
