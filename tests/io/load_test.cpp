// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// load_layer on checkpoints of every family and element type, single-file and sharded: every rank
// of uneven placements gets exactly its experts' slices, bit for bit after the documented
// conversion, and reads exactly its experts' bytes, the router's, and the headers of the shards
// that hold them, nothing else.

#include "io_test_util.hpp"

using namespace epx;
using namespace epx::test::io;

namespace {

template <class T, class A>
std::size_t count_mismatches(std::vector<T> const& got, std::vector<A> const& want_values, std::size_t first,
                             std::size_t count) {
  REQUIRE(got.size() == count);
  REQUIRE(first + count <= want_values.size());
  std::size_t bad = 0;
  for (std::size_t i = 0; i < count; ++i) {
    T const want = round_value<T>(want_values[first + i]);
    bad += bits_of(got[i]) != bits_of(want);
  }
  return bad;
}

struct LoadCase {
  std::string family;
  Encoding encoding;
};

template <class T>
void check_family(LoadCase const& c, std::int32_t num_shards, std::size_t staging_bytes, std::mt19937_64& rng) {
  CAPTURE(c.family);
  CAPTURE(to_string(c.encoding));
  CAPTURE(num_shards);
  CAPTURE(staging_bytes);
  INFO("loaded as " << to_string(dtype_of_v<T>));
  CaseShape shape;
  shape.num_shards = num_shards;
  TempDir dir;
  auto const built = build_model(c.family, c.encoding, shape, rng);
  write_model(built, dir.path());
  std::int64_t const e = shape.num_experts, h = shape.hidden, in = shape.intermediate, rows = 2 * in;

  for (auto const& counts : std::vector<std::vector<std::int32_t>>{{6}, {2, 0, 3, 1}, {1, 1, 1, 1, 1, 1}}) {
    auto const placement = ExpertPlacement::from_counts(counts);
    for (std::int32_t rank = 0; rank < placement.num_ranks(); ++rank) {
      CAPTURE(placement.num_ranks());
      CAPTURE(rank);
      io::Checkpoint ckpt(dir.path());  // each rank opens the checkpoint itself
      auto const model = io::read_model(ckpt);
      CHECK(model.family.name == c.family);
      io::LayerRequest const request{.layer = shape.layer, .placement = placement, .rank = rank};
      io::HostLayerStorage<T> storage(model, request);
      auto const layer = io::load_layer(ckpt, model, request, storage.buffers(), {.staging_bytes = staging_bytes});
      ExpertRange const mine = placement.local_range(rank);
      CHECK(layer.experts.first == mine.first);
      CHECK(layer.experts.count == mine.count);
      auto const f = static_cast<std::size_t>(mine.first), n = static_cast<std::size_t>(mine.count);

      // The slices, bit for bit.
      CHECK(count_mismatches(storage.gate_up, built.gate_up, f * static_cast<std::size_t>(rows * h),
                             n * static_cast<std::size_t>(rows * h)) == 0);
      CHECK(count_mismatches(storage.down, built.down, f * static_cast<std::size_t>(h * in),
                             n * static_cast<std::size_t>(h * in)) == 0);
      CHECK(storage.gate_up_bias.size() == (built.gate_up_bias.empty() ? 0 : n * static_cast<std::size_t>(rows)));
      if (!built.gate_up_bias.empty())
        CHECK(count_mismatches(storage.gate_up_bias, built.gate_up_bias, f * static_cast<std::size_t>(rows),
                               n * static_cast<std::size_t>(rows)) == 0);
      CHECK(storage.down_bias.size() == (built.down_bias.empty() ? 0 : n * static_cast<std::size_t>(h)));
      if (!built.down_bias.empty())
        CHECK(count_mismatches(storage.down_bias, built.down_bias, f * static_cast<std::size_t>(h),
                               n * static_cast<std::size_t>(h)) == 0);
      CHECK(count_mismatches(storage.router_weight, built.router_weight, 0, built.router_weight.size()) == 0);
      CHECK(count_mismatches(storage.router_bias, built.router_bias, 0, built.router_bias.size()) == 0);
      CHECK(count_mismatches(storage.correction_bias, built.correction_bias, 0, built.correction_bias.size()) == 0);

      // What was read: this rank's slices and the router, the headers of the shards holding them.
      auto const& stats = ckpt.stats();
      CHECK(stats.data_bytes == built.expected_data_bytes(mine.first, mine.count));
      CHECK(layer.stats.data_bytes == stats.data_bytes);
      auto const shards = built.expected_shards(mine.first, mine.count);
      std::uint64_t headers = 0;
      for (auto s : shards) headers += built.writer.header_bytes(s);
      if (num_shards == 1) headers = built.writer.header_bytes(0);  // the single file's header, read at open
      CHECK(stats.header_bytes == headers);
      CHECK(stats.shards_opened == static_cast<std::int32_t>(num_shards == 1 ? 1 : shards.size()));
      if (num_shards > 1)
        CHECK(stats.index_bytes == std::filesystem::file_size(dir.path() / "model.safetensors.index.json"));
      CHECK(stats.total_bytes() == stats.index_bytes + headers + built.expected_data_bytes(mine.first, mine.count));

      // The configuration, ready for ExpertParallel.
      auto const& cfg = layer.config;
      CHECK(cfg.weights.num_local_experts == mine.count);
      CHECK(cfg.weights.dtype == dtype_of_v<T>);
      CHECK(cfg.weights.gate_up == static_cast<void const*>(storage.gate_up.data()));
      CHECK(cfg.weights.gate_up_shape.extent_list()[1] == rows);
      CHECK(cfg.mlp.hidden == h);
      CHECK(cfg.mlp.intermediate == in);
      CHECK(cfg.mlp.gate_up_layout == built.gate_up_layout);
      CHECK(cfg.mlp.activation == built.activation);
      CHECK(cfg.router.num_experts == e);
      CHECK(cfg.placement == placement);
      CHECK(cfg.correction_bias.size() == built.correction_bias.size());
      if (mine.count > 0) CHECK((cfg.weights.gate_up_bias != nullptr) == !built.gate_up_bias.empty());
      CHECK(layer.router_weight.rows == e);
      CHECK(layer.router_bias.size() == built.router_bias.size());
      // Staging: none for verbatim reads, else at most the limit (or one stored row).
      CHECK(layer.staging_bytes <= std::max<std::size_t>(staging_bytes, static_cast<std::size_t>(4 * rows)));
      if (std::is_same_v<T, bfloat16> && c.encoding == Encoding::kBF16 &&
          (c.family == "qwen3_moe" || c.family == "qwen2_moe" || c.family == "mixtral" ||
           c.family.ends_with("_stacked")))
        CHECK(layer.staging_bytes == 0);  // every job read straight into the caller's memory
    }
  }
}

}  // namespace

