// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! The safetensors header: parsing and checking it, with nothing trusted.
//!
//! The format (huggingface/safetensors README, "Format", and its reference reader
//! safetensors/src/tensor.rs, read 2026-12):
//!   - 8 bytes: N, an unsigned little-endian 64-bit integer, the size of the header;
//!   - N bytes: a UTF-8 JSON object. Each key is a tensor name mapped to
//!     {"dtype": "BF16", "shape": [d0, d1, ...], "data_offsets": [begin, end]}, where the offsets are
//!     bytes relative to the start of the data section (end one past the last byte); the special key
//!     "__metadata__" maps to an object of strings. Writers pad the header with spaces.
//!   - the rest of the file: the data section, row-major ('C' order), little-endian, unstrided.
//! The reference reader also requires, and so does epx: N <= 100,000,000; 8 + N <= the file size;
//! each tensor's byte count = product(shape) x the dtype's bits / 8, a whole number of bytes; the
//! tensors, ordered by offset, cover the data section exactly, with no gap and no overlap, ending
//! at the end of the file; no tensor name twice. Any deviation is an epx::Error naming the file and
//! the tensor, before a single data byte is read.

#include <epx/io/checkpoint_error.hpp>
#include <epx/io/json_value_skipper.hpp>
#include <epx/io/safetensors_dtype.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <map>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace epx::io {

//! The largest header the format allows (the reference reader's MAX_HEADER_SIZE).
inline constexpr std::uint64_t kMaxSafetensorsHeaderBytes = 100'000'000;

//! Bytes before the JSON header: its length N.
inline constexpr std::uint64_t kSafetensorsPrefixBytes = 8;

//! One tensor of a safetensors file, as its header describes it (checked).
struct TensorInfo {
  std::string name = {};
  SafetensorsDType dtype = SafetensorsDType::kU8;
  std::vector<std::int64_t> shape = {};  //!< row-major extents; empty for a scalar
  std::uint64_t begin = 0;               //!< first byte, relative to the data section
  std::uint64_t end = 0;                 //!< one past the last byte, relative to the data section

  [[nodiscard]] std::uint64_t num_bytes() const noexcept { return end - begin; }
  [[nodiscard]] std::int64_t num_elements() const noexcept {
    std::int64_t n = 1;
    for (auto d : shape) n *= d;
    return n;
  }
};

//! A checked safetensors header.
struct SafetensorsHeader {
  std::uint64_t json_bytes = 0;                                    //!< N
  std::uint64_t data_bytes = 0;                                    //!< size of the data section: file size - 8 - N
  std::vector<TensorInfo> tensors = {};                            //!< ordered by offset
  std::vector<std::pair<std::string, std::string>> metadata = {};  //!< "__metadata__", in file order

  //! Where the data section starts in the file.
  [[nodiscard]] std::uint64_t data_start() const noexcept { return kSafetensorsPrefixBytes + json_bytes; }
  //! The tensor called `name`, or nullptr.
  [[nodiscard]] TensorInfo const* find(std::string_view name) const {
    auto const it = by_name.find(name);
    return it == by_name.end() ? nullptr : &tensors[it->second];
  }

  std::map<std::string, std::size_t, std::less<>> by_name = {};  //!< name -> index into tensors
};

//! "[2, 3, 4]", as messages print a tensor's shape.
inline std::string format_shape(std::span<std::int64_t const> shape) {
  std::string text = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) text += fmt::format("{}{}", i == 0 ? "" : ", ", shape[i]);
  return text + "]";
}

namespace detail {

//! Reads the JSON header of one safetensors file event by event (nlohmann::json::sax_parse):
//! exactly the schema above, the first deviation recorded with the tensor it belongs to. Keys of
//! a tensor other than the three are skipped, as the reference reader ignores them.
class SafetensorsHeaderReader : public SkippingSaxHandler<SafetensorsHeaderReader> {
 public:
  using json = nlohmann::json;

