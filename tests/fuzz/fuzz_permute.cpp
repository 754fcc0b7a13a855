// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// permute + unpermute(Host) round trip with arbitrary ids and weights (NaN/inf included).
// Invariants: permuted rows are copies of their tokens; y equals the slot-order fp32 sum computed
// here, bit for bit; y is finite whenever the inputs of its valid slots are.

#include "fuzz_input.hpp"

#include <cmath>

extern "C" int LLVMFuzzerTestOneInput(std::uint8_t const* data, std::size_t size) {
  using namespace epx;
  fuzz::ByteReader in(data, size);
  auto const num_experts = static_cast<std::int32_t>(in.in_range(1, 20));
  auto const top_k = static_cast<std::int32_t>(in.in_range(1, 6));
  auto const num_tokens = static_cast<std::int32_t>(in.in_range(0, 24));
  auto const hidden = static_cast<std::int32_t>(in.in_range(1, 9));
  auto const n = static_cast<std::size_t>(num_tokens) * static_cast<std::size_t>(top_k);
  std::vector<std::int32_t> ids(n);
  for (auto& id : ids) id = in.any_id(num_experts);
  std::vector<float> weights(n), x(static_cast<std::size_t>(num_tokens) * static_cast<std::size_t>(hidden));
  for (auto& w : weights) w = in.any_float();
  for (auto& v : x) v = in.any_float();

  std::vector<std::byte> ws(plan_workspace_bytes(num_tokens, top_k, num_experts));
  Status status;
  RoutingPlan const plan = make_plan(Host{}, MatrixView<std::int32_t const>(ids.data(), num_tokens, top_k), num_experts,
                                     {0, num_experts}, Workspace(ws.data(), ws.size()), status);
  std::int64_t const rows = plan.expert_offsets.back();
  std::vector<float> x_perm(static_cast<std::size_t>(rows) * static_cast<std::size_t>(hidden));
  permute(Host{}, plan, MatrixView<float const>(x.data(), num_tokens, hidden),
          MatrixView<float>(x_perm.data(), rows, hidden));
  for (std::int64_t r = 0; r < rows; ++r) {
    auto const token = plan.sorted_slots[static_cast<std::size_t>(r)] / top_k;
    EPX_FUZZ_CHECK(std::memcmp(&x_perm[static_cast<std::size_t>(r * hidden)],
                               &x[static_cast<std::size_t>(token) * static_cast<std::size_t>(hidden)],
                               static_cast<std::size_t>(hidden) * sizeof(float)) == 0);
  }
  std::vector<float> y(x.size(), 7.0f);
  unpermute(Host{}, plan, MatrixView<float const>(x_perm.data(), rows, hidden),
            MatrixView<float const>(weights.data(), num_tokens, top_k),
            MatrixView<float>(y.data(), num_tokens, hidden));
  for (std::int32_t t = 0; t < num_tokens; ++t)
    for (std::int32_t c = 0; c < hidden; ++c) {
      float acc = 0.0f;
      bool finite_inputs = true;
      for (std::int32_t j = 0; j < top_k; ++j) {
        auto const id = ids[static_cast<std::size_t>(t * top_k + j)];
        if (id < 0 || id >= num_experts) continue;
        float const w = weights[static_cast<std::size_t>(t * top_k + j)],
                    v = x[static_cast<std::size_t>(t * hidden + c)];
        finite_inputs = finite_inputs && std::isfinite(w) && std::isfinite(v);
        acc = std::fma(w, v, acc);  // unpermute adds each term with one rounding (detail::add_weighted)
      }
      float const got = y[static_cast<std::size_t>(t * hidden + c)];
      EPX_FUZZ_CHECK(std::memcmp(&got, &acc, sizeof(float)) == 0 || (std::isnan(got) && std::isnan(acc)));
      if (finite_inputs && std::isfinite(acc)) EPX_FUZZ_CHECK(std::isfinite(got));
    }
  return 0;
}