TEST_CASE("load_layer: every family and element type, single file and shards, every rank") {
  EPX_TEST_SEEDED_RNG(rng);
  std::vector<LoadCase> const cases = {
      {"qwen3_moe", Encoding::kBF16},
      {"qwen3_moe", Encoding::kF32},
      {"qwen3_moe", Encoding::kFp8},
      {"qwen2_moe", Encoding::kBF16},
      {"mixtral", Encoding::kBF16},
      {"mixtral", Encoding::kF16},
      {"deepseek_v3", Encoding::kFp8},
      {"deepseek_v3", Encoding::kBF16},
      {"gpt_oss", Encoding::kBF16},
      {"gpt_oss", Encoding::kMxfp4},
      {"gpt_oss", Encoding::kF32},
      {"qwen3_moe_stacked", Encoding::kBF16},
      {"qwen2_moe_stacked", Encoding::kF16},
      {"mixtral_stacked", Encoding::kF32},
      {"deepseek_v3_stacked", Encoding::kBF16},
  };
  for (auto const& c : cases) {
    for (std::int32_t shards : {1, 3}) {
      check_family<bfloat16>(c, shards, std::size_t{64} << 20, rng);
      check_family<bfloat16>(c, shards, 100, rng);  // a chunk per stored row
    }
    check_family<half>(c, 3, std::size_t{1} << 10, rng);
    check_family<float>(c, 3, std::size_t{64} << 20, rng);
  }
}

TEST_CASE("load_layer: FP8 blocks as DeepSeek-V3 ships them (128 x 128, partial edge blocks)") {
  EPX_TEST_SEEDED_RNG(rng);
  CaseShape shape;
  shape.hidden = 160;       // one full and one partial block of 128 columns
  shape.intermediate = 96;  // one partial block of 128 rows
  shape.fp8_block_rows = 128;
  shape.fp8_block_cols = 128;
  TempDir dir;
  auto const built = build_model("deepseek_v3", Encoding::kFp8, shape, rng);
  write_model(built, dir.path());
  io::Checkpoint ckpt(dir.path());
  auto const model = io::read_model(ckpt);
  CHECK(model.fp8_block == std::array<std::int32_t, 2>{128, 128});
  io::LayerRequest const request{.layer = shape.layer, .placement = ExpertPlacement::contiguous(6, 2), .rank = 1};
  io::HostLayerStorage<bfloat16> storage(model, request);
  (void)io::load_layer(ckpt, model, request, storage.buffers());
  std::size_t const rows = 2 * 96, h = 160;
  CHECK(count_mismatches(storage.gate_up, built.gate_up, 3 * rows * h, 3 * rows * h) == 0);
  CHECK(count_mismatches(storage.down, built.down, 3 * h * 96, 3 * h * 96) == 0);
}
