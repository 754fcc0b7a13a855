// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// router_losses on the GPU against its Host twin (include/epx/cuda/router_losses.cuh). Inputs: random
// logits (normal, scale 2, never 0; padding columns NaN, which the kernels must not read), random
// ids with some -1 slots (padding columns out of range, likewise), random sequence offsets with
// empty sequences (first, middle and last) or none; d_logits pre-filled with random values of the
// gradient's own scale (the gradient is added to them), its padding poisoned.
//
// Tolerances: both backends compute in double; the device's exp/log, its butterfly and tree sums
// and FMA differ from the Host's in the last bits of the double only, so the values agree to 1e-9
// relative (they agree to ~1e-15), and each d_logits element to 2 float ulp of the result plus 2
// ulp of the Host's gradient alone (rounded once to float before the add) plus 2^-40 of the row's
// largest gradient and of the largest dL/dp (cancellation in p · (g - dot): with balanced counts
// the true gradient is 0 and both backends return rounding noise of size ~eps · dL/dp). A wrong
// formula or a wrong sequence is off by far more. Then: a second run bitwise equal, a captured
// graph bitwise equal, the Status counts of invalid input (and the Host's answer for the rest),
// and the host-side errors with the Host's messages.

#include "../common/test_util.hpp"
#include "device_buffer.cuh"

#include <epx/cuda.cuh>
#include <epx/cuda/router_losses.cuh>
#include <epx/host/router_losses.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

using namespace epx;
using test::DeviceBuffer;

