// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// route on the GPU against the Host twin. Ids must be equal, except at a near-tie: where the two
// experts' selection values (or, with groups, the last kept and the first dropped group's scores)
// agree to 1e-5 (device expf and reduction order differ from the host's in the last bits), and
// such tokens must be rare. Weights agree to fp32 rounding; the per-expert counts add a count of
// the device's own ids to what the buffer held; padding columns of strided outputs stay untouched.
//
// Covered: every scoring, num_experts with a partly empty last register row (100, 500), top_k up
// to kMaxTopK, NaN and +-inf logits, fewer selectable experts than top_k (-1 slots), grouped
// configurations of several group sizes (incl. more groups than lanes) with each scoring, group
// scores of +inf, -inf and NaN, strided logits/ids/weights, tokens_per_expert null or not.

#include "../common/test_util.hpp"
#include "device_buffer.cuh"

#include <epx/cuda.cuh>

#include <algorithm>
#include <cfloat>
#include <cstring>
#include <limits>

using namespace epx;
using test::DeviceBuffer;

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kTieTolerance = 1e-5f;

// What the router selects by, for one token (RouterConfig steps 1-2, as the host computes them).
struct Selection {
  std::vector<float> choice;
  std::vector<bool> selectable;
};

Selection host_selection(RouterConfig const& c, std::vector<float> const& logits, std::vector<float> const& bias) {
  auto const n = static_cast<std::size_t>(c.num_experts);
  Selection s{std::vector<float>(n), std::vector<bool>(n)};
  std::vector<float> l(n), score(n);
  for (std::size_t e = 0; e < n; ++e) {
    s.selectable[e] = !(std::isnan(logits[e]) || logits[e] == -kInf);
    l[e] = logits[e] == kInf ? FLT_MAX : logits[e];
  }
  float m = -kInf, sum = 0.0f;
  for (std::size_t e = 0; e < n; ++e)
    if (s.selectable[e]) m = std::max(m, l[e]);
  for (std::size_t e = 0; e < n; ++e) sum += s.selectable[e] ? std::exp(l[e] - m) : 0.0f;
  for (std::size_t e = 0; e < n; ++e) {
    score[e] = c.scoring == Scoring::kSoftmaxTopK   ? (s.selectable[e] ? std::exp(l[e] - m) / sum : 0.0f)
               : c.scoring == Scoring::kSigmoidTopK ? 1.0f / (1.0f + std::exp(-l[e]))
                                                    : l[e];
    s.choice[e] = bias.empty() ? score[e] : score[e] + bias[e];
    if (std::isnan(s.choice[e])) s.selectable[e] = false;
  }
  return s;
}

// Group scores (sum of the two best selectable choices; -inf when none), by group.
std::vector<float> group_scores(RouterConfig const& c, Selection const& s) {
  auto const size = static_cast<std::size_t>(c.num_experts / c.num_groups);
  std::vector<float> out;
  for (std::size_t g = 0; g < static_cast<std::size_t>(c.num_groups); ++g) {
    std::vector<float> members;
    for (std::size_t e = g * size; e < (g + 1) * size; ++e)
      if (s.selectable[e]) members.push_back(s.choice[e]);
    std::sort(members.begin(), members.end(), std::greater<>());
    out.push_back(members.empty() ? -kInf : members.size() == 1 ? members[0] : members[0] + members[1]);
  }
  return out;
}

bool near(float a, float b) { return std::abs(a - b) <= kTieTolerance * std::max(std::abs(a), 1e-30f); }

// True when which groups are kept is a near-tie: the topk_groups-th and the next best group score
// (of those that can be kept) agree to the tolerance.
bool group_near_tie(RouterConfig const& c, Selection const& s) {
  auto scores = group_scores(c, s);
  std::erase_if(scores, [](float v) { return v == -kInf || std::isnan(v); });
  std::sort(scores.begin(), scores.end(), std::greater<>());
  auto const k = static_cast<std::size_t>(c.topk_groups);
  return scores.size() > k && near(scores[k - 1], scores[k]);
}

struct Options {
  std::int64_t pad = 0;  // extra columns of logits, ids and weights: ld = cols + pad
  bool counts = true;    // pass tokens_per_expert (else nullptr)
  bool exact = false;    // no near-tie is possible (selection on logits): ids must all be equal
};

struct Outcome {
  std::int64_t empty_slots = 0;  // -1 slots on the host
  std::int64_t near_ties = 0;
};

