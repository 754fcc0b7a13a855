// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// The CUDA router_losses' index math and the formulas it shares with the Host (include/epx/router/
// losses.hpp), on the host: the sequence of a token and a sequence's token range against plain
// loops (and in bounds whatever the offsets hold), the offsets' validity against
// check_sequence_offsets, the stripe sum's order against an emulation of its documented order, and
// the shared gradient formulas against central finite differences in double.

#include "../common/test_util.hpp"

#include <epx/router/losses.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

using namespace epx;
using namespace epx::detail;

namespace {

//! Random valid offsets over t tokens: empty sequences anywhere, lengths 0..max_len.
std::vector<std::int64_t> valid_offsets(std::int64_t t, std::int64_t max_len, std::mt19937_64& rng) {
  std::vector<std::int64_t> off{0};
  if (rng() % 2 == 0) off.push_back(0);
  while (off.back() < t)
    off.push_back(std::min<std::int64_t>(t, off.back() + static_cast<std::int64_t>(rng() % (max_len + 1))));
  if (rng() % 2 == 0 || off.size() < 2) off.push_back(t);
  return off;
}

bool host_accepts(std::vector<std::int64_t> const& off, std::int64_t t) {
  try {
    check_sequence_offsets("test", off, t);
    return true;
  } catch (Error const&) {
    return false;
  }
}

}  // namespace

TEST_CASE("router_losses kernel math: a token's sequence and a sequence's tokens, valid offsets") {
  EPX_TEST_SEEDED_RNG(rng);
  for (std::int64_t t : {0, 1, 2, 7, 50, 300})
    for (std::int64_t max_len : {0, 1, 3, 40})
      for (int trial = 0; trial < 20; ++trial) {
        if (max_len == 0 && t > 0) continue;
        auto const off = valid_offsets(t, max_len, rng);
        CAPTURE(t);
        CAPTURE(off.size());
        REQUIRE(host_accepts(off, t));
        auto const num_sequences = static_cast<std::int64_t>(off.size()) - 1;
        std::int64_t covered = 0;
        for (std::int64_t s = 0; s < num_sequences; ++s) {
          RouterLossTokenRange const r = router_loss_sequence_range(off.data(), t, s);
          CHECK(r.begin == off[static_cast<std::size_t>(s)]);
          CHECK(r.end == off[static_cast<std::size_t>(s) + 1]);
          for (std::int64_t x = r.begin; x < r.end; ++x) CHECK(router_loss_sequence(off.data(), num_sequences, x) == s);
          covered += r.end - r.begin;
        }
        CHECK(covered == t);
        for (std::int64_t i = 0; i <= num_sequences; ++i) CHECK(router_loss_offset_ok(off.data(), num_sequences, t, i));
      }
  // No offsets: one sequence of every token.
  for (std::int64_t t : {0, 1, 9}) {
    CHECK(router_loss_sequence(nullptr, 1, t) == 0);
    RouterLossTokenRange const r = router_loss_sequence_range(nullptr, t, 0);
    CHECK(r.begin == 0);
    CHECK(r.end == t);
  }
}

TEST_CASE("router_losses kernel math: invalid offsets are found as the Host finds them, and stay in bounds") {
  EPX_TEST_SEEDED_RNG(rng);
  std::uniform_int_distribution<std::int64_t> any(-20, 80);
  int invalid_seen = 0;
  for (std::int64_t t : {0, 1, 5, 37})
    for (std::size_t size : {2, 3, 6, 20})
      for (int trial = 0; trial < 200; ++trial) {
        std::vector<std::int64_t> off(size);
        if (trial % 3 == 0) {  // a valid one with one entry changed
          auto v = valid_offsets(t, 5, rng);
          v.resize(size, t);
          v.back() = t;
          off = v;
          off[rng() % size] += static_cast<std::int64_t>(rng() % 7) - 3;
        } else {
          for (auto& x : off) x = any(rng);
        }
        CAPTURE(t);
        CAPTURE(size);
        auto const num_sequences = static_cast<std::int64_t>(size) - 1;
        bool all_ok = true;
        for (std::int64_t i = 0; i <= num_sequences; ++i)
          all_ok = all_ok && router_loss_offset_ok(off.data(), num_sequences, t, i);
        CHECK(all_ok == host_accepts(off, t));
        invalid_seen += all_ok ? 0 : 1;
        for (std::int64_t x = 0; x < t; ++x) {
          std::int64_t const s = router_loss_sequence(off.data(), num_sequences, x);
          CHECK(s >= 0);
          CHECK(s < num_sequences);
        }
        for (std::int64_t s = 0; s < num_sequences; ++s) {
          RouterLossTokenRange const r = router_loss_sequence_range(off.data(), t, s);
          CHECK(0 <= r.begin);
          CHECK(r.begin <= r.end);
          CHECK(r.end <= t);
        }
      }
  CHECK(invalid_seen > 100);
}

