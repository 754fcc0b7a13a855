// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// Opening checkpoints, and every way a checkpoint or a request can be wrong: each is an Error naming
// the file (and the tensor, or the parameter), raised before a wrong byte is used.

#include "io_test_util.hpp"

#include <unistd.h>

using namespace epx;
using namespace epx::test::io;

namespace {

// Builds `family` in `enc`, lets `mutate` change the stored tensors, writes it to `dir`.
template <class Mutate>
BuiltModel write_mutated(std::string const& family, Encoding enc, CaseShape const& shape, fs::path const& dir,
                         std::mt19937_64& rng, Mutate&& mutate) {
  BuiltModel m = build_model(family, enc, shape, rng);
  mutate(m.writer.tensors());
  write_model(m, dir);
  return m;
}

StoredTensor* find(std::vector<StoredTensor>& tensors, std::string const& name) {
  for (auto& t : tensors)
    if (t.name == name) return &t;
  FAIL("the test writes no tensor " << name);
  return nullptr;
}

// Loads rank `rank` of a 2-rank contiguous placement of layer `layer` with `family`.
void load(fs::path const& dir, std::string const& family, std::int32_t rank = 0, std::int32_t layer = 1) {
  io::Checkpoint ckpt(dir);
  auto const model = io::read_model(ckpt, family_named(family));
  io::LayerRequest const request{.layer = layer, .placement = ExpertPlacement::contiguous(6, 2), .rank = rank};
  io::HostLayerStorage<bfloat16> storage(model, request);
  (void)io::load_layer(ckpt, model, request, storage.buffers());
}

// Checks that loading throws `code` with every one of `parts` in the message.
void check_load_fails(fs::path const& dir, std::string const& family, Errc code, std::vector<std::string> const& parts,
                      std::int32_t rank = 0) {
  check_error(code, parts, [&] { load(dir, family, rank); });
}

}  // namespace

TEST_CASE("checkpoint: a folder, an index file or a single file; lazily opened shards") {
  EPX_TEST_SEEDED_RNG(rng);
  CaseShape shape;
  TempDir sharded, single;
  auto const built = build_model("qwen3_moe", Encoding::kBF16, shape, rng);
  write_model(built, sharded.path());
  shape.num_shards = 1;
  write_model(build_model("qwen3_moe", Encoding::kBF16, shape, rng), single.path());

  io::Checkpoint by_folder(sharded.path());
  CHECK(by_folder.sharded());
  CHECK(by_folder.num_shards() == 3);
  CHECK(by_folder.stats().shards_opened == 0);  // the index only
  CHECK(by_folder.stats().header_bytes == 0);
  CHECK(by_folder.contains("model.layers.1.mlp.gate.weight"));
  CHECK(!by_folder.contains("model.layers.1.mlp.gate.bias"));
  CHECK(by_folder.stats().shards_opened == 0);  // contains() asks the index
  auto const t = by_folder.find("model.layers.1.mlp.gate.weight");
  REQUIRE(t.has_value());
  CHECK(by_folder.stats().shards_opened == 1);
  CHECK(t->info->shape == std::vector<std::int64_t>{6, 64});
  CHECK(!by_folder.find("model.layers.1.mlp.gate.bias").has_value());
  std::vector<std::byte> bytes(16);
  by_folder.read(*t, 100, bytes);
  CHECK(by_folder.stats().data_bytes == 16);
  CHECK(by_folder.stats().data_reads == 1);
  check_error(Errc::kInvalidArgument, "outside the tensor's 768 bytes", [&] {
    std::vector<std::byte> too_many(769);
    by_folder.read(*t, 0, too_many);
  });

  io::Checkpoint by_index(sharded.path() / "model.safetensors.index.json");
  CHECK(by_index.sharded());
  io::Checkpoint by_file(single.path() / "model.safetensors");
  CHECK(!by_file.sharded());
  CHECK(by_file.stats().shards_opened == 1);  // a single file's header is read when it is opened
  CHECK(by_file.contains("model.layers.1.mlp.gate.weight"));
  io::Checkpoint single_folder(single.path());
  CHECK(!single_folder.sharded());
  CHECK(single_folder.folder() == single.path());

  TempDir empty;
  check_error(Errc::kInvalidArgument, "a folder without model.safetensors.index.json or model.safetensors",
              [&] { io::Checkpoint c(empty.path()); });
  check_error(Errc::kInvalidArgument, "cannot open: No such file",
              [&] { io::Checkpoint c(empty.path() / "missing.safetensors"); });
  check_error(Errc::kInvalidArgument, "not a regular file", [&] { io::ReadOnlyFile f(empty.path().string()); });
}

