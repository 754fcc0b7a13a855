// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

// Shared by the epx::io tests: a safetensors writer written from the format's description (not
// with the library's parser), temporary folders, plain reference decoders of FP8 E4M3, E2M1 and
// E8M0 (from the formats' definitions, with ldexp), and builders of small checkpoints of every
// family, each with the weights it must load to in epx's layout, derived here from the stored
// tensors by each family's documented layout (independently of epx::io::ModelFamily).

#include "../common/test_util.hpp"

#include <epx/io.hpp>

#include <fmt/format.h>

#include <cmath>
#include <concepts>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

namespace epx::test::io {

namespace fs = std::filesystem;

//! A folder under the system's temp directory, removed with everything in it on destruction.
class TempDir {
 public:
  TempDir() {
    std::string tmpl = (fs::temp_directory_path() / "epx-io-test-XXXXXX").string();
    char* made = ::mkdtemp(tmpl.data());
    REQUIRE(made != nullptr);
    path_ = made;
  }
  TempDir(TempDir const&) = delete;
  TempDir& operator=(TempDir const&) = delete;
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  [[nodiscard]] fs::path const& path() const noexcept { return path_; }

 private:
  fs::path path_;
};

inline void write_bytes(fs::path const& path, std::vector<std::byte> const& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<char const*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  REQUIRE(out.good());
}
inline void write_text(fs::path const& path, std::string const& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
  REQUIRE(out.good());
}

template <class T>
std::vector<std::byte> to_bytes(std::vector<T> const& values) {
  std::vector<std::byte> bytes(values.size() * sizeof(T));
  if (!bytes.empty()) std::memcpy(bytes.data(), values.data(), bytes.size());
  return bytes;
}

//! Which experts a tensor belongs to, for counting what a rank must read.
enum class Owner { kAlways, kExpert, kStacked, kNever };

struct StoredTensor {
  std::string name;
  std::string dtype;  // as the header spells it
  std::vector<std::int64_t> shape;
  std::vector<std::byte> bytes;
  Owner owner = Owner::kNever;
  std::int32_t expert = -1;  // kExpert
  std::int32_t shard = 0;
};

//! Writes safetensors files as the format describes them: 8-byte little-endian header length, a
//! JSON header padded with spaces to a multiple of 8, then the tensors' bytes in the order added.
class SafetensorsWriter {
 public:
  void add(StoredTensor t) { tensors_.push_back(std::move(t)); }
  [[nodiscard]] std::vector<StoredTensor> const& tensors() const noexcept { return tensors_; }
  [[nodiscard]] std::vector<StoredTensor>& tensors() noexcept { return tensors_; }

  //! The JSON header of `tensors` (padded).
  static std::string header_json(std::vector<StoredTensor const*> const& tensors) {
    std::string json = "{\"__metadata__\":{\"format\":\"pt\"}";
    std::uint64_t offset = 0;
    for (auto const* t : tensors) {
      std::string shape;
      for (std::size_t i = 0; i < t->shape.size(); ++i) shape += fmt::format("{}{}", i ? "," : "", t->shape[i]);
      json += fmt::format(",\"{}\":{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{},{}]}}", t->name, t->dtype,
                          shape, offset, offset + t->bytes.size());
      offset += t->bytes.size();
    }
    json += "}";
    while (json.size() % 8 != 0) json += ' ';
    return json;
  }
  //! A whole file image of `tensors`.
  static std::vector<std::byte> image(std::vector<StoredTensor const*> const& tensors) {
    std::string const json = header_json(tensors);
    std::vector<std::byte> out(8);
    std::uint64_t const n = json.size();
    for (int i = 0; i < 8; ++i) out[static_cast<std::size_t>(i)] = static_cast<std::byte>((n >> (8 * i)) & 0xffu);
    for (char c : json) out.push_back(static_cast<std::byte>(c));
    for (auto const* t : tensors) out.insert(out.end(), t->bytes.begin(), t->bytes.end());
    return out;
  }
  //! Shard `s`'s tensors.
  [[nodiscard]] std::vector<StoredTensor const*> shard(std::int32_t s) const {
    std::vector<StoredTensor const*> out;
    for (auto const& t : tensors_)
      if (t.shard == s) out.push_back(&t);
    return out;
  }
  [[nodiscard]] std::int32_t num_shards() const {
    std::int32_t n = 1;
    for (auto const& t : tensors_) n = std::max(n, t.shard + 1);
    return n;
  }
  static std::string shard_name(std::int32_t s, std::int32_t n) {
    return fmt::format("model-{:05d}-of-{:05d}.safetensors", s + 1, n);
  }
  //! Bytes of shard `s`'s length and header.
  [[nodiscard]] std::uint64_t header_bytes(std::int32_t s) const { return 8 + header_json(shard(s)).size(); }

