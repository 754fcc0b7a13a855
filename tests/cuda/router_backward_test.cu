// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// route_backward and expert_token_counts on the GPU against their Host twins. Inputs: random logits
// (no zeros, no ties within a token), the ids the CUDA route() chose for them (with a correction
// bias and group limits where the config has them), some slots then set to -1, random
// d_topk_weights; every output poisoned first, padding columns checked untouched, a second run
// bitwise equal to the first.
//
// Tolerance of d_logits: both backends compute in double and round once to float; they differ in
// the double's last bits only (device exp vs glibc's, butterfly vs sequential sums, FMA), so an
// element agrees to within 2 float ulp of the Host's value, plus 2^-40 of the row's largest
// gradient for elements whose double value is a cancellation (p · (dp - dot)). A wrong formula
// is off by far more (the mutations in the report).
//
// Invalid ids (out of range, repeated in a token, the id of a NaN/-inf logit) reject the token:
// its row is all 0 and Status counts it (router_backward.cuh). expert_token_counts: exactly the
// Host's counts.

#include "../common/test_util.hpp"
#include "device_buffer.cuh"

#include <epx/cuda.cuh>
#include <epx/cuda/router_backward.cuh>
#include <epx/cuda/router_losses.cuh>
#include <epx/host/router_backward.hpp>
#include <epx/host/router_losses.hpp>

#include <cmath>
#include <cstring>
#include <limits>
#include <set>
#include <vector>

using namespace epx;
using test::DeviceBuffer;

