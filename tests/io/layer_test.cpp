// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// Loaded layers run: two LocalGroup ranks, each loading only its experts (uneven placement) with
// the MoeConfig load_layer returns, give bit for bit the outputs of one rank that loaded all
// experts; and both equal a dense double-precision MoE computed from the stored tensors by each
// family's documented semantics (its router, activation, gate/up order, biases), written in the
// test, not taken from the loader.

#include "io_test_util.hpp"

using namespace epx;
using namespace epx::test::io;

namespace {

// What each family computes, as its modeling code defines it (see model_family.hpp's sources).
struct Semantics {
  RouterConfig router;
  ExpertMlpConfig mlp;
};

Semantics semantics_of(std::string const& family, CaseShape const& s) {
  std::string const base = family.ends_with("_stacked") ? family.substr(0, family.size() - 8) : family;
  Semantics out{.router = {.num_experts = s.num_experts, .top_k = s.top_k},
                .mlp = {.hidden = s.hidden, .intermediate = s.intermediate}};
  if (base == "gpt_oss") {
    out.router.scoring = Scoring::kTopKSoftmax;
    out.mlp.activation = Activation::kClampedSwiGLU;
    out.mlp.gate_up_layout = GateUpLayout::kInterleaved;
    out.mlp.clamped_swiglu = {.alpha = 1.702f, .limit = 7.0f};
  } else if (base == "deepseek_v3") {  // the test's config.json: n_group 2, topk_group 1, scaling 2.5
    out.router = {.num_experts = s.num_experts,
                  .top_k = s.top_k,
                  .scoring = Scoring::kSigmoidTopK,
                  .renormalize = true,
                  .num_groups = 2,
                  .topk_groups = 1,
                  .routed_scaling_factor = 2.5f};
  } else {  // Qwen (norm_topk_prob true in the test's config.json), Mixtral (always)
    out.router.renormalize = true;
  }
  return out;
}

template <class T>
std::vector<T> rounded(std::vector<float> const& values) {
  std::vector<T> out(values.size());
  for (std::size_t i = 0; i < values.size(); ++i) out[i] = round_value<T>(values[i]);
  return out;
}

// logits[t, e] = x[t] · router[e] (+ bias[e]) in double, from the router as T.
template <class T>
std::vector<float> router_logits(std::vector<T> const& x, std::vector<T> const& router, std::vector<T> const& bias,
                                 std::int64_t tokens, std::int64_t experts, std::int64_t hidden) {
  std::vector<float> logits(static_cast<std::size_t>(tokens * experts));
  for (std::int64_t t = 0; t < tokens; ++t)
    for (std::int64_t e = 0; e < experts; ++e) {
      double acc = bias.empty() ? 0.0 : double(to_float(bias[static_cast<std::size_t>(e)]));
      for (std::int64_t h = 0; h < hidden; ++h)
        acc += double(to_float(x[static_cast<std::size_t>(t * hidden + h)])) *
               double(to_float(router[static_cast<std::size_t>(e * hidden + h)]));
      logits[static_cast<std::size_t>(t * experts + e)] = static_cast<float>(acc);
    }
  return logits;
}

// Runs the layer on `placement`'s ranks, rank r loading its experts and forwarding tokens[r]:
// from the router's logits when `from_logits`, else from `ids`/`weights`.
template <class T>
std::vector<std::vector<T>> run_loaded(fs::path const& dir, std::int32_t layer, ExpertPlacement const& placement,
                                       std::vector<std::vector<T>> const& xs,
                                       std::vector<std::vector<std::int32_t>> const& ids,
                                       std::vector<std::vector<float>> const& weights, bool from_logits) {
  std::int32_t const ranks = placement.num_ranks();
  std::vector<std::vector<T>> ys(static_cast<std::size_t>(ranks));
  LocalGroup group(ranks, {.timeout = std::chrono::seconds(60)});
  group.run([&](int rank, Communicator& comm) {
    auto const r = static_cast<std::size_t>(rank);
    io::Checkpoint ckpt(dir);
    auto const model = io::read_model(ckpt);
    io::LayerRequest const request{.layer = layer, .placement = placement, .rank = rank};
    io::HostLayerStorage<T> storage(model, request);
    auto const loaded = io::load_layer(ckpt, model, request, storage.buffers());
    ExpertParallel<Grouped, AllToAll, Host> moe(loaded.config, comm);
    std::int64_t const hidden = model.mlp.hidden, experts = model.router.num_experts;
    std::int64_t const tokens = static_cast<std::int64_t>(xs[r].size()) / hidden;
    std::int64_t max_tokens = 0;
    for (auto const& x : xs)
      max_tokens = std::max<std::int64_t>(max_tokens, static_cast<std::int64_t>(x.size()) / hidden);
    std::vector<std::byte> workspace(moe.workspace_bytes(max_tokens));
    ys[r].assign(xs[r].size(), from_float<T>(999.0f));
    MatrixView<T const> x(xs[r].data(), tokens, hidden);
    MatrixView<T> y(ys[r].data(), tokens, hidden);
    if (from_logits) {
      std::vector<T> const router(loaded.router_weight.data, loaded.router_weight.data + experts * hidden);
      std::vector<T> const bias(loaded.router_bias.begin(), loaded.router_bias.end());
      auto const logits = router_logits(xs[r], router, bias, tokens, experts, hidden);
      moe.forward(Host{}, MatrixView<float const>(logits.data(), tokens, experts), x, y,
                  Workspace(workspace.data(), workspace.size()));
    } else {
      std::int64_t const k = model.router.top_k;
      moe.forward(Host{}, MatrixView<std::int32_t const>(ids[r].data(), tokens, k),
                  MatrixView<float const>(weights[r].data(), tokens, k), x, y,
                  Workspace(workspace.data(), workspace.size()));
    }
  });
  return ys;
}

template <class T>
void check_layer(std::string const& family, Encoding enc, std::mt19937_64& rng) {
  CAPTURE(family);
  CAPTURE(to_string(enc));
  INFO("computed in " << to_string(dtype_of_v<T>));
  CaseShape shape;
  TempDir dir;
  auto const built = build_model(family, enc, shape, rng);
  write_model(built, dir.path());
  auto const sem = semantics_of(family, shape);
  std::int64_t const h = shape.hidden, e = shape.num_experts, k = shape.top_k;

  // Two ranks' own tokens; the one-rank run forwards them all.
  std::vector<std::int64_t> const tokens = {5, 9};
  std::vector<std::vector<T>> xs;
  std::vector<std::vector<std::int32_t>> ids;
  std::vector<std::vector<float>> weights;
  for (auto n : tokens) {
    xs.push_back(test::random_vector<T>(static_cast<std::size_t>(n * h), rng));
    ids.push_back(test::random_ids(n, shape.top_k, shape.num_experts, rng));
    weights.push_back(test::random_weights(ids.back().size(), rng));
  }
  auto concat = [](auto const& parts) {
    std::remove_cvref_t<decltype(parts[0])> all;
    for (auto const& p : parts) all.insert(all.end(), p.begin(), p.end());
    return all;
  };
  // The dense reference: the family's semantics over the stored tensors' values (as T).
  test::GlobalWeights<T> global{.num_experts = shape.num_experts, .mlp = sem.mlp};
  global.gate_up = rounded<T>(built.gate_up);
  global.down = rounded<T>(built.down);
  global.gate_up_bias = rounded<T>(built.gate_up_bias);
  global.down_bias = rounded<T>(built.down_bias);
  auto const router = rounded<T>(built.router_weight);
  auto const router_bias = rounded<T>(built.router_bias);
  double const tolerance = std::is_same_v<T, float> ? 1e-5 : 1e-2;

  for (bool from_logits : {false, true}) {
    CAPTURE(from_logits);
    auto const one = run_loaded<T>(dir.path(), shape.layer, ExpertPlacement::contiguous(shape.num_experts, 1),
                                   {concat(xs)}, {concat(ids)}, {concat(weights)}, from_logits);
    auto const two =
        run_loaded<T>(dir.path(), shape.layer, ExpertPlacement::from_counts(std::vector<std::int32_t>{2, 4}), xs, ids,
                      weights, from_logits);
    auto const both = concat(two);
    REQUIRE(both.size() == one[0].size());
    std::size_t mismatches = 0;
    for (std::size_t i = 0; i < both.size(); ++i) mismatches += bits_of(both[i]) != bits_of(one[0][i]);
    CHECK(mismatches == 0);  // the same experts computed the same rows

    // Against the dense reference, routed as the family routes.
    std::int64_t const n = tokens[0] + tokens[1];
    std::vector<std::int32_t> ref_ids = concat(ids);
    std::vector<float> ref_weights = concat(weights);
    if (from_logits) {
      auto const logits = router_logits(concat(xs), router, router_bias, n, e, h);
      route(Host{}, sem.router, MatrixView<float const>(logits.data(), n, e), built.correction_bias,
            MatrixView<std::int32_t>(ref_ids.data(), n, k), MatrixView<float>(ref_weights.data(), n, k));
    }
    auto const want = test::dense_moe(global, concat(xs), ref_ids, ref_weights, n, shape.top_k);
    CHECK(test::rel_error(one[0], want) <= tolerance);
  }
}

}  // namespace

TEST_CASE("loaded layers: 2 ranks with their own experts equal 1 rank with all, and the dense reference") {
  EPX_TEST_SEEDED_RNG(rng);
  check_layer<bfloat16>("qwen3_moe", Encoding::kBF16, rng);
  check_layer<float>("qwen2_moe", Encoding::kF32, rng);
  check_layer<bfloat16>("mixtral", Encoding::kF16, rng);
  check_layer<bfloat16>("deepseek_v3", Encoding::kFp8, rng);
  check_layer<bfloat16>("gpt_oss", Encoding::kMxfp4, rng);
  check_layer<float>("gpt_oss", Encoding::kBF16, rng);
  check_layer<half>("qwen3_moe_stacked", Encoding::kBF16, rng);
  check_layer<float>("deepseek_v3_stacked", Encoding::kF32, rng);
}