  //! Writes every tensor into `dir`/model.safetensors.
  void write_single(fs::path const& dir) const {
    std::vector<StoredTensor const*> all;
    for (auto const& t : tensors_) all.push_back(&t);
    write_bytes(dir / "model.safetensors", image(all));
  }
  //! Writes the shards and `dir`/model.safetensors.index.json; returns the index's text.
  std::string write_sharded(fs::path const& dir) const {
    std::int32_t const n = num_shards();
    std::string weight_map;
    std::uint64_t total = 0;
    for (std::int32_t s = 0; s < n; ++s) {
      write_bytes(dir / shard_name(s, n), image(shard(s)));
      for (auto const* t : shard(s)) {
        weight_map += fmt::format("{}\"{}\":\"{}\"", weight_map.empty() ? "" : ",", t->name, shard_name(s, n));
        total += t->bytes.size();
      }
    }
    std::string const index =
        fmt::format("{{\"metadata\":{{\"total_size\":{}}},\"weight_map\":{{{}}}}}", total, weight_map);
    write_text(dir / "model.safetensors.index.json", index);
    return index;
  }

 private:
  std::vector<StoredTensor> tensors_;
};

//! Runs `f`, which must throw epx::Error with `code` and a message containing every one of `parts`;
//! a failure prints the message.
template <class F>
void check_error(Errc code, std::vector<std::string> const& parts, F&& f) {
  std::string message;
  bool thrown = false;
  try {
    f();
  } catch (Error const& e) {
    thrown = true;
    message = e.what();
    CHECK_MESSAGE(e.code() == code, message);
  }
  REQUIRE_MESSAGE(thrown, "no epx::Error thrown");
  for (auto const& part : parts)
    CHECK_MESSAGE(message.find(part) != std::string::npos, "missing '" << part << "' in: " << message);
}

template <class S, class F>
requires std::convertible_to<S const&, std::string_view>  // a braced list of parts goes to the other overload
void check_error(Errc code, S const& part, F&& f) {
  check_error(code, std::vector<std::string>{std::string(std::string_view(part))}, std::forward<F>(f));
}

// ---- Reference decoders, from the formats' definitions --------------------------------------

//! FP8 E4M3 (OCP, "fn": no infinities): (-1)^s x 2^(e - 7) x (1 + m/8), subnormal 2^-6 x m/8,
//! S.1111.111 NaN.
inline double ref_e4m3(std::uint8_t b) {
  int const s = b >> 7, e = (b >> 3) & 0xf, m = b & 0x7;
  if (e == 15 && m == 7) return std::nan("");
  double const mag = e == 0 ? std::ldexp(m / 8.0, -6) : std::ldexp(1.0 + m / 8.0, e - 7);
  return s ? -mag : mag;
}
//! E2M1 (OCP MX): (-1)^s x 2^(e - 1) x (1 + m/2), subnormal (e = 0) 2^0 x m/2.
inline double ref_e2m1(std::uint8_t code) {
  int const s = (code >> 3) & 1, e = (code >> 1) & 3, m = code & 1;
  double const mag = e == 0 ? m / 2.0 : std::ldexp(1.0 + m / 2.0, e - 1);
  return s ? -mag : mag;
}
//! E8M0 (OCP MX): 2^(b - 127), 0xFF NaN.
inline double ref_e8m0(std::uint8_t b) { return b == 0xff ? std::nan("") : std::ldexp(1.0, b - 127); }

//! T's bits (for exact comparison, NaN included).
template <class T>
std::uint32_t bits_of(T v) {
  if constexpr (std::is_same_v<T, float>)
    return std::bit_cast<std::uint32_t>(v);
  else
    return v.bits;
}

//! The T a loaded fp32 value must be: rounded to nearest even (float: itself).
template <class T>
T round_value(float v) {
  if constexpr (std::is_same_v<T, float>)
    return v;
  else
    return T(v);
}

// ---- Small checkpoints of every family ------------------------------------------------------

//! How the experts' weights are stored.
enum class Encoding { kBF16, kF16, kF32, kFp8, kMxfp4 };

inline std::string_view to_string(Encoding e) {
  switch (e) {
    case Encoding::kBF16: return "BF16";
    case Encoding::kF16: return "F16";
    case Encoding::kF32: return "F32";
    case Encoding::kFp8: return "FP8";
    case Encoding::kMxfp4: return "MXFP4";
  }
  return "?";
}

struct CaseShape {
  std::int32_t num_experts = 6;
  std::int32_t hidden = 64;
  std::int32_t intermediate = 32;
  std::int32_t top_k = 2;
  std::int32_t layer = 1;            // the MoE layer the tests load
  std::int32_t num_layers = 3;       // layers written (the others must not be read)
  std::int32_t fp8_block_rows = 24;  // partial edge blocks in both dimensions
  std::int32_t fp8_block_cols = 40;
  std::int32_t num_shards = 3;
};

//! A built checkpoint: its tensors, config.json, and what loading must produce (fp32 values in
//! epx's layout; the loaded T is T(value), bit for bit).
struct BuiltModel {
  std::string family;  // the built-in family's name
  Encoding encoding = Encoding::kBF16;
  CaseShape shape = {};
  SafetensorsWriter writer = {};
  std::string config_json = {};
  GateUpLayout gate_up_layout = GateUpLayout::kConcatenated;
  Activation activation = Activation::kSwiGLU;
  std::vector<float> gate_up = {};          // [E, 2I, H]
  std::vector<float> down = {};             // [E, H, I]
  std::vector<float> gate_up_bias = {};     // [E, 2I] or empty
  std::vector<float> down_bias = {};        // [E, H] or empty
  std::vector<float> router_weight = {};    // [E, H]
  std::vector<float> router_bias = {};      // [E] or empty
  std::vector<float> correction_bias = {};  // [E] or empty

