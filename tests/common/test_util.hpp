// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

// Shared by epx's tests: seeded random inputs, comparisons, and a dense MoE reference written
// independently of the library (plain double loops over the global weights).

#include <epx/epx.hpp>

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

namespace epx::test {

//! The seed of this test case: EPX_TEST_SEED when set (to reproduce a failure), else fresh.
//! Tests INFO() it, so every failure prints it.
inline std::uint64_t test_seed() {
  if (char const* s = std::getenv("EPX_TEST_SEED")) return std::strtoull(s, nullptr, 10);
  return (std::uint64_t{std::random_device{}()} << 32) ^ std::random_device{}();
}

//! True when EPX_TEST_SMALL is set (to anything but "" or "0"): GPU tests then run reduced problem
//! sizes, so that compute-sanitizer (memcheck, racecheck, synccheck: 10-100x slower) fits a GPU
//! session's budget. Every size list a test shrinks keeps its edge cases (0, 1, ragged tails); only
//! the large sizes go.
inline bool small_sizes() {
  char const* s = std::getenv("EPX_TEST_SMALL");
  return s != nullptr && *s != '\0' && std::string(s) != "0";
}

//! `full`, or `small` under EPX_TEST_SMALL (see small_sizes()).
template <class T>
T pick_size(T full, T small) {
  return small_sizes() ? small : full;
}

#define EPX_TEST_SEEDED_RNG(rng)                                                       \
  std::uint64_t const rng##_seed = ::epx::test::test_seed();                           \
  INFO("seed = " << rng##_seed << " (rerun with EPX_TEST_SEED=" << rng##_seed << ")"); \
  std::mt19937_64 rng(rng##_seed)

//! Runs `f`, which must throw epx::Error with `code` and a message containing `part`.
template <class F>
void check_throws(Errc code, std::string const& part, F&& f) {
  bool thrown = false;
  try {
    f();
  } catch (Error const& e) {
    thrown = true;
    INFO(e.what());
    CHECK(e.code() == code);
    CHECK(std::string(e.what()).find(part) != std::string::npos);
  }
  CHECK(thrown);
}

//! A rank of a communicator that must never be asked for a collective: what a test gives a layer
//! whose constructor (or can_implement) refuses it first. Claims `memory`, rank 0 of `size`.
class UnusedCommunicator final : public Communicator {
 public:
  explicit UnusedCommunicator(MemorySpace memory, int size = 1) : memory_(memory), size_(size) {}
  [[nodiscard]] int rank() const noexcept override { return 0; }
  [[nodiscard]] int size() const noexcept override { return size_; }
  [[nodiscard]] MemorySpace memory_space() const noexcept override { return memory_; }
  void all_to_all_v(void const*, std::span<std::size_t const>, void*, std::span<std::size_t const>,
                    StreamRef) override {
    unexpected();
  }
  void all_to_all(void const*, void*, std::size_t, StreamRef) override { unexpected(); }
  void all_reduce_sum(void*, std::size_t, DType, StreamRef) override { unexpected(); }
  void all_gather(void const*, void*, std::size_t, StreamRef) override { unexpected(); }
  void barrier(StreamRef) override { unexpected(); }
  void wait(StreamRef) override { unexpected(); }

 private:
  [[noreturn]] static void unexpected() { throw std::logic_error("UnusedCommunicator: no collective expected"); }
  MemorySpace memory_;
  int size_;
};

template <class T>
std::vector<T> random_vector(std::size_t n, std::mt19937_64& rng, float scale = 1.0f) {
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<T> v(n);
  for (auto& x : v) x = from_float<T>(dist(rng));
  return v;
}

//! Max-norm relative error: max |a - b| / max |b|. Requires a non-trivial reference.
template <class A, class B>
double rel_error(std::vector<A> const& a, std::vector<B> const& b) {
  REQUIRE(a.size() == b.size());
  double diff = 0.0, ref = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    double const x = to_float(a[i]), y = static_cast<double>(b[i]);
    diff = std::max(diff, std::abs(x - y));
    ref = std::max(ref, std::abs(y));
    if (std::isnan(x) != std::isnan(y)) return INFINITY;
  }
  if (a.empty()) return 0.0;
  REQUIRE_MESSAGE(ref > 0.0, "reference is all zeros: the test input is trivial");
  return diff / ref;
}

inline double reference_activation(Activation kind, double gate, double up, ClampedSwiGLUParams p) {
  auto sigmoid = [](double v) { return 1.0 / (1.0 + std::exp(-v)); };
  switch (kind) {
    case Activation::kSwiGLU: return gate * sigmoid(gate) * up;
    case Activation::kGeGLU: return 0.5 * gate * (1.0 + std::erf(gate / std::sqrt(2.0))) * up;
    case Activation::kGeGLUTanh:
      return 0.5 * gate * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (gate + 0.044715 * gate * gate * gate))) * up;
    case Activation::kReLU: return std::max(gate, 0.0);
    case Activation::kClampedSwiGLU: {
      double const g = std::min(gate, static_cast<double>(p.limit));
      double const u = std::clamp(up, -static_cast<double>(p.limit), static_cast<double>(p.limit));
      return (u + 1.0) * g * sigmoid(p.alpha * g);
    }
  }
  return 0.0;
}

