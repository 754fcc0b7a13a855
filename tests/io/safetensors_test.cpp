// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// The safetensors header and index parsers: files the test writer makes parse back to what was
// written; every malformed header or index is an Error naming the file (and the tensor), never a
// crash or an out-of-range offset accepted.

#include "io_test_util.hpp"

#include <string>

using namespace epx;
using namespace epx::test::io;

namespace {

// A file image: the 8-byte length of `json`, `json`, then `data_bytes` bytes of data.
std::vector<std::byte> craft(std::string const& json, std::size_t data_bytes = 0) {
  std::vector<std::byte> out(8);
  for (int i = 0; i < 8; ++i)
    out[static_cast<std::size_t>(i)] = static_cast<std::byte>((std::uint64_t{json.size()} >> (8 * i)) & 0xffu);
  for (char c : json) out.push_back(static_cast<std::byte>(c));
  out.resize(out.size() + data_bytes, std::byte{0x5a});
  return out;
}

io::SafetensorsHeader parse(std::vector<std::byte> const& image) {
  return io::parse_safetensors(image, "t.safetensors");
}

void check_refused(std::string const& json, std::size_t data_bytes, std::string const& part,
                   std::string const& tensor = {}) {
  CAPTURE(json);
  check_error(Errc::kInvalidArgument, part, [&] { (void)parse(craft(json, data_bytes)); });
  check_error(Errc::kInvalidArgument, "checkpoint file t.safetensors", [&] { (void)parse(craft(json, data_bytes)); });
  if (!tensor.empty())
    check_error(Errc::kInvalidArgument, "tensor '" + tensor + "'", [&] { (void)parse(craft(json, data_bytes)); });
}

}  // namespace

TEST_CASE("safetensors: what the writer writes parses back, tensors ordered by offset") {
  EPX_TEST_SEEDED_RNG(rng);
  SafetensorsWriter w;
  std::vector<std::pair<std::string, std::vector<std::int64_t>>> const specs = {
      {"b.weight", {3, 5}}, {"a.scalar", {}}, {"c.empty", {0, 7}}, {"d.vec", {9}}, {"e.cube", {2, 3, 4}}};
  std::vector<std::string> const dtypes = {"BF16", "F32", "F16", "U8", "F8_E4M3"};
  std::uniform_int_distribution<int> byte(0, 255);
  for (std::size_t i = 0; i < specs.size(); ++i) {
    std::int64_t n = 1;
    for (auto d : specs[i].second) n *= d;
    auto const size = static_cast<std::size_t>(n) * (dtypes[i] == "F32"                            ? 4
                                                     : dtypes[i] == "U8" || dtypes[i] == "F8_E4M3" ? 1
                                                                                                   : 2);
    std::vector<std::byte> bytes(size);
    for (auto& b : bytes) b = static_cast<std::byte>(byte(rng));
    w.add({specs[i].first, dtypes[i], specs[i].second, bytes});
  }
  auto const image = SafetensorsWriter::image(w.shard(0));
  auto const header = parse(image);
  REQUIRE(header.tensors.size() == specs.size());
  CHECK(header.json_bytes % 8 == 0);
  CHECK(header.data_start() + header.data_bytes == image.size());
  REQUIRE(header.metadata.size() == 1);
  CHECK(header.metadata[0] == std::pair<std::string, std::string>("format", "pt"));
  std::uint64_t previous_end = 0;
  for (auto const& t : header.tensors) {
    CHECK(t.begin == previous_end);  // ordered and contiguous
    previous_end = t.end;
  }
  for (std::size_t i = 0; i < specs.size(); ++i) {
    CAPTURE(specs[i].first);
    auto const* t = header.find(specs[i].first);
    REQUIRE(t != nullptr);
    CHECK(io::to_string(t->dtype) == dtypes[i]);
    CHECK(t->shape == specs[i].second);
    auto const& written = w.tensors()[i].bytes;
    REQUIRE(t->num_bytes() == written.size());
    CHECK(std::equal(written.begin(), written.end(),
                     image.begin() + static_cast<std::ptrdiff_t>(header.data_start() + t->begin)));
  }
  CHECK(header.find("nope") == nullptr);
}

TEST_CASE("safetensors: the 8-byte length is checked against the format's limit and the file") {
  check_error(Errc::kInvalidArgument, "at least the 8-byte header length",
              [&] { (void)parse(std::vector<std::byte>(5)); });
  auto image = craft("{}");
  image[5] = std::byte{1};  // N = 2^40
  check_error(Errc::kInvalidArgument, "expected at most 100000000", [&] { (void)parse(image); });
  image = craft("{}");
  image[0] = std::byte{100};  // N = 100 > the file
  check_error(Errc::kInvalidArgument, "truncated", [&] { (void)parse(image); });
  // The bytes given must hold the header even when the file is said to be larger.
  auto const whole = craft("{}");
  check_error(Errc::kInvalidArgument, "expected the whole",
              [&] { (void)io::parse_safetensors(std::span(whole).first(9), "t", 1000); });
  CHECK(parse(craft("{}")).tensors.empty());      // an empty checkpoint is valid
  CHECK(parse(craft("  {}  ")).tensors.empty());  // JSON whitespace, as writers pad
}

