// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! A model's MoE layers as its checkpoint's config.json describes them, read through a family's
//! ConfigKeys: the RouterConfig and ExpertMlpConfig epx needs (so that a runtime gets a correct
//! MoeConfig without knowing the family's key names), which layers are MoE layers, and the FP8
//! block size.

#include <epx/core/placement.hpp>
#include <epx/core/router_config.hpp>
#include <epx/gemm/expert_mlp.hpp>
#include <epx/io/checkpoint.hpp>
#include <epx/io/checkpoint_error.hpp>
#include <epx/io/file.hpp>
#include <epx/io/fp8_e4m3.hpp>
#include <epx/io/model_family.hpp>
#include <epx/parallel/expert_parallel.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <limits>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace epx::io {

//! One model's MoE layers: the family that names their tensors and what config.json says of them.
struct MoeModel {
  ModelFamily family = {};
  RouterConfig router = {};                     //!< num_experts, top_k, scoring, renormalize, groups, scaling
  ExpertMlpConfig mlp = {};                     //!< hidden, intermediate, activation, gate/up layout, clamped SwiGLU
  std::int32_t num_layers = 0;                  //!< decoder layers; 0: not known (not checked)
  std::int32_t first_moe_layer = 0;             //!< layers below are dense (DeepSeek-V3: 3)
  std::int32_t moe_layer_step = 1;              //!< layer l is MoE when (l + 1) % step == 0 (Qwen)
  std::vector<std::int32_t> dense_layers = {};  //!< layers listed as dense (Qwen's mlp_only_layers)
  std::array<std::int32_t, 2> fp8_block = {kFp8DefaultBlock, kFp8DefaultBlock};  //!< [rows, cols] per FP8 scale

  //! Whether `layer` has an MoE block (as opposed to a dense MLP).
  [[nodiscard]] bool is_moe_layer(std::int32_t layer) const noexcept {
    if (layer < 0 || (num_layers > 0 && layer >= num_layers) || layer < first_moe_layer) return false;
    if (moe_layer_step > 1 && (layer + 1) % moe_layer_step != 0) return false;
    return std::find(dense_layers.begin(), dense_layers.end(), layer) == dense_layers.end();
  }

  //! The layer's configuration for ExpertParallel, without weights (load_layer fills them in).
  [[nodiscard]] MoeConfig moe_config(ExpertPlacement placement = {}) const {
    return MoeConfig{.router = router, .mlp = mlp, .placement = std::move(placement)};
  }
};

namespace detail {

//! The value at a dotted `key` ("a.b") of a JSON object, or nullptr.
inline nlohmann::json const* config_value(nlohmann::json const& config, std::string_view key) {
  nlohmann::json const* node = &config;
  while (!key.empty()) {
    auto const dot = key.find('.');
    std::string const part(key.substr(0, dot));
    if (!node->is_object()) return nullptr;
    auto const it = node->find(part);
    if (it == node->end()) return nullptr;
    node = &*it;
    key = dot == std::string_view::npos ? std::string_view() : key.substr(dot + 1);
  }
  return node;
}

//! config.json's integer at `key`, checked to lie in [lo, hi]; nothing when the key is absent or
//! empty (or JSON null), unless `required`.
inline std::optional<std::int64_t> config_int(nlohmann::json const& config, std::string_view key, std::string_view file,
                                              std::string_view family, bool required, std::int64_t lo,
                                              std::int64_t hi) {
  if (key.empty()) return std::nullopt;
  auto const* v = config_value(config, key);
  if (v == nullptr || v->is_null()) {
    if (required)
      file_error(Errc::kInvalidArgument, file,
                 fmt::format("no \"{}\", which family {} needs (it reads a required value from it)", key, family));
    return std::nullopt;
  }
  if (!v->is_number_integer())
    file_error(Errc::kInvalidArgument, file,
               fmt::format("\"{}\" = {}, expected an integer", key, printable(v->dump(), 60)));
  std::int64_t const value =
      v->is_number_unsigned() && v->get<std::uint64_t>() > std::uint64_t(hi) ? hi + 1 : v->get<std::int64_t>();
  if (value < lo || value > hi)
    file_error(Errc::kInvalidArgument, file,
               fmt::format("\"{}\" = {}, expected an integer in [{}, {}]", key, printable(v->dump(), 60), lo, hi));
  return value;
}

}  // namespace detail