//! A whole MoE layer's weights for all experts, in the layout epx reads.
template <class T>
struct GlobalWeights {
  std::int32_t num_experts = 0;
  ExpertMlpConfig mlp;
  std::vector<T> gate_up = {};       // [E, gate_up_rows, H]
  std::vector<T> down = {};          // [E, H, I]
  std::vector<T> gate_up_bias = {};  // [E, gate_up_rows] or empty
  std::vector<T> down_bias = {};     // [E, H] or empty

  static GlobalWeights random(std::int32_t num_experts, ExpertMlpConfig mlp, bool with_bias, std::mt19937_64& rng) {
    GlobalWeights w{num_experts, mlp};
    auto const e = static_cast<std::size_t>(num_experts), h = static_cast<std::size_t>(mlp.hidden),
               i = static_cast<std::size_t>(mlp.intermediate), gu = static_cast<std::size_t>(mlp.gate_up_rows());
    w.gate_up = random_vector<T>(e * gu * h, rng, 1.0f / std::sqrt(static_cast<float>(h)));
    w.down = random_vector<T>(e * h * i, rng, 1.0f / std::sqrt(static_cast<float>(i)));
    if (with_bias) {
      w.gate_up_bias = random_vector<T>(e * gu, rng, 0.1f);
      w.down_bias = random_vector<T>(e * h, rng, 0.1f);
    }
    return w;
  }

  //! The weights of experts [range.first, range.end()), as epx::ExpertWeights with their shapes
  //! (the checked form: every layer built from these checks them against its config).
  ExpertWeights local(ExpertRange range) const {
    auto const gu = static_cast<std::size_t>(mlp.gate_up_rows()) * static_cast<std::size_t>(mlp.hidden);
    auto const dn = static_cast<std::size_t>(mlp.hidden) * static_cast<std::size_t>(mlp.intermediate);
    auto const f = static_cast<std::size_t>(range.first);
    std::int64_t const n = range.count, rows = mlp.gate_up_rows(), h = mlp.hidden, i = mlp.intermediate;
    TensorView<T const, 2> gu_bias, dn_bias;
    if (!gate_up_bias.empty()) gu_bias = TensorView(gate_up_bias.data() + f * mlp.gate_up_rows(), {n, rows});
    if (!down_bias.empty()) dn_bias = TensorView(down_bias.data() + f * mlp.hidden, {n, h});
    return expert_weights(TensorView(gate_up.data() + f * gu, {n, rows, h}),
                          TensorView(down.data() + f * dn, {n, h, i}), gu_bias, dn_bias);
  }