TEST_CASE("safetensors: malformed and hostile headers are refused, naming the tensor") {
  std::string const ok = R"("dtype":"U8","shape":[2],"data_offsets":[0,2])";
  check_refused("{", 0, "not valid JSON");
  check_refused("", 0, "not valid JSON");
  check_refused("[]", 0, "expected a JSON object");
  check_refused("{} x", 0, "not valid JSON");
  check_refused("{}{}", 0, "not valid JSON");
  check_refused("{\"a\": 5}", 0, "expected {\"dtype\", \"shape\", \"data_offsets\"}", "a");
  check_refused("{\"a\": {\"shape\":[2],\"data_offsets\":[0,2]}}", 2, "no \"dtype\"", "a");
  check_refused("{\"a\": {\"dtype\":\"U8\",\"data_offsets\":[0,2]}}", 2, "no \"shape\"", "a");
  check_refused("{\"a\": {\"dtype\":\"U8\",\"shape\":[2]}}", 2, "no \"data_offsets\"", "a");
  check_refused("{\"a\": {\"dtype\":\"F128\",\"shape\":[2],\"data_offsets\":[0,2]}}", 2, "dtype = \"F128\"", "a");
  check_refused("{\"a\": {\"dtype\":5,\"shape\":[2],\"data_offsets\":[0,2]}}", 2, "dtype is the number 5", "a");
  check_refused("{\"a\": {\"dtype\":\"U8\",\"shape\":[-2],\"data_offsets\":[0,2]}}", 2, "integers >= 0", "a");
  check_refused("{\"a\": {\"dtype\":\"U8\",\"shape\":[1.5],\"data_offsets\":[0,2]}}", 2, "no fraction", "a");
  check_refused("{\"a\": {\"dtype\":\"U8\",\"shape\":[1e30],\"data_offsets\":[0,2]}}", 2, "no fraction", "a");
  check_refused("{\"a\": {\"dtype\":\"U8\",\"shape\":[[2]],\"data_offsets\":[0,2]}}", 2, "shape holds an array", "a");
  check_refused("{\"a\": {\"dtype\":\"U8\",\"shape\":\"2\",\"data_offsets\":[0,2]}}", 2, "shape is the string", "a");
  check_refused("{\"a\": {\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[0,2,4]}}", 4, "more than two", "a");
  check_refused("{\"a\": {\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[2]}}", 2, "holds 1 number", "a");
  check_refused("{\"a\": {\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[0,-2]}}", 2, "integers >= 0", "a");
  check_refused("{\"a\": {\"dtype\":\"U8\",\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[0,2]}}", 2, "appears twice",
                "a");
  check_refused("{\"a\": {" + ok + "}, \"a\": {" + ok + "}}", 2, "appears twice", "a");
  check_refused("{\"__metadata__\": {\"k\": 1}}", 0, "expected a string");
  check_refused("{\"__metadata__\": [1]}", 0, "expected an object");
  check_refused("{\"__metadata__\": {}, \"__metadata__\": {}}", 0, "appears twice");
  check_refused("{\"a\": {" + ok + ", \"x\": " + std::string(70, '[') + std::string(70, ']') + "}}", 2,
                "deeper than 64", "a");
  check_refused("{\"a\": {\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[0,2]}, \"b\": {\"dtype\"", 2,
                "not valid JSON", "b");
  // Not UTF-8: refused by the JSON parser.
  check_refused("{\"a\xff\": {" + ok + "}}", 2, "not valid JSON");
  // Keys the format does not define inside a tensor are skipped, whatever they hold.
  auto const header = parse(craft("{\"a\": {" + ok + ", \"extra\": {\"k\": [1, {\"z\": null}], \"t\": true}}}", 2));
  REQUIRE(header.tensors.size() == 1);
  CHECK(header.tensors[0].shape == std::vector<std::int64_t>{2});
}