TEST_CASE("checkpoint: bad shards and indexes name the file") {
  EPX_TEST_SEEDED_RNG(rng);
  CaseShape shape;
  TempDir dir;
  auto const built = build_model("qwen3_moe", Encoding::kBF16, shape, rng);
  write_model(built, dir.path());
  auto const shard0 = dir.path() / SafetensorsWriter::shard_name(0, 3);

  SUBCASE("a missing shard file") {
    fs::remove(shard0);
    check_error(Errc::kInvalidArgument, shard0.string() + ": cannot open", [&] { load(dir.path(), "qwen3_moe"); });
  }
  SUBCASE("a truncated shard") {
    fs::resize_file(shard0, fs::file_size(shard0) - 3);
    check_load_fails(dir.path(), "qwen3_moe", Errc::kInvalidArgument, {shard0.string(), "truncated"});
  }
  SUBCASE("a shard that is not a safetensors file") {
    write_text(shard0, "{\"weight_map\": {}}");
    check_load_fails(dir.path(), "qwen3_moe", Errc::kInvalidArgument, {shard0.string()});
  }
  SUBCASE("a file truncated after the checkpoint opened it") {
    TempDir one;
    CaseShape single = shape;
    single.num_shards = 1;
    auto const m = build_model("qwen3_moe", Encoding::kBF16, single, rng);
    write_model(m, one.path());
    io::Checkpoint ckpt(one.path());  // reads the header now
    auto const model = io::read_model(ckpt);
    io::LayerRequest const request{.layer = 1, .placement = ExpertPlacement::contiguous(6, 1), .rank = 0};
    io::HostLayerStorage<bfloat16> storage(model, request);
    fs::resize_file(one.path() / "model.safetensors", m.writer.header_bytes(0) + 10);
    check_error(Errc::kInvalidArgument, {"model.safetensors", "truncated after it was opened"},
                [&] { (void)io::load_layer(ckpt, model, request, storage.buffers()); });
  }
  SUBCASE("an index that names a shard without the tensor") {
    std::string index = built.writer.write_sharded(dir.path());
    std::int32_t shard = -1;
    for (auto const& t : built.writer.tensors())
      if (t.name == "model.layers.1.mlp.gate.weight") shard = t.shard;
    std::string const from = "\"model.layers.1.mlp.gate.weight\":\"" + SafetensorsWriter::shard_name(shard, 3) + "\"";
    REQUIRE(index.find(from) != std::string::npos);
    std::string const wrong = SafetensorsWriter::shard_name((shard + 1) % 3, 3);
    index.replace(index.find(from), from.size(), "\"model.layers.1.mlp.gate.weight\":\"" + wrong + "\"");
    write_text(dir.path() / "model.safetensors.index.json", index);
    check_load_fails(dir.path(), "qwen3_moe", Errc::kInvalidArgument,
                     {"tensor 'model.layers.1.mlp.gate.weight': not in this shard, but the index", wrong});
  }
  SUBCASE("a malformed index") {
    write_text(dir.path() / "model.safetensors.index.json", "{\"weight_map\": {\"a\": 1}}");
    check_error(Errc::kInvalidArgument, "model.safetensors.index.json: weight_map[\"a\"] is a number",
                [&] { io::Checkpoint c(dir.path()); });
  }
}