TEST_CASE("router_losses kernel math: the stripe sum visits every token once, in its documented order") {
  EPX_TEST_SEEDED_RNG(rng);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  for (std::int64_t len : {0, 1, 7, 8, 9, 31, 32, 33, 100, 1000})
    for (std::int64_t begin : {0, 3, 64}) {
      CAPTURE(len);
      CAPTURE(begin);
      std::int64_t const end = begin + len;
      std::vector<double> v(static_cast<std::size_t>(end + 5));
      for (auto& x : v) x = u(rng);
      std::vector<int> visits(v.size(), 0);
      double total = 0.0;
      for (int stripe = 0; stripe < kRouterLossStripes; ++stripe) {
        double const got = router_loss_stripe_sum({begin, end}, stripe, [&](std::int64_t t) {
          ++visits[static_cast<std::size_t>(t)];
          return v[static_cast<std::size_t>(t)];
        });
        // The emulation: the stripe's tokens in order, the q-th into accumulator q % 4.
        double a[4] = {0.0, 0.0, 0.0, 0.0};
        std::int64_t q = 0;
        for (std::int64_t t = begin + stripe; t < end; t += kRouterLossStripes, ++q)
          a[q % 4] += v[static_cast<std::size_t>(t)];
        double const want = (a[0] + a[1]) + (a[2] + a[3]);
        CHECK(std::memcmp(&got, &want, sizeof got) == 0);
        total += got;
      }
      for (std::size_t t = 0; t < v.size(); ++t)
        CHECK(visits[t] == (static_cast<std::int64_t>(t) >= begin && static_cast<std::int64_t>(t) < end ? 1 : 0));
      double const plain = std::accumulate(v.begin() + begin, v.begin() + end, 0.0);
      CHECK(std::abs(total - plain) <= 1e-13 * std::max(1.0, plain));
    }
}