namespace {

constexpr unsigned char kPoison = 0xcd;
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr Scoring kScorings[] = {Scoring::kSoftmaxTopK, Scoring::kTopKSoftmax, Scoring::kSigmoidTopK};
constexpr RouterLossConfig kCoefficients[] = {
    {.load_balancing = 0.01f}, {.sequence_aux = 0.25f}, {.z_loss = 0.001f}, {0.01f, 0.25f, 0.001f}};

struct Case {
  RouterConfig config;
  RouterLossConfig losses;
  std::int64_t tokens = 0;
  bool offsets = true;    // random sequences (with empty ones), or none: one sequence
  std::int64_t pad = 0;   // extra columns of every matrix
  bool balanced = false;  // top_k == num_experts, every token routed to every expert: the balance
                          // losses' gradient is 0 (only rounding noise)
};

//! Random sequence offsets over t tokens: an empty first sequence, random lengths 0..6 (some
//! empty), an empty last one.
std::vector<std::int64_t> random_offsets(std::int64_t t, std::mt19937_64& rng) {
  std::vector<std::int64_t> off{0, 0};
  while (off.back() < t) off.push_back(std::min<std::int64_t>(t, off.back() + static_cast<std::int64_t>(rng() % 7)));
  off.push_back(t);
  return off;
}

template <class L>
std::vector<L> random_logits(std::int64_t t, std::int32_t e, std::int64_t ld, std::mt19937_64& rng) {
  std::normal_distribution<float> dist(0.0f, 2.0f);
  std::vector<L> out(static_cast<std::size_t>(std::max<std::int64_t>(t, 1) * ld), from_float<L>(kNaN));
  for (std::int64_t r = 0; r < t; ++r)
    for (std::int32_t c = 0; c < e; ++c) {
      float v = 0.0f;
      do v = to_float(from_float<L>(dist(rng)));
      while (v == 0.0f);
      out[static_cast<std::size_t>(r * ld + c)] = from_float<L>(v);
    }
  return out;
}

//! |got - want| within the header's bound; `grad` the Host's gradient alone, `row_max` its row's
//! largest magnitude, `prob_gradient` the largest dL/dp (gradient_floor).
bool within(float got, float want, float grad, double row_max, double prob_gradient) {
  if (!std::isfinite(got)) return false;
  auto ulp = [](float v) {
    double const a = std::abs(double{v});
    return std::nextafter(static_cast<float>(a), std::numeric_limits<float>::infinity()) - a;
  };
  return std::abs(double{got} - double{want}) <=
         2.0 * ulp(want) + 2.0 * ulp(grad) + 0x1p-40 * (row_max + prob_gradient);
}

//! The largest dL/dp any token sees, the size of the terms p · (g - dot) cancels:
//! lb · E · max_i c_i / (T² k) + seq / S' · E · max_{s,i} c_{s,i} / (n_s² k) (S' the non-empty
//! sequences), with the counts taken from the ids as the Host takes them.
double gradient_floor(RouterConfig const& cfg, RouterLossConfig const& losses, MatrixView<std::int32_t const> ids,
                      std::vector<std::int64_t> const& offsets) {
  std::int64_t const t = ids.rows;
  if (t == 0) return 0.0;
  auto const e = static_cast<std::size_t>(cfg.num_experts);
  double const experts = cfg.num_experts, k = cfg.top_k;
  std::vector<std::int64_t> const bounds = offsets.empty() ? std::vector<std::int64_t>{0, t} : offsets;
  std::vector<double> all(e, 0.0);
  double seq_max = 0.0, non_empty = 0.0;
  for (std::size_t s = 0; s + 1 < bounds.size(); ++s) {
    std::vector<double> c(e, 0.0);
    for (std::int64_t r = bounds[s]; r < bounds[s + 1]; ++r)
      for (std::int64_t j = 0; j < ids.cols; ++j) {
        std::int32_t const id = ids(r, j);
        if (id >= 0 && id < cfg.num_experts) {
          c[static_cast<std::size_t>(id)] += 1.0;
          all[static_cast<std::size_t>(id)] += 1.0;
        }
      }
    double const n = static_cast<double>(bounds[s + 1] - bounds[s]);
    if (n == 0.0) continue;
    non_empty += 1.0;
    seq_max = std::max(seq_max, *std::max_element(c.begin(), c.end()) / (n * n));
  }
  double const n_all = static_cast<double>(t);
  return double{losses.load_balancing} * experts * *std::max_element(all.begin(), all.end()) / (n_all * n_all * k) +
         double{losses.sequence_aux} / std::max(non_empty, 1.0) * experts * seq_max / k;
}

//! The device's d_logits [t, ld_d] against the Host's `want` = prefill + its gradient `grad`
//! [t, e] (rows in `skip` not compared): elements out of bound (the first few described in
//! `first`), padding columns changed, and elements the device changed (its own gradient flowed).
struct GradientDiff {
  int bad = 0, touched = 0, changed = 0;
  std::string first;
};
GradientDiff compare_d_logits(std::vector<float> const& got, std::vector<float> const& prefill,
                              std::vector<float> const& want, std::vector<float> const& grad, std::int64_t t,
                              std::int32_t e, std::int64_t ld_d, double prob_gradient,
                              std::vector<std::int64_t> const& skip = {}) {
  GradientDiff diff;
  std::ostringstream first;
  for (std::int64_t r = 0; r < t; ++r) {
    for (std::int64_t x = e; x < ld_d; ++x) {
      auto const i = static_cast<std::size_t>(r * ld_d + x);
      diff.touched += std::memcmp(&got[i], &prefill[i], 4) == 0 ? 0 : 1;
    }
    if (std::find(skip.begin(), skip.end(), r) != skip.end()) continue;
    double row_max = 0.0;
    for (std::int32_t x = 0; x < e; ++x) row_max = std::max(row_max, double{std::abs(grad[r * e + x])});
    for (std::int32_t x = 0; x < e; ++x) {
      auto const i = static_cast<std::size_t>(r * e + x), d = static_cast<std::size_t>(r * ld_d + x);
      if (!within(got[d], want[i], grad[i], row_max, prob_gradient)) {
        if (diff.bad < 5)
          first << "token " << r << ", expert " << x << ": device " << got[d] << ", host " << want[i]
                << " (host gradient " << grad[i] << "); ";
        ++diff.bad;
      }
      diff.changed += got[d] != prefill[d] ? 1 : 0;
    }
  }
  diff.first = first.str();
  return diff;
}

bool close(double got, double want) {
  return std::abs(got - want) <= 1e-9 * std::abs(want) + 1e-300 && std::isfinite(got);
}

struct DeviceRun {
  std::vector<float> d_logits;
  RouterLossValues values;
};

//! The Host's values, its gradient alone and its gradient added to a prefill.
struct HostAnswer {
  RouterLossValues values;
  std::vector<float> grad, want;
};

//! Everything a case needs on the device, and one call of router_losses on it (d_logits reset to
//! `prefill` first).
template <class L>
struct DeviceCase {
  RouterConfig config;
  RouterLossConfig losses;
  std::int64_t t, ld_l, ld_k, ld_d;
  DeviceBuffer<L> logits;
  DeviceBuffer<std::int32_t> ids;
  DeviceBuffer<std::int64_t> offsets;
  DeviceBuffer<float> d_logits;
  DeviceBuffer<RouterLossValues> values{1};
  DeviceBuffer<Status> status{1};
  DeviceBuffer<std::byte> workspace;
  std::vector<float> prefill;

