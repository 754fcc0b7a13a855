// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// MoeModel from config.json, per family: the released models' configs (values as on the Hub) give
// the RouterConfig and ExpertMlpConfig their modeling code implies; missing or malformed keys are
// an Error naming config.json and the key; the family is recognised from model_type and the tensors.

#include "io_test_util.hpp"

using namespace epx;
using namespace epx::test::io;

namespace {

io::MoeModel parse(std::string const& json, std::string const& family) {
  return io::parse_model_config(json, family_named(family), "config.json");
}

}  // namespace

TEST_CASE("config.json: each family's released configuration") {
  SUBCASE("Qwen3-30B-A3B") {
    auto const m = parse(R"({"model_type": "qwen3_moe", "hidden_size": 2048, "moe_intermediate_size": 768,
        "intermediate_size": 6144, "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": true,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "num_hidden_layers": 48, "hidden_act": "silu"})",
                         "qwen3_moe");
    CHECK(m.router.num_experts == 128);
    CHECK(m.router.top_k == 8);
    CHECK(m.router.scoring == Scoring::kSoftmaxTopK);
    CHECK(m.router.renormalize);
    CHECK(m.mlp.hidden == 2048);
    CHECK(m.mlp.intermediate == 768);  // moe_intermediate_size, not the dense intermediate_size
    CHECK(m.mlp.activation == Activation::kSwiGLU);
    CHECK(m.mlp.gate_up_layout == GateUpLayout::kConcatenated);
    CHECK(m.num_layers == 48);
    CHECK(m.is_moe_layer(0));
    CHECK(m.is_moe_layer(47));
    CHECK(!m.is_moe_layer(48));
  }
  SUBCASE("Qwen1.5-MoE-A2.7B (qwen2_moe): norm_topk_prob false, sparse step and dense layers") {
    auto const m = parse(R"({"model_type": "qwen2_moe", "hidden_size": 2048, "moe_intermediate_size": 1408,
        "num_experts": 60, "num_experts_per_tok": 4, "norm_topk_prob": false, "decoder_sparse_step": 2,
        "mlp_only_layers": [5], "num_hidden_layers": 24, "shared_expert_intermediate_size": 5632})",
                         "qwen2_moe");
    CHECK(!m.router.renormalize);
    CHECK(!m.is_moe_layer(0));  // (0 + 1) % 2 != 0
    CHECK(m.is_moe_layer(1));
    CHECK(!m.is_moe_layer(5));  // listed as dense
    CHECK(m.is_moe_layer(7));
  }
  SUBCASE("Mixtral-8x7B: always renormalised") {
    auto const m = parse(R"({"model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336,
        "num_local_experts": 8, "num_experts_per_tok": 2, "num_hidden_layers": 32})",
                         "mixtral");
    CHECK(m.router.num_experts == 8);
    CHECK(m.router.renormalize);
    CHECK(m.mlp.intermediate == 14336);
  }
  SUBCASE("DeepSeek-V3: sigmoid, groups, scaling, dense first layers, FP8 blocks") {
    auto const m = parse(R"({"model_type": "deepseek_v3", "hidden_size": 7168, "moe_intermediate_size": 2048,
        "intermediate_size": 18432, "n_routed_experts": 256, "num_experts_per_tok": 8, "n_group": 8,
        "topk_group": 4, "routed_scaling_factor": 2.5, "norm_topk_prob": true, "scoring_func": "sigmoid",
        "topk_method": "noaux_tc", "first_k_dense_replace": 3, "moe_layer_freq": 1, "num_hidden_layers": 61,
        "n_shared_experts": 1, "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
        "quant_method": "fp8", "weight_block_size": [128, 128]}})",
                         "deepseek_v3");
    CHECK(m.router.num_experts == 256);
    CHECK(m.router.scoring == Scoring::kSigmoidTopK);
    CHECK(m.router.num_groups == 8);
    CHECK(m.router.topk_groups == 4);
    CHECK(m.router.routed_scaling_factor == 2.5f);
    CHECK(m.router.renormalize);
    CHECK(m.mlp.intermediate == 2048);
    CHECK(m.fp8_block == std::array<std::int32_t, 2>{128, 128});
    CHECK(!m.is_moe_layer(2));
    CHECK(m.is_moe_layer(3));
    CHECK(m.is_moe_layer(60));
    auto const softmax = parse(R"({"n_routed_experts": 64, "num_experts_per_tok": 6, "hidden_size": 16,
        "moe_intermediate_size": 8, "scoring_func": "softmax", "n_group": 1, "topk_group": 1})",
                               "deepseek_v3");
    CHECK(softmax.router.scoring == Scoring::kSoftmaxTopK);
  }
  SUBCASE("gpt-oss-20b: top-k then softmax, clamped SwiGLU, interleaved gate/up") {
    auto const m = parse(R"({"model_type": "gpt_oss", "hidden_size": 2880, "intermediate_size": 2880,
        "num_local_experts": 32, "num_experts_per_tok": 4, "num_hidden_layers": 24, "swiglu_limit": 7.0,
        "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}})",
                         "gpt_oss");
    CHECK(m.router.scoring == Scoring::kTopKSoftmax);
    CHECK(!m.router.renormalize);
    CHECK(m.mlp.activation == Activation::kClampedSwiGLU);
    CHECK(m.mlp.clamped_swiglu.alpha == 1.702f);
    CHECK(m.mlp.clamped_swiglu.limit == 7.0f);
    CHECK(m.mlp.gate_up_layout == GateUpLayout::kInterleaved);
    CHECK(m.mlp.gate_up_rows() == 2 * 2880);
    auto const limit = parse(R"({"hidden_size": 64, "intermediate_size": 32, "num_local_experts": 4,
        "num_experts_per_tok": 2, "swiglu_limit": 5.5})",
                             "gpt_oss");
    CHECK(limit.mlp.clamped_swiglu.limit == 5.5f);
  }
  SUBCASE("the MoeConfig") {
    auto const m = parse(R"({"hidden_size": 64, "intermediate_size": 32, "num_local_experts": 4,
        "num_experts_per_tok": 2})",
                         "mixtral");
    auto const placement = ExpertPlacement::contiguous(4, 2);
    MoeConfig const c = m.moe_config(placement);
    CHECK(c.router.num_experts == 4);
    CHECK(c.router.top_k == 2);
    CHECK(c.mlp.hidden == 64);
    CHECK(c.placement == placement);
    CHECK(c.weights.gate_up == nullptr);
  }
}

