// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// The checkpoint parsers of epx::io on arbitrary bytes: a safetensors file image (as given, or its
// JSON header with a length prefix made to fit, so that the fuzzer explores the header's grammar),
// an index file, a config.json. Invariants: any input is either an epx::Error or a result that
// holds what the parser promises (tensors ordered, covering the data section exactly, each of the
// size its dtype and shape say; shard names that are plain file names; a valid router and MLP).
// Input: byte 0 picks the parser, byte 1 the data section's size (made-to-fit mode), the rest is
// the text.

#include <epx/io.hpp>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string_view>
#include <vector>

#define EPX_FUZZ_CHECK(cond)                                                             \
  do {                                                                                   \
    if (!(cond)) {                                                                       \
      std::fprintf(stderr, "invariant failed: %s (%s:%d)\n", #cond, __FILE__, __LINE__); \
      std::abort();                                                                      \
    }                                                                                    \
  } while (0)

namespace {

void check_header(epx::io::SafetensorsHeader const& h, std::uint64_t file_size) {
  EPX_FUZZ_CHECK(h.data_start() + h.data_bytes == file_size);
  EPX_FUZZ_CHECK(h.json_bytes <= epx::io::kMaxSafetensorsHeaderBytes);
  std::uint64_t covered = 0;
  for (auto const& t : h.tensors) {
    EPX_FUZZ_CHECK(t.begin == covered);
    EPX_FUZZ_CHECK(t.end >= t.begin && t.end <= h.data_bytes);
    std::uint64_t elements = 1;
    for (auto d : t.shape) {
      EPX_FUZZ_CHECK(d >= 0);
      elements *= static_cast<std::uint64_t>(d);
    }
    EPX_FUZZ_CHECK(elements * epx::io::bits_of(t.dtype) == 8 * t.num_bytes());
    EPX_FUZZ_CHECK(h.find(t.name) == &t);
    covered = t.end;
  }
  EPX_FUZZ_CHECK(covered == h.data_bytes);
  EPX_FUZZ_CHECK(h.by_name.size() == h.tensors.size());
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(std::uint8_t const* data, std::size_t size) {
  if (size < 2) return 0;
  auto const mode = data[0] % 4;
  std::string_view const text(reinterpret_cast<char const*>(data + 2), size - 2);
  try {
    switch (mode) {
      case 0: {  // the bytes as a file image
        auto const image = std::span(reinterpret_cast<std::byte const*>(data + 1), size - 1);
        check_header(epx::io::parse_safetensors(image, "fuzz.safetensors"), image.size());
        break;
      }
      case 1: {  // the text as a header, with its length prefix and data[1] bytes of data
        std::vector<std::byte> image(8);
        for (int i = 0; i < 8; ++i)
          image[static_cast<std::size_t>(i)] = static_cast<std::byte>((std::uint64_t{text.size()} >> (8 * i)) & 0xffu);
        for (char c : text) image.push_back(static_cast<std::byte>(c));
        image.resize(image.size() + data[1], std::byte{0});
        check_header(epx::io::parse_safetensors(image, "fuzz.safetensors"), image.size());
        break;
      }
      case 2: {  // the text as model.safetensors.index.json
        auto const index = epx::io::parse_safetensors_index(text, "fuzz.index.json");
        for (auto const& name : index.shards) {
          EPX_FUZZ_CHECK(!name.empty() && name != "." && name != "..");
          EPX_FUZZ_CHECK(name.find('/') == std::string::npos && name.find('\\') == std::string::npos);
        }
        for (auto const& [tensor, shard] : index.shard_of)
          EPX_FUZZ_CHECK(shard >= 0 && static_cast<std::size_t>(shard) < index.shards.size());
        break;
      }
      default: {  // the text as a config.json, read with one of the built-in families
        auto const families = epx::io::builtin_families();
        auto const& family = families[data[1] % families.size()];
        auto const model = epx::io::parse_model_config(text, family, "fuzz.config.json");
        epx::detail::validate(model.router);  // what the parser returns is a valid configuration
        epx::detail::validate(model.mlp);
        EPX_FUZZ_CHECK(model.fp8_block[0] >= 1 && model.fp8_block[1] >= 1);
        break;
      }
    }
  } catch (epx::Error const&) {
    // A refused input: what the parsers must do with anything malformed.
  }
  return 0;
}