namespace {

constexpr unsigned char kPoison = 0xcd;
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr Scoring kScorings[] = {Scoring::kSoftmaxTopK, Scoring::kTopKSoftmax, Scoring::kSigmoidTopK};

bool is_poison(float v) {
  unsigned char b[sizeof(float)];
  std::memcpy(b, &v, sizeof b);
  return std::all_of(std::begin(b), std::end(b), [](unsigned char x) { return x == kPoison; });
}

//! Random logits [t, ld] (ld >= e; padding columns hold values the kernels must not read): normal
//! with scale 2, never 0, distinct within a token in L's precision.
template <class L>
std::vector<L> random_logits(std::int64_t t, std::int32_t e, std::int64_t ld, std::mt19937_64& rng) {
  std::normal_distribution<float> dist(0.0f, 2.0f);
  std::vector<L> out(static_cast<std::size_t>(t * ld), from_float<L>(123.0f));
  for (std::int64_t r = 0; r < t; ++r) {
    std::set<float> seen;
    for (std::int32_t c = 0; c < e; ++c) {
      float v = 0.0f;
      do v = to_float(from_float<L>(dist(rng)));
      while (v == 0.0f || seen.count(v) != 0);
      seen.insert(v);
      out[static_cast<std::size_t>(r * ld + c)] = from_float<L>(v);
    }
  }
  return out;
}

struct Options {
  std::int64_t pad = 0;  // extra columns of every matrix
  bool bias = false;     // route() with a correction bias
  double empty = 0.1;    // fraction of slots set to -1 after routing (and one token all -1)
  double special = 0.0;  // fraction of logits set to NaN, -inf or +inf
};

// Statistics over a test case, printed at its end: how often the device's float is the Host's.
std::int64_t bitwise_total = 0, compared_total = 0;

void report_bitwise() {
  MESSAGE("d_logits bitwise equal to the Host's: " << bitwise_total << " of " << compared_total);
  bitwise_total = compared_total = 0;
}

//! The scale of a token's gradient: its largest |d_logits| or, where that is itself rounding noise
//! (renormalised weights over one valid slot cancel to ~2^-52 of the input), the largest incoming
//! |d_topk_weights| times the routed scaling factor.
double gradient_scale(double row_max, float const* d_w, std::int32_t k, float scaling) {
  double in_max = 0.0;
  for (std::int32_t j = 0; j < k; ++j) in_max = std::max(in_max, double{std::abs(d_w[j])});
  return std::max(row_max, in_max * std::max(1.0, std::abs(double{scaling})));
}

//! Per element: |got - want| <= 2 ulp(want) + 2^-40 · the token's gradient scale (header note).
bool within(float got, float want, double row_max) {
  if (std::isnan(got) || std::isinf(got)) return false;
  double const ulp = std::nextafter(std::abs(want), kInf) - std::abs(want);
  return std::abs(double{got} - double{want}) <= 2.0 * ulp + 0x1p-40 * row_max;
}

//! One comparison of route_backward: t tokens under config c.
template <class L>
void check_backward(RouterConfig const& c, std::int64_t t, Options opt, std::mt19937_64& rng) {
  CAPTURE(c.num_experts);
  CAPTURE(c.top_k);
  CAPTURE(to_string(c.scoring));
  CAPTURE(c.renormalize);
  CAPTURE(c.routed_scaling_factor);
  CAPTURE(c.num_groups);
  CAPTURE(c.topk_groups);
  CAPTURE(t);
  CAPTURE(opt.pad);
  CAPTURE(opt.bias);
  CAPTURE(opt.special);
  std::int32_t const e = c.num_experts, k = c.top_k;
  std::int64_t const ld_l = e + opt.pad, ld_k = k + opt.pad;
  auto logits = random_logits<L>(t, e, ld_l, rng);
  if (opt.special > 0.0) {
    std::uniform_real_distribution<double> u(0.0, 1.0);
    float const specials[] = {std::numeric_limits<float>::quiet_NaN(), -kInf, kInf};
    for (std::int64_t r = 0; r < t; ++r)
      for (std::int32_t x = 0; x < e; ++x)
        if (u(rng) < opt.special) logits[static_cast<std::size_t>(r * ld_l + x)] = from_float<L>(specials[rng() % 3]);
  }
  std::vector<float> bias;
  if (opt.bias) bias = test::random_vector<float>(static_cast<std::size_t>(e), rng, 0.5f);

  // The forward on the device: its ids are what the backward takes.
  test::CudaStream stream;
  DeviceBuffer<L> d_logits_in(logits);
  DeviceBuffer<float> d_bias(bias);
  auto const k_size = static_cast<std::size_t>(std::max<std::int64_t>(t, 1) * ld_k);
  DeviceBuffer<std::int32_t> d_route_ids(k_size);
  DeviceBuffer<float> d_route_w(k_size);
  d_route_ids.poison(0xff);  // -1 in the padding
  MatrixView<L const> const dev_logits(d_logits_in.data(), t, e, ld_l);
  route(stream.ref(), c, dev_logits, std::span<float const>(d_bias.data(), bias.size()),
        MatrixView<std::int32_t>(d_route_ids.data(), t, k, ld_k), MatrixView<float>(d_route_w.data(), t, k, ld_k));
  stream.sync();
  auto ids = d_route_ids.to_host();
  if (t > 0 && opt.empty > 0.0) {
    std::uniform_real_distribution<double> u(0.0, 1.0);
    for (std::int64_t r = 0; r < t; ++r)
      for (std::int32_t j = 0; j < k; ++j)
        if (u(rng) < opt.empty) ids[static_cast<std::size_t>(r * ld_k + j)] = -1;
    std::int64_t const all_empty = static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(t));
    std::fill_n(ids.begin() + all_empty * ld_k, k, -1);
  }
  auto d_w = test::random_vector<float>(k_size, rng);

  // Host reference.
  std::vector<float> want(static_cast<std::size_t>(t * e), 77.0f);
  route_backward(Host{}, c, MatrixView<L const>(logits.data(), t, e, ld_l),
                 MatrixView<std::int32_t const>(ids.data(), t, k, ld_k),
                 MatrixView<float const>(d_w.data(), t, k, ld_k), MatrixView<float>(want.data(), t, e));

  DeviceBuffer<std::int32_t> dev_ids(ids);
  DeviceBuffer<float> dev_dw(d_w);
  DeviceBuffer<Status> status(1);
  status.poison(0);
  auto run = [&] {
    DeviceBuffer<float> out(static_cast<std::size_t>(std::max<std::int64_t>(t, 1) * ld_l));
    out.poison(kPoison);
    route_backward(stream.ref(), c, dev_logits, MatrixView<std::int32_t const>(dev_ids.data(), t, k, ld_k),
                   MatrixView<float const>(dev_dw.data(), t, k, ld_k), MatrixView<float>(out.data(), t, e, ld_l),
                   status.data());
    stream.sync();
    return out.to_host();
  };
  auto const got = run();