//! The largest config.json epx reads.
inline constexpr std::uint64_t kMaxConfigBytes = 16'000'000;

namespace detail {

//! Deepest nesting of arrays and objects epx accepts in a config.json (released ones nest 3 deep).
inline constexpr int kMaxConfigDepth = 64;

//! `text` parsed as JSON, nesting at most kMaxConfigDepth levels (deeper input is refused while it is
//! read, so a hostile file cannot make the parser build millions of levels).
inline nlohmann::json parse_config_json(std::string_view text, std::string_view file) {
  if (text.size() > kMaxConfigBytes)
    file_error(Errc::kInvalidArgument, file,
               fmt::format("{} bytes, expected a config of at most {}", text.size(), kMaxConfigBytes));
  auto const limit_depth = [&](int depth, nlohmann::json::parse_event_t event, nlohmann::json&) {
    if ((event == nlohmann::json::parse_event_t::object_start || event == nlohmann::json::parse_event_t::array_start) &&
        depth >= kMaxConfigDepth)
      file_error(Errc::kInvalidArgument, file, fmt::format("values nest deeper than {} levels", kMaxConfigDepth));
    return true;
  };
  try {
    return nlohmann::json::parse(text, limit_depth);
  } catch (nlohmann::json::exception const& e) {
    file_error(Errc::kInvalidArgument, file, fmt::format("not valid JSON: {}", printable(e.what(), 200)));
  }
}

}  // namespace detail