  //! Bytes of tensor data a load of experts [first, first + count) of `shape.layer` must read.
  [[nodiscard]] std::uint64_t expected_data_bytes(std::int32_t first, std::int32_t count) const {
    std::uint64_t total = 0;
    for (auto const& t : writer.tensors()) {
      if (t.owner == Owner::kAlways) total += t.bytes.size();
      if (t.owner == Owner::kExpert && t.expert >= first && t.expert < first + count) total += t.bytes.size();
      if (t.owner == Owner::kStacked)
        total += t.bytes.size() / static_cast<std::size_t>(shape.num_experts) * static_cast<std::size_t>(count);
    }
    return total;
  }
  //! The shards a load of those experts must open.
  [[nodiscard]] std::set<std::int32_t> expected_shards(std::int32_t first, std::int32_t count) const {
    std::set<std::int32_t> out;
    for (auto const& t : writer.tensors())
      if (t.owner == Owner::kAlways || (t.owner == Owner::kStacked && count > 0) ||
          (t.owner == Owner::kExpert && t.expert >= first && t.expert < first + count))
        out.insert(t.shard);
    return out;
  }
};

namespace detail {

inline float random_normal(std::mt19937_64& rng, float scale) {
  return std::normal_distribution<float>(0.0f, scale)(rng);
}

//! A plain tensor of `n` random values with scale `scale` in `enc`'s element type: its bytes and
//! the fp32 values it holds (exact).
inline std::pair<std::vector<std::byte>, std::vector<float>> plain_values(Encoding enc, std::size_t n, float scale,
                                                                          std::mt19937_64& rng) {
  std::vector<float> values(n);
  std::vector<std::byte> bytes;
  if (enc == Encoding::kF32) {
    for (auto& v : values) v = random_normal(rng, scale);
    bytes = to_bytes(values);
  } else if (enc == Encoding::kF16) {
    std::vector<half> h(n);
    for (std::size_t i = 0; i < n; ++i) {
      h[i] = half(random_normal(rng, scale));
      values[i] = static_cast<float>(h[i]);
    }
    bytes = to_bytes(h);
  } else {  // BF16 (also the plain parts of FP8 and MXFP4 checkpoints)
    std::vector<bfloat16> b(n);
    for (std::size_t i = 0; i < n; ++i) {
      b[i] = bfloat16(random_normal(rng, scale));
      values[i] = static_cast<float>(b[i]);
    }
    bytes = to_bytes(b);
  }
  return {bytes, values};
}

inline std::string plain_dtype(Encoding enc) {
  return enc == Encoding::kF32 ? "F32" : enc == Encoding::kF16 ? "F16" : "BF16";
}

//! A stored matrix [rows, cols] of one expert, in `enc`: appended to `w` under `name` (FP8: with
//! `name_scale_inv`), returning the fp32 values it dequantises to, row-major [rows, cols].
inline std::vector<float> add_matrix(SafetensorsWriter& w, std::string const& name, Encoding enc, std::int64_t rows,
                                     std::int64_t cols, CaseShape const& s, Owner owner, std::int32_t expert,
                                     std::int32_t shard, std::mt19937_64& rng) {
  float const scale = 1.0f / std::sqrt(static_cast<float>(cols));
  if (enc != Encoding::kFp8) {
    auto [bytes, values] = plain_values(enc, static_cast<std::size_t>(rows * cols), scale, rng);
    w.add({name, plain_dtype(enc), {rows, cols}, std::move(bytes), owner, expert, shard});
    return values;
  }
  // FP8 E4M3 codes (no NaN) and fp32 block scales of ~ scale / 16.
  std::int64_t const br = (rows + s.fp8_block_rows - 1) / s.fp8_block_rows,
                     bc = (cols + s.fp8_block_cols - 1) / s.fp8_block_cols;
  std::vector<std::uint8_t> codes(static_cast<std::size_t>(rows * cols));
  std::uniform_int_distribution<int> code(0, 255);
  for (auto& c : codes) {
    do c = static_cast<std::uint8_t>(code(rng));
    while ((c & 0x7f) == 0x7f);
  }
  std::vector<float> scales(static_cast<std::size_t>(br * bc));
  std::uniform_real_distribution<float> u(0.5f, 1.5f);
  for (auto& v : scales) v = scale / 16.0f * u(rng);
  std::vector<float> values(codes.size());
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t c = 0; c < cols; ++c) {
      auto const i = static_cast<std::size_t>(r * cols + c);
      double const exact = ref_e4m3(codes[i]) *
                           double(scales[static_cast<std::size_t>((r / s.fp8_block_rows) * bc + c / s.fp8_block_cols)]);
      values[i] = static_cast<float>(exact);  // the product is exact in double: one rounding to fp32
    }
  w.add({name, "F8_E4M3", {rows, cols}, to_bytes(codes), owner, expert, shard});
  w.add({name + "_scale_inv", "F32", {br, bc}, to_bytes(scales), owner, expert, shard});
  return values;
}

//! A stacked MXFP4 projection [E, rows, cols] (cols % 32 == 0): `name`_blocks and `name`_scales,
//! returning the values [E, rows, cols].
inline std::vector<float> add_mxfp4(SafetensorsWriter& w, std::string const& name, std::int64_t experts,
                                    std::int64_t rows, std::int64_t cols, std::int32_t shard, std::mt19937_64& rng) {
  std::int64_t const nb = cols / 32;
  std::vector<std::uint8_t> blocks(static_cast<std::size_t>(experts * rows * nb * 16)),
      scales(static_cast<std::size_t>(experts * rows * nb));
  std::uniform_int_distribution<int> byte(0, 255), exponent(118, 125);
  for (auto& b : blocks) b = static_cast<std::uint8_t>(byte(rng));
  for (auto& s : scales) s = static_cast<std::uint8_t>(exponent(rng));
  std::vector<float> values(static_cast<std::size_t>(experts * rows * cols));
  for (std::int64_t r = 0; r < experts * rows; ++r)
    for (std::int64_t c = 0; c < cols; ++c) {
      std::uint8_t const packed = blocks[static_cast<std::size_t>(r * nb * 16 + c / 2)];
      std::uint8_t const code = c % 2 == 0 ? (packed & 0xf) : (packed >> 4);
      values[static_cast<std::size_t>(r * cols + c)] =
          static_cast<float>(ref_e2m1(code) * ref_e8m0(scales[static_cast<std::size_t>(r * nb + c / 32)]));
    }
  w.add({name + "_blocks", "U8", {experts, rows, nb, 16}, to_bytes(blocks), Owner::kStacked, -1, shard});
  w.add({name + "_scales", "U8", {experts, rows, nb}, to_bytes(scales), Owner::kStacked, -1, shard});
  return values;
}

//! A vector [n] (or stacked [E, n]) of plain values.
inline std::vector<float> add_vector(SafetensorsWriter& w, std::string const& name, Encoding enc,
                                     std::vector<std::int64_t> shape, Owner owner, std::int32_t expert,
                                     std::int32_t shard, std::mt19937_64& rng, float scale = 0.1f) {
  std::int64_t n = 1;
  for (auto d : shape) n *= d;
  auto [bytes, values] = plain_values(enc, static_cast<std::size_t>(n), scale, rng);
  w.add({name, plain_dtype(enc), std::move(shape), std::move(bytes), owner, expert, shard});
  return values;
}

//! Unrelated tensors every checkpoint has, never read by an expert load.
inline void add_unrelated(SafetensorsWriter& w, CaseShape const& s, std::mt19937_64& rng) {
  add_vector(w, "model.embed_tokens.weight", Encoding::kBF16, {16, s.hidden}, Owner::kNever, -1, 0, rng);
  for (std::int32_t l = 0; l < s.num_layers; ++l)
    add_vector(w, fmt::format("model.layers.{}.input_layernorm.weight", l), Encoding::kBF16, {s.hidden}, Owner::kNever,
               -1, l % s.num_shards, rng);
}

}  // namespace detail