  DeviceCase(RouterConfig const& c, RouterLossConfig const& l, std::int64_t tokens, std::int64_t pad,
             std::vector<L> const& host_logits, std::vector<std::int32_t> const& host_ids,
             std::vector<std::int64_t> const& host_offsets, std::vector<float> const& host_prefill)
      : config(c),
        losses(l),
        t(tokens),
        ld_l(c.num_experts + pad),
        ld_k(c.top_k + pad),
        ld_d(c.num_experts + pad),
        logits(host_logits),
        ids(host_ids),
        offsets(host_offsets),
        d_logits(host_prefill.size()),
        workspace(cuda_router_losses_workspace_bytes(
            c.num_experts, tokens, host_offsets.empty() ? 1 : static_cast<std::int64_t>(host_offsets.size()) - 1)),
        prefill(host_prefill) {
    status.poison(0);
  }

  void call(StreamRef stream) {
    router_losses(stream, config, losses, MatrixView<L const>(logits.data(), t, config.num_experts, ld_l),
                  MatrixView<std::int32_t const>(ids.data(), t, config.top_k, ld_k),
                  std::span<std::int64_t const>(offsets.data(), offsets.size()),
                  MatrixView<float>(d_logits.data(), t, config.num_experts, ld_d), values.data(),
                  Workspace(workspace.data(), workspace.size()), status.data());
  }

  void reset() {
    if (!prefill.empty())
      EPX_CUDA_CHECK(
          cudaMemcpy(d_logits.data(), prefill.data(), prefill.size() * sizeof(float), cudaMemcpyHostToDevice));
    values.poison(kPoison);
    workspace.poison(kPoison);  // the kernels initialise every part they read
  }