//! @brief The MoeModel a config.json text describes, read with `family`'s keys. Values config.json
//! leaves out (and the family reads no key for) keep the family's defaults.
//! @throws Error naming `file` and the key: not JSON, a required key missing, a value of the wrong
//!         type or out of range; also when the result is not a valid router or MLP configuration.
inline MoeModel parse_model_config(std::string_view json_text, ModelFamily family, std::string_view file) {
  validate(family);
  nlohmann::json const config = detail::parse_config_json(json_text, file);
  if (!config.is_object()) detail::file_error(Errc::kInvalidArgument, file, "not a JSON object");

  ConfigKeys const& keys = family.config;
  constexpr std::int64_t kInt32Max = std::numeric_limits<std::int32_t>::max();
  auto integer = [&](std::string const& key, bool required, std::int64_t lo, std::int64_t hi) {
    return detail::config_int(config, key, file, family.name, required, lo, hi);
  };
  auto boolean = [&](std::string const& key) -> std::optional<bool> {
    if (key.empty()) return std::nullopt;
    auto const* v = detail::config_value(config, key);
    if (v == nullptr || v->is_null()) return std::nullopt;
    if (!v->is_boolean())
      detail::file_error(Errc::kInvalidArgument, file,
                         fmt::format("\"{}\" = {}, expected true or false", key, detail::printable(v->dump(), 60)));
    return v->get<bool>();
  };
  auto real = [&](std::string const& key) -> std::optional<float> {
    if (key.empty()) return std::nullopt;
    auto const* v = detail::config_value(config, key);
    if (v == nullptr || v->is_null()) return std::nullopt;
    if (!v->is_number() || !std::isfinite(v->get<double>()))
      detail::file_error(Errc::kInvalidArgument, file,
                         fmt::format("\"{}\" = {}, expected a finite number", key, detail::printable(v->dump(), 60)));
    return static_cast<float>(v->get<double>());
  };

  MoeModel model{.family = family, .router = family.router};
  model.router.num_experts = static_cast<std::int32_t>(*integer(keys.num_experts, true, 1, kInt32Max));
  model.router.top_k = static_cast<std::int32_t>(*integer(keys.top_k, true, 1, kInt32Max));
  model.mlp.hidden = static_cast<std::int32_t>(*integer(keys.hidden, true, 1, kInt32Max));
  model.mlp.intermediate = static_cast<std::int32_t>(*integer(keys.intermediate, true, 1, kInt32Max));
  model.mlp.activation = family.activation;
  model.mlp.gate_up_layout = family.gate_up_layout;
  model.mlp.clamped_swiglu = family.clamped_swiglu;
  if (auto v = integer(keys.num_layers, false, 1, kInt32Max)) model.num_layers = static_cast<std::int32_t>(*v);
  if (auto v = boolean(keys.renormalize)) model.router.renormalize = *v;
  if (!keys.scoring.empty()) {
    if (auto const* v = detail::config_value(config, keys.scoring); v != nullptr && !v->is_null()) {
      if (v->is_string() && v->get<std::string>() == "softmax")
        model.router.scoring = Scoring::kSoftmaxTopK;
      else if (v->is_string() && v->get<std::string>() == "sigmoid")
        model.router.scoring = Scoring::kSigmoidTopK;
      else
        detail::file_error(Errc::kInvalidArgument, file,
                           fmt::format("\"{}\" = {}, expected \"softmax\" or \"sigmoid\"", keys.scoring,
                                       detail::printable(v->dump(), 60)));
    }
  }
  if (auto v = integer(keys.num_groups, false, 1, kInt32Max)) model.router.num_groups = static_cast<std::int32_t>(*v);
  if (auto v = integer(keys.topk_groups, false, 1, kInt32Max)) model.router.topk_groups = static_cast<std::int32_t>(*v);
  if (auto v = real(keys.routed_scaling_factor)) model.router.routed_scaling_factor = *v;
  if (auto v = real(keys.swiglu_limit)) model.mlp.clamped_swiglu.limit = *v;
  if (auto v = integer(keys.first_moe_layer, false, 0, kInt32Max))
    model.first_moe_layer = static_cast<std::int32_t>(*v);
  if (auto v = integer(keys.moe_layer_step, false, 1, kInt32Max)) model.moe_layer_step = static_cast<std::int32_t>(*v);
  if (!keys.dense_layers.empty()) {
    if (auto const* v = detail::config_value(config, keys.dense_layers); v != nullptr && !v->is_null()) {
      if (!v->is_array())
        detail::file_error(Errc::kInvalidArgument, file,
                           fmt::format("\"{}\" = {}, expected a list of layer indices", keys.dense_layers,
                                       detail::printable(v->dump(), 60)));
      for (auto const& e : *v) {
        if (!e.is_number_integer() || e.get<std::int64_t>() < 0 || e.get<std::int64_t>() > kInt32Max)
          detail::file_error(Errc::kInvalidArgument, file,
                             fmt::format("\"{}\" holds {}, expected layer indices >= 0", keys.dense_layers,
                                         detail::printable(e.dump(), 60)));
        model.dense_layers.push_back(static_cast<std::int32_t>(e.get<std::int64_t>()));
      }
    }
  }
  if (!keys.fp8_block.empty()) {
    if (auto const* v = detail::config_value(config, keys.fp8_block); v != nullptr && !v->is_null()) {
      if (!v->is_array() || v->size() != 2 || !(*v)[0].is_number_integer() || !(*v)[1].is_number_integer() ||
          (*v)[0].get<std::int64_t>() < 1 || (*v)[1].get<std::int64_t>() < 1 ||
          (*v)[0].get<std::int64_t>() > kInt32Max || (*v)[1].get<std::int64_t>() > kInt32Max)
        detail::file_error(Errc::kInvalidArgument, file,
                           fmt::format("\"{}\" = {}, expected [rows, cols] of an FP8 scale block, both >= 1",
                                       keys.fp8_block, detail::printable(v->dump(), 60)));
      model.fp8_block = {static_cast<std::int32_t>((*v)[0].get<std::int64_t>()),
                         static_cast<std::int32_t>((*v)[1].get<std::int64_t>())};
    }
  }
  try {
    epx::detail::validate(model.router, "config.json's router");
    epx::detail::validate(model.mlp, "config.json's expert MLP");
  } catch (Error const& e) {
    std::string_view inner = e.what();
    if (inner.starts_with("epx: ")) inner.remove_prefix(5);
    detail::file_error(e.code(), file, fmt::format("read with family {}: {}", family.name, inner));
  }
  return model;
}