  //! One expert's MLP on one token, in double.
  std::vector<double> expert(std::int32_t e, T const* x) const {
    auto const h = static_cast<std::size_t>(mlp.hidden), inter = static_cast<std::size_t>(mlp.intermediate),
               gu = static_cast<std::size_t>(mlp.gate_up_rows());
    auto const ue = static_cast<std::size_t>(e);
    std::vector<double> hidden_act(gu), act(inter), out(h);
    for (std::size_t n = 0; n < gu; ++n) {
      double acc = gate_up_bias.empty() ? 0.0 : to_float(gate_up_bias[ue * gu + n]);
      for (std::size_t k = 0; k < h; ++k) acc += double(to_float(x[k])) * to_float(gate_up[(ue * gu + n) * h + k]);
      hidden_act[n] = acc;
    }
    bool const interleaved = mlp.gate_up_layout == GateUpLayout::kInterleaved;
    for (std::size_t i = 0; i < inter; ++i) {
      double gate = hidden_act[i], up = 0.0;
      if (is_gated(mlp.activation)) {
        gate = interleaved ? hidden_act[2 * i] : hidden_act[i];
        up = interleaved ? hidden_act[2 * i + 1] : hidden_act[inter + i];
      }
      act[i] = reference_activation(mlp.activation, gate, up, mlp.clamped_swiglu);
    }
    for (std::size_t n = 0; n < h; ++n) {
      double acc = down_bias.empty() ? 0.0 : to_float(down_bias[ue * h + n]);
      for (std::size_t i = 0; i < inter; ++i) acc += act[i] * to_float(down[(ue * h + n) * inter + i]);
      out[n] = acc;
    }
    return out;
  }
};

//! The dense single-rank MoE: y[t] = sum over valid slots of weight * expert(x[t]). Slots with
//! id -1 or outside [0, E) contribute nothing.
template <class T>
std::vector<double> dense_moe(GlobalWeights<T> const& w, std::vector<T> const& x, std::vector<std::int32_t> const& ids,
                              std::vector<float> const& weights, std::int64_t num_tokens, std::int32_t top_k) {
  auto const h = static_cast<std::size_t>(w.mlp.hidden);
  std::vector<double> y(static_cast<std::size_t>(num_tokens) * h, 0.0);
  for (std::int64_t t = 0; t < num_tokens; ++t) {
    for (std::int32_t j = 0; j < top_k; ++j) {
      auto const s = static_cast<std::size_t>(t * top_k + j);
      if (ids[s] < 0 || ids[s] >= w.num_experts) continue;
      auto const out = w.expert(ids[s], x.data() + static_cast<std::size_t>(t) * h);
      for (std::size_t c = 0; c < h; ++c) y[static_cast<std::size_t>(t) * h + c] += double(weights[s]) * out[c];
    }
  }
  return y;
}

//! Random routing: distinct ids per token, a fraction of slots -1.
inline std::vector<std::int32_t> random_ids(std::int64_t num_tokens, std::int32_t top_k, std::int32_t num_experts,
                                            std::mt19937_64& rng, double p_skip = 0.1) {
  std::vector<std::int32_t> ids(static_cast<std::size_t>(num_tokens * top_k));
  std::vector<std::int32_t> perm(static_cast<std::size_t>(num_experts));
  std::bernoulli_distribution skip(p_skip);
  for (std::int64_t t = 0; t < num_tokens; ++t) {
    for (std::size_t e = 0; e < perm.size(); ++e) perm[e] = static_cast<std::int32_t>(e);
    std::shuffle(perm.begin(), perm.end(), rng);
    for (std::int32_t j = 0; j < top_k; ++j)
      ids[static_cast<std::size_t>(t * top_k + j)] = skip(rng) ? -1 : perm[static_cast<std::size_t>(j)];
  }
  return ids;
}

inline std::vector<float> random_weights(std::size_t n, std::mt19937_64& rng) {
  std::uniform_real_distribution<float> dist(0.05f, 1.0f);
  std::vector<float> w(n);
  for (auto& x : w) x = dist(rng);
  return w;
}

//! The most rows any rank's experts receive from `ids` (every rank's slots, in one table): what
//! AllToAll's received_rows_factor must hold.
inline std::int64_t most_received_rows(std::vector<std::int32_t> const& ids, ExpertPlacement const& placement) {
  std::int64_t most = 0;
  for (std::int32_t q = 0; q < placement.num_ranks(); ++q) {
    ExpertRange const local = placement.local_range(q);
    most = std::max(most, static_cast<std::int64_t>(std::count_if(ids.begin(), ids.end(), [&](std::int32_t id) {
                      return id >= local.first && id < local.first + local.count;
                    })));
  }
  return most;
}

}  // namespace epx::test