  int bad = 0, nonzero = 0, unwritten = 0, bitwise = 0;
  for (std::int64_t r = 0; r < t; ++r) {
    double row_max = 0.0;
    for (std::int32_t x = 0; x < e; ++x) row_max = std::max(row_max, double{std::abs(want[r * e + x])});
    row_max = gradient_scale(row_max, d_w.data() + r * ld_k, k, c.routed_scaling_factor);
    for (std::int32_t x = 0; x < e; ++x) {
      float const g = got[static_cast<std::size_t>(r * ld_l + x)], w = want[static_cast<std::size_t>(r * e + x)];
      if (!within(g, w, row_max)) {
        if (bad < 5) INFO("token " << r << ", expert " << x << ": device " << g << ", host " << w);
        ++bad;
      }
      bitwise += std::memcmp(&g, &w, sizeof g) == 0 ? 1 : 0;
      nonzero += w != 0.0f ? 1 : 0;
      // No gradient for an unselectable expert: exactly 0.
      float const l = to_float(logits[static_cast<std::size_t>(r * ld_l + x)]);
      if ((std::isnan(l) || l == -kInf) && g != 0.0f) ++bad;
    }
    for (std::int64_t x = e; x < ld_l; ++x) unwritten += is_poison(got[static_cast<std::size_t>(r * ld_l + x)]) ? 0 : 1;
  }
  CHECK(bad == 0);
  CHECK(unwritten == 0);
  // Real gradients were compared, except where the weights cannot move: top-k softmax or any
  // renormalised config with one slot (weight 1), softmax over one expert, and logits mostly
  // +-inf/NaN (saturated sigmoids and one-hot softmaxes: the Host's gradients are all 0 too; seen
  // on the H200 with sigmoid, top-4, 70% special logits).
  bool const constant = (k == 1 && (c.renormalize || c.scoring == Scoring::kTopKSoftmax)) ||
                        (e == 1 && c.scoring == Scoring::kSoftmaxTopK) || opt.special > 0.5;
  if (t > 1 && !constant) CHECK(nonzero > 0);
  bitwise_total += bitwise;
  compared_total += t * e;
  auto const st = status.to_host()[0];
  CHECK(st.invalid_ids == 0);
  CHECK(st.dropped_slots == 0);

  auto const second = run();
  CHECK(std::memcmp(got.data(), second.data(), got.size() * sizeof(float)) == 0);
}

}  // namespace

TEST_CASE("route_backward[cuda]: every scoring, renormalize and scaling, 1..512 experts, top_k 1..8") {
  EPX_TEST_SEEDED_RNG(rng);
  std::int64_t const many = test::pick_size<std::int64_t>(1000, 67);
  for (std::int32_t e : {1, 2, 7, 32, 33, 100, 256, 512})
    for (std::int32_t k : {1, 2, 3, 8})
      for (auto scoring : kScorings)
        for (bool renormalize : {false, true}) {
          if (k > e) continue;
          RouterConfig const c{.num_experts = e,
                               .top_k = k,
                               .scoring = scoring,
                               .renormalize = renormalize,
                               .routed_scaling_factor = renormalize ? 2.5f : 1.0f};
          std::int64_t const t = e == 256 ? many : 37;
          check_backward<float>(c, t, {.pad = k == 3 ? 5 : 0, .bias = scoring == Scoring::kSigmoidTopK}, rng);
          if (e == 100 || e == 256) check_backward<bfloat16>(c, t, {.pad = k == 2 ? 3 : 0}, rng);
        }
  report_bitwise();
}

TEST_CASE("route_backward[cuda]: top_k past 32 (the second slot register), tokens 0 and 1") {
  EPX_TEST_SEEDED_RNG(rng);
  for (auto scoring : kScorings)
    for (std::int32_t k : {33, kMaxTopK}) {
      RouterConfig const c{.num_experts = 100, .top_k = k, .scoring = scoring, .renormalize = true};
      check_backward<float>(c, 19, {.pad = 1}, rng);
    }
  check_backward<float>({.num_experts = 8, .top_k = 2}, 0, {}, rng);
  check_backward<bfloat16>({.num_experts = 8, .top_k = 2}, 1, {.empty = 0.0}, rng);
}

