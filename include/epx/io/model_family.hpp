// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! Model families as data: where a family keeps its MoE tensors, how they are laid out, and what
//! its layer computes. The loader has one code path; a family is a value of ModelFamily, so a
//! family epx does not list is described the same way (docs/loading.md shows how).
//!
//! The built-in families and their sources (read 2026-12):
//!   - qwen3_moe, qwen2_moe: transformers models/qwen3_moe, models/qwen2_moe (Qwen3MoeSparseMoeBlock,
//!     Qwen2MoeSparseMoeBlock): per-expert `mlp.experts.{e}.gate_proj/up_proj/down_proj.weight`
//!     ([I, H], [I, H], [H, I]), router `mlp.gate.weight` [E, H]; softmax over all experts, top-k,
//!     renormalised when config.json's norm_topk_prob is true; SwiGLU. (Qwen2-MoE's shared expert,
//!     `mlp.shared_expert.*` and `mlp.shared_expert_gate.weight`, is a dense MLP: it stays the runtime's.)
//!   - mixtral: transformers models/mixtral: per-expert `block_sparse_moe.experts.{e}.w1/w3/w2.weight`
//!     (gate, up, down), router `block_sparse_moe.gate.weight`; softmax, top-k, always renormalised.
//!   - deepseek_v3: transformers models/deepseek_v3 and DeepSeek-V3's README_WEIGHTS.md: per-expert
//!     `mlp.experts.{e}.gate_proj/up_proj/down_proj.weight` (F8_E4M3 with `.weight_scale_inv`, or
//!     bf16), router `mlp.gate.weight` [E, H] and `mlp.gate.e_score_correction_bias` [E] (F32);
//!     sigmoid, groups (n_group, topk_group), renormalised (norm_topk_prob), x routed_scaling_factor;
//!     the first first_k_dense_replace layers are dense.
//!   - gpt_oss: transformers models/gpt_oss (GptOssExperts, GptOssTopKRouter) and integrations/mxfp4.py:
//!     stacked `mlp.experts.gate_up_proj` [E, H, 2I] with gate and up interleaved (gate = even
//!     columns), `gate_up_proj_bias` [E, 2I], `down_proj` [E, I, H], `down_proj_bias` [E, H]: x · W,
//!     the transpose of epx's layout; MXFP4 as `*_blocks`/`*_scales` [E, 2I, H/32, 16] (K-major);
//!     router `mlp.router.weight` [E, H] + `mlp.router.bias` [E]; top-k on the logits, softmax over
//!     the k; clamped SwiGLU (alpha 1.702, limit swiglu_limit = 7).
//!   - *_stacked: what transformers 5 loads these models into and saves (conversion_mapping.py:
//!     MergeModulelist + Concatenate): `mlp.experts.gate_up_proj` [E, 2I, H] (gate rows, then up
//!     rows) and `mlp.experts.down_proj` [E, H, I], already K-major; Mixtral's router becomes
//!     `mlp.gate.weight`.