TEST_CASE("load_layer: missing, misshapen and mistyped tensors name the file and the tensor") {
  EPX_TEST_SEEDED_RNG(rng);
  CaseShape shape;
  TempDir dir;
  SUBCASE("an expert's tensor missing from every shard: only its owner fails") {
    write_mutated("qwen3_moe", Encoding::kBF16, shape, dir.path(), rng, [](auto& tensors) {
      std::erase_if(tensors,
                    [](StoredTensor const& t) { return t.name == "model.layers.1.mlp.experts.4.up_proj.weight"; });
    });
    check_load_fails(dir.path(), "qwen3_moe", Errc::kInvalidArgument,
                     {"no tensor 'model.layers.1.mlp.experts.4.up_proj.weight'", "the up of expert 4 of layer 1",
                      "model.safetensors.index.json", "nor its MXFP4 form"},
                     1);
    load(dir.path(), "qwen3_moe", 0);  // rank 0 owns experts 0..2 and never asks for expert 4
  }
  SUBCASE("a per-expert weight stored the other way round") {
    write_mutated("mixtral", Encoding::kBF16, shape, dir.path(), rng, [](auto& tensors) {
      auto* t = find(tensors, "model.layers.1.block_sparse_moe.experts.1.w2.weight");
      std::swap(t->shape[0], t->shape[1]);
    });
    check_load_fails(dir.path(), "mixtral", Errc::kShapeMismatch,
                     {"tensor 'model.layers.1.block_sparse_moe.experts.1.w2.weight': shape [32, 64], expected [64, 32]",
                      "down of expert 1", "family mixtral"});
  }
  SUBCASE("gpt-oss's gate_up_proj passed in epx's layout instead of [E, H, 2I]") {
    shape.intermediate = 48;  // 2I = 96 != H = 64 (a square [E, H, H] could not be told apart)
    write_mutated("gpt_oss", Encoding::kBF16, shape, dir.path(), rng, [](auto& tensors) {
      find(tensors, "model.layers.1.mlp.experts.gate_up_proj")->shape = {6, 96, 64};
    });
    check_load_fails(dir.path(), "gpt_oss", Errc::kShapeMismatch,
                     {"tensor 'model.layers.1.mlp.experts.gate_up_proj': shape [6, 96, 64], expected [6, 64, 96]",
                      "= [gate_up_rows, hidden] stored transposed, [in, out]", "the gate_up of experts 0..2"});
  }
  SUBCASE("gpt-oss's down_proj untransposed") {
    write_mutated("gpt_oss", Encoding::kBF16, shape, dir.path(), rng, [](auto& tensors) {
      auto* t = find(tensors, "model.layers.1.mlp.experts.down_proj");
      t->shape = {6, 64, 32};  // epx's [E, H, I], not the checkpoint's [E, I, H]
    });
    check_load_fails(dir.path(), "gpt_oss", Errc::kShapeMismatch,
                     {"tensor 'model.layers.1.mlp.experts.down_proj': shape [6, 64, 32], expected [6, 32, 64]",
                      "stored transposed, [in, out]"});
  }
  SUBCASE("a stacked tensor with another number of experts than config.json") {
    write_mutated("qwen3_moe_stacked", Encoding::kBF16, shape, dir.path(), rng, [](auto& tensors) {
      auto* t = find(tensors, "model.layers.1.mlp.experts.down_proj");
      t->shape = {3, 64, 64};
    });
    check_load_fails(dir.path(), "qwen3_moe_stacked", Errc::kShapeMismatch,
                     {"expected [6, 64, 32]", "config: 6 experts, hidden 64, intermediate 32"});
  }
  SUBCASE("an element type epx does not convert") {
    write_mutated("qwen3_moe", Encoding::kBF16, shape, dir.path(), rng,
                  [](auto& tensors) { find(tensors, "model.layers.1.mlp.experts.0.gate_proj.weight")->dtype = "I16"; });
    check_load_fails(
        dir.path(), "qwen3_moe", Errc::kUnsupported,
        {"tensor 'model.layers.1.mlp.experts.0.gate_proj.weight': dtype I16", "F8_E4M3 with '_scale_inv'"});
  }
  SUBCASE("a router bias stored as FP8") {
    write_mutated("gpt_oss", Encoding::kBF16, shape, dir.path(), rng, [](auto& tensors) {
      auto* t = find(tensors, "model.layers.1.mlp.router.bias");
      t->dtype = "F8_E4M3";
      t->bytes.resize(6);
    });
    check_load_fails(dir.path(), "gpt_oss", Errc::kUnsupported,
                     {"router.bias': dtype F8_E4M3 for the router bias of family gpt_oss, expected F32, F16 or BF16"});
  }
  SUBCASE("FP8 without its scales") {
    write_mutated("deepseek_v3", Encoding::kFp8, shape, dir.path(), rng, [](auto& tensors) {
      std::erase_if(tensors, [](StoredTensor const& t) {
        return t.name == "model.layers.1.mlp.experts.2.down_proj.weight_scale_inv";
      });
    });
    check_load_fails(dir.path(), "deepseek_v3", Errc::kInvalidArgument,
                     {"model.layers.1.mlp.experts.2.down_proj.weight': F8_E4M3 without its block scales"}, 0);
  }
  SUBCASE("FP8 scales of another block grid") {
    write_mutated("deepseek_v3", Encoding::kFp8, shape, dir.path(), rng, [](auto& tensors) {
      auto* s = find(tensors, "model.layers.1.mlp.experts.0.gate_proj.weight_scale_inv");
      s->shape = {3, 1};
      s->bytes.resize(12);
    });
    check_load_fails(dir.path(), "deepseek_v3", Errc::kShapeMismatch,
                     {"gate_proj.weight_scale_inv': shape [3, 1], expected [2, 2] = ceil(32 / 24) x ceil(64 / 40)"});
  }
  SUBCASE("MXFP4 blocks of the wrong type") {
    write_mutated("gpt_oss", Encoding::kMxfp4, shape, dir.path(), rng,
                  [](auto& tensors) { find(tensors, "model.layers.1.mlp.experts.gate_up_proj_blocks")->dtype = "I8"; });
    check_load_fails(dir.path(), "gpt_oss", Errc::kUnsupported, {"gate_up_proj_blocks': dtype I8, expected U8"});
  }
  SUBCASE("MXFP4 blocks without scales") {
    write_mutated("gpt_oss", Encoding::kMxfp4, shape, dir.path(), rng, [](auto& tensors) {
      std::erase_if(tensors,
                    [](StoredTensor const& t) { return t.name == "model.layers.1.mlp.experts.down_proj_scales"; });
    });
    check_load_fails(dir.path(), "gpt_oss", Errc::kInvalidArgument,
                     {"down_proj_blocks': MXFP4 blocks without their scales"});
  }
}

