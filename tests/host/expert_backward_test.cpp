// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// The backward of the expert stages (activations, permute, unpermute, grouped GEMM, expert MLP)
// against central finite differences of double-precision re-implementations of their forwards,
// each re-implementation first checked against the library's forward.

#include "../common/finite_differences.hpp"
#include "../common/test_util.hpp"

#include <epx/host/expert_mlp_backward.hpp>
#include <epx/host/grouped_gemm_backward.hpp>
#include <epx/host/permute_backward.hpp>

#include <cstring>
#include <limits>
#include <utility>

using namespace epx;

namespace {

using Dvec = std::vector<double>;
constexpr double kEps = 1e-6;  // central differences: truncation ~eps^2, cancellation ~1e-16 / eps
constexpr float kPoison = std::numeric_limits<float>::quiet_NaN();
constexpr auto kActivations = {Activation::kSwiGLU, Activation::kGeGLU, Activation::kGeGLUTanh, Activation::kReLU,
                               Activation::kClampedSwiGLU};

//! dL/dp.*member by central differences of `loss`, in double.
template <class P, class Loss>
Dvec fd_gradient(P p, Dvec P::*member, Loss const& loss) {
  Dvec const at = p.*member;
  return test::central_differences(at, kEps, [&](Dvec const& v) {
    p.*member = v;
    return loss(p);
  });
}

template <class T>
Dvec to_double(std::vector<T> const& v) {
  Dvec d(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) d[i] = to_float(v[i]);
  return d;
}

double dot(Dvec const& a, Dvec const& b) {
  double s = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

//! Rows [first, last) of a row-major [*, cols] vector.
template <class T>
std::vector<T> row_slice(std::vector<T> const& v, std::int64_t cols, std::int64_t first, std::int64_t last) {
  return {v.begin() + first * cols, v.begin() + last * cols};
}

template <class T>
bool all_nan(std::vector<T> const& v, std::size_t first, std::size_t last) {
  for (std::size_t i = first; i < last; ++i)
    if (!std::isnan(to_float(v[i]))) return false;
  return true;
}

template <class T>
bool bitwise_equal(std::vector<T> const& a, std::vector<T> const& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

std::vector<std::int32_t> offsets_of(std::int32_t first, std::vector<std::int32_t> const& rows_per_group) {
  std::vector<std::int32_t> off{first};
  for (auto r : rows_per_group) off.push_back(off.back() + r);
  return off;
}

// ---- routing: T = 5, k = 2, E = 4; expert 2 gets nothing, token 3 has no valid id ----

constexpr std::int32_t kTokens = 5, kTopK = 2, kExperts = 4;

struct Routed {
  std::vector<std::int32_t> ids = {0, 1, 3, 0, 1, -1, -1, 7, 0, 3};
  std::vector<std::byte> ws;
  Status status;
  RoutingPlan plan;

  explicit Routed(ExpertRange range) : ws(plan_workspace_bytes(kTokens, kTopK, range.count)) {
    plan = make_plan(Host{}, MatrixView<std::int32_t const>(ids.data(), kTokens, kTopK), kExperts, range,
                     Workspace(ws.data(), ws.size()), status);
  }
  Routed(Routed const&) = delete;
  [[nodiscard]] std::int64_t rows() const { return plan.expert_offsets.back(); }
};

// ---- double re-implementations of the forwards ----

//! permute: x_perm[row] = x[sorted_slots[row] / top_k].
Dvec permute_d(RoutingPlan const& plan, Dvec const& x, std::int64_t hidden) {
  std::int64_t const rows = plan.expert_offsets.back();
  Dvec out(static_cast<std::size_t>(rows * hidden));
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t h = 0; h < hidden; ++h)
      out[static_cast<std::size_t>(r * hidden + h)] =
          x[static_cast<std::size_t>(plan.sorted_slots[static_cast<std::size_t>(r)] / plan.top_k * hidden + h)];
  return out;
}

//! unpermute: y[t] = sum over slots with a row of w[t, j] * expert_out[row].
Dvec unpermute_d(RoutingPlan const& plan, Dvec const& expert_out, Dvec const& w, std::int64_t hidden) {
  Dvec y(static_cast<std::size_t>(plan.num_tokens * hidden), 0.0);
  for (std::int64_t t = 0; t < plan.num_tokens; ++t)
    for (std::int32_t j = 0; j < plan.top_k; ++j) {
      auto const s = static_cast<std::size_t>(t * plan.top_k + j);
      std::int32_t const row = plan.slot_rows[s];
      if (row < 0) continue;
      for (std::int64_t h = 0; h < hidden; ++h)
        y[static_cast<std::size_t>(t * hidden + h)] += w[s] * expert_out[static_cast<std::size_t>(row * hidden + h)];
    }
  return y;
}

//! grouped GEMM: c[r, n] = sum over k of a[r, k] b[g][n, k] + bias[g][n] for the rows of the groups;
//! zeros elsewhere.
Dvec grouped_gemm_d(Dvec const& a, Dvec const& b, Dvec const& bias, std::vector<std::int32_t> const& off,
                    std::int64_t m, std::int64_t n, std::int64_t k) {
  Dvec c(static_cast<std::size_t>(m * n), 0.0);
  for (std::size_t g = 0; g + 1 < off.size(); ++g)
    for (std::int64_t r = off[g]; r < off[g + 1]; ++r)
      for (std::int64_t col = 0; col < n; ++col) {
        double acc = bias.empty() ? 0.0 : bias[g * static_cast<std::size_t>(n) + static_cast<std::size_t>(col)];
        for (std::int64_t i = 0; i < k; ++i)
          acc += a[static_cast<std::size_t>(r * k + i)] *
                 b[static_cast<std::size_t>((static_cast<std::int64_t>(g) * n + col) * k + i)];
        c[static_cast<std::size_t>(r * n + col)] = acc;
      }
  return c;
}

struct MlpParams {
  Dvec x, gate_up, down, gate_up_bias, down_bias;
};

//! Gate and up of column i of one row of h, found by the layout's definition (not by the
//! library's gate_column/up_column); up is 0 when not gated.
std::pair<double, double> gate_and_up(ExpertMlpConfig const& c, double const* hr, std::int64_t i) {
  if (!is_gated(c.activation)) return {hr[i], 0.0};
  if (c.gate_up_layout == GateUpLayout::kInterleaved) return {hr[2 * i], hr[2 * i + 1]};
  return {hr[i], hr[c.intermediate + i]};
}

//! The expert MLP in double. With `round_to_t` the activation is rounded to T as expert_mlp stores
//! it: that loss is smooth in down and down_bias (not in x and gate_up, where the rounding steps),
//! and the forward it computes is the library's up to the output's rounding.
template <class T>
Dvec expert_mlp_d(ExpertMlpConfig const& c, std::vector<std::int32_t> const& off, MlpParams const& p, bool round_to_t) {
  std::int64_t const rows = static_cast<std::int64_t>(p.x.size()) / c.hidden, gu = c.gate_up_rows(),
                     inter = c.intermediate;
  Dvec const h = grouped_gemm_d(p.x, p.gate_up, p.gate_up_bias, off, rows, gu, c.hidden);
  Dvec act(static_cast<std::size_t>(rows * inter), 0.0);
  for (std::int64_t r = off.front(); r < off.back(); ++r)
    for (std::int64_t i = 0; i < inter; ++i) {
      auto const [gate, up] = gate_and_up(c, h.data() + r * gu, i);
      double const a = test::reference_activation(c.activation, gate, up, c.clamped_swiglu);
      act[static_cast<std::size_t>(r * inter + i)] = round_to_t ? to_float(from_float<T>(static_cast<float>(a))) : a;
    }
  return grouped_gemm_d(act, p.down, p.down_bias, off, rows, c.hidden, inter);
}

//! Whether central differences around p are meaningful: no gate or up within 1e-3 of a kink (relu
//! at 0, the clamp edges; a difference step moves them by ~1e-6), and, for a 16-bit T, no
//! activation so near a rounding boundary of T that fp32 and double round it differently.
template <class T>
bool clear_of_kinks(ExpertMlpConfig const& c, std::vector<std::int32_t> const& off, MlpParams const& p) {
  std::int64_t const rows = static_cast<std::int64_t>(p.x.size()) / c.hidden, gu = c.gate_up_rows();
  Dvec const h = grouped_gemm_d(p.x, p.gate_up, p.gate_up_bias, off, rows, gu, c.hidden);
  double const margin = 1e-3, limit = c.clamped_swiglu.limit;
  for (std::int64_t r = off.front(); r < off.back(); ++r)
    for (std::int64_t i = 0; i < c.intermediate; ++i) {
      auto const [gate, up] = gate_and_up(c, h.data() + r * gu, i);
      if (c.activation == Activation::kReLU && std::abs(gate) < margin) return false;
      if (c.activation == Activation::kClampedSwiGLU &&
          (std::abs(gate - limit) < margin || std::abs(std::abs(up) - limit) < margin))
        return false;
      if constexpr (!std::is_same_v<T, float>) {
        double const a = test::reference_activation(c.activation, gate, up, c.clamped_swiglu);
        if (to_float(from_float<T>(static_cast<float>(a * (1.0 + 1e-5)))) !=
            to_float(from_float<T>(static_cast<float>(a * (1.0 - 1e-5)))))
          return false;
      }
    }
  return true;
}

}  // namespace

// ---- activations ----

TEST_CASE("activation_grad: every activation against central differences of the double activation") {
  EPX_TEST_SEEDED_RNG(rng);
  ClampedSwiGLUParams const p{.alpha = 1.702f, .limit = 0.5f};
  std::normal_distribution<float> dist(0.0f, 1.5f);
  for (auto act : kActivations) {
    CAPTURE(to_string(act));
    int clamped_gate = 0, clamped_up = 0;
    for (int trial = 0; trial < 400; ++trial) {
      float const gate = dist(rng), up = dist(rng);
      // Central differences are meaningless across a kink: stay clear of them.
      if (std::abs(gate) < 1e-3f || std::abs(gate - p.limit) < 1e-3f || std::abs(std::abs(up) - p.limit) < 1e-3f)
        continue;
      CAPTURE(gate);
      CAPTURE(up);
      auto f = [&](double g, double u) { return test::reference_activation(act, g, u, p); };
      double const want_gate = (f(gate + kEps, up) - f(gate - kEps, up)) / (2.0 * kEps);
      double const want_up = (f(gate, up + kEps) - f(gate, up - kEps)) / (2.0 * kEps);
      auto const got = detail::activation_grad(act, gate, up, p);
      CHECK(std::abs(got.d_gate - want_gate) <= 1e-5 * std::max(1.0, std::abs(want_gate)));
      CHECK(std::abs(got.d_up - want_up) <= 1e-5 * std::max(1.0, std::abs(want_up)));
      clamped_gate += gate > p.limit;
      clamped_up += std::abs(up) > p.limit;
    }
    CHECK(clamped_gate > 0);  // the clamp's flat parts were exercised
    CHECK(clamped_up > 0);
  }
}

TEST_CASE("activation_grad: the kinks (relu at 0, clamped SwiGLU's clamp edges pass the gradient from inside)") {
  ClampedSwiGLUParams const p{.alpha = 1.702f, .limit = 0.5f};
  auto const kRelu = Activation::kReLU, kClamped = Activation::kClampedSwiGLU;
  CHECK(detail::activation_grad(kRelu, 0.0f, 3.0f, p).d_gate == 0.0f);
  CHECK(detail::activation_grad(kRelu, 1e-30f, 3.0f, p).d_gate == 1.0f);
  CHECK(detail::activation_grad(kRelu, -1e-30f, 3.0f, p).d_gate == 0.0f);
  CHECK(detail::activation_grad(kRelu, 2.0f, 3.0f, p).d_up == 0.0f);

  auto f = [&](double g, double u) { return test::reference_activation(kClamped, g, u, p); };
  float const lim = p.limit, above = std::nextafter(lim, 1.0f), below = std::nextafter(-lim, -1.0f);
  float const up = 0.25f, gate = 0.3f;
  // gate == limit: the derivative from the left (inside), not 0.
  double const left = (f(lim, up) - f(lim - kEps, up)) / kEps;
  auto const at_gate_edge = detail::activation_grad(kClamped, lim, up, p);
  CHECK(at_gate_edge.d_gate == doctest::Approx(left).epsilon(1e-4));
  CHECK(at_gate_edge.d_gate > 0.0f);
  CHECK(detail::activation_grad(kClamped, above, up, p).d_gate == 0.0f);
  CHECK(detail::activation_grad(kClamped, above, up, p).d_up == doctest::Approx((f(lim, 0.25) - f(lim, 0.0)) / 0.25));
  // up == +-limit: the derivative from inside; beyond: 0.
  double const inside_hi = (f(gate, lim) - f(gate, lim - kEps)) / kEps;
  double const inside_lo = (f(gate, -lim + kEps) - f(gate, -lim)) / kEps;
  CHECK(detail::activation_grad(kClamped, gate, lim, p).d_up == doctest::Approx(inside_hi).epsilon(1e-4));
  CHECK(detail::activation_grad(kClamped, gate, -lim, p).d_up == doctest::Approx(inside_lo).epsilon(1e-4));
  CHECK(detail::activation_grad(kClamped, gate, above, p).d_up == 0.0f);
  CHECK(detail::activation_grad(kClamped, gate, below, p).d_up == 0.0f);
  CHECK(detail::activation_grad(kClamped, gate, above, p).d_gate ==
        doctest::Approx((f(gate + kEps, lim) - f(gate - kEps, lim)) / (2.0 * kEps)).epsilon(1e-4));
}

// ---- permute and unpermute ----

TEST_CASE("permute_backward: the sum of each token's rows, against central differences") {
  EPX_TEST_SEEDED_RNG(rng);
  std::int64_t const hidden = 6;
  for (ExpertRange const range : {ExpertRange{0, kExperts}, ExpertRange{1, 2}}) {
    CAPTURE(range.first);
    CAPTURE(range.count);
    Routed const r(range);
    std::int64_t const rows = r.rows();
    REQUIRE(rows > 0);
    auto const x = test::random_vector<float>(static_cast<std::size_t>(kTokens * hidden), rng);
    // The library's forward equals the re-implementation.
    std::vector<float> x_perm(static_cast<std::size_t>(rows * hidden), kPoison);
    permute(Host{}, r.plan, MatrixView<float const>(x.data(), kTokens, hidden),
            MatrixView<float>(x_perm.data(), rows, hidden));
    struct P {
      Dvec x;
    };
    CHECK(test::rel_error(x_perm, permute_d(r.plan, to_double(x), hidden)) == 0.0);

    // d_x_perm has rows past the plan's: they must not be read.
    auto d_x_perm = test::random_vector<float>(static_cast<std::size_t>(kTokens * kTopK * hidden), rng);
    std::fill(d_x_perm.begin() + rows * hidden, d_x_perm.end(), 1e30f);
    Dvec const g = to_double(row_slice(d_x_perm, hidden, 0, rows));
    auto const want =
        fd_gradient(P{to_double(x)}, &P::x, [&](P const& p) { return dot(g, permute_d(r.plan, p.x, hidden)); });
    std::vector<float> dx(x.size(), kPoison), dx2(x.size(), 0.0f);
    permute_backward(Host{}, r.plan, MatrixView<float const>(d_x_perm.data(), kTokens * kTopK, hidden),
                     MatrixView<float>(dx.data(), kTokens, hidden));
    CHECK(test::rel_error(dx, want) <= 1e-6);
    for (std::int64_t h = 0; h < hidden; ++h) CHECK(dx[static_cast<std::size_t>(3 * hidden + h)] == 0.0f);  // no expert
    permute_backward(Host{}, r.plan, MatrixView<float const>(d_x_perm.data(), kTokens * kTopK, hidden),
                     MatrixView<float>(dx2.data(), kTokens, hidden));
    CHECK(bitwise_equal(dx, dx2));
    // bf16 gradient rows into bf16 dx: the fp32 sum rounded once.
    std::vector<bfloat16> d_bf(d_x_perm.size()), dx_bf(dx.size(), bfloat16(kPoison));
    for (std::size_t i = 0; i < d_x_perm.size(); ++i) d_bf[i] = bfloat16(d_x_perm[i]);
    permute_backward(Host{}, r.plan, MatrixView<bfloat16 const>(d_bf.data(), kTokens * kTopK, hidden),
                     MatrixView<bfloat16>(dx_bf.data(), kTokens, hidden));
    Dvec const g_bf = to_double(row_slice(d_bf, hidden, 0, rows));
    auto const want_bf =
        fd_gradient(P{to_double(x)}, &P::x, [&](P const& p) { return dot(g_bf, permute_d(r.plan, p.x, hidden)); });
    CHECK(test::rel_error(dx_bf, want_bf) <= 1e-2);  // one rounding of the fp32 sum: <= 2^-8
  }
}

TEST_CASE("unpermute_backward: row and weight gradients against central differences") {
  EPX_TEST_SEEDED_RNG(rng);
  std::int64_t const hidden = 6;
  for (ExpertRange const range : {ExpertRange{0, kExperts}, ExpertRange{1, 2}}) {
    CAPTURE(range.first);
    CAPTURE(range.count);
    Routed const r(range);
    std::int64_t const rows = r.rows(), capacity = kTokens * kTopK;
    REQUIRE(rows > 0);
    // Rows past the plan's are NaN: read, they would poison every result.
    auto expert_out = test::random_vector<float>(static_cast<std::size_t>(capacity * hidden), rng);
    std::fill(expert_out.begin() + rows * hidden, expert_out.end(), kPoison);
    auto const w = test::random_weights(static_cast<std::size_t>(kTokens * kTopK), rng);  // slots without row too
    auto const dy = test::random_vector<float>(static_cast<std::size_t>(kTokens * hidden), rng);

    struct P {
      Dvec eo, w;
    };
    P const p0{to_double(row_slice(expert_out, hidden, 0, rows)), to_double(w)};
    std::vector<float> y(static_cast<std::size_t>(kTokens * hidden), kPoison);
    unpermute(Host{}, r.plan, MatrixView<float const>(expert_out.data(), capacity, hidden),
              MatrixView<float const>(w.data(), kTokens, kTopK), MatrixView<float>(y.data(), kTokens, hidden));
    CHECK(test::rel_error(y, unpermute_d(r.plan, p0.eo, p0.w, hidden)) <= 1e-6);

    Dvec const dyd = to_double(dy);
    auto loss = [&](P const& p) { return dot(dyd, unpermute_d(r.plan, p.eo, p.w, hidden)); };
    auto const want_eo = fd_gradient(p0, &P::eo, loss);
    auto const want_w = fd_gradient(p0, &P::w, loss);

    auto run = [&](std::vector<float>& d_eo, std::vector<float>& d_w) {
      d_eo.assign(expert_out.size(), kPoison);
      d_w.assign(w.size(), kPoison);
      unpermute_backward(
          Host{}, r.plan, MatrixView<float const>(expert_out.data(), capacity, hidden),
          MatrixView<float const>(w.data(), kTokens, kTopK), MatrixView<float const>(dy.data(), kTokens, hidden),
          MatrixView<float>(d_eo.data(), capacity, hidden), MatrixView<float>(d_w.data(), kTokens, kTopK));
    };
    std::vector<float> d_eo, d_w, d_eo2, d_w2;
    run(d_eo, d_w);
    CHECK(test::rel_error(row_slice(d_eo, hidden, 0, rows), want_eo) <= 1e-6);
    CHECK(all_nan(d_eo, static_cast<std::size_t>(rows * hidden), d_eo.size()));  // past the rows: untouched
    CHECK(test::rel_error(d_w, want_w) <= 1e-5);
    for (std::size_t s = 0; s < d_w.size(); ++s)
      if (r.plan.slot_rows[s] < 0) CHECK(d_w[s] == 0.0f);  // no row in this plan: no gradient
    run(d_eo2, d_w2);
    CHECK(bitwise_equal(row_slice(d_eo, hidden, 0, rows), row_slice(d_eo2, hidden, 0, rows)));
    CHECK(bitwise_equal(d_w, d_w2));
  }
}

// ---- grouped GEMM ----

TEST_CASE_TEMPLATE("grouped_gemm_backward: data, weight and bias gradients against central differences", T, float,
                   bfloat16, half) {
  EPX_TEST_SEEDED_RNG(rng);
  // Groups of 3, 0, 4 and 2 rows starting at row 1 of 11: rows 0 and 10 belong to no group.
  auto const off = offsets_of(1, {3, 0, 4, 2});
  std::int64_t const m = 11, n = 5, k = 6, groups = 4;
  double const tol = std::is_same_v<T, float> ? 1e-5 : 2e-3;  // fp32 accumulation; 16-bit inputs are exact in double
  auto const a = test::random_vector<T>(static_cast<std::size_t>(m * k), rng);
  auto const b = test::random_vector<T>(static_cast<std::size_t>(groups * n * k), rng);
  auto const bias = test::random_vector<T>(static_cast<std::size_t>(groups * n), rng);
  auto const dc = test::random_vector<float>(static_cast<std::size_t>(m * n), rng);

  struct P {
    Dvec a, b, bias;
  };
  P const p0{to_double(a), to_double(b), to_double(bias)};
  std::vector<float> c(static_cast<std::size_t>(m * n), kPoison);
  grouped_gemm(Host{}, MatrixView<T const>(a.data(), m, k), BatchedMatrixView<T const>{b.data(), groups, n, k},
               bias.data(), off, MatrixView<float>(c.data(), m, n));
  CHECK(test::rel_error(row_slice(c, n, 1, 10),
                        row_slice(grouped_gemm_d(p0.a, p0.b, p0.bias, off, m, n, k), n, 1, 10)) <= 1e-5);

  Dvec dcd = to_double(dc);
  auto loss = [&](P const& p) { return dot(dcd, grouped_gemm_d(p.a, p.b, p.bias, off, m, n, k)); };
  auto const want_a = fd_gradient(p0, &P::a, loss);
  auto const want_b = fd_gradient(p0, &P::b, loss);
  auto const want_bias = fd_gradient(p0, &P::bias, loss);

  auto run = [&](std::vector<float>& da, std::vector<float>& db, std::vector<float>& dbias) {
    da.assign(a.size(), kPoison);
    db.assign(b.size(), kPoison);
    dbias.assign(bias.size(), kPoison);
    grouped_gemm_backward_data(Host{}, MatrixView<float const>(dc.data(), m, n),
                               BatchedMatrixView<T const>{b.data(), groups, n, k}, off,
                               MatrixView<float>(da.data(), m, k));
    grouped_gemm_backward_weight(Host{}, MatrixView<T const>(a.data(), m, k), MatrixView<float const>(dc.data(), m, n),
                                 off, BatchedMatrixView<float>{db.data(), groups, n, k}, dbias.data());
  };
  std::vector<float> da, db, dbias, da2, db2, dbias2;
  run(da, db, dbias);
  CHECK(test::rel_error(row_slice(da, k, 1, 10), row_slice(want_a, k, 1, 10)) <= tol);
  CHECK(all_nan(da, 0, static_cast<std::size_t>(k)));  // rows outside the groups: untouched
  CHECK(all_nan(da, static_cast<std::size_t>(10 * k), da.size()));
  CHECK(test::rel_error(db, want_b) <= tol);
  CHECK(test::rel_error(dbias, want_bias) <= tol);
  for (std::int64_t i = n * k; i < 2 * n * k; ++i) CHECK(db[static_cast<std::size_t>(i)] == 0.0f);  // empty group
  for (std::int64_t i = n; i < 2 * n; ++i) CHECK(dbias[static_cast<std::size_t>(i)] == 0.0f);
  run(da2, db2, dbias2);
  CHECK(bitwise_equal(row_slice(da, k, 1, 10), row_slice(da2, k, 1, 10)));
  CHECK(bitwise_equal(db, db2));
  CHECK(bitwise_equal(dbias, dbias2));

  // No bias gradient wanted: the weight gradient is the same; gradients in the element type.
  std::vector<float> db3(b.size(), kPoison);
  grouped_gemm_backward_weight(Host{}, MatrixView<T const>(a.data(), m, k), MatrixView<float const>(dc.data(), m, n),
                               off, BatchedMatrixView<float>{db3.data(), groups, n, k}, nullptr);
  CHECK(bitwise_equal(db, db3));
  std::vector<T> da_t(a.size(), T(kPoison)), db_t(b.size(), T(kPoison));
  grouped_gemm_backward_data(Host{}, MatrixView<float const>(dc.data(), m, n),
                             BatchedMatrixView<T const>{b.data(), groups, n, k}, off, MatrixView<T>(da_t.data(), m, k));
  grouped_gemm_backward_weight(Host{}, MatrixView<T const>(a.data(), m, k), MatrixView<float const>(dc.data(), m, n),
                               off, BatchedMatrixView<T>{db_t.data(), groups, n, k}, nullptr);
  double const tol_t = std::is_same_v<T, float> ? 1e-5 : 1e-2;
  CHECK(test::rel_error(row_slice(da_t, k, 1, 10), row_slice(want_a, k, 1, 10)) <= tol_t);
  CHECK(test::rel_error(db_t, want_b) <= tol_t);
}

// ---- expert MLP ----

TEST_CASE_TEMPLATE(
    "expert_mlp_backward: every activation x gate/up layout, with and without biases, against central "
    "differences",
    T, float, bfloat16) {
  EPX_TEST_SEEDED_RNG(rng);
  // 4 local experts with 3, 0, 4, 2 rows starting at row 1 of 10 (row 0 belongs to no expert).
  auto const off = offsets_of(1, {3, 0, 4, 2});
  std::int64_t const rows = 10, first = 1, last = 10, experts = 4;
  // fp32 accumulation, inputs exact in double; the activation's rounding to T is in the reference
  // where the loss is smooth in it (down, down_bias) and straight-through elsewhere.
  double const tol = 1e-4;
  for (auto act : kActivations)
    for (auto layout : {GateUpLayout::kConcatenated, GateUpLayout::kInterleaved})
      for (bool bias : {true, false}) {
        CAPTURE(to_string(act));
        CAPTURE(static_cast<int>(layout));
        CAPTURE(bias);
        ExpertMlpConfig const mlp{.hidden = 6,
                                  .intermediate = 4,
                                  .activation = act,
                                  .gate_up_layout = layout,
                                  .clamped_swiglu = {.alpha = 1.702f, .limit = 0.5f}};  // low: the clamp matters
        std::int64_t const hidden = mlp.hidden, inter = mlp.intermediate, gu = mlp.gate_up_rows();
        test::GlobalWeights<T> gw;
        std::vector<T> x;
        MlpParams p0;
        for (int attempt = 0;; ++attempt) {  // draw until no input sits on a kink
          REQUIRE(attempt < 100);
          gw = test::GlobalWeights<T>::random(static_cast<std::int32_t>(experts), mlp, bias, rng);
          x = test::random_vector<T>(static_cast<std::size_t>(rows * hidden), rng);
          p0 = {to_double(x), to_double(gw.gate_up), to_double(gw.down), to_double(gw.gate_up_bias),
                to_double(gw.down_bias)};
          if (clear_of_kinks<T>(mlp, off, p0)) break;
        }
        auto const weights = gw.local({0, static_cast<std::int32_t>(experts)});
        auto const dy = test::random_vector<float>(static_cast<std::size_t>(rows * hidden), rng);
        MatrixView<T const> const xv(x.data(), rows, hidden);

        // The re-implementation equals the library's forward, and h is non-trivial at the kinks.
        std::vector<T> out(static_cast<std::size_t>(rows * hidden), T(kPoison));
        std::vector<std::byte> fwd_ws(expert_mlp_workspace_bytes<T>(mlp, rows));
        expert_mlp(Host{}, mlp, weights, xv, off, MatrixView<T>(out.data(), rows, hidden),
                   Workspace(fwd_ws.data(), fwd_ws.size()));
        auto const want_out = expert_mlp_d<T>(mlp, off, p0, true);
        CHECK(test::rel_error(row_slice(out, hidden, first, last), row_slice(want_out, hidden, first, last)) <=
              (std::is_same_v<T, float> ? 1e-5 : 1e-2));
        std::vector<float> h(static_cast<std::size_t>(rows * gu), kPoison);
        expert_mlp_gate_up(Host{}, mlp, weights, xv, off, MatrixView<float>(h.data(), rows, gu));
        CHECK(all_nan(h, 0, static_cast<std::size_t>(gu)));
        if (act == Activation::kClampedSwiGLU) {
          int gate_clamped = 0, up_clamped = 0;
          for (std::int64_t r = first; r < last; ++r)
            for (int i = 0; i < static_cast<int>(inter); ++i) {
              bool const cat = layout == GateUpLayout::kConcatenated;
              gate_clamped += h[static_cast<std::size_t>(r * gu + (cat ? i : 2 * i))] > mlp.clamped_swiglu.limit;
              up_clamped += std::abs(h[static_cast<std::size_t>(r * gu + (cat ? inter + i : 2 * i + 1))]) >
                            mlp.clamped_swiglu.limit;
            }
          CHECK(gate_clamped > 0);
          CHECK(up_clamped > 0);
        }

        Dvec const dyd = to_double(row_slice(dy, hidden, 0, rows));
        auto loss = [&](MlpParams const& p) { return dot(dyd, expert_mlp_d<T>(mlp, off, p, false)); };
        auto loss_rounded = [&](MlpParams const& p) { return dot(dyd, expert_mlp_d<T>(mlp, off, p, true)); };

        struct Grads {
          std::vector<float> dx, gate_up, down, gate_up_bias, down_bias;
        };
        auto run = [&]() {
          Grads g{std::vector<float>(x.size(), kPoison), std::vector<float>(gw.gate_up.size(), kPoison),
                  std::vector<float>(gw.down.size(), kPoison),
                  std::vector<float>(static_cast<std::size_t>(experts * gu), kPoison),
                  std::vector<float>(static_cast<std::size_t>(experts * hidden), kPoison)};
          ExpertWeightGrads<float> const grads{.gate_up = {g.gate_up.data(), experts, gu, hidden},
                                               .down = {g.down.data(), experts, hidden, inter},
                                               .gate_up_bias = bias ? g.gate_up_bias.data() : nullptr,
                                               .down_bias = bias ? g.down_bias.data() : nullptr};
          std::vector<std::byte> ws(expert_mlp_backward_workspace_bytes<T>(mlp, rows));
          std::fill(ws.begin(), ws.end(), std::byte{0xff});  // NaN scratch: read before written shows
          expert_mlp_backward(Host{}, mlp, weights, xv, off, MatrixView<float const>(h.data(), rows, gu),
                              MatrixView<float const>(dy.data(), rows, hidden),
                              MatrixView<float>(g.dx.data(), rows, hidden), grads, Workspace(ws.data(), ws.size()));
          return g;
        };
        Grads const g = run();
        CHECK(test::rel_error(row_slice(g.dx, hidden, first, last),
                              row_slice(fd_gradient(p0, &MlpParams::x, loss), hidden, first, last)) <= tol);
        CHECK(all_nan(g.dx, 0, static_cast<std::size_t>(hidden)));  // row 0: no expert, untouched
        CHECK(test::rel_error(g.gate_up, fd_gradient(p0, &MlpParams::gate_up, loss)) <= tol);
        CHECK(test::rel_error(g.down, fd_gradient(p0, &MlpParams::down, loss_rounded)) <= tol);
        if (bias) {
          CHECK(test::rel_error(g.gate_up_bias, fd_gradient(p0, &MlpParams::gate_up_bias, loss)) <= tol);
          CHECK(test::rel_error(g.down_bias, fd_gradient(p0, &MlpParams::down_bias, loss_rounded)) <= tol);
          for (std::int64_t i = gu; i < 2 * gu; ++i) CHECK(g.gate_up_bias[static_cast<std::size_t>(i)] == 0.0f);
          for (std::int64_t i = hidden; i < 2 * hidden; ++i) CHECK(g.down_bias[static_cast<std::size_t>(i)] == 0.0f);
        } else {
          CHECK(all_nan(g.gate_up_bias, 0, g.gate_up_bias.size()));  // not asked for: not written
          CHECK(all_nan(g.down_bias, 0, g.down_bias.size()));
        }
        // Expert 1 has no rows: zero weight gradients, not garbage.
        for (std::int64_t i = gu * hidden; i < 2 * gu * hidden; ++i)
          CHECK(g.gate_up[static_cast<std::size_t>(i)] == 0.0f);
        for (std::int64_t i = hidden * inter; i < 2 * hidden * inter; ++i)
          CHECK(g.down[static_cast<std::size_t>(i)] == 0.0f);

        Grads const g2 = run();
        CHECK(bitwise_equal(row_slice(g.dx, hidden, first, last), row_slice(g2.dx, hidden, first, last)));
        CHECK(bitwise_equal(g.gate_up, g2.gate_up));
        CHECK(bitwise_equal(g.down, g2.down));
        if (bias) CHECK(bitwise_equal(g.gate_up_bias, g2.gate_up_bias));
        if (bias) CHECK(bitwise_equal(g.down_bias, g2.down_bias));
      }
}

TEST_CASE("expert_mlp_backward: gradients in the weights' element type") {
  EPX_TEST_SEEDED_RNG(rng);
  ExpertMlpConfig const mlp{.hidden = 6, .intermediate = 4, .activation = Activation::kGeGLU};
  auto const off = offsets_of(0, {2, 3});
  std::int64_t const rows = 5, gu = mlp.gate_up_rows();
  auto const gw = test::GlobalWeights<bfloat16>::random(2, mlp, true, rng);
  auto const x = test::random_vector<bfloat16>(static_cast<std::size_t>(rows * mlp.hidden), rng);
  auto const dy = test::random_vector<bfloat16>(x.size(), rng);
  std::vector<float> h(static_cast<std::size_t>(rows * gu));
  expert_mlp_gate_up(Host{}, mlp, gw.local({0, 2}), MatrixView<bfloat16 const>(x.data(), rows, mlp.hidden), off,
                     MatrixView<float>(h.data(), rows, gu));
  std::vector<std::byte> ws(expert_mlp_backward_workspace_bytes<bfloat16>(mlp, rows));
  auto run = [&](auto zero) {
    using G = decltype(zero);
    std::vector<G> dx(x.size()), dgu(gw.gate_up.size()), ddn(gw.down.size()), dgub(gw.gate_up_bias.size()),
        ddnb(gw.down_bias.size());
    std::vector<G> dyg(dy.size());
    for (std::size_t i = 0; i < dy.size(); ++i) dyg[i] = from_float<G>(to_float(dy[i]));
    expert_mlp_backward(
        Host{}, mlp, gw.local({0, 2}), MatrixView<bfloat16 const>(x.data(), rows, mlp.hidden), off,
        MatrixView<float const>(h.data(), rows, gu), MatrixView<G const>(dyg.data(), rows, mlp.hidden),
        MatrixView<G>(dx.data(), rows, mlp.hidden),
        ExpertWeightGrads<G>{
            {dgu.data(), 2, gu, mlp.hidden}, {ddn.data(), 2, mlp.hidden, mlp.intermediate}, dgub.data(), ddnb.data()},
        Workspace(ws.data(), ws.size()));
    return std::vector<std::vector<G>>{dx, dgu, ddn, dgub, ddnb};
  };
  auto const ref = run(0.0f);
  auto const got = run(bfloat16(0.0f));
  for (std::size_t i = 0; i < ref.size(); ++i) {
    CAPTURE(i);
    CHECK(test::rel_error(got[i], ref[i]) <= 1e-2);  // one bf16 rounding of the fp32 result
  }
}

// ---- argument errors ----

TEST_CASE("backward stages: wrong shapes and offsets are named") {
  using test::check_throws;
  Routed const r({0, kExperts});
  std::int64_t const rows = r.rows(), hidden = 6;
  std::vector<float> buf(1000, 1.0f), out(1000), wout(100);
  MatrixView<float const> const perm(buf.data(), rows, hidden), tok(buf.data(), kTokens, hidden),
      w(buf.data(), kTokens, kTopK);

  check_throws(Errc::kShapeMismatch, "permute_backward: dx.rows = 4, expected 5",
               [&] { permute_backward(Host{}, r.plan, perm, MatrixView<float>(out.data(), 4, hidden)); });
  check_throws(Errc::kShapeMismatch, "permute_backward: dx.cols = 5, expected 6",
               [&] { permute_backward(Host{}, r.plan, perm, MatrixView<float>(out.data(), kTokens, 5)); });
  check_throws(Errc::kShapeMismatch, "permute_backward: d_x_perm.rows = 2, expected >= the plan's routed rows", [&] {
    permute_backward(Host{}, r.plan, MatrixView<float const>(buf.data(), 2, hidden),
                     MatrixView<float>(out.data(), kTokens, hidden));
  });
  check_throws(Errc::kInvalidArgument, "permute_backward: plan.expert_offsets.size() = 0",
               [&] { permute_backward(Host{}, RoutingPlan{}, perm, MatrixView<float>(out.data(), kTokens, hidden)); });

  auto unperm = [&](MatrixView<float const> eo, MatrixView<float const> tw, MatrixView<float const> dy,
                    MatrixView<float> d_eo,
                    MatrixView<float> d_w) { unpermute_backward(Host{}, r.plan, eo, tw, dy, d_eo, d_w); };
  MatrixView<float> const d_eo(out.data(), rows, hidden), d_w(wout.data(), kTokens, kTopK);
  CHECK_NOTHROW(unperm(perm, w, tok, d_eo, d_w));
  check_throws(Errc::kShapeMismatch, "unpermute_backward: d_topk_weights.cols = 3, expected 2",
               [&] { unperm(perm, w, tok, d_eo, MatrixView<float>(wout.data(), kTokens, 3)); });
  check_throws(Errc::kShapeMismatch, "unpermute_backward: dy.cols = 5, expected 6",
               [&] { unperm(perm, w, MatrixView<float const>(buf.data(), kTokens, 5), d_eo, d_w); });
  check_throws(Errc::kShapeMismatch, "unpermute_backward: topk_weights.rows = 4, expected 5",
               [&] { unperm(perm, MatrixView<float const>(buf.data(), 4, kTopK), tok, d_eo, d_w); });
  check_throws(Errc::kShapeMismatch, "unpermute_backward: d_expert_out.rows = 1, expected >= the plan's routed rows",
               [&] { unperm(perm, w, tok, MatrixView<float>(out.data(), 1, hidden), d_w); });
  check_throws(Errc::kShapeMismatch, "unpermute_backward: expert_out.rows = 1, expected >= the plan's routed rows",
               [&] { unperm(MatrixView<float const>(buf.data(), 1, hidden), w, tok, d_eo, d_w); });

  // Grouped GEMM: a [4, 8], dc [4, 3], b [2, 3, 8].
  std::vector<std::int32_t> const good{0, 1, 4}, bad{0, 3, 2}, short_off{0, 4};
  MatrixView<float const> const a(buf.data(), 4, 8), dc(buf.data(), 4, 3);
  BatchedMatrixView<float const> const b{buf.data(), 2, 3, 8};
  BatchedMatrixView<float> const db{out.data(), 2, 3, 8};
  CHECK_NOTHROW(grouped_gemm_backward_data(Host{}, dc, b, good, MatrixView<float>(out.data(), 4, 8)));
  CHECK_NOTHROW(grouped_gemm_backward_weight(Host{}, a, dc, good, db, wout.data()));
  check_throws(Errc::kInvalidArgument, "grouped_gemm_backward_weight: offsets[1..2] = [3, 2]",
               [&] { grouped_gemm_backward_weight(Host{}, a, dc, bad, db, nullptr); });
  check_throws(Errc::kShapeMismatch, "grouped_gemm_backward_weight: offsets.size() = 2, expected db.batch + 1 = 3",
               [&] { grouped_gemm_backward_weight(Host{}, a, dc, short_off, db, nullptr); });
  check_throws(
      Errc::kShapeMismatch, "grouped_gemm_backward_weight: db (batch, rows, cols) = (2, 3, 7), expected (any, 3, 8)",
      [&] {
        grouped_gemm_backward_weight(Host{}, a, dc, good, BatchedMatrixView<float>{out.data(), 2, 3, 7}, nullptr);
      });
  check_throws(Errc::kShapeMismatch, "grouped_gemm_backward_weight: dc.rows = 3, expected 4", [&] {
    grouped_gemm_backward_weight(Host{}, a, MatrixView<float const>(buf.data(), 3, 3), good, db, nullptr);
  });
  check_throws(Errc::kShapeMismatch, "grouped_gemm_backward_data: da.cols = 7, expected 8",
               [&] { grouped_gemm_backward_data(Host{}, dc, b, good, MatrixView<float>(out.data(), 4, 7)); });
  check_throws(Errc::kShapeMismatch,
               "grouped_gemm_backward_data: b (batch, rows, cols) = (2, 4, 8), expected (any, 3, any)", [&] {
                 grouped_gemm_backward_data(Host{}, dc, BatchedMatrixView<float const>{buf.data(), 2, 4, 8}, good,
                                            MatrixView<float>(out.data(), 4, 8));
               });
  check_throws(Errc::kInvalidArgument, "grouped_gemm_backward_data: offsets[1..2] = [1, 5]", [&] {
    grouped_gemm_backward_data(Host{}, dc, b, std::vector<std::int32_t>{0, 1, 5}, MatrixView<float>(out.data(), 4, 8));
  });
}

TEST_CASE("expert_mlp_backward: wrong shapes, offsets and workspace are named") {
  using test::check_throws;
  EPX_TEST_SEEDED_RNG(rng);
  ExpertMlpConfig const mlp{.hidden = 6, .intermediate = 4};
  std::int64_t const rows = 5, gu = mlp.gate_up_rows();
  auto const gw = test::GlobalWeights<float>::random(2, mlp, true, rng);
  auto const off = offsets_of(0, {2, 3});
  auto const x = test::random_vector<float>(static_cast<std::size_t>(rows * mlp.hidden), rng);
  std::vector<float> h(static_cast<std::size_t>(rows * gu), 0.5f), dy(x), dx(x.size()), dgu(gw.gate_up.size()),
      ddn(gw.down.size());
  std::vector<std::byte> ws(expert_mlp_backward_workspace_bytes<float>(mlp, rows));
  ExpertWeightGrads<float> const grads{.gate_up = {dgu.data(), 2, gu, mlp.hidden},
                                       .down = {ddn.data(), 2, mlp.hidden, mlp.intermediate}};
  auto call = [&](ExpertWeights const& w, std::span<std::int32_t const> o, MatrixView<float const> hv,
                  MatrixView<float const> dyv, ExpertWeightGrads<float> const& g, std::size_t ws_bytes) {
    expert_mlp_backward(Host{}, mlp, w, MatrixView<float const>(x.data(), rows, mlp.hidden), o, hv, dyv,
                        MatrixView<float>(dx.data(), rows, mlp.hidden), g, Workspace(ws.data(), ws_bytes));
  };
  MatrixView<float const> const hv(h.data(), rows, gu), dyv(dy.data(), rows, mlp.hidden);
  auto const w = gw.local({0, 2});
  CHECK_NOTHROW(call(w, off, hv, dyv, grads, ws.size()));
  check_throws(Errc::kShapeMismatch, "expert_mlp_backward: gate_up_out.cols = 4, expected 8",
               [&] { call(w, off, MatrixView<float const>(h.data(), rows, 4), dyv, grads, ws.size()); });
  check_throws(Errc::kShapeMismatch, "expert_mlp_backward: dy.rows = 4, expected 5",
               [&] { call(w, off, hv, MatrixView<float const>(dy.data(), 4, mlp.hidden), grads, ws.size()); });
  check_throws(Errc::kShapeMismatch,
               "expert_mlp_backward: grads.down (batch, rows, cols) = (2, 4, 6), expected (2, 6, 4)", [&] {
                 auto g = grads;
                 g.down = {ddn.data(), 2, mlp.intermediate, mlp.hidden};
                 call(w, off, hv, dyv, g, ws.size());
               });
  check_throws(Errc::kShapeMismatch, "expert_mlp_backward: grads.gate_up (batch, rows, cols) = (1, 8, 6)", [&] {
    auto g = grads;
    g.gate_up.batch = 1;
    call(w, off, hv, dyv, g, ws.size());
  });
  check_throws(Errc::kShapeMismatch,
               "expert_mlp_backward: expert_offsets.size() = 2, expected num_local_experts + 1 = 3", [&] {
                 call(w, std::vector<std::int32_t>{0, 5}, hv, dyv, grads, ws.size());
               });
  check_throws(Errc::kInvalidArgument, "expert_mlp_backward: expert_offsets[1..2] = [2, 6]", [&] {
    call(w, std::vector<std::int32_t>{0, 2, 6}, hv, dyv, grads, ws.size());
  });
  check_throws(Errc::kWorkspaceTooSmall, "expert_mlp_backward: workspace.size()",
               [&] { call(w, off, hv, dyv, grads, ws.size() - 1); });
  auto wrong = w;
  wrong.dtype = DType::kBF16;
  check_throws(Errc::kInvalidArgument, "expert_mlp_backward: weights.dtype = bf16, expected f32",
               [&] { call(wrong, off, hv, dyv, grads, ws.size()); });
  check_throws(Errc::kShapeMismatch, "expert_mlp_gate_up: gate_up_out.rows = 4, expected 5", [&] {
    expert_mlp_gate_up(Host{}, mlp, w, MatrixView<float const>(x.data(), rows, mlp.hidden), off,
                       MatrixView<float>(h.data(), 4, gu));
  });
}
