// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// ExpertParallel<Grouped, AllToAll | AllGather, Host> over 1-4 LocalGroup ranks with arbitrary
// ids, weights and shapes, a training forward then its backward. Invariants: an Error with
// Errc::kInvalidExpertId is thrown exactly on the ranks whose ids hold invalid values (policy
// kThrow), never anything else, and the backward still runs; every row of y, dx, d_topk_weights
// and every weight gradient is written; y, dx and d_topk_weights match plain per-token loops in
// double within fp32 tolerance when the inputs are finite; a second backward gives the same bits.
// AllToAll also takes a received_rows_factor (0 to 4 in halves; 0, the dropless worst case, when
// the input ends first): a forward whose routing fits that bound for max_tokens never throws
// kWorkspaceTooSmall, and when one does it throws on every rank and its backward finds no forward.
// Either dispatch may keep GEMM 1's output for the backward (save_gate_up_output): the same checks.

#include "fuzz_input.hpp"

#include <cmath>
#include <cstring>
#include <span>
#include <string_view>
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

  //! dL/dx of expert e at x for dL/dout = dy (the vector-Jacobian product), in double.
  std::vector<double> expert_vjp(std::int32_t e, float const* x, float const* dy) const {
    auto const h = static_cast<std::size_t>(hidden), ii = static_cast<std::size_t>(inter),
               ue = static_cast<std::size_t>(e);
    std::vector<double> hv(2 * ii), dh(2 * ii), dx(h);
    for (std::size_t n = 0; n < 2 * ii; ++n)
      for (std::size_t k = 0; k < h; ++k) hv[n] += double(x[k]) * gate_up[(ue * 2 * ii + n) * h + k];
    for (std::size_t i = 0; i < ii; ++i) {
      double da = 0.0;
      for (std::size_t n = 0; n < h; ++n) da += double(dy[n]) * down[(ue * h + n) * ii + i];
      double const g = hv[i], s = 1 / (1 + std::exp(-g));
      dh[i] = da * hv[ii + i] * s * (1 + g * (1 - s));
      dh[ii + i] = da * g * s;
    }
    for (std::size_t n = 0; n < 2 * ii; ++n)
      for (std::size_t k = 0; k < h; ++k) dx[k] += dh[n] * gate_up[(ue * 2 * ii + n) * h + k];
    return dx;
  }
};

