// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// ExpertParallel<Grouped, AllToAll | AllGather, Host> over 1-4 LocalGroup ranks with arbitrary
// ids, weights and shapes. Invariants: an Error with Errc::kInvalidExpertId is thrown exactly on
// the ranks whose ids hold invalid values (policy kThrow), never anything else; every row of y is
// written; y matches a plain per-token loop within fp32 tolerance when the inputs are finite.

#include "fuzz_input.hpp"

#include <cmath>
#include <random>

namespace {

using namespace epx;

struct Layer {
  std::int32_t num_experts, top_k, hidden, inter;
  std::vector<float> gate_up, down;  // [E, 2I, H], [E, H, I]

  std::vector<double> expert(std::int32_t e, float const* x) const {
    auto const h = static_cast<std::size_t>(hidden), ii = static_cast<std::size_t>(inter),
               ue = static_cast<std::size_t>(e);
    std::vector<double> hv(2 * ii), out(h);
    for (std::size_t n = 0; n < 2 * ii; ++n)
      for (std::size_t k = 0; k < h; ++k) hv[n] += double(x[k]) * gate_up[(ue * 2 * ii + n) * h + k];
    for (std::size_t n = 0; n < h; ++n)
      for (std::size_t i = 0; i < ii; ++i)
        out[n] += hv[i] / (1 + std::exp(-hv[i])) * hv[ii + i] * down[(ue * h + n) * ii + i];
    return out;
  }
};

template <class Dispatch>
void run(fuzz::ByteReader& in, Layer const& layer, int num_ranks) {
  constexpr bool kAllToAll = std::is_same_v<Dispatch, AllToAll>;
  auto const k = static_cast<std::size_t>(layer.top_k), h = static_cast<std::size_t>(layer.hidden);
  std::vector<std::int64_t> tokens(static_cast<std::size_t>(num_ranks));
  std::vector<std::vector<std::int32_t>> ids(tokens.size());
  std::vector<std::vector<float>> weights(tokens.size()), x(tokens.size()), y(tokens.size());
  for (std::size_t r = 0; r < tokens.size(); ++r) {
    if (!kAllToAll && r > 0) {
      tokens[r] = tokens[0], ids[r] = ids[0], weights[r] = weights[0], x[r] = x[0];
    } else {
      tokens[r] = in.in_range(0, 6);
      for (std::size_t i = 0; i < static_cast<std::size_t>(tokens[r]) * k; ++i) {
        ids[r].push_back(in.any_id(layer.num_experts));
        weights[r].push_back(in.any_float());
      }
      for (std::size_t i = 0; i < static_cast<std::size_t>(tokens[r]) * h; ++i) x[r].push_back(in.any_float());
    }
    y[r].assign(x[r].size(), NAN);
  }
  std::int64_t const max_tokens = *std::max_element(tokens.begin(), tokens.end());
  auto const placement = ExpertPlacement::contiguous(layer.num_experts, num_ranks);
  std::vector<int> invalid_errors(tokens.size()), other_errors(tokens.size());
  LocalGroup group(num_ranks, {.timeout = std::chrono::seconds(20)});
  group.run([&](int rank, Communicator& comm) {
    auto const r = static_cast<std::size_t>(rank);
    auto const local = placement.local_range(rank);
    auto const gu = static_cast<std::size_t>(2 * layer.inter) * h, dn = h * static_cast<std::size_t>(layer.inter);
    ExpertParallel<Grouped, Dispatch, Host> ep(
        MoeConfig{
            .router = {.num_experts = layer.num_experts, .top_k = layer.top_k},
            .mlp = {.hidden = layer.hidden, .intermediate = layer.inter},
            .weights = expert_weights(local.count, layer.gate_up.data() + static_cast<std::size_t>(local.first) * gu,
                                      layer.down.data() + static_cast<std::size_t>(local.first) * dn)},
        comm);
    std::vector<std::byte> ws(ep.workspace_bytes(max_tokens));
    try {
      ep.forward(Host{}, MatrixView<std::int32_t const>(ids[r].data(), tokens[r], layer.top_k),
                 MatrixView<float const>(weights[r].data(), tokens[r], layer.top_k),
                 MatrixView<float const>(x[r].data(), tokens[r], layer.hidden),
                 MatrixView<float>(y[r].data(), tokens[r], layer.hidden), Workspace(ws.data(), ws.size()));
      (void)ep.status(Host{});  // where AllGather raises invalid ids (AllToAll's forward has)
    } catch (Error const& e) {
      (e.code() == Errc::kInvalidExpertId ? invalid_errors : other_errors)[r] = 1;
    }
  });
  for (std::size_t r = 0; r < tokens.size(); ++r) {
    bool has_invalid = false;
    for (auto id : ids[r]) has_invalid = has_invalid || (id != -1 && (id < 0 || id >= layer.num_experts));
    EPX_FUZZ_CHECK(other_errors[r] == 0);
    EPX_FUZZ_CHECK(invalid_errors[r] == (has_invalid ? 1 : 0));
    for (std::int64_t t = 0; t < tokens[r]; ++t) {
      std::vector<double> want(h, 0.0);
      bool finite = true;
      for (std::size_t j = 0; j < k; ++j) {
        auto const id = ids[r][static_cast<std::size_t>(t) * k + j];
        if (id < 0 || id >= layer.num_experts) continue;
        float const w = weights[r][static_cast<std::size_t>(t) * k + j];
        // Compare only where fp32 cannot overflow inside the expert (|x|, |w| < 1e3 with these small
        // weights); a huge finite input may rightly give inf/NaN in fp32 but not in the double reference.
        for (std::size_t c = 0; c < h; ++c)
          finite = finite && std::abs(x[r][static_cast<std::size_t>(t) * h + c]) < 1e3f;
        finite = finite && std::abs(w) < 1e3f;
        if (!finite) break;
        auto const out = layer.expert(id, x[r].data() + static_cast<std::size_t>(t) * h);
        for (std::size_t c = 0; c < h; ++c) want[c] += double(w) * out[c];
      }
      double scale = 1.0;
      for (double v : want) scale = std::isnan(v) ? INFINITY : std::max(scale, std::abs(v));
      for (std::size_t c = 0; c < h; ++c) {
        float const got = y[r][static_cast<std::size_t>(t) * h + c];
        // y was poisoned with NaN, so this also proves the row was written.
        if (finite && scale < 1e6) EPX_FUZZ_CHECK(std::abs(got - want[c]) <= 1e-4 * scale);
      }
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(std::uint8_t const* data, std::size_t size) {
  fuzz::ByteReader in(data, size);
  Layer layer{.num_experts = static_cast<std::int32_t>(in.in_range(1, 9)),
              .top_k = 0,
              .hidden = static_cast<std::int32_t>(in.in_range(1, 6)),
              .inter = static_cast<std::int32_t>(in.in_range(1, 5))};
  layer.top_k = static_cast<std::int32_t>(in.in_range(1, layer.num_experts));
  int const num_ranks = static_cast<int>(in.in_range(1, 4));
  bool const all_gather = in.flag();
  std::mt19937 rng(static_cast<unsigned>(in.take<std::uint16_t>()));
  std::normal_distribution<float> dist(0.0f, 0.5f);
  layer.gate_up.resize(static_cast<std::size_t>(layer.num_experts * 2 * layer.inter * layer.hidden));
  layer.down.resize(static_cast<std::size_t>(layer.num_experts * layer.hidden * layer.inter));
  for (auto& v : layer.gate_up) v = dist(rng);
  for (auto& v : layer.down) v = dist(rng);
  if (all_gather)
    run<AllGather>(in, layer, num_ranks);
  else
    run<AllToAll>(in, layer, num_ranks);
  return 0;
}