  DeviceRun run(test::CudaStream const& stream) {
    reset();
    call(stream.ref());
    stream.sync();
    return {d_logits.to_host(), values.to_host()[0]};
  }
};

template <class L>
void check_losses(Case const& c, std::mt19937_64& rng) {
  RouterConfig const& cfg = c.config;
  CAPTURE(cfg.num_experts);
  CAPTURE(cfg.top_k);
  CAPTURE(to_string(cfg.scoring));
  CAPTURE(c.losses.load_balancing);
  CAPTURE(c.losses.sequence_aux);
  CAPTURE(c.losses.z_loss);
  CAPTURE(c.tokens);
  CAPTURE(c.offsets);
  CAPTURE(c.pad);
  CAPTURE(sizeof(L));
  std::int32_t const e = cfg.num_experts, k = cfg.top_k;
  std::int64_t const t = c.tokens, ld_l = e + c.pad, ld_k = k + c.pad, ld_d = e + c.pad;
  auto const logits = random_logits<L>(t, e, ld_l, rng);
  std::vector<std::int32_t> ids(static_cast<std::size_t>(std::max<std::int64_t>(t, 1) * ld_k), e + 5);
  std::uniform_int_distribution<std::int32_t> pick(0, e - 1);
  REQUIRE((!c.balanced || k == e));
  for (std::int64_t r = 0; r < t; ++r)
    for (std::int32_t j = 0; j < k; ++j)
      ids[static_cast<std::size_t>(r * ld_k + j)] = c.balanced       ? static_cast<std::int32_t>((r + j) % e)
                                                    : rng() % 8 == 0 ? -1
                                                                     : pick(rng);
  auto const offsets = c.offsets ? random_offsets(t, rng) : std::vector<std::int64_t>{};
  CAPTURE(offsets.size());

  // The Host: its gradient alone (zero d_logits), then added to the random prefill.
  MatrixView<L const> const host_logits(logits.data(), t, e, ld_l);
  MatrixView<std::int32_t const> const host_ids(ids.data(), t, k, ld_k);
  std::vector<float> grad(static_cast<std::size_t>(t * e), 0.0f);
  RouterLossValues const want_values =
      router_losses(Host{}, cfg, c.losses, host_logits, host_ids, offsets, MatrixView<float>(grad.data(), t, e));
  double scale = 0.0;
  for (float g : grad) scale = std::max(scale, double{std::abs(g)});
  auto prefill = test::random_vector<float>(static_cast<std::size_t>(std::max<std::int64_t>(t, 1) * ld_d), rng,
                                            static_cast<float>(scale > 0.0 ? scale : 1.0));
  for (std::int64_t r = 0; r < t; ++r)
    for (std::int64_t x = e; x < ld_d; ++x) std::memset(&prefill[static_cast<std::size_t>(r * ld_d + x)], kPoison, 4);
  std::vector<float> want(static_cast<std::size_t>(t * e));
  for (std::int64_t r = 0; r < t; ++r)
    for (std::int32_t x = 0; x < e; ++x)
      want[static_cast<std::size_t>(r * e + x)] = prefill[static_cast<std::size_t>(r * ld_d + x)];
  (void)router_losses(Host{}, cfg, c.losses, host_logits, host_ids, offsets, MatrixView<float>(want.data(), t, e));

  test::CudaStream stream;
  DeviceCase<L> dev(cfg, c.losses, t, c.pad, logits, ids, offsets, prefill);
  DeviceRun const got = dev.run(stream);

  CHECK(close(got.values.load_balancing, want_values.load_balancing));
  CHECK(close(got.values.sequence_aux, want_values.sequence_aux));
  CHECK(close(got.values.z_loss, want_values.z_loss));
  CHECK(close(got.values.total, want_values.total));
  if (t > 0) CHECK(want_values.z_loss > 0.0);
  double const prob_gradient = gradient_floor(cfg, c.losses, host_ids, offsets);
  CAPTURE(prob_gradient);
  GradientDiff const diff = compare_d_logits(got.d_logits, prefill, want, grad, t, e, ld_d, prob_gradient);
  INFO(diff.first);
  CHECK(diff.bad == 0);
  CHECK(diff.touched == 0);
  // The device's gradient flowed (softmax over one expert has none but the z-loss's; balanced
  // counts none but the z-loss's).
  bool const gradient = c.losses.z_loss > 0.0f ||
                        (e > 1 && !c.balanced && (c.losses.load_balancing > 0.0f || c.losses.sequence_aux > 0.0f));
  if (t > 1 && gradient) CHECK(diff.changed > 0);
  // No coefficient, or one expert (p · (g - dot) exactly 0): d_logits untouched. Balanced counts
  // leave rounding noise instead.
  if (!gradient && !c.balanced) CHECK(got.d_logits == prefill);
  Status const st = dev.status.to_host()[0];
  CHECK(st.invalid_ids == 0);
  CHECK(st.dropped_slots == 0);

  DeviceRun const second = dev.run(stream);
  CHECK(std::memcmp(&second.values, &got.values, sizeof got.values) == 0);
  CHECK(std::memcmp(second.d_logits.data(), got.d_logits.data(), got.d_logits.size() * sizeof(float)) == 0);
}

}  // namespace

TEST_CASE("router_losses[cuda]: every scoring and coefficient, 1..512 experts, top_k 1..8, fp32 and bf16") {
  EPX_TEST_SEEDED_RNG(rng);
  std::int64_t const many = test::pick_size<std::int64_t>(1000, 67);
  for (std::int32_t e : {1, 8, 33, 64, 256, 512})
    for (std::int32_t k : {1, 2, 8})
      for (auto scoring : kScorings) {
        if (k > e) continue;
        RouterConfig const cfg{.num_experts = e, .top_k = k, .scoring = scoring};
        std::int64_t const t = e == 256 ? many : 37;
        for (auto const& losses : kCoefficients)
          check_losses<float>({.config = cfg, .losses = losses, .tokens = t, .pad = k == 2 ? 3 : 0}, rng);
        RouterLossConfig const all = kCoefficients[3];
        check_losses<float>({.config = cfg, .losses = all, .tokens = t, .offsets = false}, rng);
        check_losses<float>({.config = cfg, .losses = {}, .tokens = 19}, rng);  // values only
        if (e == 64 || e == 256) {
          check_losses<bfloat16>({.config = cfg, .losses = all, .tokens = t, .pad = 1}, rng);
          check_losses<bfloat16>({.config = cfg, .losses = all, .tokens = t, .offsets = false}, rng);
        }
      }
}