double dot(std::vector<double> const& a, float const* b) {
  double s = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

template <class Dispatch>
void run(fuzz::ByteReader& in, Layer const& layer, int num_ranks) {
  constexpr bool kAllToAll = std::is_same_v<Dispatch, AllToAll>;
  auto const k = static_cast<std::size_t>(layer.top_k), h = static_cast<std::size_t>(layer.hidden);
  std::vector<std::int64_t> tokens(static_cast<std::size_t>(num_ranks));
  std::vector<std::vector<std::int32_t>> ids(tokens.size());
  std::vector<std::vector<float>> weights(tokens.size()), x(tokens.size()), y(tokens.size()), dy(tokens.size()),
      dx(tokens.size()), dw(tokens.size());
  for (std::size_t r = 0; r < tokens.size(); ++r) {
    if (!kAllToAll && r > 0) {
      tokens[r] = tokens[0], ids[r] = ids[0], weights[r] = weights[0], x[r] = x[0], dy[r] = dy[0];
    } else {
      tokens[r] = in.in_range(0, 6);
      for (std::size_t i = 0; i < static_cast<std::size_t>(tokens[r]) * k; ++i) {
        ids[r].push_back(in.any_id(layer.num_experts));
        weights[r].push_back(in.any_float());
      }
      for (std::size_t i = 0; i < static_cast<std::size_t>(tokens[r]) * h; ++i) x[r].push_back(in.any_float());
      for (std::size_t i = 0; i < static_cast<std::size_t>(tokens[r]) * h; ++i) dy[r].push_back(in.any_float());
    }
    y[r].assign(x[r].size(), NAN);
    dx[r].assign(x[r].size(), NAN);
    dw[r].assign(ids[r].size(), NAN);
  }
  std::vector<int> backward_errors(tokens.size()), backward_differs(tokens.size()), grads_unwritten(tokens.size());
  bool small_inputs = true;  // every rank's x, dy and weights: fp32 cannot overflow in the experts
  for (std::size_t r = 0; r < tokens.size(); ++r)
    for (auto const* v : {&x[r], &dy[r], &weights[r]})
      for (float e : *v) small_inputs = small_inputs && std::abs(e) < 1e3f;
  std::int64_t const max_tokens = *std::max_element(tokens.begin(), tokens.end());
  auto const placement = ExpertPlacement::contiguous(layer.num_experts, num_ranks);
  double const factor = kAllToAll ? static_cast<double>(in.in_range(0, 8)) / 2.0 : 0.0;
  bool const keep_h = in.flag();  // save_gate_up_output: the backward reads the h its forward kept
  // The most rows a rank's experts receive, and the bound the factor sets for max_tokens (a
  // workspace may hold a few more tokens than asked for: the bound is at least this).
  std::int64_t most_received = 0;
  for (int q = 0; q < num_ranks; ++q) {
    auto const local = placement.local_range(q);
    std::int64_t received = 0;
    for (auto const& rank_ids : ids)
      for (auto id : rank_ids) received += id >= local.first && id < local.first + local.count;
    most_received = std::max(most_received, received);
  }
  bool const fits =
      !kAllToAll || most_received <= detail::recv_capacity_rows(max_tokens, num_ranks, layer.top_k, factor);
  std::vector<int> invalid_errors(tokens.size()), other_errors(tokens.size()), too_many_rows(tokens.size());
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
                                      layer.down.data() + static_cast<std::size_t>(local.first) * dn),
            .received_rows_factor = factor,
            .save_gate_up_output = keep_h},
        comm);
    std::vector<std::byte> ws(ep.workspace_bytes(max_tokens)), saved(ep.saved_bytes(max_tokens)),
        bws(ep.backward_workspace_bytes(max_tokens));
    try {
      ep.forward(Host{}, MatrixView<std::int32_t const>(ids[r].data(), tokens[r], layer.top_k),
                 MatrixView<float const>(weights[r].data(), tokens[r], layer.top_k),
                 MatrixView<float const>(x[r].data(), tokens[r], layer.hidden),
                 MatrixView<float>(y[r].data(), tokens[r], layer.hidden), Workspace(ws.data(), ws.size()),
                 SavedState(saved.data(), saved.size()));
      (void)ep.status(Host{});  // where AllGather raises invalid ids (AllToAll's forward has)
    } catch (Error const& e) {
      bool const rows = e.code() == Errc::kWorkspaceTooSmall &&
                        std::string_view(e.what()).find("received_rows_factor") != std::string_view::npos;
      (e.code() == Errc::kInvalidExpertId ? invalid_errors : rows ? too_many_rows : other_errors)[r] = 1;
    }
    // The backward, twice: invalid ids were raised after the forward had completed.
    auto const gu_rows = static_cast<std::size_t>(local.count) * gu,
               dn_rows = static_cast<std::size_t>(local.count) * dn;
    std::vector<float> d_gate_up(gu_rows, NAN), d_down(dn_rows, NAN), first_dx;
    ExpertWeightGrads<float> const grads{.gate_up = {d_gate_up.data(), local.count, 2 * layer.inter, layer.hidden},
                                         .down = {d_down.data(), local.count, layer.hidden, layer.inter}};
    try {
      for (int pass = 0; pass < 2; ++pass) {
        ep.backward(Host{}, MatrixView<float const>(dy[r].data(), tokens[r], layer.hidden),
                    MatrixView<float>(dx[r].data(), tokens[r], layer.hidden),
                    MatrixView<float>(dw[r].data(), tokens[r], layer.top_k), grads,
                    SavedState(saved.data(), saved.size()), Workspace(bws.data(), bws.size()));
        if (pass == 0) first_dx = dx[r];
      }
      backward_differs[r] =
          !dx[r].empty() && std::memcmp(first_dx.data(), dx[r].data(), dx[r].size() * sizeof(float)) != 0;
      // Written: NaN only where some rank's inputs make it (the rows come from every rank).
      if (small_inputs) {
        for (float v : d_gate_up) grads_unwritten[r] |= std::isnan(v);
        for (float v : d_down) grads_unwritten[r] |= std::isnan(v);
      }
    } catch (Error const&) {
      backward_errors[r] = 1;
    }
  });
  for (std::size_t r = 0; r < tokens.size(); ++r) {
    EPX_FUZZ_CHECK(other_errors[r] == 0);
    // Too many rows for the factor: on every rank alike, never when the routing fits; the forward
    // did not complete, so its backward must refuse.
    EPX_FUZZ_CHECK(too_many_rows[r] == too_many_rows[0]);
    if (fits) EPX_FUZZ_CHECK(too_many_rows[r] == 0);
    if (too_many_rows[r] != 0) {
      EPX_FUZZ_CHECK(backward_errors[r] == 1);
      continue;
    }
    bool has_invalid = false;
    for (auto id : ids[r]) has_invalid = has_invalid || (id != -1 && (id < 0 || id >= layer.num_experts));
    EPX_FUZZ_CHECK(invalid_errors[r] == (has_invalid ? 1 : 0));
    EPX_FUZZ_CHECK(backward_errors[r] == 0);
    EPX_FUZZ_CHECK(backward_differs[r] == 0);
    EPX_FUZZ_CHECK(grads_unwritten[r] == 0);
    for (std::int64_t t = 0; t < tokens[r]; ++t) {
      std::vector<double> want(h, 0.0), want_dx(h, 0.0);
      bool finite = true;
      for (auto v : std::span(dy[r]).subspan(static_cast<std::size_t>(t) * h, h)) finite = finite && std::abs(v) < 1e3f;
      double dw_scale = 1.0, dw_error = 0.0;
      for (std::size_t j = 0; j < k; ++j) {
        auto const id = ids[r][static_cast<std::size_t>(t) * k + j];
        float const got_dw = dw[r][static_cast<std::size_t>(t) * k + j];
        if (id < 0 || id >= layer.num_experts) {
          EPX_FUZZ_CHECK(got_dw == 0.0f);  // no expert, no weight gradient
          continue;
        }
        float const w = weights[r][static_cast<std::size_t>(t) * k + j];
        // Compare only where fp32 cannot overflow inside the expert (|x|, |w| < 1e3 with these small
        // weights); a huge finite input may rightly give inf/NaN in fp32 but not in the double reference.
        for (std::size_t c = 0; c < h; ++c)
          finite = finite && std::abs(x[r][static_cast<std::size_t>(t) * h + c]) < 1e3f;
        finite = finite && std::abs(w) < 1e3f;
        if (!finite) break;
        float const* const xt = x[r].data() + static_cast<std::size_t>(t) * h;
        float const* const dyt = dy[r].data() + static_cast<std::size_t>(t) * h;
        auto const out = layer.expert(id, xt);
        for (std::size_t c = 0; c < h; ++c) want[c] += double(w) * out[c];
        auto const vjp = layer.expert_vjp(id, xt, dyt);
        for (std::size_t c = 0; c < h; ++c) want_dx[c] += double(w) * vjp[c];
        double const want_dw = dot(out, dyt);
        dw_scale = std::max(dw_scale, std::abs(want_dw));
        dw_error = std::max(dw_error, std::abs(double(got_dw) - want_dw));
      }
      double scale = 1.0, dx_scale = 1.0;
      for (double v : want) scale = std::isnan(v) ? INFINITY : std::max(scale, std::abs(v));
      for (double v : want_dx) dx_scale = std::isnan(v) ? INFINITY : std::max(dx_scale, std::abs(v));
      for (std::size_t c = 0; c < h; ++c) {
        float const got = y[r][static_cast<std::size_t>(t) * h + c];
        float const got_dx = dx[r][static_cast<std::size_t>(t) * h + c];
        // y and dx were poisoned with NaN, so this also proves the rows were written.
        if (finite && scale < 1e6) EPX_FUZZ_CHECK(std::abs(got - want[c]) <= 1e-4 * scale);
        if (finite && dx_scale < 1e6) EPX_FUZZ_CHECK(std::abs(got_dx - want_dx[c]) <= 1e-4 * dx_scale);
      }
      if (finite && scale < 1e6 && dw_scale < 1e6) EPX_FUZZ_CHECK(dw_error <= 1e-4 * dw_scale);
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