// logits: [t, num_experts] with ld = num_experts + opt.pad (padding columns hold garbage the
// router must not read).
template <class L>
Outcome check_route(RouterConfig const& c, std::int64_t t, std::vector<L> const& logits, std::vector<float> const& bias,
                    Options opt) {
  CAPTURE(c.num_experts);
  CAPTURE(c.top_k);
  CAPTURE(c.num_groups);
  CAPTURE(c.topk_groups);
  CAPTURE(t);
  CAPTURE(opt.pad);
  CAPTURE(opt.counts);
  CAPTURE(to_string(c.scoring));
  std::int64_t const ld_l = c.num_experts + opt.pad, ld_o = c.top_k + opt.pad;
  REQUIRE(logits.size() == static_cast<std::size_t>(t * ld_l));
  auto const out_size = static_cast<std::size_t>(t * ld_o);
  std::vector<std::int32_t> host_ids(out_size, 77);
  std::vector<float> host_w(out_size, 77.0f);
  route(Host{}, c, MatrixView<L const>(logits.data(), t, c.num_experts, ld_l), bias,
        MatrixView<std::int32_t>(host_ids.data(), t, c.top_k, ld_o),
        MatrixView<float>(host_w.data(), t, c.top_k, ld_o));

  test::CudaStream stream;
  DeviceBuffer<L> d_logits(logits);
  DeviceBuffer<float> d_bias(bias);
  DeviceBuffer<std::int32_t> d_ids(out_size), d_counts(static_cast<std::size_t>(c.num_experts));
  DeviceBuffer<float> d_w(out_size);
  d_ids.poison(0x7f);
  d_w.poison(0x7f);
  d_counts.poison(0x01);  // the router adds to the counts: each starts at 0x01010101
  route(stream.ref(), c, MatrixView<L const>(d_logits.data(), t, c.num_experts, ld_l),
        std::span<float const>(d_bias.data(), bias.size()), MatrixView<std::int32_t>(d_ids.data(), t, c.top_k, ld_o),
        MatrixView<float>(d_w.data(), t, c.top_k, ld_o), opt.counts ? d_counts.data() : nullptr);
  stream.sync();
  auto const ids = d_ids.to_host();
  auto const w = d_w.to_host();
  auto const counts = d_counts.to_host();

  Outcome out;
  std::int32_t poison_id = 0;
  float poison_w = 0.0f;
  std::memset(&poison_id, 0x7f, sizeof poison_id);
  std::memset(&poison_w, 0x7f, sizeof poison_w);
  std::vector<std::int32_t> own_counts(static_cast<std::size_t>(c.num_experts), 0x01010101);
  auto const k = static_cast<std::size_t>(c.top_k);
  for (std::int64_t tok = 0; tok < t; ++tok) {
    auto const row = static_cast<std::size_t>(tok * ld_o);
    for (std::size_t j = k; j < static_cast<std::size_t>(ld_o); ++j) {  // padding untouched
      REQUIRE_MESSAGE(ids[row + j] == poison_id, "token " << tok << " padding column " << j);
      REQUIRE_MESSAGE(std::memcmp(&w[row + j], &poison_w, sizeof poison_w) == 0, "token " << tok << " column " << j);
    }
    // Device ids are valid on their own: in range, distinct, -1 only after the chosen ones.
    for (std::size_t j = 0; j < k; ++j) {
      std::int32_t const id = ids[row + j];
      REQUIRE_MESSAGE((id >= -1 && id < c.num_experts), "token " << tok << " slot " << j << " id " << id);
      if (id >= 0) ++own_counts[static_cast<std::size_t>(id)];
      if (j > 0 && ids[row + j - 1] < 0) REQUIRE_MESSAGE(id == -1, "token " << tok << " slot " << j);
      for (std::size_t i = 0; i < j; ++i)
        if (id >= 0) REQUIRE_MESSAGE(ids[row + i] != id, "token " << tok << " repeats expert " << id);
      if (host_ids[row + j] < 0) ++out.empty_slots;
    }
    if (std::equal(ids.begin() + static_cast<std::ptrdiff_t>(row), ids.begin() + static_cast<std::ptrdiff_t>(row + k),
                   host_ids.begin() + static_cast<std::ptrdiff_t>(row))) {
      for (std::size_t j = 0; j < k; ++j)
        REQUIRE_MESSAGE(std::abs(w[row + j] - host_w[row + j]) <= 1e-5f * std::max(1.0f, std::abs(host_w[row + j])),
                        "token " << tok << " slot " << j << ": device " << w[row + j] << ", host " << host_w[row + j]);
      continue;
    }
    // A different choice is only acceptable at a near-tie of the selection values or group scores.
    std::vector<float> f(static_cast<std::size_t>(c.num_experts));
    for (std::size_t e = 0; e < f.size(); ++e) f[e] = to_float(logits[static_cast<std::size_t>(tok * ld_l) + e]);
    auto const sel = host_selection(c, f, bias);
    std::size_t j = 0;
    while (ids[row + j] == host_ids[row + j]) ++j;
    std::int32_t const h = host_ids[row + j], d = ids[row + j];
    bool tie = h >= 0 && d >= 0 && sel.selectable[static_cast<std::size_t>(d)] &&
               near(sel.choice[static_cast<std::size_t>(h)], sel.choice[static_cast<std::size_t>(d)]);
    if (!tie && c.num_groups > 1) tie = group_near_tie(c, sel);
    auto value = [&](std::int32_t id) { return id >= 0 ? sel.choice[static_cast<std::size_t>(id)] : 0.0f; };
    INFO("token " << tok << " slot " << j << ": host " << h << " (" << value(h) << "), device " << d << " (" << value(d)
                  << ")");
    CHECK(!opt.exact);
    CHECK(tie);
    ++out.near_ties;
  }
  CHECK(out.near_ties <= std::max<std::int64_t>(1, t / 1000));
  if (opt.counts)
    CHECK(counts == own_counts);
  else
    CHECK(std::all_of(counts.begin(), counts.end(), [](std::int32_t v) { return v == 0x01010101; }));
  return out;
}