TEST_CASE("load_layer: bad requests and buffers name the parameter") {
  EPX_TEST_SEEDED_RNG(rng);
  CaseShape shape;
  TempDir dir;
  write_model(build_model("deepseek_v3", Encoding::kBF16, shape, rng), dir.path());
  io::Checkpoint ckpt(dir.path());
  auto const model = io::read_model(ckpt);
  auto const placement = ExpertPlacement::contiguous(6, 2);
  io::LayerRequest request{.layer = 1, .placement = placement, .rank = 0};
  io::HostLayerStorage<bfloat16> storage(model, request);
  auto try_load = [&](io::LayerRequest const& r, io::LayerBuffers<bfloat16> const& b) {
    return [&, r, b] { (void)io::load_layer(ckpt, model, r, b); };
  };
  check_error(Errc::kInvalidArgument, "request.placement = empty",
              try_load({.layer = 1, .placement = {}, .rank = 0}, storage.buffers()));
  check_error(Errc::kInvalidArgument, "request.placement.num_experts() = 8, expected the model's num_experts = 6",
              try_load({.layer = 1, .placement = ExpertPlacement::contiguous(8, 2), .rank = 0}, storage.buffers()));
  check_error(Errc::kInvalidArgument, "request.rank = 2, expected in [0, 2)",
              try_load({.layer = 1, .placement = placement, .rank = 2}, storage.buffers()));
  check_error(Errc::kInvalidArgument, "layer = 0, expected an MoE layer of this model (3 layers, the first 1 dense)",
              try_load({.layer = 0, .placement = placement, .rank = 0}, storage.buffers()));
  check_error(Errc::kInvalidArgument, "layer = 3, expected an MoE layer",
              try_load({.layer = 3, .placement = placement, .rank = 0}, storage.buffers()));
  auto small = storage.buffers();
  small.down = small.down.first(10);
  check_error(Errc::kInvalidArgument, "buffers.down.size() = 10, expected >= 6144 elements", try_load(request, small));
  auto no_bias = storage.buffers();
  no_bias.correction_bias = {};
  check_error(Errc::kInvalidArgument, "buffers.correction_bias.size() = 0, expected >= 6 elements",
              try_load(request, no_bias));
  // Experts outside [0, num_experts), through the lower-level plan.
  check_error(Errc::kInvalidArgument, "experts = [4, 8), expected a range of expert ids in [0, 6)", [&] {
    (void)io::plan_layer(ckpt, model, 1, ExpertRange{4, 4});
  });
  check_error(Errc::kInvalidArgument, "experts = [-1, 1)", [&] {
    (void)io::plan_layer(ckpt, model, 1, ExpertRange{-1, 2});
  });
  // The request that is right loads.
  auto const layer = io::load_layer(ckpt, model, request, storage.buffers());
  CHECK(layer.config.weights.num_local_experts == 3);
  CHECK(layer.config.correction_bias.size() == 6);
}