TEST_CASE("router_losses shared formulas: backprop through p and the z-loss term against finite differences") {
  EPX_TEST_SEEDED_RNG(rng);
  std::normal_distribution<double> n(0.0, 1.5);
  for (bool sigmoid : {false, true})
    for (int e : {1, 2, 5, 17})
      for (int trial = 0; trial < 10; ++trial) {
        CAPTURE(sigmoid);
        CAPTURE(e);
        std::vector<double> logit(static_cast<std::size_t>(e)), g(logit.size());
        for (auto& x : logit) x = n(rng);
        for (auto& x : g) x = n(rng);
        struct Token {
          std::vector<double> prob, softmax, sig;
          double sig_sum = 0.0, lse = 0.0;
        };
        auto token = [&](std::vector<double> const& l) {
          Token tk{std::vector<double>(l.size()), std::vector<double>(l.size()), std::vector<double>(l.size())};
          double m = -INFINITY, sum = 0.0;
          for (double x : l) m = std::max(m, x);
          for (std::size_t i = 0; i < l.size(); ++i) sum += (tk.softmax[i] = std::exp(l[i] - m));
          for (auto& x : tk.softmax) x /= sum;
          tk.lse = m + std::log(sum);
          for (std::size_t i = 0; i < l.size(); ++i) tk.sig_sum += (tk.sig[i] = 1.0 / (1.0 + std::exp(-l[i])));
          for (std::size_t i = 0; i < l.size(); ++i) tk.prob[i] = sigmoid ? tk.sig[i] / tk.sig_sum : tk.softmax[i];
          return tk;
        };
        double const z = 0.3, n_all = 7.0;
        // f(logit) = sum_i g_i p_i + z · lse² / n_all; its gradient from the shared formulas:
        auto f = [&](std::vector<double> const& l) {
          Token const tk = token(l);
          double v = z * tk.lse * tk.lse / n_all;
          for (std::size_t i = 0; i < l.size(); ++i) v += g[i] * tk.prob[i];
          return v;
        };
        Token const tk = token(logit);
        double dot = 0.0;
        for (std::size_t i = 0; i < g.size(); ++i) dot += g[i] * tk.prob[i];
        for (std::size_t j = 0; j < logit.size(); ++j) {
          double const got = router_loss_backprop(sigmoid, g[j], dot, tk.prob[j], tk.sig[j], tk.sig_sum) +
                             router_z_gradient(z, tk.lse, n_all, tk.softmax[j]);
          double const h = 1e-5;
          auto up = logit, down = logit;
          up[j] += h;
          down[j] -= h;
          double const want = (f(up) - f(down)) / (2.0 * h);
          CHECK(std::abs(got - want) <= 1e-7 * std::max(1.0, std::abs(want)));
        }
      }
}

TEST_CASE("router_losses shared formulas: dL/dp and the balance value agree with each other") {
  EPX_TEST_SEEDED_RNG(rng);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  // L(P) = lb · balance(E, sum_i c_i P_i, T, k) + seq / S' · balance(E, sum_i c_si P_si, T_s, k); a
  // probability p[t, i] of a token of sequence s enters P_i and P_si: dL/dp[t, i] is linear.
  for (int trial = 0; trial < 50; ++trial) {
    int const e = 1 + static_cast<int>(rng() % 9), k = 1 + static_cast<int>(rng() % 4);
    double const t_all = 20.0 + static_cast<double>(rng() % 30), t_s = 1.0 + static_cast<double>(rng() % 19);
    double const lb = u(rng), seq = u(rng), non_empty = 1.0 + static_cast<double>(rng() % 4);
    std::vector<double> c(static_cast<std::size_t>(e)), cs(c.size()), P(c.size()), Ps(c.size());
    for (std::size_t i = 0; i < c.size(); ++i) {
      cs[i] = static_cast<double>(rng() % 5);
      c[i] = cs[i] + static_cast<double>(rng() % 9);
      Ps[i] = u(rng) * t_s;
      P[i] = Ps[i] + u(rng) * 10.0;
    }
    auto loss = [&](std::vector<double> const& p, std::vector<double> const& ps) {
      double a = 0.0, as = 0.0;
      for (std::size_t i = 0; i < p.size(); ++i) {
        a += c[i] * p[i];
        as += cs[i] * ps[i];
      }
      return lb * router_balance_value(e, a, t_all, k) + seq / non_empty * router_balance_value(e, as, t_s, k);
    };
    for (std::size_t i = 0; i < c.size(); ++i) {
      auto up = P, ups = Ps, down = P, downs = Ps;
      double const h = 1e-3;
      up[i] += h;
      ups[i] += h;
      down[i] -= h;
      downs[i] -= h;
      double const want = (loss(up, ups) - loss(down, downs)) / (2.0 * h);
      double const got = router_loss_prob_gradient(lb, seq, e, k, c[i], t_all, cs[i], t_s, non_empty);
      CAPTURE(trial);
      CHECK(std::abs(got - want) <= 1e-9 * std::max(1.0, std::abs(want)));
    }
  }
  // At perfect balance (c_i = T·k/E, P_i = T/E) the balance loss is 1.
  CHECK(router_balance_value(8.0, 8.0 * (10.0 * 2.0 / 8.0) * (10.0 / 8.0), 10.0, 2.0) == doctest::Approx(1.0));
}