// Random logits N(0, scale) with padding columns of +inf (a router that read them would pick them);
// `special` of the entries become NaN, +inf or -inf.
template <class L>
std::vector<L> random_logits(RouterConfig const& c, std::int64_t t, std::int64_t pad, std::mt19937_64& rng,
                             double special = 0.0, float scale = 2.0f) {
  std::int64_t const ld = c.num_experts + pad;
  std::vector<L> out(static_cast<std::size_t>(t * ld));
  std::normal_distribution<float> normal(0.0f, scale);
  std::uniform_real_distribution<double> coin(0.0, 1.0);
  float const specials[] = {std::numeric_limits<float>::quiet_NaN(), kInf, -kInf, -kInf};
  std::uniform_int_distribution<int> which(0, 3);
  for (std::int64_t tok = 0; tok < t; ++tok)
    for (std::int64_t e = 0; e < ld; ++e) {
      float v = e >= c.num_experts ? kInf : (coin(rng) < special ? specials[which(rng)] : normal(rng));
      out[static_cast<std::size_t>(tok * ld + e)] = from_float<L>(v);
    }
  return out;
}

std::vector<float> random_bias(RouterConfig const& c, std::mt19937_64& rng, float scale = 0.3f) {
  return test::random_vector<float>(static_cast<std::size_t>(c.num_experts), rng, scale);
}

template <class L>
Outcome check_random(RouterConfig const& c, std::int64_t t, bool with_bias, Options opt, std::mt19937_64& rng,
                     double special = 0.0) {
  auto const bias = with_bias ? random_bias(c, rng) : std::vector<float>{};
  return check_route<L>(c, t, random_logits<L>(c, t, opt.pad, rng, special), bias, opt);
}

constexpr Scoring kScorings[] = {Scoring::kSoftmaxTopK, Scoring::kTopKSoftmax, Scoring::kSigmoidTopK};

}  // namespace

TEST_CASE("Router::route[cuda]: softmax, top-k softmax and sigmoid match the host") {
  EPX_TEST_SEEDED_RNG(rng);
  std::int64_t const large = test::pick_size<std::int64_t>(4096, 256);
  for (std::int32_t e : {8, 100, 128, 256, 384, 500})  // 100, 500: the last register row partly empty
    for (std::int32_t k : {1, 2, 4, 8})
      for (std::int64_t t : {std::int64_t{1}, std::int64_t{7}, std::int64_t{128}, large})
        for (auto scoring : kScorings) {
          if (k > e) continue;
          bool const renormalize = scoring != Scoring::kTopKSoftmax || k == 4;  // incl. softmax-then-renormalise
          check_random<float>({.num_experts = e, .top_k = k, .scoring = scoring, .renormalize = renormalize}, t,
                              scoring == Scoring::kSigmoidTopK, {.pad = k % 2 == 1 ? 3 : 0, .counts = t != 7}, rng);
        }
  check_random<bfloat16>({.num_experts = 128, .top_k = 8, .renormalize = true},
                         test::pick_size<std::int64_t>(16384, 1024), false, {}, rng);
  check_random<float>({.num_experts = 512, .top_k = 16, .scoring = Scoring::kSigmoidTopK}, 1000, true, {}, rng);
}