TEST_CASE("families: a family not listed is described with the same data type") {
  EPX_TEST_SEEDED_RNG(rng);
  CaseShape shape;
  TempDir dir;
  // A made-up model that keeps Qwen's tensors under other names, with separate gate/up biases,
  // and wants gate and up interleaved.
  auto built = build_model("qwen3_moe", Encoding::kBF16, shape, rng);
  for (auto& t : built.writer.tensors()) {
    auto const at = t.name.find(".mlp.experts.");
    if (at != std::string::npos) t.name.replace(at, 13, ".moe.expert_");
  }
  for (std::int32_t x = 0; x < 6; ++x)
    for (auto const* which : {"gate", "up"})
      built.writer.add({fmt::format("model.layers.1.moe.expert_{}.{}_proj.bias", x, which),
                        "F32",
                        {32},
                        to_bytes(std::vector<float>(32, static_cast<float>(x) + (which[0] == 'g' ? 0.25f : 0.5f))),
                        Owner::kExpert,
                        x,
                        x % 3});
  write_model(built, dir.path());
  io::ModelFamily family = io::qwen3_moe();
  family.name = "my_moe";
  family.model_types = {"my_moe"};
  family.gate = "model.layers.{layer}.moe.expert_{expert}.gate_proj.weight";
  family.up = "model.layers.{layer}.moe.expert_{expert}.up_proj.weight";
  family.down = "model.layers.{layer}.moe.expert_{expert}.down_proj.weight";
  family.gate_bias = "model.layers.{layer}.moe.expert_{expert}.gate_proj.bias";
  family.up_bias = "model.layers.{layer}.moe.expert_{expert}.up_proj.bias";
  family.gate_up_layout = GateUpLayout::kInterleaved;
  io::Checkpoint ckpt(dir.path());
  auto const model = io::read_model(ckpt, family);
  io::LayerRequest const request{.layer = 1, .placement = ExpertPlacement::contiguous(6, 2), .rank = 1};
  io::HostLayerStorage<float> storage(model, request);
  auto const layer = io::load_layer(ckpt, model, request, storage.buffers());
  CHECK(layer.config.mlp.gate_up_layout == GateUpLayout::kInterleaved);
  // Row 2i is gate row i, row 2i + 1 is up row i; the biases alternate likewise.
  for (std::size_t x = 0; x < 3; ++x)
    for (std::size_t i = 0; i < 32; ++i)
      for (std::size_t c = 0; c < 64; ++c) {
        std::size_t const g = x + 3;  // global expert
        CHECK(storage.gate_up[(x * 64 + 2 * i) * 64 + c] == built.gate_up[(g * 64 + i) * 64 + c]);
        CHECK(storage.gate_up[(x * 64 + 2 * i + 1) * 64 + c] == built.gate_up[(g * 64 + 32 + i) * 64 + c]);
      }
  for (std::size_t x = 0; x < 3; ++x)
    for (std::size_t i = 0; i < 32; ++i) {
      CHECK(storage.gate_up_bias[x * 64 + 2 * i] == static_cast<float>(x + 3) + 0.25f);
      CHECK(storage.gate_up_bias[x * 64 + 2 * i + 1] == static_cast<float>(x + 3) + 0.5f);
    }
  // A family that does not describe a layer is refused, naming the field.
  io::ModelFamily bad = family;
  bad.down.clear();
  check_error(Errc::kInvalidArgument, "ModelFamily 'my_moe': down = ''", [&] { io::validate(bad); });
  bad = family;
  bad.gate = "model.layers.{layer}.moe.shared.gate_proj.weight";
  check_error(Errc::kInvalidArgument, "a name holding {expert}", [&] { io::validate(bad); });
  bad = family;
  bad.storage = io::ExpertStorage::kStacked;
  check_error(Errc::kInvalidArgument, "a name without {expert}", [&] { io::validate(bad); });
  bad = family;
  bad.gate_up = "x.{layer}";
  check_error(Errc::kInvalidArgument, "either gate and up, or gate_up", [&] { io::validate(bad); });
  bad = family;
  bad.up_bias.clear();
  check_error(Errc::kInvalidArgument, "both named or both empty", [&] { io::validate(bad); });
  bad = family;
  bad.router_weight = "r.{expert}";
  check_error(Errc::kInvalidArgument, "every expert's router row is in one tensor", [&] { io::validate(bad); });
  for (auto const& f : io::builtin_families()) {
    CAPTURE(f.name);
    io::validate(f);
  }
}