TEST_CASE("route_backward[cuda]: group-limited selection and the correction bias (DeepSeek-V3)") {
  EPX_TEST_SEEDED_RNG(rng);
  std::int64_t const many = test::pick_size<std::int64_t>(2000, 61);
  // DeepSeek-V3: 256 experts in 8 groups, 4 kept, top 8, sigmoid, renormalised, scaled 2.5, bias.
  RouterConfig const v3{.num_experts = 256,
                        .top_k = 8,
                        .scoring = Scoring::kSigmoidTopK,
                        .renormalize = true,
                        .num_groups = 8,
                        .topk_groups = 4,
                        .routed_scaling_factor = 2.5f};
  check_backward<float>(v3, many, {.bias = true}, rng);
  check_backward<bfloat16>(v3, many, {.bias = true, .empty = 0.0}, rng);
  for (auto scoring : kScorings) {
    check_backward<float>({.num_experts = 64, .top_k = 6, .scoring = scoring, .num_groups = 8, .topk_groups = 3}, 53,
                          {.pad = 2, .bias = true}, rng);
    check_backward<float>(
        {.num_experts = 160, .top_k = 4, .scoring = scoring, .renormalize = true, .num_groups = 32, .topk_groups = 2},
        53, {}, rng);
  }
  report_bitwise();
}

TEST_CASE("route_backward[cuda]: NaN and +-inf logits") {
  EPX_TEST_SEEDED_RNG(rng);
  for (std::int32_t e : {16, 100})
    for (auto scoring : kScorings)
      for (double special : {0.1, 0.7})
        check_backward<float>({.num_experts = e, .top_k = 4, .scoring = scoring, .renormalize = special > 0.5}, 41,
                              {.special = special}, rng);
}