//! The config.json beside a checkpoint, as text (at most kMaxConfigBytes).
inline std::string read_config_json(std::filesystem::path const& path) {
  ReadOnlyFile file(path.string());
  if (file.size() > kMaxConfigBytes)
    detail::file_error(Errc::kInvalidArgument, path.string(),
                       fmt::format("{} bytes, expected a config of at most {}", file.size(), kMaxConfigBytes));
  std::string text(static_cast<std::size_t>(file.size()), '\0');
  file.read_at(0, std::as_writable_bytes(std::span(text)));
  return text;
}

//! @brief The MoeModel of the checkpoint at `checkpoint.folder()`: its config.json read with `family`.
inline MoeModel read_model(Checkpoint const& checkpoint, ModelFamily family) {
  auto const path = checkpoint.folder() / "config.json";
  return parse_model_config(read_config_json(path), std::move(family), path.string());
}

//! @brief The MoeModel of a checkpoint whose family is one of `candidates`: the first family listing
//! config.json's "model_type" whose expert tensors of the first MoE layer the checkpoint holds (so the Hub's per-expert layout and transformers 5's stacked one are
//! both recognised). With an index this reads no shard; a single file's header is read already.
//! @throws Error naming config.json's model_type and the families tried, when none fits.
inline MoeModel read_model(Checkpoint& checkpoint, std::span<ModelFamily const> candidates) {
  auto const path = checkpoint.folder() / "config.json";
  std::string const text = read_config_json(path);
  std::string model_type;
  auto const config = detail::parse_config_json(text, path.string());
  if (config.is_object() && config.contains("model_type") && config["model_type"].is_string())
    model_type = config["model_type"].get<std::string>();
  if (model_type.empty())
    detail::file_error(Errc::kInvalidArgument, path.string(),
                       "no \"model_type\" string, expected one to pick the model family by (or pass the family)");
  std::string tried;
  for (auto const& family : candidates) {
    if (std::find(family.model_types.begin(), family.model_types.end(), model_type) == family.model_types.end())
      continue;
    MoeModel model = parse_model_config(text, family, path.string());
    std::int32_t layer = model.first_moe_layer;
    while (!model.is_moe_layer(layer) && (model.num_layers == 0 || layer < model.num_layers) && layer < (1 << 20))
      ++layer;
    std::string const probe =
        tensor_name(family.gate_up.empty() ? family.gate : family.gate_up, layer, 0);  // expert 0 when per expert
    if (checkpoint.contains(probe) || checkpoint.contains(probe + family.mxfp4_blocks_suffix)) return model;
    tried += fmt::format("{}{} (no '{}')", tried.empty() ? "" : ", ", family.name, detail::printable(probe));
  }
  detail::file_error(Errc::kInvalidArgument, checkpoint.source(),
                     fmt::format("model_type \"{}\" (from {}) matches no family whose tensors it holds; tried: {}. "
                                 "Describe the family as an epx::io::ModelFamily and pass it",
                                 detail::printable(model_type, 60), path.string(), tried.empty() ? "none" : tried));
}

//! read_model over the built-in families (builtin_families()).
inline MoeModel read_model(Checkpoint& checkpoint) {
  std::vector<ModelFamily> const families = builtin_families();
  return read_model(checkpoint, families);
}

}  // namespace epx::io