TEST_CASE("config.json: missing and malformed keys name the file and the key") {
  std::string const base = R"("hidden_size": 64, "moe_intermediate_size": 32, "num_experts_per_tok": 2)";
  auto refused = [&](std::string const& json, std::string const& family, std::vector<std::string> const& parts) {
    CAPTURE(json);
    check_error(Errc::kInvalidArgument, parts, [&] { (void)parse(json, family); });
  };
  refused("{" + base + "}", "qwen3_moe", {"config.json", "no \"num_experts\"", "family qwen3_moe"});
  refused("{" + base + ", \"n_routed_experts\": 8}", "qwen3_moe", {"no \"num_experts\""});
  refused("{" + base + ", \"num_experts\": \"8\"}", "qwen3_moe", {"\"num_experts\" = \"8\", expected an integer"});
  refused("{" + base + ", \"num_experts\": 8.5}", "qwen3_moe", {"expected an integer"});
  refused("{" + base + ", \"num_experts\": 0}", "qwen3_moe", {"\"num_experts\" = 0, expected an integer in [1, "});
  refused("{" + base + ", \"num_experts\": 99999999999}", "qwen3_moe", {"expected an integer in [1, 2147483647]"});
  refused("{" + base + ", \"num_experts\": 18446744073709551615}", "qwen3_moe", {"expected an integer in [1, "});
  refused("{" + base + ", \"num_experts\": 8, \"norm_topk_prob\": 1}", "qwen3_moe", {"expected true or false"});
  refused("{" + base + ", \"num_experts\": 8, \"mlp_only_layers\": 3}", "qwen3_moe", {"expected a list of layer"});
  refused("{" + base + ", \"num_experts\": 8, \"mlp_only_layers\": [-1]}", "qwen3_moe", {"layer indices >= 0"});
  refused("{" + base + ", \"n_routed_experts\": 8, \"scoring_func\": \"relu\"}", "deepseek_v3",
          {"\"scoring_func\" = \"relu\", expected \"softmax\" or \"sigmoid\""});
  refused("{" + base + ", \"n_routed_experts\": 8, \"routed_scaling_factor\": \"x\"}", "deepseek_v3",
          {"expected a finite number"});
  refused("{" + base +
              ", \"n_routed_experts\": 8, \"n_group\": 2, \"topk_group\": 1, "
              "\"quantization_config\": {\"weight_block_size\": [128]}}",
          "deepseek_v3", {"\"quantization_config.weight_block_size\" = [128], expected [rows, cols]"});
  // A configuration the router refuses: named as config.json's.
  refused("{" + base + ", \"n_routed_experts\": 8, \"n_group\": 3}", "deepseek_v3",
          {"config.json", "num_groups = 3, expected >= 1 and dividing num_experts = 8"});
  refused("{\"hidden_size\": 64, \"moe_intermediate_size\": 32, \"num_experts_per_tok\": 9, \"num_experts\": 8}",
          "qwen3_moe", {"top_k = 9"});
  refused("{", "qwen3_moe", {"config.json: not valid JSON"});
  refused("[1]", "qwen3_moe", {"not a JSON object"});
  refused("{\"x\": " + std::string(100, '[') + std::string(100, ']') + "}", "qwen3_moe", {"nest deeper than 64"});
  // null means absent: the family's default holds.
  auto const m = parse("{" + base + ", \"num_experts\": 8, \"norm_topk_prob\": null}", "qwen3_moe");
  CHECK(!m.router.renormalize);
}