#include <epx/core/error.hpp>
#include <epx/core/router_config.hpp>
#include <epx/gemm/activation.hpp>
#include <epx/gemm/expert_mlp.hpp>

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace epx::io {

//! How a family stores its experts' weights.
enum class ExpertStorage : std::uint8_t {
  kPerExpert,  //!< one tensor per expert and projection; names hold {expert}
  kStacked,    //!< one tensor per projection holding every expert, [E, ...]; names hold no {expert}
};

//! The config.json keys a family's MoeModel is read from. A key may name a nested value with dots
//! ("quantization_config.weight_block_size"); an empty key means the family has no such setting
//! and the value in ModelFamily::router (or the default) holds.
struct ConfigKeys {
  std::string num_experts = "num_experts";             //!< required
  std::string top_k = "num_experts_per_tok";           //!< required
  std::string hidden = "hidden_size";                  //!< required
  std::string intermediate = "moe_intermediate_size";  //!< required: the expert's width I
  std::string num_layers = "num_hidden_layers";        //!< optional
  std::string renormalize = {};                        //!< bool, e.g. "norm_topk_prob"
  std::string scoring = {};                            //!< "softmax" or "sigmoid", e.g. "scoring_func"
  std::string num_groups = {};                         //!< e.g. "n_group"
  std::string topk_groups = {};                        //!< e.g. "topk_group"
  std::string routed_scaling_factor = {};              //!< e.g. "routed_scaling_factor"
  std::string swiglu_limit = {};                       //!< clamped SwiGLU's limit, e.g. "swiglu_limit"
  std::string first_moe_layer = {};                    //!< layers below it are dense ("first_k_dense_replace")
  std::string moe_layer_step = {};  //!< layer l is MoE when (l + 1) % step == 0 ("decoder_sparse_step")
  std::string dense_layers = {};    //!< a list of dense layers ("mlp_only_layers")
  std::string fp8_block = "quantization_config.weight_block_size";  //!< [rows, cols] of an FP8 scale block
};

//! @brief Where a model family keeps one MoE layer's tensors and what the layer computes.
//!
//! Tensor names are patterns: `{layer}` stands for the layer index and, with per-expert storage,
//! `{expert}` for the global expert id. A pattern left empty means the family has no such tensor.
//! Give either `gate` and `up` (two [I, H] weights per expert, or stacked [E, I, H]) or `gate_up`
//! ([2I, H] per expert, or stacked [E, 2I, H]; its rows in `gate_up_layout` order), and `down`
//! ([H, I], or stacked [E, H, I]). These are the shapes when `transposed` is false (nn.Linear's
//! [out, in]); with `transposed` each expert matrix is stored the other way round, [in, out].
//!
//! Each weight may be stored plain (F32, F16, BF16), as F8_E4M3 with a `<name><fp8_scale_suffix>`
//! block-scale tensor, or, when `<name>` is absent, as MXFP4 `<name><mxfp4_blocks_suffix>` +
//! `<name><mxfp4_scales_suffix>`; the loader picks by what the checkpoint holds.
struct ModelFamily {
  std::string name = {};                      //!< for messages, e.g. "qwen3_moe"
  std::vector<std::string> model_types = {};  //!< config.json "model_type" values this family reads

  ExpertStorage storage = ExpertStorage::kPerExpert;
  std::string gate = {};          //!< [I, H] per expert
  std::string up = {};            //!< [I, H] per expert
  std::string gate_up = {};       //!< [gate_up_rows, H] per expert
  std::string down = {};          //!< [H, I] per expert
  std::string gate_bias = {};     //!< [I] per expert (with `gate`)
  std::string up_bias = {};       //!< [I] per expert (with `up`)
  std::string gate_up_bias = {};  //!< [gate_up_rows] per expert (with `gate_up`)
  std::string down_bias = {};     //!< [H] per expert
  //! Plain and FP8 expert weights are stored [in, out] (x · W), not [out, in]; epx transposes them.
  bool transposed = false;
  //! MXFP4 blocks pack the [in, out] matrix (blocks of 32 along `out`) instead of [out, in].
  bool mxfp4_transposed = false;
  //! gate_up's rows as stored; with separate gate and up, the order epx lays them out in.
  GateUpLayout gate_up_layout = GateUpLayout::kConcatenated;

  std::string router_weight = {};    //!< [E, H]; every rank loads it
  std::string router_bias = {};      //!< [E] added to the logits (gpt-oss), or empty
  std::string correction_bias = {};  //!< [E] selection-only bias (DeepSeek-V3), or empty

  std::string fp8_scale_suffix = "_scale_inv";
  std::string mxfp4_blocks_suffix = "_blocks";
  std::string mxfp4_scales_suffix = "_scales";

  Activation activation = Activation::kSwiGLU;
  ClampedSwiGLUParams clamped_swiglu = {};
  //! Router settings config.json does not give (num_experts and top_k always come from it).
  RouterConfig router = {};
  ConfigKeys config = {};
};

namespace detail {

//! Whether `pattern` holds `{placeholder}`.
inline bool has_placeholder(std::string_view pattern, std::string_view placeholder) {
  return pattern.find(placeholder) != std::string_view::npos;
}

}  // namespace detail

//! `pattern` with every {layer} and {expert} replaced.
inline std::string tensor_name(std::string_view pattern, std::int64_t layer, std::int64_t expert = -1) {
  std::string out;
  for (std::size_t i = 0; i < pattern.size();) {
    if (pattern.substr(i, 7) == "{layer}") {
      out += std::to_string(layer);
      i += 7;
    } else if (pattern.substr(i, 8) == "{expert}") {
      out += std::to_string(expert);
      i += 8;
    } else {
      out += pattern[i++];
    }
  }
  return out;
}

//! @brief Checks that `f` describes a loadable layer: the weights it needs are named, each with the
//! placeholders its storage needs and no others.
//! @throws Error(kInvalidArgument) naming the first field that is wrong.
inline void validate(ModelFamily const& f) {
  std::string const where = fmt::format("ModelFamily '{}'", f.name);
  bool const separate = !f.gate.empty() || !f.up.empty();
  epx::detail::require(separate != !f.gate_up.empty(), Errc::kInvalidArgument, where, "gate / up / gate_up",
                       fmt::format("'{}' / '{}' / '{}'", f.gate, f.up, f.gate_up),
                       "either gate and up, or gate_up, named");
  epx::detail::require(!separate || (!f.gate.empty() && !f.up.empty()), Errc::kInvalidArgument, where, "gate / up",
                       fmt::format("'{}' / '{}'", f.gate, f.up), "both named");
  epx::detail::require(!f.down.empty(), Errc::kInvalidArgument, where, "down", "''", "a tensor name");
  epx::detail::require(!f.router_weight.empty(), Errc::kInvalidArgument, where, "router_weight", "''", "a tensor name");
  epx::detail::require(separate || (f.gate_bias.empty() && f.up_bias.empty()), Errc::kInvalidArgument, where,
                       "gate_bias / up_bias", fmt::format("'{}' / '{}'", f.gate_bias, f.up_bias),
                       "empty when gate_up is one tensor (use gate_up_bias)");
  epx::detail::require(!separate || f.gate_up_bias.empty(), Errc::kInvalidArgument, where, "gate_up_bias",
                       f.gate_up_bias, "empty when gate and up are separate (use gate_bias and up_bias)");
  epx::detail::require(f.gate_bias.empty() == f.up_bias.empty(), Errc::kInvalidArgument, where, "gate_bias / up_bias",
                       fmt::format("'{}' / '{}'", f.gate_bias, f.up_bias), "both named or both empty");
  bool const per_expert = f.storage == ExpertStorage::kPerExpert;
  for (auto const& [field, pattern] : {std::pair<std::string_view, std::string const&>{"gate", f.gate},
                                       {"up", f.up},
                                       {"gate_up", f.gate_up},
                                       {"down", f.down},
                                       {"gate_bias", f.gate_bias},
                                       {"up_bias", f.up_bias},
                                       {"gate_up_bias", f.gate_up_bias},
                                       {"down_bias", f.down_bias}}) {
    if (pattern.empty()) continue;
    epx::detail::require(detail::has_placeholder(pattern, "{expert}") == per_expert, Errc::kInvalidArgument, where,
                         field, pattern,
                         per_expert ? "a name holding {expert} (storage is kPerExpert)"
                                    : "a name without {expert} (storage is kStacked: one tensor holds every expert)");
  }
  for (auto const& [field, pattern] :
       {std::pair<std::string_view, std::string const&>{"router_weight", f.router_weight},
        {"router_bias", f.router_bias},
        {"correction_bias", f.correction_bias}})
    epx::detail::require(!detail::has_placeholder(pattern, "{expert}"), Errc::kInvalidArgument, where, field, pattern,
                         "a name without {expert} (every expert's router row is in one tensor)");
  for (auto const& [field, suffix] :
       {std::pair<std::string_view, std::string const&>{"fp8_scale_suffix", f.fp8_scale_suffix},
        {"mxfp4_blocks_suffix", f.mxfp4_blocks_suffix},
        {"mxfp4_scales_suffix", f.mxfp4_scales_suffix}})
    epx::detail::require(!suffix.empty(), Errc::kInvalidArgument, where, field, "''", "a non-empty suffix");
}

//! Qwen3-MoE (model_type "qwen3_moe"), per-expert tensors as on the Hub.
inline ModelFamily qwen3_moe() {
  ModelFamily f{.name = "qwen3_moe", .model_types = {"qwen3_moe"}};
  f.gate = "model.layers.{layer}.mlp.experts.{expert}.gate_proj.weight";
  f.up = "model.layers.{layer}.mlp.experts.{expert}.up_proj.weight";
  f.down = "model.layers.{layer}.mlp.experts.{expert}.down_proj.weight";
  f.router_weight = "model.layers.{layer}.mlp.gate.weight";
  f.router = {.scoring = Scoring::kSoftmaxTopK, .renormalize = false};  // Qwen3MoeConfig's norm_topk_prob default
  f.config.renormalize = "norm_topk_prob";
  f.config.moe_layer_step = "decoder_sparse_step";
  f.config.dense_layers = "mlp_only_layers";
  return f;
}

//! Qwen2-MoE / Qwen1.5-MoE (model_type "qwen2_moe"): Qwen3-MoE's expert names; the shared expert is
//! not part of epx's layer.
inline ModelFamily qwen2_moe() {
  ModelFamily f = qwen3_moe();
  f.name = "qwen2_moe";
  f.model_types = {"qwen2_moe"};
  return f;
}

//! Mixtral (model_type "mixtral"), per-expert tensors as on the Hub.
inline ModelFamily mixtral() {
  ModelFamily f{.name = "mixtral", .model_types = {"mixtral"}};
  f.gate = "model.layers.{layer}.block_sparse_moe.experts.{expert}.w1.weight";
  f.up = "model.layers.{layer}.block_sparse_moe.experts.{expert}.w3.weight";
  f.down = "model.layers.{layer}.block_sparse_moe.experts.{expert}.w2.weight";
  f.router_weight = "model.layers.{layer}.block_sparse_moe.gate.weight";
  f.router = {.scoring = Scoring::kSoftmaxTopK, .renormalize = true};
  f.config.num_experts = "num_local_experts";
  f.config.intermediate = "intermediate_size";
  return f;
}

//! DeepSeek-V3 / R1 (model_type "deepseek_v3"), per-expert tensors (FP8 block-scaled on the Hub).
inline ModelFamily deepseek_v3() {
  ModelFamily f{.name = "deepseek_v3", .model_types = {"deepseek_v3"}};
  f.gate = "model.layers.{layer}.mlp.experts.{expert}.gate_proj.weight";
  f.up = "model.layers.{layer}.mlp.experts.{expert}.up_proj.weight";
  f.down = "model.layers.{layer}.mlp.experts.{expert}.down_proj.weight";
  f.router_weight = "model.layers.{layer}.mlp.gate.weight";
  f.correction_bias = "model.layers.{layer}.mlp.gate.e_score_correction_bias";
  // DeepseekV3Config's defaults, for keys a config.json leaves out.
  f.router = {.scoring = Scoring::kSigmoidTopK,
              .renormalize = true,
              .num_groups = 8,
              .topk_groups = 4,
              .routed_scaling_factor = 2.5f};
  f.config.num_experts = "n_routed_experts";
  f.config.renormalize = "norm_topk_prob";
  f.config.scoring = "scoring_func";
  f.config.num_groups = "n_group";
  f.config.topk_groups = "topk_group";
  f.config.routed_scaling_factor = "routed_scaling_factor";
  f.config.first_moe_layer = "first_k_dense_replace";
  return f;
}

//! gpt-oss (model_type "gpt_oss"): stacked, transposed, gate/up interleaved, biases; bf16 or MXFP4.
inline ModelFamily gpt_oss() {
  ModelFamily f{.name = "gpt_oss", .model_types = {"gpt_oss"}, .storage = ExpertStorage::kStacked};
  f.gate_up = "model.layers.{layer}.mlp.experts.gate_up_proj";
  f.gate_up_bias = "model.layers.{layer}.mlp.experts.gate_up_proj_bias";
  f.down = "model.layers.{layer}.mlp.experts.down_proj";
  f.down_bias = "model.layers.{layer}.mlp.experts.down_proj_bias";
  f.transposed = true;         // bf16: [E, H, 2I] and [E, I, H]
  f.mxfp4_transposed = false;  // MXFP4: [E, 2I, H/32, 16] and [E, H, I/32, 16]
  f.gate_up_layout = GateUpLayout::kInterleaved;
  f.router_weight = "model.layers.{layer}.mlp.router.weight";
  f.router_bias = "model.layers.{layer}.mlp.router.bias";
  f.activation = Activation::kClampedSwiGLU;
  f.clamped_swiglu = {.alpha = 1.702f, .limit = 7.0f};
  f.router = {.scoring = Scoring::kTopKSoftmax, .renormalize = false};
  f.config.num_experts = "num_local_experts";
  f.config.intermediate = "intermediate_size";
  f.config.swiglu_limit = "swiglu_limit";
  return f;
}

//! `base` as transformers 5 holds it: `mlp.experts.gate_up_proj` [E, 2I, H] (gate rows, then up) and
//! `mlp.experts.down_proj` [E, H, I], router `mlp.gate.weight` (name "<base>_stacked").
inline ModelFamily transformers5_stacked(ModelFamily base) {
  base.name += "_stacked";
  base.storage = ExpertStorage::kStacked;
  base.gate.clear();
  base.up.clear();
  base.gate_bias.clear();
  base.up_bias.clear();
  base.gate_up = "model.layers.{layer}.mlp.experts.gate_up_proj";
  base.down = "model.layers.{layer}.mlp.experts.down_proj";
  base.transposed = false;
  base.gate_up_layout = GateUpLayout::kConcatenated;
  base.router_weight = "model.layers.{layer}.mlp.gate.weight";
  return base;
}

//! Every built-in family, the Hub's layout of a model before its transformers 5 stacked layout.
inline std::vector<ModelFamily> builtin_families() {
  return {qwen3_moe(), transformers5_stacked(qwen3_moe()), qwen2_moe(),   transformers5_stacked(qwen2_moe()),
          mixtral(),   transformers5_stacked(mixtral()),   deepseek_v3(), transformers5_stacked(deepseek_v3()),
          gpt_oss()};
}

}  // namespace epx::io
