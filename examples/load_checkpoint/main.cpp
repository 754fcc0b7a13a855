// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// docs/loading.md: a small Qwen3-MoE-style checkpoint written to a temporary folder (two layers, 8
// experts, bf16, two shards and an index, config.json), then loaded the way a runtime would: each of
// two expert-parallel ranks reads only its experts of layer 1 (and the router) and runs the layer
// on its own tokens. One rank that loads all experts must give the same bits; each rank reads only
// its share of the file. The test example.loading_snippet keeps the page's block equal to the lines
// between the markers below.
#include <epx/epx.hpp>
#include <epx/io.hpp>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include <unistd.h>

namespace fs = std::filesystem;

constexpr int kLayers = 2, kExperts = 8, kTopK = 2, kHidden = 64, kInter = 32, kTokensPerRank = 6;

// ---- Writing the checkpoint (what a training framework does; not epx's part) ----

struct Tensor {
  std::string name;
  std::vector<std::int64_t> shape;
  std::vector<epx::bfloat16> values;
};

// A safetensors file: 8-byte little-endian header length, the JSON header (padded with spaces),
// then the tensors' bytes.
void write_safetensors(fs::path const& path, std::vector<Tensor> const& tensors) {
  std::string header = "{";
  std::uint64_t offset = 0;
  for (auto const& t : tensors) {
    std::string shape;
    for (auto d : t.shape) shape += (shape.empty() ? "" : ",") + std::to_string(d);
    std::uint64_t const bytes = t.values.size() * sizeof(epx::bfloat16);
    header += fmt::format("{}\"{}\":{{\"dtype\":\"BF16\",\"shape\":[{}],\"data_offsets\":[{},{}]}}",
                          header.size() > 1 ? "," : "", t.name, shape, offset, offset + bytes);
    offset += bytes;
  }
  header += "}";
  while (header.size() % 8 != 0) header += ' ';
  std::ofstream out(path, std::ios::binary);
  std::uint64_t const n = header.size();
  for (int i = 0; i < 8; ++i) out.put(static_cast<char>((n >> (8 * i)) & 0xff));
  out << header;
  for (auto const& t : tensors)
    out.write(reinterpret_cast<char const*>(t.values.data()), static_cast<std::streamsize>(t.values.size() * 2));
}

// Layer l's router and experts, Qwen3-MoE's names, expert e in shard e % 2; config.json and the index.
void write_checkpoint(fs::path const& dir, std::mt19937_64& rng) {
  auto random = [&](std::size_t n, float scale) {
    std::normal_distribution<float> dist(0.0f, scale);
    std::vector<epx::bfloat16> v(n);
    for (auto& x : v) x = epx::bfloat16(dist(rng));
    return v;
  };
  std::vector<Tensor> shards[2];
  for (int l = 0; l < kLayers; ++l) {
    std::string const p = "model.layers." + std::to_string(l) + ".mlp.";
    shards[0].push_back({p + "gate.weight", {kExperts, kHidden}, random(kExperts * kHidden, 0.125f)});
    for (int e = 0; e < kExperts; ++e) {
      std::string const q = p + "experts." + std::to_string(e) + ".";
      auto& shard = shards[e % 2];
      shard.push_back({q + "gate_proj.weight", {kInter, kHidden}, random(kInter * kHidden, 0.125f)});
      shard.push_back({q + "up_proj.weight", {kInter, kHidden}, random(kInter * kHidden, 0.125f)});
      shard.push_back({q + "down_proj.weight", {kHidden, kInter}, random(kHidden * kInter, 0.18f)});
    }
  }
  std::string weight_map;
  for (int s = 0; s < 2; ++s) {
    std::string const file = fmt::format("model-{:05d}-of-00002.safetensors", s + 1);
    write_safetensors(dir / file, shards[s]);
    for (auto const& t : shards[s])
      weight_map += fmt::format("{}\"{}\":\"{}\"", weight_map.empty() ? "" : ",", t.name, file);
  }
  std::ofstream(dir / "model.safetensors.index.json") << "{\"metadata\":{},\"weight_map\":{" << weight_map << "}}";
  std::ofstream(dir / "config.json") << fmt::format(
      R"({{"model_type": "qwen3_moe", "num_experts": {}, "num_experts_per_tok": {}, "hidden_size": {},
          "moe_intermediate_size": {}, "num_hidden_layers": {}, "norm_topk_prob": true}})",
      kExperts, kTopK, kHidden, kInter, kLayers);
}

// ---- Loading and running (the runtime's part) ----