TEST_CASE("router_losses[cuda]: top_k past 32, zero and one token, long sequences, many sequences") {
  EPX_TEST_SEEDED_RNG(rng);
  RouterLossConfig const all = kCoefficients[3];
  for (auto scoring : kScorings) {
    check_losses<float>(
        {.config = {.num_experts = 100, .top_k = kMaxTopK, .scoring = scoring}, .losses = all, .tokens = 23, .pad = 2},
        rng);
    for (std::int64_t t : {0, 1}) {
      check_losses<float>({.config = {.num_experts = 8, .top_k = 2, .scoring = scoring}, .losses = all, .tokens = t},
                          rng);
      check_losses<float>(
          {.config = {.num_experts = 8, .top_k = 2, .scoring = scoring}, .losses = all, .tokens = t, .offsets = false},
          rng);
    }
    // One sequence of many tokens: the stripes' four accumulators and several rounds each.
    check_losses<float>({.config = {.num_experts = 64, .top_k = 6, .scoring = scoring},
                         .losses = all,
                         .tokens = test::pick_size<std::int64_t>(3000, 300),
                         .offsets = false},
                        rng);
    // About 600 short sequences (lengths 0..6): the values kernel's stride over sequences (256
    // threads) in every mode.
    check_losses<float>(
        {.config = {.num_experts = 33, .top_k = 3, .scoring = scoring}, .losses = all, .tokens = 1800, .pad = 1}, rng);
  }
}

TEST_CASE("router_losses[cuda]: balanced counts, where the balance losses' true gradient is 0") {
  // Every token routed to every expert: g_i is the same for every expert, p · (g - dot) cancels to
  // rounding noise on both backends (different noise); the bound's floor (gradient_floor) covers it.
  EPX_TEST_SEEDED_RNG(rng);
  for (std::int32_t e : {2, 8})
    for (auto scoring : kScorings)
      for (auto const& losses : kCoefficients)
        for (bool offsets : {true, false})
          check_losses<float>({.config = {.num_experts = e, .top_k = e, .scoring = scoring},
                               .losses = losses,
                               .tokens = 300,
                               .offsets = offsets,
                               .balanced = true},
                              rng);
}

TEST_CASE("router_losses[cuda]: a captured graph gives the direct call's bits") {
  EPX_TEST_SEEDED_RNG(rng);
  RouterConfig const cfg{.num_experts = 64, .top_k = 4, .scoring = Scoring::kSigmoidTopK};
  std::int64_t const t = 300;
  auto const logits = random_logits<float>(t, cfg.num_experts, cfg.num_experts, rng);
  std::vector<std::int32_t> ids(static_cast<std::size_t>(t * cfg.top_k));
  for (auto& id : ids) id = static_cast<std::int32_t>(rng() % 65) - 1;
  auto const offsets = random_offsets(t, rng);
  auto const prefill = test::random_vector<float>(static_cast<std::size_t>(t * cfg.num_experts), rng, 1e-4f);
  test::CudaStream stream;
  DeviceCase<float> dev(cfg, kCoefficients[3], t, 0, logits, ids, offsets, prefill);
  DeviceRun const direct = dev.run(stream);

  dev.reset();
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  EPX_CUDA_CHECK(cudaStreamBeginCapture(stream.s, cudaStreamCaptureModeThreadLocal));
  dev.call(stream.ref());
  EPX_CUDA_CHECK(cudaStreamEndCapture(stream.s, &graph));
  EPX_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  EPX_CUDA_CHECK(cudaGraphLaunch(exec, stream.s));
  stream.sync();
  auto const graph_d_logits = dev.d_logits.to_host();
  auto const graph_values = dev.values.to_host()[0];
  EPX_CUDA_CHECK(cudaGraphExecDestroy(exec));
  EPX_CUDA_CHECK(cudaGraphDestroy(graph));
  CHECK(std::memcmp(&graph_values, &direct.values, sizeof graph_values) == 0);
  CHECK(graph_d_logits == direct.d_logits);
  CHECK(graph_d_logits != prefill);
}

