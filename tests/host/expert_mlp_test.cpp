// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// Grouped GEMM and the expert MLP against double-precision loops.

#include "../common/test_util.hpp"

using namespace epx;
using epx::test::GlobalWeights;

namespace {

std::vector<std::int32_t> offsets_of(std::vector<std::int32_t> const& rows_per_group) {
  std::vector<std::int32_t> off{0};
  for (auto r : rows_per_group) off.push_back(off.back() + r);
  return off;
}

template <class T>
void check_grouped_gemm(std::vector<std::int32_t> const& rows_per_group, std::int64_t n, std::int64_t k, bool bias,
                        std::mt19937_64& rng) {
  auto const off = offsets_of(rows_per_group);
  auto const g = static_cast<std::int64_t>(rows_per_group.size());
  std::int64_t const m = off.back();
  auto const a = test::random_vector<T>(static_cast<std::size_t>(m * k), rng);
  auto const b = test::random_vector<T>(static_cast<std::size_t>(g * n * k), rng);
  auto const bv = bias ? test::random_vector<T>(static_cast<std::size_t>(g * n), rng) : std::vector<T>{};
  std::vector<float> c(static_cast<std::size_t>(m * n), 1e30f);
  grouped_gemm(Host{}, MatrixView<T const>(a.data(), m, k), BatchedMatrixView<T const>{b.data(), g, n, k},
               bias ? bv.data() : nullptr, off, MatrixView<float>(c.data(), m, n));
  std::vector<double> want(c.size());
  for (std::int64_t grp = 0; grp < g; ++grp)
    for (std::int64_t r = off[static_cast<std::size_t>(grp)]; r < off[static_cast<std::size_t>(grp) + 1]; ++r)
      for (std::int64_t col = 0; col < n; ++col) {
        double acc = bias ? double(to_float(bv[static_cast<std::size_t>(grp * n + col)])) : 0.0;
        for (std::int64_t i = 0; i < k; ++i)
          acc += double(to_float(a[static_cast<std::size_t>(r * k + i)])) *
                 to_float(b[static_cast<std::size_t>((grp * n + col) * k + i)]);
        want[static_cast<std::size_t>(r * n + col)] = acc;
      }
  if (m > 0) CHECK(test::rel_error(c, want) <= 1e-5);
}

}  // namespace

TEST_CASE("GroupedGemm::run: mixed group sizes 0 1 7 63 64 65 1000 in one call") {
  EPX_TEST_SEEDED_RNG(rng);
  check_grouped_gemm<float>({0, 1, 7, 63, 64, 65, 1000}, 24, 16, false, rng);
  check_grouped_gemm<bfloat16>({65, 0, 1000, 7, 1, 64, 63}, 8, 40, true, rng);
  check_grouped_gemm<half>({3, 0, 0}, 8, 8, true, rng);
}

TEST_CASE("GroupedGemm::run: all rows on one group and groups with none") {
  EPX_TEST_SEEDED_RNG(rng);
  check_grouped_gemm<float>({0, 0, 300, 0}, 16, 32, true, rng);
  check_grouped_gemm<float>({0, 0}, 16, 32, false, rng);
}

TEST_CASE("GroupedGemm::run: bad offsets and shapes are named") {
  std::vector<float> a(4 * 8, 1.0f), b(2 * 3 * 8, 1.0f), c(4 * 3);
  std::vector<std::int32_t> const bad{0, 3, 2};
  MatrixView<float const> av(a.data(), 4, 8);
  BatchedMatrixView<float const> bv{b.data(), 2, 3, 8};
  CHECK_THROWS_WITH_AS(
      grouped_gemm(Host{}, av, bv, static_cast<float const*>(nullptr), bad, MatrixView<float>(c.data(), 4, 3)),
      doctest::Contains("offsets[1..2] = [3, 2]"), Error);
  std::vector<std::int32_t> const short_off{0, 4};
  CHECK_THROWS_WITH_AS(
      grouped_gemm(Host{}, av, bv, static_cast<float const*>(nullptr), short_off, MatrixView<float>(c.data(), 4, 3)),
      doctest::Contains("offsets.size() = 2, expected b.batch + 1 = 3"), Error);
  CHECK_THROWS_WITH_AS(
      grouped_gemm(Host{}, av, BatchedMatrixView<float const>{b.data(), 2, 3, 7}, static_cast<float const*>(nullptr),
                   offsets_of({2, 2}), MatrixView<float>(c.data(), 4, 3)),
      doctest::Contains("k = a.cols = 8"), Error);
}