// Runs layer 1 on `ranks` ranks of `placement`, rank r forwarding tokens x[r]; returns each rank's
// y, and prints what each rank read.
std::vector<std::vector<epx::bfloat16>> run(fs::path const& dir, epx::ExpertPlacement const& placement,
                                            std::vector<std::vector<epx::bfloat16>> const& x) {
  int const ranks = placement.num_ranks();
  std::vector<std::vector<epx::bfloat16>> y(static_cast<std::size_t>(ranks));
  epx::LocalGroup group(ranks);
  group.run([&](int rank, epx::Communicator& comm) {
    // example-begin loading
    epx::io::Checkpoint checkpoint(dir);                              // reads the index only
    epx::io::MoeModel const model = epx::io::read_model(checkpoint);  // config.json + family (qwen3_moe)
    epx::io::LayerRequest const request{.layer = 1, .placement = placement, .rank = rank};
    epx::io::HostLayerStorage<epx::bfloat16> storage(model, request);  // or your own buffers (layer_sizes)
    epx::io::LoadedLayer<epx::bfloat16> const layer =
        epx::io::load_layer(checkpoint, model, request, storage.buffers());  // this rank's experts + the router
    epx::ExpertParallel<epx::Grouped, epx::AllToAll, epx::Host> moe(layer.config, comm);
    // example-end loading

    // The router's projection is the runtime's: logits = x · router weightᵀ (epx starts from logits).
    auto const& xr = x[static_cast<std::size_t>(rank)];
    std::int64_t const tokens = static_cast<std::int64_t>(xr.size()) / kHidden;
    std::vector<float> logits(static_cast<std::size_t>(tokens * kExperts));
    for (std::int64_t t = 0; t < tokens; ++t)
      for (int e = 0; e < kExperts; ++e) {
        float acc = 0.0f;
        for (int h = 0; h < kHidden; ++h)
          acc += static_cast<float>(xr[static_cast<std::size_t>(t * kHidden + h)]) *
                 static_cast<float>(layer.router_weight(e, h));
        logits[static_cast<std::size_t>(t * kExperts + e)] = acc;
      }
    auto& yr = y[static_cast<std::size_t>(rank)];
    yr.resize(xr.size());
    std::vector<std::byte> workspace(moe.workspace_bytes(kTokensPerRank * 2));
    moe.forward(epx::Host{}, epx::MatrixView<float const>(logits.data(), tokens, kExperts),
                epx::MatrixView(xr.data(), tokens, kHidden), epx::MatrixView(yr.data(), tokens, kHidden),
                {workspace.data(), workspace.size()});
    std::printf(
        "%d rank(s), rank %d: experts %d..%d, read %llu bytes of tensor data and %llu of headers in %d "
        "shard(s)\n",
        ranks, rank, layer.experts.first, layer.experts.end() - 1,
        static_cast<unsigned long long>(checkpoint.stats().data_bytes),
        static_cast<unsigned long long>(checkpoint.stats().header_bytes), checkpoint.stats().shards_opened);
  });
  return y;
}

int main() {
  std::mt19937_64 rng(2026);
  fs::path const dir = fs::temp_directory_path() / fmt::format("epx-load-checkpoint-{}", ::getpid());
  fs::create_directories(dir);
  write_checkpoint(dir, rng);

  std::vector<std::vector<epx::bfloat16>> x(2);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  for (auto& xr : x)
    for (int i = 0; i < kTokensPerRank * kHidden; ++i) xr.push_back(epx::bfloat16(dist(rng)));

  // Two ranks, uneven on purpose (3 and 5 experts), each with its own tokens; then one rank with all.
  auto const two = run(dir, epx::ExpertPlacement::from_counts(std::vector<std::int32_t>{3, 5}), x);
  std::vector<std::vector<epx::bfloat16>> all(1);
  for (auto const& xr : x) all[0].insert(all[0].end(), xr.begin(), xr.end());
  auto const one = run(dir, epx::ExpertPlacement::contiguous(kExperts, 1), all);
  fs::remove_all(dir);

  std::size_t differ = 0;
  for (std::size_t i = 0; i < one[0].size(); ++i) {
    auto const& y2 = i < two[0].size() ? two[0][i] : two[1][i - two[0].size()];
    differ += y2.bits != one[0][i].bits;
  }
  std::printf("outputs of 2 ranks vs 1 rank: %zu of %zu elements differ (expected 0)\n", differ, one[0].size());
  return differ == 0 ? 0 : 1;
}