TEST_CASE("route_backward[cuda]: invalid ids reject their token (row 0, counted in Status)") {
  EPX_TEST_SEEDED_RNG(rng);
  for (auto scoring : kScorings) {
    CAPTURE(to_string(scoring));
    RouterConfig const c{.num_experts = 40, .top_k = 4, .scoring = scoring, .renormalize = true};
    std::int64_t const t = 12, e = c.num_experts, k = c.top_k;
    auto logits = random_logits<float>(t, c.num_experts, e, rng);
    // Distinct valid ids per token (what route() would write; the backward does not care which).
    std::vector<std::int32_t> ids(static_cast<std::size_t>(t * k));
    for (std::int64_t r = 0; r < t; ++r)
      for (std::int64_t j = 0; j < k; ++j)
        ids[static_cast<std::size_t>(r * k + j)] = static_cast<std::int32_t>((r + 7 * j) % e);
    auto const d_w = test::random_vector<float>(ids.size(), rng);
    // Token 1: out of range (e); 3: -5 and e + 100; 5: repeated; 7: NaN logit chosen; 9: -inf chosen;
    // 11: -1 in one slot (valid, not rejected).
    ids[1 * k + 2] = static_cast<std::int32_t>(e);
    ids[3 * k + 0] = -5;
    ids[3 * k + 3] = static_cast<std::int32_t>(e + 100);
    ids[5 * k + 3] = ids[5 * k + 1];
    logits[static_cast<std::size_t>(7 * e + ids[7 * k + 2])] = std::numeric_limits<float>::quiet_NaN();
    logits[static_cast<std::size_t>(9 * e + ids[9 * k + 0])] = -kInf;
    ids[11 * k + 1] = -1;
    std::set<std::int64_t> const rejected{1, 3, 5, 7, 9};

    // Host: the rejected tokens as all -1 (a row of zeros), the others as they are.
    auto host_ids = ids;
    for (auto r : rejected) std::fill_n(host_ids.begin() + r * k, k, -1);
    std::vector<float> want(static_cast<std::size_t>(t * e));
    route_backward(Host{}, c, MatrixView<float const>(logits.data(), t, e),
                   MatrixView<std::int32_t const>(host_ids.data(), t, k), MatrixView<float const>(d_w.data(), t, k),
                   MatrixView<float>(want.data(), t, e));
    // ... and the Host throws for the originals.
    CHECK_THROWS_AS(route_backward(Host{}, c, MatrixView<float const>(logits.data(), t, e),
                                   MatrixView<std::int32_t const>(ids.data(), t, k),
                                   MatrixView<float const>(d_w.data(), t, k), MatrixView<float>(want.data(), t, e)),
                    Error);

    test::CudaStream stream;
    DeviceBuffer<float> dev_logits(logits), dev_dw(d_w), out(want.size());
    DeviceBuffer<std::int32_t> dev_ids(ids);
    DeviceBuffer<Status> status(1);
    status.poison(0);
    out.poison(kPoison);
    route_backward(stream.ref(), c, MatrixView<float const>(dev_logits.data(), t, e),
                   MatrixView<std::int32_t const>(dev_ids.data(), t, k), MatrixView<float const>(dev_dw.data(), t, k),
                   MatrixView<float>(out.data(), t, e), status.data());
    stream.sync();
    auto const got = out.to_host();
    int bad = 0;
    for (std::int64_t r = 0; r < t; ++r) {
      double row_max = 0.0;
      for (std::int64_t x = 0; x < e; ++x) row_max = std::max(row_max, double{std::abs(want[r * e + x])});
      bool const nontrivial = row_max > 0.0;
      row_max = gradient_scale(row_max, d_w.data() + r * k, static_cast<std::int32_t>(k), c.routed_scaling_factor);
      for (std::int64_t x = 0; x < e; ++x) {
        float const g = got[static_cast<std::size_t>(r * e + x)];
        if (rejected.count(r) != 0 ? g != 0.0f || std::signbit(g) : !within(g, want[r * e + x], row_max)) ++bad;
      }
      if (rejected.count(r) == 0) CHECK(nontrivial);
    }
    CHECK(bad == 0);
    Status const st = status.to_host()[0];
    CHECK(st.invalid_ids == 3);     // e, -5, e + 100
    CHECK(st.dropped_slots == 20);  // every slot of the 5 rejected tokens names something
    CHECK_FALSE(st.ok());
  }
}

TEST_CASE("route_backward[cuda]: argument errors") {
  std::vector<float> logits(600 * 2), d_w(4), d_logits(600 * 2);
  std::vector<std::int32_t> ids(4);
  auto* fake = reinterpret_cast<CUstream_st*>(std::uintptr_t{0x2});
  auto* fake_status = reinterpret_cast<Status*>(std::uintptr_t{0x40});
  RouterConfig const c{.num_experts = 8, .top_k = 2};
  auto call = [&](RouterConfig const& cfg, std::int64_t d_rows, std::int64_t id_cols, StreamRef s, Status* st) {
    route_backward(s, cfg, MatrixView<float const>(logits.data(), 2, cfg.num_experts),
                   MatrixView<std::int32_t const>(ids.data(), 2, id_cols), MatrixView<float const>(d_w.data(), 2, 2),
                   MatrixView<float>(d_logits.data(), d_rows, cfg.num_experts), st);
  };
  test::check_throws(Errc::kShapeMismatch, "route_backward: d_logits.rows = 1, expected 2",
                     [&] { call(c, 1, 2, StreamRef(fake), fake_status); });
  test::check_throws(Errc::kShapeMismatch, "route_backward: topk_ids.cols = 3, expected 2",
                     [&] { call(c, 2, 3, StreamRef(fake), fake_status); });
  test::check_throws(Errc::kInvalidArgument, "route_backward: top_k = 9",
                     [&] { call({.num_experts = 8, .top_k = 9}, 2, 9, StreamRef(fake), fake_status); });
  test::check_throws(Errc::kUnsupported, "route_backward: num_experts = 600, expected <= 512 on CUDA",
                     [&] { call({.num_experts = 600, .top_k = 2}, 2, 2, StreamRef(fake), fake_status); });
  test::check_throws(Errc::kInvalidArgument, "route_backward: status = nullptr",
                     [&] { call(c, 2, 2, StreamRef(fake), nullptr); });
  test::check_throws(Errc::kInvalidArgument, "route_backward: stream = StreamRef::host()",
                     [&] { call(c, 2, 2, StreamRef::host(), fake_status); });
}