TEST_CASE("Router::route[cuda]: top_k up to kMaxTopK (two slot registers per lane)") {
  EPX_TEST_SEEDED_RNG(rng);
  std::int64_t const large = test::pick_size<std::int64_t>(1024, 64);
  for (std::int32_t e : {64, 100, 128, 500, 512})
    for (std::int32_t k : {31, 32, 33, 63, kMaxTopK})
      for (auto scoring : kScorings)
        for (std::int64_t t : {std::int64_t{1}, std::int64_t{33}, large})
          check_random<float>(
              {.num_experts = e, .top_k = k, .scoring = scoring, .renormalize = true, .routed_scaling_factor = 1.5f}, t,
              scoring != Scoring::kSoftmaxTopK, {.pad = k == 33 ? 5 : 0}, rng);
}

TEST_CASE("Router::route[cuda]: NaN and +-inf logits; fewer selectable experts than top_k") {
  EPX_TEST_SEEDED_RNG(rng);
  std::int64_t const t = test::pick_size<std::int64_t>(2048, 256);
  std::int64_t empty_slots = 0;
  for (std::int32_t e : {16, 100, 500})
    for (std::int32_t k : {1, 8, 12})
      for (auto scoring : kScorings)
        for (double special : {0.1, 0.9}) {  // 0.9: most tokens have fewer than k selectable experts
          RouterConfig const c{.num_experts = e, .top_k = k, .scoring = scoring, .renormalize = k != 12};
          empty_slots +=
              check_random<float>(c, t, scoring == Scoring::kSigmoidTopK, {.pad = k == 12 ? 1 : 0}, rng, special)
                  .empty_slots;
          empty_slots += check_random<bfloat16>(c, 7, false, {}, rng, special).empty_slots;
        }
  CHECK(empty_slots > 0);  // -1 slots were exercised

  // Tokens with nothing selectable, and tokens whose only candidates are +inf logits (exact ties).
  RouterConfig const c{.num_experts = 40, .top_k = 4, .renormalize = true};
  std::vector<float> logits(40 * 3, std::numeric_limits<float>::quiet_NaN());
  for (int e = 0; e < 40; e += 2) logits[static_cast<std::size_t>(40 + e)] = -kInf;
  for (int e : {3, 17, 33}) logits[static_cast<std::size_t>(80 + e)] = kInf;
  auto const out = check_route<float>(c, 3, logits, {}, {.exact = true});
  CHECK(out.empty_slots == 4 + 4 + 1);
}

TEST_CASE("Router::route[cuda]: grouped configurations match the host") {
  EPX_TEST_SEEDED_RNG(rng);
  struct Grouped {
    RouterConfig config;
    bool bias;
  };
  Grouped const cases[] = {
      // DeepSeek-V3: 256 experts, 8 groups of 32, 4 kept.
      {{.num_experts = 256,
        .top_k = 8,
        .scoring = Scoring::kSigmoidTopK,
        .renormalize = true,
        .num_groups = 8,
        .topk_groups = 4,
        .routed_scaling_factor = 2.5f},
       true},
      // DeepSeek-V2: 160 experts, 8 groups of 20 (even, not a multiple of 32), softmax scoring.
      {{.num_experts = 160,
        .top_k = 6,
        .scoring = Scoring::kSoftmaxTopK,
        .num_groups = 8,
        .topk_groups = 3,
        .routed_scaling_factor = 16.0f},
       false},
      {{.num_experts = 64,
        .top_k = 6,
        .scoring = Scoring::kSoftmaxTopK,
        .renormalize = true,
        .num_groups = 4,
        .topk_groups = 2},
       false},
      {{.num_experts = 100,
        .top_k = 8,
        .scoring = Scoring::kSigmoidTopK,
        .renormalize = true,
        .num_groups = 5,
        .topk_groups = 2},
       true},
      {{.num_experts = 500,
        .top_k = 16,
        .scoring = Scoring::kSigmoidTopK,
        .renormalize = true,
        .num_groups = 10,
        .topk_groups = 3},
       true},
      {{.num_experts = 512,
        .top_k = 64,
        .scoring = Scoring::kSoftmaxTopK,
        .renormalize = true,
        .num_groups = 16,
        .topk_groups = 4},
       false},
      {{.num_experts = 128, .top_k = 8, .scoring = Scoring::kTopKSoftmax, .num_groups = 32, .topk_groups = 3}, true},
      // More groups than lanes (each lane scores several), groups of 1, 2 and odd sizes.
      {{.num_experts = 512,
        .top_k = 8,
        .scoring = Scoring::kSoftmaxTopK,
        .renormalize = true,
        .num_groups = 256,
        .topk_groups = 8},
       false},
      {{.num_experts = 96, .top_k = 4, .scoring = Scoring::kSigmoidTopK, .num_groups = 96, .topk_groups = 4}, true},
      {{.num_experts = 375,
        .top_k = 10,
        .scoring = Scoring::kSigmoidTopK,
        .renormalize = true,
        .num_groups = 75,
        .topk_groups = 5},
       true},
      {{.num_experts = 384,
        .top_k = 8,
        .scoring = Scoring::kTopKSoftmax,
        .renormalize = true,
        .num_groups = 64,
        .topk_groups = 6},
       false},
  };
  for (auto const& g : cases) {
    for (std::int64_t t : {std::int64_t{1}, std::int64_t{128}, test::pick_size<std::int64_t>(4096, 256)}) {
      check_random<bfloat16>(g.config, t, g.bias, {.pad = t == 128 ? 2 : 0, .counts = t != 1}, rng);
      check_random<float>(g.config, t, g.bias, {}, rng, 0.05);  // with NaN / inf logits
    }
  }
  RouterConfig const v3 = cases[0].config;
  check_random<bfloat16>(v3, test::pick_size<std::int64_t>(16384, 512), true, {}, rng);
}