//! A checkpoint of `family` ("qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3", "gpt_oss", or a
//! built-in name + "_stacked") with experts stored in `enc`.
inline BuiltModel build_model(std::string const& family, Encoding enc, CaseShape const& s, std::mt19937_64& rng) {
  using detail::add_matrix;
  using detail::add_vector;
  BuiltModel m{.family = family, .encoding = enc, .shape = s};
  std::int64_t const e = s.num_experts, h = s.hidden, in = s.intermediate;
  auto& w = m.writer;
  detail::add_unrelated(w, s, rng);
  m.gate_up.assign(static_cast<std::size_t>(e * 2 * in * h), 0.0f);
  m.down.assign(static_cast<std::size_t>(e * h * in), 0.0f);
  bool const stacked = family.ends_with("_stacked");
  std::string const base = stacked ? family.substr(0, family.size() - 8) : family;
  Encoding const router_enc = enc == Encoding::kF32 || enc == Encoding::kF16 ? enc : Encoding::kBF16;

  if (base == "gpt_oss") {
    m.gate_up_layout = GateUpLayout::kInterleaved;
    m.activation = Activation::kClampedSwiGLU;
    for (std::int32_t l = 0; l < s.num_layers; ++l) {  // every layer's tensors; only s.layer's are read
      bool const mine = l == s.layer;
      std::string const q = fmt::format("model.layers.{}.mlp.", l);
      std::int32_t const shard = l % s.num_shards;
      if (enc == Encoding::kMxfp4) {
        // MXFP4: [E, 2I, H/32, 16] and [E, H, I/32, 16]: rows are output features (K-major).
        auto gu = detail::add_mxfp4(w, q + "experts.gate_up_proj", e, 2 * in, h, shard, rng);
        auto dn = detail::add_mxfp4(w, q + "experts.down_proj", e, h, in, (shard + 1) % s.num_shards, rng);
        if (mine) {
          m.gate_up = gu;
          m.down = dn;
        } else {
          for (auto& t : w.tensors())
            if (t.name.starts_with(q)) t.owner = Owner::kNever;
        }
      } else {
        // bf16 form: gate_up_proj [E, H, 2I] and down_proj [E, I, H]: x · W, transposed.
        auto [gu_bytes, gu] =
            detail::plain_values(enc, static_cast<std::size_t>(e * h * 2 * in), 1.0f / std::sqrt(float(h)), rng);
        w.add({q + "experts.gate_up_proj",
               detail::plain_dtype(enc),
               {e, h, 2 * in},
               std::move(gu_bytes),
               mine ? Owner::kStacked : Owner::kNever,
               -1,
               shard});
        auto [dn_bytes, dn] =
            detail::plain_values(enc, static_cast<std::size_t>(e * in * h), 1.0f / std::sqrt(float(in)), rng);
        w.add({q + "experts.down_proj",
               detail::plain_dtype(enc),
               {e, in, h},
               std::move(dn_bytes),
               mine ? Owner::kStacked : Owner::kNever,
               -1,
               (shard + 1) % s.num_shards});
        if (mine)
          for (std::int64_t x = 0; x < e; ++x) {
            for (std::int64_t r = 0; r < 2 * in; ++r)  // epx row r (interleaved gate/up) = stored column r
              for (std::int64_t c = 0; c < h; ++c)
                m.gate_up[static_cast<std::size_t>((x * 2 * in + r) * h + c)] =
                    gu[static_cast<std::size_t>((x * h + c) * 2 * in + r)];
            for (std::int64_t r = 0; r < h; ++r)
              for (std::int64_t c = 0; c < in; ++c)
                m.down[static_cast<std::size_t>((x * h + r) * in + c)] =
                    dn[static_cast<std::size_t>((x * in + c) * h + r)];
          }
      }
      Encoding const bias_enc = enc == Encoding::kMxfp4 ? Encoding::kBF16 : enc;
      auto gub = add_vector(w, q + "experts.gate_up_proj_bias", bias_enc, {e, 2 * in},
                            mine ? Owner::kStacked : Owner::kNever, -1, shard, rng);
      auto dnb = add_vector(w, q + "experts.down_proj_bias", bias_enc, {e, h}, mine ? Owner::kStacked : Owner::kNever,
                            -1, shard, rng);
      auto rw = add_vector(w, q + "router.weight", router_enc, {e, h}, mine ? Owner::kAlways : Owner::kNever, -1,
                           (shard + 2) % s.num_shards, rng, 1.0f / std::sqrt(float(h)));
      auto rb =
          add_vector(w, q + "router.bias", router_enc, {e}, mine ? Owner::kAlways : Owner::kNever, -1, shard, rng);
      if (mine) {
        m.gate_up_bias = gub;
        m.down_bias = dnb;
        m.router_weight = rw;
        m.router_bias = rb;
      }
    }
    m.config_json = fmt::format(R"({{"model_type": "gpt_oss", "num_local_experts": {}, "num_experts_per_tok": {},
      "hidden_size": {}, "intermediate_size": {}, "num_hidden_layers": {}, "swiglu_limit": 7.0{}}})",
                                e, s.top_k, h, in, s.num_layers,
                                enc == Encoding::kMxfp4 ? R"(, "quantization_config": {"quant_method": "mxfp4"})" : "");
    return m;
  }

  // Per-expert families and transformers 5's stacked form of them.
  std::string const experts_prefix = base == "mixtral" && !stacked ? "block_sparse_moe.experts." : "mlp.experts.";
  std::string const gate_name = base == "mixtral" ? "w1" : "gate_proj", up_name = base == "mixtral" ? "w3" : "up_proj",
                    down_name = base == "mixtral" ? "w2" : "down_proj";
  std::string const router = base == "mixtral" && !stacked ? "block_sparse_moe.gate" : "mlp.gate";
  for (std::int32_t l = 0; l < s.num_layers; ++l) {
    bool const mine = l == s.layer;
    std::string const q = fmt::format("model.layers.{}.", l);
    if (base == "deepseek_v3" && l == 0) {  // DeepSeek's first layer is dense here (first_k_dense_replace = 1)
      add_vector(w, q + "mlp.gate_proj.weight", Encoding::kBF16, {in, h}, Owner::kNever, -1, 0, rng);
      continue;
    }
    if (stacked) {
      // [E, 2I, H] = per expert gate rows then up rows; [E, H, I].
      std::vector<float> gu, dn;
      if (enc == Encoding::kFp8) {
        FAIL("FP8 is built for the per-expert layout only");
      }
      auto [gu_bytes, guv] =
          detail::plain_values(enc, static_cast<std::size_t>(e * 2 * in * h), 1.0f / std::sqrt(float(h)), rng);
      auto [dn_bytes, dnv] =
          detail::plain_values(enc, static_cast<std::size_t>(e * h * in), 1.0f / std::sqrt(float(in)), rng);
      std::int32_t const shard = l % s.num_shards;
      w.add({q + "mlp.experts.gate_up_proj",
             detail::plain_dtype(enc),
             {e, 2 * in, h},
             std::move(gu_bytes),
             mine ? Owner::kStacked : Owner::kNever,
             -1,
             shard});
      w.add({q + "mlp.experts.down_proj",
             detail::plain_dtype(enc),
             {e, h, in},
             std::move(dn_bytes),
             mine ? Owner::kStacked : Owner::kNever,
             -1,
             (shard + 1) % s.num_shards});
      if (mine) {
        m.gate_up = guv;
        m.down = dnv;
      }
    } else {
      for (std::int32_t x = 0; x < e; ++x) {
        std::string const p = q + experts_prefix + std::to_string(x) + ".";
        std::int32_t const shard = (l + x) % s.num_shards;  // experts spread over the shards
        Owner const owner = mine ? Owner::kExpert : Owner::kNever;
        auto gate = add_matrix(w, p + gate_name + ".weight", enc, in, h, s, owner, x, shard, rng);
        auto up = add_matrix(w, p + up_name + ".weight", enc, in, h, s, owner, x, shard, rng);
        auto dn = add_matrix(w, p + down_name + ".weight", enc, h, in, s, owner, x, (shard + 1) % s.num_shards, rng);
        if (!mine) continue;
        auto const ux = static_cast<std::size_t>(x);
        auto const rows = static_cast<std::size_t>(2 * in), uh = static_cast<std::size_t>(h);
        std::copy(gate.begin(), gate.end(), m.gate_up.begin() + static_cast<std::ptrdiff_t>(ux * rows * uh));
        std::copy(up.begin(), up.end(),
                  m.gate_up.begin() + static_cast<std::ptrdiff_t>(ux * rows * uh + static_cast<std::size_t>(in) * uh));
        std::copy(dn.begin(), dn.end(),
                  m.down.begin() + static_cast<std::ptrdiff_t>(ux * uh * static_cast<std::size_t>(in)));
      }
    }
    auto rw = add_vector(w, q + router + ".weight", router_enc, {e, h}, mine ? Owner::kAlways : Owner::kNever, -1,
                         (l + 2) % s.num_shards, rng, 1.0f / std::sqrt(float(h)));
    if (mine) m.router_weight = rw;
    if (base == "deepseek_v3") {
      auto cb = add_vector(w, q + "mlp.gate.e_score_correction_bias", Encoding::kF32, {e},
                           mine ? Owner::kAlways : Owner::kNever, -1, l % s.num_shards, rng);
      if (mine) m.correction_bias = cb;
    }
  }
  if (base == "qwen3_moe" || base == "qwen2_moe") {
    m.config_json = fmt::format(R"({{"model_type": "{}", "num_experts": {}, "num_experts_per_tok": {},
      "hidden_size": {}, "moe_intermediate_size": {}, "num_hidden_layers": {}, "norm_topk_prob": true,
      "decoder_sparse_step": 1, "mlp_only_layers": []{}}})",
                                base, e, s.top_k, h, in, s.num_layers,
                                enc != Encoding::kFp8 ? std::string()
                                                      : fmt::format(R"(, "quantization_config": {{"quant_method": "fp8",
      "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [{}, {}]}})",
                                                                    s.fp8_block_rows, s.fp8_block_cols));
  } else if (base == "mixtral") {
    m.config_json = fmt::format(R"({{"model_type": "mixtral", "num_local_experts": {}, "num_experts_per_tok": {},
      "hidden_size": {}, "intermediate_size": {}, "num_hidden_layers": {}}})",
                                e, s.top_k, h, in, s.num_layers);
  } else if (base == "deepseek_v3") {
    m.config_json = fmt::format(R"({{"model_type": "deepseek_v3", "n_routed_experts": {}, "num_experts_per_tok": {},
      "hidden_size": {}, "moe_intermediate_size": {}, "num_hidden_layers": {}, "n_group": 2, "topk_group": 1,
      "routed_scaling_factor": 2.5, "norm_topk_prob": true, "scoring_func": "sigmoid", "first_k_dense_replace": 1,
      "quantization_config": {{"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                               "weight_block_size": [{}, {}]}}}})",
                                e, s.top_k, h, in, s.num_layers, s.fp8_block_rows, s.fp8_block_cols);
  } else {
    FAIL("unknown family " << family);
  }
  return m;
}

//! Writes `m` into `dir` (sharded with an index when m.shape.num_shards > 1) with its config.json.
inline void write_model(BuiltModel const& m, fs::path const& dir) {
  if (m.shape.num_shards > 1)
    m.writer.write_sharded(dir);
  else
    m.writer.write_single(dir);
  write_text(dir / "config.json", m.config_json);
}

//! The built-in family called `name`.
inline epx::io::ModelFamily family_named(std::string const& name) {
  for (auto const& f : epx::io::builtin_families())
    if (f.name == name) return f;
  FAIL("no built-in family " << name);
  return {};
}

}  // namespace epx::test::io