TEST_CASE("expert_token_counts[cuda]: exact, -1 counted nowhere, invalid ids in Status") {
  EPX_TEST_SEEDED_RNG(rng);
  test::CudaStream stream;
  for (std::int32_t e : {1, 7, 64, 300})
    for (std::int64_t t :
         {std::int64_t{0}, std::int64_t{1}, std::int64_t{33}, test::pick_size<std::int64_t>(5000, 200)})
      for (std::int32_t k : {1, 3, 8}) {
        CAPTURE(e);
        CAPTURE(t);
        CAPTURE(k);
        std::int64_t const ld = k + 2;
        std::uniform_int_distribution<std::int32_t> pick(-1, e - 1);
        std::vector<std::int32_t> ids(static_cast<std::size_t>(std::max<std::int64_t>(t, 1) * ld),
                                      e + 5);  // padding: invalid
        for (std::int64_t r = 0; r < t; ++r)
          for (std::int32_t j = 0; j < k; ++j) ids[static_cast<std::size_t>(r * ld + j)] = pick(rng);
        // Two invalid ids (one when they share the slot): the Host throws, the device counts them
        // and skips them; the Host's reference sees -1 there.
        std::uint64_t invalid = 0;
        if (t > 0) {
          auto const last = static_cast<std::size_t>((t - 1) * ld + k - 1);
          ids[0] = e;
          ids[last] = -7;
          invalid = last == 0 ? 1 : 2;
        }
        auto fixed = ids;
        for (std::int64_t r = 0; r < t; ++r)
          for (std::int32_t j = 0; j < k; ++j) {
            auto& v = fixed[static_cast<std::size_t>(r * ld + j)];
            if (v < -1 || v >= e) v = -1;
          }
        std::vector<std::int64_t> want(static_cast<std::size_t>(e));
        expert_token_counts(Host{}, e, MatrixView<std::int32_t const>(fixed.data(), t, k, ld), want);

        DeviceBuffer<std::int32_t> dev_ids(ids);
        DeviceBuffer<std::int64_t> counts(static_cast<std::size_t>(e));
        DeviceBuffer<Status> status(1);
        counts.poison(kPoison);
        status.poison(0);
        expert_token_counts(stream.ref(), e, MatrixView<std::int32_t const>(dev_ids.data(), t, k, ld),
                            std::span<std::int64_t>(counts.data(), counts.size()), status.data());
        stream.sync();
        CHECK(counts.to_host() == want);
        CHECK(status.to_host()[0].invalid_ids == invalid);
        std::int64_t total = 0;
        for (auto v : want) total += v;
        if (t > 1) CHECK(total > 0);
      }
  // Errors.
  std::vector<std::int32_t> ids(4);
  auto* fake = reinterpret_cast<CUstream_st*>(std::uintptr_t{0x2});
  auto* fake_status = reinterpret_cast<Status*>(std::uintptr_t{0x40});
  std::vector<std::int64_t> counts(3);
  MatrixView<std::int32_t const> const idv(ids.data(), 2, 2);
  test::check_throws(Errc::kShapeMismatch, "expert_token_counts: counts.size() = 3, expected num_experts = 4", [&] {
    expert_token_counts(StreamRef(fake), 4, idv, std::span<std::int64_t>(counts), fake_status);
  });
  test::check_throws(Errc::kInvalidArgument, "expert_token_counts: num_experts = 0", [&] {
    expert_token_counts(StreamRef(fake), 0, idv, std::span<std::int64_t>(counts), fake_status);
  });
  test::check_throws(Errc::kInvalidArgument, "expert_token_counts: status = nullptr",
                     [&] { expert_token_counts(StreamRef(fake), 3, idv, std::span<std::int64_t>(counts), nullptr); });
  test::check_throws(Errc::kInvalidArgument, "expert_token_counts: stream = StreamRef::host()", [&] {
    expert_token_counts(StreamRef::host(), 3, idv, std::span<std::int64_t>(counts), fake_status);
  });
}