  bool null() { return scalar("null"); }
  bool boolean(bool) { return scalar("a boolean"); }
  bool number_integer(json::number_integer_t value) {
    if (skipper_.active()) return skip_scalar();
    if (state_ == State::kShape || state_ == State::kOffsets)  // only negative numbers arrive here
      return fail(fmt::format("{} holds {}, expected integers >= 0", field_name(), value));
    return scalar(fmt::format("the number {}", value));
  }
  bool number_unsigned(json::number_unsigned_t value) {
    if (skipper_.active()) return skip_scalar();
    if (state_ == State::kShape) {
      if (value > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
        return fail(fmt::format("shape holds {}, expected extents < 2^63", value));
      current_.shape.push_back(static_cast<std::int64_t>(value));
      return true;
    }
    if (state_ == State::kOffsets) {
      if (num_offsets_ >= 2) return fail("data_offsets holds more than two numbers, expected [begin, end]");
      (num_offsets_ == 0 ? current_.begin : current_.end) = value;
      ++num_offsets_;
      return true;
    }
    return scalar(fmt::format("the number {}", value));
  }
  bool number_float(json::number_float_t, json::string_t const& text) {
    if (skipper_.active()) return skip_scalar();
    if (state_ == State::kShape || state_ == State::kOffsets)
      return fail(fmt::format("{} holds {}, expected integers >= 0 (no fraction, no exponent, < 2^64)", field_name(),
                              printable(text, 40)));
    return scalar(fmt::format("the number {}", printable(text, 40)));
  }
  bool string(json::string_t& value) {
    if (skipper_.active()) return skip_scalar();
    if (state_ == State::kTensorField && field_ == Field::kDtype) {
      auto const dtype = parse_safetensors_dtype(value);
      if (!dtype)
        return fail(
            fmt::format("dtype = \"{}\", expected one of the format's element types (BOOL, U8, I8, F8_E4M3, "
                        "F8_E5M2, F8_E8M0, I16, U16, F16, BF16, I32, U32, F32, F64, I64, U64, C64, F4, "
                        "F6_E2M3, F6_E3M2)",
                        printable(value, 40)));
      current_.dtype = *dtype;
      have_dtype_ = true;
      state_ = State::kTensor;
      return true;
    }
    if (state_ == State::kMetadataValue) {
      metadata_.emplace_back(std::move(metadata_key_), std::move(value));
      state_ = State::kMetadata;
      return true;
    }
    return scalar(fmt::format("the string \"{}\"", printable(value, 40)));
  }
  bool binary(json::binary_t&) { return scalar("binary data"); }

  bool start_object(std::size_t) {
    if (skipper_.active()) return skip_open();
    switch (state_) {
      case State::kStart: state_ = State::kTop; return true;
      case State::kTensorValue: state_ = State::kTensor; return true;
      case State::kMetadataObject: state_ = State::kMetadata; return true;
      default: return unexpected("an object");
    }
  }
  bool key(json::string_t& name) {
    if (skipper_.active()) return skip_scalar();
    if (state_ == State::kTop) {
      if (name == "__metadata__") {
        if (have_metadata_) return fail("\"__metadata__\" appears twice");
        have_metadata_ = true;
        in_metadata_ = true;
        state_ = State::kMetadataObject;
        return true;
      }
      if (!names_.insert(name).second) {
        current_ = {.name = name};
        return fail("the name appears twice in the header");
      }
      current_ = TensorInfo{.name = std::move(name)};
      have_dtype_ = have_shape_ = false;
      num_offsets_ = -1;
      state_ = State::kTensorValue;
      return true;
    }
    if (state_ == State::kMetadata) {
      metadata_key_ = std::move(name);
      state_ = State::kMetadataValue;
      return true;
    }
    if (state_ == State::kTensor) {
      field_ = name == "dtype"          ? Field::kDtype
               : name == "shape"        ? Field::kShape
               : name == "data_offsets" ? Field::kOffsets
                                        : Field::kOther;
      if ((field_ == Field::kDtype && have_dtype_) || (field_ == Field::kShape && have_shape_) ||
          (field_ == Field::kOffsets && num_offsets_ >= 0))
        return fail(fmt::format("\"{}\" appears twice", name));
      if (field_ == Field::kOther)
        skipper_.start();
      else
        state_ = State::kTensorField;
      return true;
    }
    return unexpected("a key");
  }
  bool end_object() {
    if (skipper_.active()) return skip_close();
    switch (state_) {
      case State::kTop: state_ = State::kDone; return true;
      case State::kMetadata:
        in_metadata_ = false;
        state_ = State::kTop;
        return true;
      case State::kTensor: {
        if (!have_dtype_) return fail("no \"dtype\", expected {\"dtype\", \"shape\", \"data_offsets\"}");
        if (!have_shape_) return fail("no \"shape\", expected {\"dtype\", \"shape\", \"data_offsets\"}");
        if (num_offsets_ < 0) return fail("no \"data_offsets\", expected {\"dtype\", \"shape\", \"data_offsets\"}");
        tensors_.push_back(std::move(current_));
        current_ = {};
        state_ = State::kTop;
        return true;
      }
      default: return unexpected("'}'");
    }
  }
  bool start_array(std::size_t) {
    if (skipper_.active()) return skip_open();
    if (state_ == State::kTensorField && field_ == Field::kShape) {
      have_shape_ = true;
      state_ = State::kShape;
      return true;
    }
    if (state_ == State::kTensorField && field_ == Field::kOffsets) {
      num_offsets_ = 0;
      state_ = State::kOffsets;
      return true;
    }
    return unexpected("an array");
  }
  bool end_array() {
    if (skipper_.active()) return skip_close();
    if (state_ == State::kShape) {
      state_ = State::kTensor;
      return true;
    }
    if (state_ == State::kOffsets) {
      if (num_offsets_ != 2)
        return fail(fmt::format("data_offsets holds {} number(s), expected [begin, end]", num_offsets_));
      state_ = State::kTensor;
      return true;
    }
    return unexpected("']'");
  }
  bool parse_error(std::size_t position, std::string const&, json::exception const& e) {
    return fail(
        fmt::format("the header is not valid JSON (byte {} of the header): {}", position, printable(e.what(), 200)));
  }

  //! The first problem ("" when none) and the tensor it concerns ("" for the header as a whole).
  [[nodiscard]] std::string const& error() const noexcept { return error_; }
  [[nodiscard]] std::string const& error_tensor() const noexcept { return error_tensor_; }
  [[nodiscard]] bool done() const noexcept { return state_ == State::kDone; }

  std::vector<TensorInfo> tensors_;
  std::vector<std::pair<std::string, std::string>> metadata_;

 private:
  friend class SkippingSaxHandler<SafetensorsHeaderReader>;

  enum class State {
    kStart,           // before the top-level object
    kTop,             // in the top-level object, before a key
    kTensorValue,     // after a tensor's name, before its object
    kTensor,          // in a tensor's object, before a key
    kTensorField,     // after "dtype", "shape" or "data_offsets", before the value
    kShape,           // in the shape array
    kOffsets,         // in the data_offsets array
    kMetadataObject,  // after "__metadata__", before its object
    kMetadata,        // in __metadata__, before a key
    kMetadataValue,   // in __metadata__, after a key
    kDone,            // after the top-level object
  };
  enum class Field { kDtype, kShape, kOffsets, kOther };

  bool fail(std::string message) {
    if (error_.empty()) {
      error_ = std::move(message);
      if (!in_metadata_) error_tensor_ = current_.name;  // empty between tensors
    }
    return false;
  }
  [[nodiscard]] std::string_view field_name() const noexcept {
    return state_ == State::kShape ? "shape" : "data_offsets";
  }
  // What the schema expects where `what` arrived.
  bool unexpected(std::string_view what) {
    switch (state_) {
      case State::kStart: return fail(fmt::format("the header starts with {}, expected a JSON object", what));
      case State::kTensorValue:
        return fail(fmt::format("the value is {}, expected {{\"dtype\", \"shape\", \"data_offsets\"}}", what));
      case State::kTensorField:
        return fail(fmt::format("{} is {}, expected {}",
                                field_ == Field::kDtype   ? "dtype"
                                : field_ == Field::kShape ? "shape"
                                                          : "data_offsets",
                                what, field_ == Field::kDtype ? "a string" : "an array of integers"));
      case State::kShape:
      case State::kOffsets: return fail(fmt::format("{} holds {}, expected integers >= 0", field_name(), what));
      case State::kMetadataObject: return fail(fmt::format("\"__metadata__\" is {}, expected an object", what));
      case State::kMetadataValue:
        return fail(
            fmt::format("\"__metadata__\"[\"{}\"] is {}, expected a string", printable(metadata_key_, 60), what));
      case State::kDone: return fail(fmt::format("{} follows the header's object", what));
      default: return fail(fmt::format("unexpected {} in the header", what));
    }
  }

  State state_ = State::kStart;
  Field field_ = Field::kOther;
  TensorInfo current_;
  bool have_dtype_ = false;
  bool have_shape_ = false;
  int num_offsets_ = -1;  // -1: no data_offsets yet
  bool have_metadata_ = false;
  bool in_metadata_ = false;
  std::string metadata_key_;
  std::set<std::string, std::less<>> names_;
  std::string error_;
  std::string error_tensor_;
};

//! product(shape) x bits / 8, or an Error naming the tensor when it overflows or is not whole bytes.
inline std::uint64_t expected_tensor_bytes(TensorInfo const& t, std::string_view file) {
  std::uint64_t elements = 1;
  for (auto const d : t.shape) {
    auto const extent = static_cast<std::uint64_t>(d);
    if (extent != 0 && elements > (std::uint64_t{1} << 62) / extent)
      tensor_error(Errc::kInvalidArgument, file, t.name,
                   fmt::format("shape {} holds more than 2^62 elements", format_shape(t.shape)));
    elements *= extent;
  }
  std::uint64_t const bits = elements * bits_of(t.dtype);  // bits <= 64, elements <= 2^62: no overflow
  if (bits % 8 != 0)
    tensor_error(Errc::kInvalidArgument, file, t.name,
                 fmt::format("{} elements of {} ({} bits each) do not fill whole bytes", elements, to_string(t.dtype),
                             bits_of(t.dtype)));
  return bits / 8;
}

}  // namespace detail

//! Checks the 8-byte prefix of a `file_size`-byte file and returns N, the header's length.
//! @throws Error naming `file` when the file is shorter than 8 bytes, N exceeds the format's
//!         limit, or the header would end past the end of the file.
inline std::uint64_t safetensors_header_length(std::span<std::byte const> prefix, std::uint64_t file_size,
                                               std::string_view file) {
  if (prefix.size() < kSafetensorsPrefixBytes || file_size < kSafetensorsPrefixBytes)
    detail::file_error(Errc::kInvalidArgument, file,
                       fmt::format("{} bytes, expected at least the 8-byte header length of a safetensors file",
                                   std::min<std::uint64_t>(prefix.size(), file_size)));
  std::uint64_t n = 0;
  for (std::size_t i = 0; i < kSafetensorsPrefixBytes; ++i)
    n |= std::uint64_t{std::to_integer<std::uint8_t>(prefix[i])} << (8 * i);
  if (n > kMaxSafetensorsHeaderBytes)
    detail::file_error(Errc::kInvalidArgument, file,
                       fmt::format("header length = {} bytes, expected at most {} (the format's limit; is this a "
                                   "safetensors file?)",
                                   n, kMaxSafetensorsHeaderBytes));
  if (n > file_size - kSafetensorsPrefixBytes)
    detail::file_error(Errc::kInvalidArgument, file,
                       fmt::format("header length = {} bytes, but the file has only {} bytes after the 8-byte length "
                                   "(truncated?)",
                                   n, file_size - kSafetensorsPrefixBytes));
  return n;
}

//! @brief Parses and checks the JSON header (the N bytes after the length) of a safetensors file of
//! `file_size` bytes: the schema, each tensor's dtype, shape and byte count, and that the tensors
//! cover the data section exactly.
//! @throws Error(kInvalidArgument) naming `file`, and the tensor when the problem is one tensor's.
inline SafetensorsHeader parse_safetensors_header(std::string_view json_text, std::uint64_t file_size,
                                                  std::string_view file) {
  SafetensorsHeader header;
  header.json_bytes = json_text.size();
  if (file_size < kSafetensorsPrefixBytes + json_text.size())
    detail::file_error(Errc::kInvalidArgument, file,
                       fmt::format("{} bytes, too short for its {}-byte header", file_size, json_text.size()));
  header.data_bytes = file_size - kSafetensorsPrefixBytes - json_text.size();

  detail::SafetensorsHeaderReader reader;
  bool const parsed = nlohmann::json::sax_parse(json_text.data(), json_text.data() + json_text.size(), &reader);
  if (!parsed || !reader.done()) {
    std::string const message =
        reader.error().empty() ? std::string("the header is not a complete JSON object") : reader.error();
    if (reader.error_tensor().empty()) detail::file_error(Errc::kInvalidArgument, file, message);
    detail::tensor_error(Errc::kInvalidArgument, file, reader.error_tensor(), message);
  }
  header.tensors = std::move(reader.tensors_);
  header.metadata = std::move(reader.metadata_);

  for (auto const& t : header.tensors) {
    if (t.end < t.begin)
      detail::tensor_error(Errc::kInvalidArgument, file, t.name,
                           fmt::format("data_offsets = [{}, {}], expected begin <= end", t.begin, t.end));
    if (t.end > header.data_bytes)
      detail::tensor_error(Errc::kInvalidArgument, file, t.name,
                           fmt::format("data_offsets = [{}, {}] end past the data section ({} bytes after the "
                                       "header; truncated file?)",
                                       t.begin, t.end, header.data_bytes));
    std::uint64_t const bytes = detail::expected_tensor_bytes(t, file);
    if (bytes != t.num_bytes())
      detail::tensor_error(Errc::kInvalidArgument, file, t.name,
                           fmt::format("data_offsets = [{}, {}] hold {} bytes, expected {} for {} x {}", t.begin, t.end,
                                       t.num_bytes(), bytes, to_string(t.dtype), format_shape(t.shape)));
  }
  std::stable_sort(header.tensors.begin(), header.tensors.end(), [](TensorInfo const& a, TensorInfo const& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  std::uint64_t covered = 0;  // the data section is covered up to here
  for (std::size_t i = 0; i < header.tensors.size(); ++i) {
    auto const& t = header.tensors[i];
    if (t.begin < covered)
      detail::tensor_error(Errc::kInvalidArgument, file, t.name,
                           fmt::format("data_offsets = [{}, {}] overlap those of tensor '{}' (which end at {})",
                                       t.begin, t.end, detail::printable(header.tensors[i - 1].name), covered));
    if (t.begin > covered)
      detail::tensor_error(Errc::kInvalidArgument, file, t.name,
                           fmt::format("data_offsets = [{}, {}] leave bytes [{}, {}) of the data section to no "
                                       "tensor, expected the tensors to cover it without gaps",
                                       t.begin, t.end, covered, t.begin));
    covered = t.end;
  }
  if (covered != header.data_bytes)
    detail::file_error(Errc::kInvalidArgument, file,
                       fmt::format("the tensors cover {} bytes of the {}-byte data section, expected all of it (the "
                                   "file has {} bytes: extra bytes at its end?)",
                                   covered, header.data_bytes, file_size));
  for (std::size_t i = 0; i < header.tensors.size(); ++i) header.by_name.emplace(header.tensors[i].name, i);
  return header;
}

//! @brief Parses a whole safetensors file image, or its first bytes: the length, the header, and
//! the checks above against `file_size` (default: the image's size). Used by tests and the fuzzer.
inline SafetensorsHeader parse_safetensors(std::span<std::byte const> image, std::string_view file,
                                           std::uint64_t file_size = std::numeric_limits<std::uint64_t>::max()) {
  if (file_size == std::numeric_limits<std::uint64_t>::max()) file_size = image.size();
  std::uint64_t const n = safetensors_header_length(image, file_size, file);
  if (image.size() < kSafetensorsPrefixBytes + n)
    detail::file_error(Errc::kInvalidArgument, file,
                       fmt::format("{} bytes given, expected the whole {}-byte header", image.size(), n));
  std::string_view const text(reinterpret_cast<char const*>(image.data()) + kSafetensorsPrefixBytes,
                              static_cast<std::size_t>(n));
  return parse_safetensors_header(text, file_size, file);
}

}  // namespace epx::io