TEST_CASE("router_losses[cuda]: a NaN logit, invalid ids and invalid offsets are counted in Status") {
  EPX_TEST_SEEDED_RNG(rng);
  RouterConfig const cfg{.num_experts = 40, .top_k = 3};
  RouterLossConfig const all = kCoefficients[3];
  std::int64_t const t = 12, e = cfg.num_experts, k = cfg.top_k;
  auto logits = random_logits<float>(t, cfg.num_experts, e, rng);
  std::vector<std::int32_t> ids(static_cast<std::size_t>(t * k));
  for (auto& id : ids) id = static_cast<std::int32_t>(rng() % 40);
  auto const prefill = test::random_vector<float>(static_cast<std::size_t>(t * e), rng, 1e-3f);
  std::vector<std::int64_t> const offsets{0, 4, 4, 12};
  test::CudaStream stream;
  auto view = [&](std::vector<float> const& l) { return MatrixView<float const>(l.data(), t, e); };
  auto id_view = [&](std::vector<std::int32_t> const& i) { return MatrixView<std::int32_t const>(i.data(), t, k); };
  // The Host's values, its gradient alone and added to the prefill.
  auto host = [&](std::vector<float> const& l, std::vector<std::int32_t> const& i, std::vector<std::int64_t> const& o) {
    HostAnswer a;
    a.grad.assign(static_cast<std::size_t>(t * e), 0.0f);
    a.want = prefill;
    a.values = router_losses(Host{}, cfg, all, view(l), id_view(i), o, MatrixView<float>(a.grad.data(), t, e));
    (void)router_losses(Host{}, cfg, all, view(l), id_view(i), o, MatrixView<float>(a.want.data(), t, e));
    return a;
  };

  // Token 5: ids e and -3, counted nowhere: the values and gradient are the Host's with them -1.
  auto bad_ids = ids;
  bad_ids[5 * k + 0] = static_cast<std::int32_t>(e);
  bad_ids[5 * k + 2] = -3;
  auto minus_one = ids;
  minus_one[5 * k + 0] = -1;
  minus_one[5 * k + 2] = -1;
  {
    DeviceCase<float> dev(cfg, all, t, 0, logits, bad_ids, offsets, prefill);
    DeviceRun const got = dev.run(stream);
    Status const st = dev.status.to_host()[0];
    CHECK(st.invalid_ids == 2);
    CHECK(st.dropped_slots == 2);  // an invalid id is a dropped slot too
    CHECK_FALSE(st.ok());
    HostAnswer const want = host(logits, minus_one, offsets);
    CHECK(close(got.values.load_balancing, want.values.load_balancing));
    CHECK(close(got.values.sequence_aux, want.values.sequence_aux));
    CHECK(close(got.values.z_loss, want.values.z_loss));
    CHECK(close(got.values.total, want.values.total));
    GradientDiff const diff = compare_d_logits(got.d_logits, prefill, want.want, want.grad, t, cfg.num_experts, e,
                                               gradient_floor(cfg, all, id_view(minus_one), offsets));
    INFO(diff.first);
    CHECK(diff.bad == 0);
    CHECK(diff.changed > 0);
    CHECK_THROWS_AS((void)host(logits, bad_ids, offsets), Error);
  }

  // And token 3: a NaN logit and one -1 id; token 7: +inf logit. Their rows are left as they were,
  // their slots that named an expert dropped (2 + 3) and counted nowhere: the other tokens'
  // gradients are the Host's with those ids -1 (and any finite logits in rows 3 and 7).
  auto bad_logits = logits;
  bad_logits[static_cast<std::size_t>(3 * e + 11)] = kNaN;
  bad_logits[static_cast<std::size_t>(7 * e + 0)] = std::numeric_limits<float>::infinity();
  bad_ids[3 * k + 1] = -1;
  for (std::int64_t r : {3, 7})
    for (std::int64_t j = 0; j < k; ++j) minus_one[static_cast<std::size_t>(r * k + j)] = -1;
  {
    DeviceCase<float> dev(cfg, all, t, 0, bad_logits, bad_ids, offsets, prefill);
    DeviceRun const got = dev.run(stream);
    Status const st = dev.status.to_host()[0];
    CHECK(st.invalid_ids == 2);
    CHECK(st.dropped_slots == 2 + 5);
    CHECK_FALSE(st.ok());
    for (std::int64_t r : {3, 7})  // rows with a non-finite logit are left as they were
      CHECK(std::memcmp(&got.d_logits[static_cast<std::size_t>(r * e)], &prefill[static_cast<std::size_t>(r * e)],
                        static_cast<std::size_t>(e) * sizeof(float)) == 0);
    HostAnswer const want = host(logits, minus_one, offsets);
    GradientDiff const diff = compare_d_logits(got.d_logits, prefill, want.want, want.grad, t, cfg.num_experts, e,
                                               gradient_floor(cfg, all, id_view(minus_one), offsets), {3, 7});
    INFO(diff.first);
    CHECK(diff.bad == 0);
    CHECK(diff.changed > 0);  // the other tokens got their gradient
    CHECK(std::isfinite(got.values.total));
    CHECK_THROWS_AS((void)host(bad_logits, ids, offsets), Error);
  }

  // Invalid offsets (non-decreasing broken; last != t; first != 0; no non-empty sequence left):
  // num_tokens · top_k dropped each call, no gradient at all (d_logits as it was), finite values,
  // and nothing out of bounds (compute-sanitizer's memcheck in the GPU bundle).
  logits = random_logits<float>(t, cfg.num_experts, e, rng);
  for (auto& id : ids) id = static_cast<std::int32_t>(rng() % 40);
  for (auto const& bad : {std::vector<std::int64_t>{0, 9, 4, 12}, std::vector<std::int64_t>{0, 4, 30},
                          std::vector<std::int64_t>{-5, 4, 12}, std::vector<std::int64_t>{0, 100, -100, 12},
                          std::vector<std::int64_t>{7, 7}, std::vector<std::int64_t>{0, -3}}) {
    CAPTURE(bad.size());
    CAPTURE(bad[0]);
    CAPTURE(bad[1]);
    DeviceCase<float> dev(cfg, all, t, 0, logits, ids, bad, prefill);
    DeviceRun const got = dev.run(stream);
    Status const st = dev.status.to_host()[0];
    CHECK(st.invalid_ids == 0);
    CHECK(st.dropped_slots == static_cast<std::uint64_t>(t * k));
    CHECK(got.d_logits == prefill);
    CHECK(std::isfinite(got.values.load_balancing));
    CHECK(std::isfinite(got.values.sequence_aux));
    CHECK(std::isfinite(got.values.z_loss));
    CHECK(std::isfinite(got.values.total));
    CHECK_THROWS_AS((void)host(logits, ids, bad), Error);
  }
  // Valid ones count nothing (the same data).
  DeviceCase<float> dev(cfg, all, t, 0, logits, ids, offsets, prefill);
  (void)dev.run(stream);
  CHECK(dev.status.to_host()[0].ok());
  CHECK(dev.status.to_host()[0].dropped_slots == 0);
}