TEST_CASE_TEMPLATE("ExpertMlp::run: every activation and layout against the double reference", T, float, bfloat16,
                   half) {
  EPX_TEST_SEEDED_RNG(rng);
  std::vector<std::int32_t> const rows{5, 0, 1, 17};
  auto const off = offsets_of(rows);
  std::int64_t const m = off.back();
  for (auto act :
       {Activation::kSwiGLU, Activation::kGeGLU, Activation::kGeGLUTanh, Activation::kReLU, Activation::kClampedSwiGLU})
    for (auto layout : {GateUpLayout::kConcatenated, GateUpLayout::kInterleaved})
      for (bool bias : {false, true}) {
        CAPTURE(to_string(act));
        CAPTURE(static_cast<int>(layout));
        CAPTURE(bias);
        ExpertMlpConfig const mlp{.hidden = 24,
                                  .intermediate = 16,
                                  .activation = act,
                                  .gate_up_layout = layout,
                                  .clamped_swiglu = {.alpha = 1.702f, .limit = 0.7f}};
        auto const gw = GlobalWeights<T>::random(4, mlp, bias, rng);
        auto const x = test::random_vector<T>(static_cast<std::size_t>(m * mlp.hidden), rng);
        std::vector<T> out(x.size(), T(7.0f));
        std::vector<std::byte> ws(expert_mlp_workspace_bytes<T>(mlp, m));
        expert_mlp(Host{}, mlp, gw.local({0, 4}), MatrixView<T const>(x.data(), m, mlp.hidden), off,
                   MatrixView<T>(out.data(), m, mlp.hidden), Workspace(ws.data(), ws.size()));
        std::vector<double> want;
        for (std::int32_t e = 0; e < 4; ++e)
          for (std::int32_t r = off[static_cast<std::size_t>(e)]; r < off[static_cast<std::size_t>(e) + 1]; ++r) {
            auto const o = gw.expert(e, x.data() + r * mlp.hidden);
            want.insert(want.end(), o.begin(), o.end());
          }
        CHECK(test::rel_error(out, want) <= (std::is_same_v<T, float> ? 1e-5 : 1e-2));
      }
}

TEST_CASE("ExpertMlp::run: bad weights and workspace are named") {
  EPX_TEST_SEEDED_RNG(rng);
  ExpertMlpConfig const mlp{.hidden = 8, .intermediate = 4};
  auto const gw = GlobalWeights<float>::random(2, mlp, false, rng);
  std::vector<float> x(3 * 8, 1.0f), out(3 * 8);
  auto const off = offsets_of({1, 2});
  std::vector<std::byte> ws(expert_mlp_workspace_bytes<float>(mlp, 3));
  auto call = [&](ExpertWeights const& w, std::size_t ws_bytes) {
    expert_mlp(Host{}, mlp, w, MatrixView<float const>(x.data(), 3, 8), off, MatrixView<float>(out.data(), 3, 8),
               Workspace(ws.data(), ws_bytes));
  };
  CHECK_NOTHROW(call(gw.local({0, 2}), ws.size()));
  auto wrong = gw.local({0, 2});
  wrong.dtype = DType::kBF16;
  CHECK_THROWS_WITH_AS(call(wrong, ws.size()), doctest::Contains("weights.dtype = bf16, expected f32"), Error);
  auto null_down = gw.local({0, 2});
  null_down.down = nullptr;
  CHECK_THROWS_WITH_AS(call(null_down, ws.size()), doctest::Contains("weights.down = nullptr"), Error);
  CHECK_THROWS_WITH_AS(call(gw.local({0, 1}), ws.size()), doctest::Contains("expert_offsets.size() = 3"), Error);
  CHECK_THROWS_WITH_AS(call(gw.local({0, 2}), ws.size() - 1), doctest::Contains("expert_mlp: workspace.size()"), Error);
  CHECK_THROWS_WITH_AS(expert_mlp(Host{}, ExpertMlpConfig{.hidden = 8, .intermediate = 0}, gw.local({0, 2}),
                                  MatrixView<float const>(x.data(), 3, 8), off, MatrixView<float>(out.data(), 3, 8),
                                  Workspace(ws.data(), ws.size())),
                       doctest::Contains("intermediate = 0, expected > 0"), Error);
}

TEST_CASE("ExpertMlp::run: widths whose gate/up rows overflow int32 are refused") {
  ExpertMlpConfig const mlp{.hidden = 8, .intermediate = 1 << 30};
  CHECK_THROWS_WITH_AS(detail::validate(mlp), doctest::Contains("intermediate = 1073741824, expected <= 2^29"), Error);
}