TEST_CASE("read_model: the family from model_type and the tensors the checkpoint holds") {
  EPX_TEST_SEEDED_RNG(rng);
  CaseShape shape;
  for (std::string const family : {"qwen3_moe", "qwen3_moe_stacked", "mixtral", "mixtral_stacked", "deepseek_v3",
                                   "deepseek_v3_stacked", "gpt_oss", "qwen2_moe", "qwen2_moe_stacked"}) {
    CAPTURE(family);
    TempDir dir;
    write_model(build_model(family, Encoding::kBF16, shape, rng), dir.path());
    io::Checkpoint ckpt(dir.path());
    CHECK(io::read_model(ckpt).family.name == family);
    CHECK(ckpt.stats().shards_opened == 0);  // recognised from the index alone
  }
  TempDir dir;
  auto built = build_model("qwen3_moe", Encoding::kBF16, shape, rng);
  built.config_json.replace(built.config_json.find("qwen3_moe"), 9, "llama4");
  write_model(built, dir.path());
  io::Checkpoint ckpt(dir.path());
  check_error(Errc::kInvalidArgument, {"model_type \"llama4\"", "matches no family", "tried: none", "ModelFamily"},
              [&] { (void)io::read_model(ckpt); });
  // The right model_type but none of the family's tensors.
  io::ModelFamily renamed = io::qwen3_moe();
  renamed.gate = "x.{layer}.{expert}.gate";
  renamed.model_types = {"llama4"};
  check_error(Errc::kInvalidArgument, {"tried: qwen3_moe (no 'x.0.0.gate')"},
              [&] { (void)io::read_model(ckpt, std::vector{renamed}); });
  write_text(dir.path() / "config.json", "{\"num_experts\": 3}");
  check_error(Errc::kInvalidArgument, "no \"model_type\" string", [&] { (void)io::read_model(ckpt); });
}