TEST_CASE("router_losses[cuda]: argument errors, with the Host's messages where they apply") {
  std::vector<float> logits(600 * 2, 1.0f), d_logits(600 * 2);
  std::vector<std::int32_t> ids(4, 0);
  std::vector<std::int64_t> one{0};
  auto* fake = reinterpret_cast<CUstream_st*>(std::uintptr_t{0x2});
  auto* fake_status = reinterpret_cast<Status*>(std::uintptr_t{0x40});
  auto* fake_values = reinterpret_cast<RouterLossValues*>(std::uintptr_t{0x80});
  RouterConfig const c{.num_experts = 8, .top_k = 2};
  Workspace const big(reinterpret_cast<void*>(std::uintptr_t{0x1000}), std::size_t{1} << 30);
  struct Args {
    RouterConfig cfg;
    RouterLossConfig losses{};
    std::int64_t d_rows = 2;
    std::int64_t id_cols = 2;
    std::span<std::int64_t const> offsets{};
    StreamRef stream;
    RouterLossValues* values;
    Workspace ws;
    Status* status;
  };
  Args const good{.cfg = c, .stream = StreamRef(fake), .values = fake_values, .ws = big, .status = fake_status};
  auto cuda = [&](Args const& a) {
    router_losses(a.stream, a.cfg, a.losses, MatrixView<float const>(logits.data(), 2, a.cfg.num_experts),
                  MatrixView<std::int32_t const>(ids.data(), 2, a.id_cols), a.offsets,
                  MatrixView<float>(d_logits.data(), a.d_rows, a.cfg.num_experts), a.values, a.ws, a.status);
  };
  auto host = [&](Args const& a) {
    (void)router_losses(Host{}, a.cfg, a.losses, MatrixView<float const>(logits.data(), 2, a.cfg.num_experts),
                        MatrixView<std::int32_t const>(ids.data(), 2, a.id_cols), a.offsets,
                        MatrixView<float>(d_logits.data(), a.d_rows, a.cfg.num_experts));
  };
  auto both = [&](Errc code, std::string const& part, Args const& a) {
    test::check_throws(code, part, [&] { cuda(a); });
    test::check_throws(code, part, [&] { host(a); });
  };
  auto with = [&](auto change) {
    Args a = good;
    change(a);
    return a;
  };
  both(Errc::kInvalidArgument, "router_losses: losses.z_loss = -1, expected a finite number >= 0",
       with([](Args& a) { a.losses.z_loss = -1.0f; }));
  both(Errc::kInvalidArgument, "router_losses: losses.load_balancing = nan",
       with([](Args& a) { a.losses.load_balancing = kNaN; }));
  both(Errc::kShapeMismatch, "router_losses: d_logits.rows = 1, expected 2", with([](Args& a) { a.d_rows = 1; }));
  both(Errc::kShapeMismatch, "router_losses: topk_ids.cols = 3, expected 2", with([](Args& a) { a.id_cols = 3; }));
  both(Errc::kShapeMismatch, "router_losses: sequence_offsets.size() = 1, expected 0 (one sequence)",
       with([&](Args& a) { a.offsets = one; }));
  both(Errc::kInvalidArgument, "router_losses: top_k = 9", with([](Args& a) {
         a.cfg = {.num_experts = 8, .top_k = 9};
         a.id_cols = 9;
       }));
  // CUDA only.
  test::check_throws(Errc::kUnsupported, "router_losses: num_experts = 600, expected <= 512 on CUDA",
                     [&] { cuda(with([](Args& a) { a.cfg = {.num_experts = 600, .top_k = 2}; })); });
  test::check_throws(Errc::kInvalidArgument, "router_losses: values = nullptr",
                     [&] { cuda(with([](Args& a) { a.values = nullptr; })); });
  test::check_throws(Errc::kInvalidArgument, "router_losses: status = nullptr",
                     [&] { cuda(with([](Args& a) { a.status = nullptr; })); });
  test::check_throws(Errc::kInvalidArgument, "router_losses: stream = StreamRef::host()",
                     [&] { cuda(with([](Args& a) { a.stream = StreamRef::host(); })); });
  std::size_t const need = cuda_router_losses_workspace_bytes(8, 2, 1);
  CHECK(need >= (2 * 8 + 2 + 8 + 8 + 8 + 8 + 1) * sizeof(double));
  test::check_throws(
      Errc::kWorkspaceTooSmall,
      fmt::format("router_losses: workspace.size() = {} bytes, expected at least {} bytes", need - 1, need),
      [&] { cuda(with([&](Args& a) { a.ws = Workspace(big.data(), need - 1); })); });
  test::check_throws(Errc::kInvalidArgument, "cuda_router_losses_workspace_bytes: num_sequences = 0",
                     [] { (void)cuda_router_losses_workspace_bytes(8, 2, 0); });
  test::check_throws(Errc::kInvalidArgument, "cuda_router_losses_workspace_bytes: num_experts = 0",
                     [] { (void)cuda_router_losses_workspace_bytes(0, 2, 1); });
  test::check_throws(Errc::kInvalidArgument, "cuda_router_losses_workspace_bytes: num_tokens = -1",
                     [] { (void)cuda_router_losses_workspace_bytes(8, -1, 1); });
}