TEST_CASE("safetensors: offsets must cover the data section exactly") {
  auto tensor = [](std::string const& name, std::string const& dtype, std::string const& shape, std::uint64_t b,
                   std::uint64_t e) {
    return fmt::format("\"{}\": {{\"dtype\":\"{}\",\"shape\":{},\"data_offsets\":[{},{}]}}", name, dtype, shape, b, e);
  };
  check_refused("{" + tensor("a", "U8", "[4]", 4, 0) + "}", 4, "begin <= end", "a");
  check_refused("{" + tensor("a", "U8", "[4]", 0, 4) + "}", 3, "end past the data section", "a");  // truncated
  check_refused("{" + tensor("a", "U8", "[4]", 0, 1ull << 62) + "}", 4, "end past the data section", "a");
  check_refused("{" + tensor("a", "F32", "[4]", 0, 8) + "}", 8, "expected 16", "a");
  check_refused("{" + tensor("a", "U8", "[4]", 0, 4) + "," + tensor("b", "U8", "[4]", 2, 6) + "}", 6, "overlap", "b");
  check_refused("{" + tensor("a", "U8", "[4]", 0, 4) + "," + tensor("b", "U8", "[4]", 0, 4) + "}", 4, "overlap", "b");
  check_refused("{" + tensor("a", "U8", "[4]", 0, 4) + "," + tensor("b", "U8", "[4]", 6, 10) + "}", 10,
                "leave bytes [4, 6)", "b");
  check_refused("{" + tensor("a", "U8", "[4]", 2, 6) + "}", 6, "leave bytes [0, 2)", "a");
  check_refused("{" + tensor("a", "U8", "[4]", 0, 4) + "}", 5, "extra bytes");
  check_refused("{" + tensor("a", "F4", "[3]", 0, 2) + "}", 2, "whole bytes", "a");
  check_refused("{" + tensor("a", "U8", "[1099511627776,1099511627776]", 0, 4) + "}", 4, "2^62", "a");
  // Zero-sized tensors take no bytes, anywhere among the others.
  auto const header = parse(craft("{" + tensor("a", "U8", "[4]", 0, 4) + "," + tensor("z", "BF16", "[0, 3]", 4, 4) +
                                      "," + tensor("s", "F16", "[]", 4, 6) + "}",
                                  6));
  CHECK(header.tensors.size() == 3);
  CHECK(header.find("z")->num_bytes() == 0);
  CHECK(header.find("s")->shape.empty());
}

TEST_CASE("safetensors: messages print names from the file escaped and shortened") {
  std::string const name = "ctl\\u0001" + std::string(500, 'x');
  try {
    (void)parse(craft("{\"" + name + "\": 5}"));
    FAIL("no Error");
  } catch (Error const& e) {
    std::string const what = e.what();
    CHECK(what.find("ctl\\x01xxx") != std::string::npos);
    CHECK(what.find(std::string(200, 'x')) == std::string::npos);
    CHECK(what.find('\x01') == std::string::npos);
  }
}

TEST_CASE("safetensors index: the weight map, checked") {
  auto const index = io::parse_safetensors_index(
      R"({"metadata": {"total_size": 10, "nested": [1, {"a": null}]}, "weight_map": {"a": "s1.safetensors",
          "b": "s2.safetensors", "c": "s1.safetensors"}, "other": 3})",
      "idx.json");
  REQUIRE(index.shards == std::vector<std::string>{"s1.safetensors", "s2.safetensors"});
  CHECK(index.shard_of.at("a") == 0);
  CHECK(index.shard_of.at("b") == 1);
  CHECK(index.shard_of.at("c") == 0);

  auto refused = [](std::string const& text, std::string const& part) {
    CAPTURE(text);
    check_error(Errc::kInvalidArgument, part, [&] { (void)io::parse_safetensors_index(text, "idx.json"); });
    check_error(Errc::kInvalidArgument, "checkpoint file idx.json",
                [&] { (void)io::parse_safetensors_index(text, "idx.json"); });
  };
  refused("", "not valid JSON");
  refused("[]", "expected a JSON object");
  refused(R"({"metadata": {}})", "no \"weight_map\"");
  refused(R"({"weight_map": []})", "\"weight_map\" is an array");
  refused(R"({"weight_map": {"a": 5}})", "weight_map[\"a\"] is a number");
  refused(R"({"weight_map": {"a": "x", "a": "y"}})", "names tensor \"a\" twice");
  refused(R"({"weight_map": {}, "weight_map": {}})", "appears twice");
  refused(R"({"weight_map": {"a": "../../etc/passwd"}})", "no path separators");
  refused(R"({"weight_map": {"a": "/abs.safetensors"}})", "no path separators");
  refused(R"({"weight_map": {"a": ".."}})", "a shard file name");
  refused(R"({"weight_map": {"a": ""}})", "a shard file name");
  refused(R"({"weight_map": {"a": "x\u0000y"}})", "no path separators");
  refused(R"({"m": )" + std::string(80, '[') + std::string(80, ']') + "}", "deeper than 64");
  refused(R"({"weight_map": {"a": "x"}} trailing)", "not valid JSON");
}