TEST_CASE("Router::route[cuda]: group scores of +inf, -inf and NaN are kept as the host keeps them") {
  // Top-k softmax selects on logits + bias: no expf in the selection, so ids must match exactly.
  // Biases of +-3e38 turn logits of +-3e38 into +-inf choices: groups then sum to +inf, to -inf
  // (never kept) or to NaN (+inf and -inf; kept only as the lowest competing group), and many
  // choices are exactly equal (ties to the lower id).
  EPX_TEST_SEEDED_RNG(rng);
  RouterConfig const c{.num_experts = 64,
                       .top_k = 6,
                       .scoring = Scoring::kTopKSoftmax,
                       .renormalize = true,
                       .num_groups = 16,
                       .topk_groups = 3};
  std::vector<float> bias(64);
  for (std::size_t e = 0; e < bias.size(); ++e) bias[e] = e % 2 == 0 ? 3e38f : -3e38f;
  std::int64_t const t = test::pick_size<std::int64_t>(4096, 512);
  float const values[] = {3e38f, -3e38f, 0.5f, -1.25f, std::numeric_limits<float>::quiet_NaN(), -kInf, kInf};
  std::uniform_int_distribution<int> pick(0, 6);
  std::vector<float> logits(static_cast<std::size_t>(t * 64));
  for (auto& v : logits) v = values[pick(rng)];
  std::int64_t nan_groups = 0, inf_groups = 0, minus_inf_groups = 0;
  for (std::int64_t tok = 0; tok < t; ++tok) {
    std::vector<float> row(logits.begin() + tok * 64, logits.begin() + (tok + 1) * 64);
    for (float s : group_scores(c, host_selection(c, row, bias))) {
      nan_groups += std::isnan(s);
      inf_groups += s == kInf;
      minus_inf_groups += s == -kInf;
    }
  }
  CHECK(nan_groups > 0);
  CHECK(inf_groups > 0);
  CHECK(minus_inf_groups > 0);
  check_route<float>(c, t, logits, bias, {.exact = true});
  check_route<float>(c, t, logits, bias, {.counts = false, .exact = true});
}

TEST_CASE("Router::route[cuda]: more than 512 experts is refused") {
  std::vector<float> logits(600);
  std::vector<std::int32_t> ids(2);
  std::vector<float> w(2);
  auto* fake = reinterpret_cast<CUstream_st*>(std::uintptr_t{0x2});
  CHECK_THROWS_WITH_AS(route(StreamRef(fake), RouterConfig{.num_experts = 600, .top_k = 2},
                             MatrixView<float const>(logits.data(), 1, 600), {},
                             MatrixView<std::int32_t>(ids.data(), 1, 2), MatrixView<float>(w.data(), 1, 2)),
                       doctest::Contains("num_experts = 600, expected <= 512 on CUDA"), Error);
}
