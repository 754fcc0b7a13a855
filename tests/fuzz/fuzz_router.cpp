// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// route(Host): arbitrary configs and logits. Invariants: Error exactly when the config or bias is
// invalid; otherwise ids are distinct, in range, -1 only after the last chosen slot, and weights
// are finite and zero for -1 slots.

#include "fuzz_input.hpp"

#include <cmath>
#include <set>

extern "C" int LLVMFuzzerTestOneInput(std::uint8_t const* data, std::size_t size) {
  using namespace epx;
  fuzz::ByteReader in(data, size);
  RouterConfig c;
  c.num_experts = static_cast<std::int32_t>(in.in_range(-1, 70));
  c.top_k = static_cast<std::int32_t>(in.in_range(-1, 20));
  c.scoring = static_cast<Scoring>(in.in_range(0, 2));
  c.renormalize = in.flag();
  c.num_groups = static_cast<std::int32_t>(in.in_range(0, 9));
  c.topk_groups = static_cast<std::int32_t>(in.in_range(0, 9));
  c.routed_scaling_factor = in.flag() ? in.any_float() : 1.0f;
  bool const with_bias = in.flag();
  std::int64_t const num_tokens = in.in_range(0, 12);

  bool const config_ok = c.num_experts > 0 && c.top_k >= 1 && c.top_k <= c.num_experts && c.num_groups >= 1 &&
                         c.num_experts % c.num_groups == 0 && c.topk_groups >= 1 && c.topk_groups <= c.num_groups &&
                         c.topk_groups * (c.num_experts / c.num_groups) >= c.top_k &&
                         std::isfinite(c.routed_scaling_factor);
  auto const e = static_cast<std::size_t>(std::max(c.num_experts, 1));
  auto const k = static_cast<std::size_t>(std::max(c.top_k, 1));
  std::vector<float> bias;
  bool bias_ok = true;
  if (with_bias)
    for (std::size_t i = 0; i < e; ++i) {
      float const b = in.flag() ? in.any_float() : 0.25f * static_cast<float>(i % 3);
      bias_ok = bias_ok && std::isfinite(b);
      bias.push_back(b);
    }
  std::vector<float> logits(static_cast<std::size_t>(num_tokens) * e);
  for (auto& l : logits) l = in.any_float();
  std::vector<std::int32_t> ids(static_cast<std::size_t>(num_tokens) * k, 12345);
  std::vector<float> weights(ids.size(), 12345.0f);
  bool threw = false;
  try {
    route(Host{}, c, MatrixView<float const>(logits.data(), num_tokens, static_cast<std::int64_t>(e)), bias,
          MatrixView<std::int32_t>(ids.data(), num_tokens, static_cast<std::int64_t>(k)),
          MatrixView<float>(weights.data(), num_tokens, static_cast<std::int64_t>(k)));
  } catch (Error const&) {
    threw = true;
  }
  // Shapes always match here, so only the config and the bias can make it throw.
  bool const valid = config_ok && static_cast<std::size_t>(c.num_experts) == e &&
                     static_cast<std::size_t>(c.top_k) == k && (bias.empty() || bias_ok);
  EPX_FUZZ_CHECK(threw == !valid);
  if (threw) return 0;
  for (std::int64_t t = 0; t < num_tokens; ++t) {
    std::set<std::int32_t> seen;
    bool ended = false;
    for (std::size_t j = 0; j < k; ++j) {
      auto const id = ids[static_cast<std::size_t>(t) * k + j];
      float const w = weights[static_cast<std::size_t>(t) * k + j];
      if (id == -1) {
        ended = true;
        EPX_FUZZ_CHECK(w == 0.0f);
        continue;
      }
      EPX_FUZZ_CHECK(!ended);
      EPX_FUZZ_CHECK(id >= 0 && id < c.num_experts);
      EPX_FUZZ_CHECK(seen.insert(id).second);
      float const l = logits[static_cast<std::size_t>(t) * e + static_cast<std::size_t>(id)];
      EPX_FUZZ_CHECK(!std::isnan(l) && l != -INFINITY);  // unselectable experts are never chosen
      EPX_FUZZ_CHECK(std::isfinite(w));
    }
  }
  return 0;
}
