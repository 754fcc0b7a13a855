// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// The errors of docs/errors.md that no other test raises: each case triggers one documented
// condition and checks its Errc and the stable part of its message.

#include "../common/test_util.hpp"

#include <chrono>
#include <exception>
#include <limits>
#include <span>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

using namespace epx;
using namespace std::chrono_literals;

namespace {

// Runs `f` once; when it throws epx::Error, records the code and rethrows for the caller's check.
template <class F>
void record_code(Errc& code, bool& thrown, F&& f) {
  try {
    f();
  } catch (Error const& e) {
    code = e.code();
    thrown = true;
    throw;
  }
}

// Rethrows a rank's captured exception; does nothing when that rank did not throw.
void rethrow(std::exception_ptr const& e) {
  if (e) std::rethrow_exception(e);
}

}  // namespace

// Evaluates the expression (the trailing arguments) once and checks that it throws epx::Error
// with code `errc` and a message containing `text`.
#define CHECK_EPX_ERROR(errc, text, ...)                                                                             \
  do {                                                                                                               \
    ::epx::Errc epx_code_ = ::epx::Errc::kUnsupported;                                                               \
    bool epx_thrown_ = false;                                                                                        \
    CHECK_THROWS_WITH_AS(record_code(epx_code_, epx_thrown_, [&] { (void)(__VA_ARGS__); }), doctest::Contains(text), \
                         ::epx::Error);                                                                              \
    if (epx_thrown_) CHECK(epx_code_ == (errc));                                                                     \
  } while (0)

namespace {

// A plan of 4 tokens x top_k 2 over 8 experts in which every slot has a row (8 rows).
struct SmallPlan {
  std::vector<std::int32_t> ids{0, 1, 2, 3, 4, 5, 6, 7};
  std::vector<std::byte> ws = std::vector<std::byte>(plan_workspace_bytes(4, 2, 8));
  Status status;
  RoutingPlan plan = make_plan(Host{}, MatrixView<std::int32_t const>(ids.data(), 4, 2), 8, ExpertRange{0, 8},
                               Workspace(ws.data(), ws.size()), status);
};

// An MoE layer of 8 experts, top_k 2, hidden 16, intermediate 8, with fixed weights.
struct Layer {
  ExpertMlpConfig mlp{.hidden = 16, .intermediate = 8};
  std::mt19937_64 rng{2026};
  test::GlobalWeights<float> gw = test::GlobalWeights<float>::random(8, mlp, false, rng);

  [[nodiscard]] MoeConfig config(Communicator const& comm) const {
    auto const placement = ExpertPlacement::contiguous(8, comm.size());
    return MoeConfig{
        .router = {.num_experts = 8, .top_k = 2}, .mlp = mlp, .weights = gw.local(placement.local_range(comm.rank()))};
  }
};

}  // namespace

// ---------------------------------------------------------------------------------------------
// Core: workspace, views, placement

TEST_CASE("Workspace::carve: a null workspace with a non-zero requirement is named") {
  std::vector<std::int32_t> const ids(8, 0);
  std::size_t const need = plan_workspace_bytes(4, 2, 8);
  Status st;
  std::string const text = fmt::format("make_plan: workspace.data() = nullptr, expected {} bytes of memory", need);
  CHECK_EPX_ERROR(Errc::kInvalidArgument, text.c_str(),
                  make_plan(Host{}, MatrixView<std::int32_t const>(ids.data(), 4, 2), 8, ExpertRange{0, 8},
                            Workspace(nullptr, need), st));
}

TEST_CASE("MatrixView::check: a malformed view is named") {
  std::vector<float> logits(4 * 8, 0.0f), w(4 * 2);
  std::vector<std::int32_t> ids(4 * 2);
  RouterConfig const c{.num_experts = 8, .top_k = 2};
  MatrixView<std::int32_t> iv(ids.data(), 4, 2);
  MatrixView<float> wv(w.data(), 4, 2);
  CHECK_EPX_ERROR(Errc::kInvalidArgument,
                  "route: logits has rows = 4, cols = 8, ld = 4, expected rows >= 0, cols >= 0, ld >= cols",
                  route(Host{}, c, MatrixView<float const>(logits.data(), 4, 8, 4), {}, iv, wv));
  CHECK_EPX_ERROR(Errc::kInvalidArgument, "route: logits has rows = -1, cols = 8, ld = 8",
                  route(Host{}, c, MatrixView<float const>(logits.data(), -1, 8), {}, iv, wv));
}

TEST_CASE("MatrixView::check: a null view with elements is named and an empty one is accepted") {
  std::vector<std::int32_t> ids(4 * 2);
  std::vector<float> w(4 * 2);
  RouterConfig const c{.num_experts = 8, .top_k = 2};
  CHECK_EPX_ERROR(Errc::kInvalidArgument, "route: logits.data = nullptr, expected a pointer to 4 x 8 elements",
                  route(Host{}, c, MatrixView<float const>(nullptr, 4, 8), {},
                        MatrixView<std::int32_t>(ids.data(), 4, 2), MatrixView<float>(w.data(), 4, 2)));
  CHECK_NOTHROW(route(Host{}, c, MatrixView<float const>(nullptr, 0, 8), {}, MatrixView<std::int32_t>(nullptr, 0, 2),
                      MatrixView<float>(nullptr, 0, 2)));
}

TEST_CASE("ExpertPlacement::contiguous: a non-positive rank count is named") {
  CHECK_EPX_ERROR(Errc::kInvalidArgument, "ExpertPlacement::contiguous: num_ranks = 0, expected > 0",
                  ExpertPlacement::contiguous(8, 0));
}

TEST_CASE("ExpertPlacement::from_counts: an empty or all-zero count list is named") {
  std::vector<std::int32_t> const none;
  CHECK_EPX_ERROR(Errc::kInvalidArgument, "ExpertPlacement::from_counts: experts_per_rank.size() = 0, expected > 0",
                  ExpertPlacement::from_counts(none));
  std::vector<std::int32_t> const zeros{0, 0};
  CHECK_EPX_ERROR(Errc::kInvalidArgument, "ExpertPlacement::from_counts: sum(experts_per_rank) = 0, expected > 0",
                  ExpertPlacement::from_counts(zeros));
}

TEST_CASE("ExpertPlacement::rank: a rank outside the placement is named") {
  auto const p = ExpertPlacement::contiguous(8, 4);
  CHECK_EPX_ERROR(Errc::kInvalidArgument, "ExpertPlacement: rank = 4, expected in [0, 4)", p.first_expert(4));
  CHECK_EPX_ERROR(Errc::kInvalidArgument, "ExpertPlacement: rank = -1, expected in [0, 4)", p.num_local_experts(-1));
  CHECK_EPX_ERROR(Errc::kInvalidArgument, "ExpertPlacement: rank = 7, expected in [0, 4)", p.local_range(7));
}

// ---------------------------------------------------------------------------------------------
// Router

TEST_CASE("Router::route: the output views must be num_tokens x top_k") {
  std::vector<float> logits(4 * 8, 0.0f);
  std::vector<std::int32_t> ids(4 * 3);
  std::vector<float> w(4 * 3);
  RouterConfig const c{.num_experts = 8, .top_k = 2};
  MatrixView<float const> lv(logits.data(), 4, 8);
  CHECK_EPX_ERROR(
      Errc::kShapeMismatch, "route: topk_ids.cols = 3, expected 2",
      route(Host{}, c, lv, {}, MatrixView<std::int32_t>(ids.data(), 4, 3), MatrixView<float>(w.data(), 4, 2)));
  CHECK_EPX_ERROR(
      Errc::kShapeMismatch, "route: topk_weights.rows = 3, expected 4",
      route(Host{}, c, lv, {}, MatrixView<std::int32_t>(ids.data(), 4, 2), MatrixView<float>(w.data(), 3, 2)));
  CHECK_EPX_ERROR(
      Errc::kShapeMismatch, "route: topk_weights.cols = 3, expected 2",
      route(Host{}, c, lv, {}, MatrixView<std::int32_t>(ids.data(), 4, 2), MatrixView<float>(w.data(), 4, 3)));
}

// ---------------------------------------------------------------------------------------------
// Plan, permute, unpermute

TEST_CASE("Plan::make_plan: zero top_k and too many slots are named") {
  std::vector<std::int32_t> const ids(8, 0);
  std::vector<std::byte> ws(plan_workspace_bytes(4, 2, 8));
  Status st;
  CHECK_EPX_ERROR(Errc::kInvalidArgument, "make_plan: topk_ids.cols (top_k) = 0, expected >= 1",
                  make_plan(Host{}, MatrixView<std::int32_t const>(ids.data(), 4, 0), 8, ExpertRange{0, 8},
                            Workspace(ws.data(), ws.size()), st));
  // 2^30 tokens x top_k 2: rejected from the shape alone, before any element is read.
  CHECK_EPX_ERROR(Errc::kInvalidArgument, "make_plan: num_tokens * top_k = 2147483648, expected < 2^31 - 1",
                  make_plan(Host{}, MatrixView<std::int32_t const>(ids.data(), std::int64_t{1} << 30, 2), 8,
                            ExpertRange{0, 8}, Workspace(ws.data(), ws.size()), st));
}

TEST_CASE("Permute::permute: x and x_perm must match the plan and each other") {
  SmallPlan const p;
  std::vector<float> x(4 * 8, 1.0f), x_perm(8 * 8);
  CHECK_EPX_ERROR(
      Errc::kShapeMismatch, "permute: x.rows = 3, expected 4",
      permute(Host{}, p.plan, MatrixView<float const>(x.data(), 3, 8), MatrixView<float>(x_perm.data(), 8, 8)));
  CHECK_EPX_ERROR(
      Errc::kShapeMismatch, "permute: x_perm.cols = 7, expected 8",
      permute(Host{}, p.plan, MatrixView<float const>(x.data(), 4, 8), MatrixView<float>(x_perm.data(), 8, 7)));
  CHECK_EPX_ERROR(
      Errc::kShapeMismatch, "permute: x_perm.rows = 7, expected >= the plan's routed rows (8)",
      permute(Host{}, p.plan, MatrixView<float const>(x.data(), 4, 8), MatrixView<float>(x_perm.data(), 7, 8)));
}

TEST_CASE("Permute::unpermute: expert_out and y must match the plan") {
  SmallPlan const p;
  std::vector<float> expert_out(8 * 8, 1.0f), weights(4 * 2, 0.5f), y(4 * 8);
  MatrixView<float const> wv(weights.data(), 4, 2);
  CHECK_EPX_ERROR(Errc::kShapeMismatch, "unpermute: expert_out.rows = 7, expected >= the plan's routed rows (8)",
                  unpermute(Host{}, p.plan, MatrixView<float const>(expert_out.data(), 7, 8), wv,
                            MatrixView<float>(y.data(), 4, 8)));
  CHECK_EPX_ERROR(Errc::kShapeMismatch, "unpermute: y.rows = 3, expected 4",
                  unpermute(Host{}, p.plan, MatrixView<float const>(expert_out.data(), 8, 8), wv,
                            MatrixView<float>(y.data(), 3, 8)));
  CHECK_EPX_ERROR(Errc::kShapeMismatch, "unpermute: y.cols = 7, expected 8",
                  unpermute(Host{}, p.plan, MatrixView<float const>(expert_out.data(), 8, 8), wv,
                            MatrixView<float>(y.data(), 4, 7)));
}

// ---------------------------------------------------------------------------------------------
// Grouped GEMM and expert MLP

TEST_CASE("GroupedGemm::run: a null or negative b and a wrong c are named") {
  std::vector<float> a(4 * 8, 1.0f), b(2 * 3 * 8, 1.0f), c(4 * 3);
  std::vector<std::int32_t> const offsets{0, 2, 4};
  MatrixView<float const> av(a.data(), 4, 8);
  BatchedMatrixView<float const> const bv{b.data(), 2, 3, 8};
  float const* no_bias = nullptr;
  CHECK_EPX_ERROR(Errc::kInvalidArgument, "grouped_gemm: b.data = nullptr, expected a pointer to the stacked weights",
                  grouped_gemm(Host{}, av, BatchedMatrixView<float const>{nullptr, 2, 3, 8}, no_bias, offsets,
                               MatrixView<float>(c.data(), 4, 3)));
  CHECK_EPX_ERROR(Errc::kShapeMismatch, "grouped_gemm: b (batch, n, k) = (-1, 3, 8), expected k = a.cols = 8",
                  grouped_gemm(Host{}, av, BatchedMatrixView<float const>{b.data(), -1, 3, 8}, no_bias, offsets,
                               MatrixView<float>(c.data(), 4, 3)));
  CHECK_EPX_ERROR(Errc::kShapeMismatch, "grouped_gemm: c.rows = 3, expected 4",
                  grouped_gemm(Host{}, av, bv, no_bias, offsets, MatrixView<float>(c.data(), 3, 3)));
  CHECK_EPX_ERROR(Errc::kShapeMismatch, "grouped_gemm: c.cols = 2, expected 3",
                  grouped_gemm(Host{}, av, bv, no_bias, offsets, MatrixView<float>(c.data(), 4, 2)));
}

TEST_CASE("ExpertMlp::run: a bad hidden size and bad weights or views are named") {
  std::mt19937_64 rng(11);
  ExpertMlpConfig const mlp{.hidden = 8, .intermediate = 4};
  auto const gw = test::GlobalWeights<float>::random(2, mlp, false, rng);
  std::vector<float> x(3 * 8, 1.0f), out(3 * 8);
  std::vector<std::int32_t> const offsets{0, 1, 3};
  std::vector<std::byte> ws(expert_mlp_workspace_bytes<float>(mlp, 3));
  auto call = [&](ExpertMlpConfig const& config, ExpertWeights const& w, std::int64_t x_cols, std::int64_t out_rows) {
    expert_mlp(Host{}, config, w, MatrixView<float const>(x.data(), 3, x_cols), offsets,
               MatrixView<float>(out.data(), out_rows, 8), Workspace(ws.data(), ws.size()));
  };
  CHECK_NOTHROW(call(mlp, gw.local({0, 2}), 8, 3));
  CHECK_EPX_ERROR(Errc::kInvalidArgument, "expert_mlp: hidden = 0, expected > 0",
                  call(ExpertMlpConfig{.hidden = 0, .intermediate = 4}, gw.local({0, 2}), 8, 3));
  auto negative = gw.local({0, 2});
  negative.num_local_experts = -1;
  CHECK_EPX_ERROR(Errc::kInvalidArgument, "expert_mlp: weights.num_local_experts = -1, expected >= 0",
                  call(mlp, negative, 8, 3));
  auto null_gate_up = gw.local({0, 2});
  null_gate_up.gate_up = nullptr;
  CHECK_EPX_ERROR(Errc::kInvalidArgument, "expert_mlp: weights.gate_up = nullptr, expected [2, 8, 8] elements",
                  call(mlp, null_gate_up, 8, 3));
  CHECK_EPX_ERROR(Errc::kShapeMismatch, "expert_mlp: x.cols = 7, expected 8", call(mlp, gw.local({0, 2}), 7, 3));
  CHECK_EPX_ERROR(Errc::kShapeMismatch, "expert_mlp: out.rows = 2, expected 3", call(mlp, gw.local({0, 2}), 8, 2));
}

TEST_CASE("ExpertMlp::run: bad expert_offsets values are named by grouped_gemm") {
  std::mt19937_64 rng(12);
  ExpertMlpConfig const mlp{.hidden = 8, .intermediate = 4};
  auto const gw = test::GlobalWeights<float>::random(2, mlp, false, rng);
  std::vector<float> x(3 * 8, 1.0f), out(3 * 8);
  std::vector<std::byte> ws(expert_mlp_workspace_bytes<float>(mlp, 3));
  auto call = [&](std::vector<std::int32_t> const& offsets) {
    expert_mlp(Host{}, mlp, gw.local({0, 2}), MatrixView<float const>(x.data(), 3, 8), offsets,
               MatrixView<float>(out.data(), 3, 8), Workspace(ws.data(), ws.size()));
  };
  CHECK_EPX_ERROR(Errc::kInvalidArgument,
                  "grouped_gemm: offsets[1..2] = [2, 1], expected 0 <= offsets[g] <= offsets[g+1] <= a.rows = 3",
                  call({0, 2, 1}));
  CHECK_EPX_ERROR(Errc::kInvalidArgument, "grouped_gemm: offsets[1..2] = [2, 5]", call({0, 2, 5}));
}

TEST_CASE(
    "ExpertWeights::expert_weights: a negative extent, a null tensor with elements or too many experts is named") {
  std::vector<float> const gate_up(2 * 8 * 4, 0.5f), down(2 * 4 * 4, 0.25f);
  TensorView<float const, 3> const good_gate_up(gate_up.data(), {2, 8, 4}), good_down(down.data(), {2, 4, 4});
  CHECK_NOTHROW((void)expert_weights(good_gate_up, good_down));
  CHECK(expert_weights(good_gate_up, good_down).num_local_experts == 2);
  CHECK_EPX_ERROR(Errc::kInvalidArgument, "expert_weights: gate_up.extents = [2, -8, 4], expected every extent >= 0",
                  expert_weights(TensorView<float const, 3>(gate_up.data(), {2, -8, 4}), good_down));
  CHECK_EPX_ERROR(Errc::kInvalidArgument,
                  "expert_weights: down.data = nullptr, expected a pointer to the 32 elements of a [2, 4, 4] tensor",
                  expert_weights(good_gate_up, TensorView<float const, 3>(nullptr, {2, 4, 4})));
  CHECK_EPX_ERROR(Errc::kInvalidArgument,
                  "expert_weights: down_bias.data = nullptr, expected a pointer to the 8 elements of a [2, 4] tensor",
                  expert_weights(good_gate_up, good_down, {}, TensorView<float const, 2>(nullptr, {2, 4})));
  CHECK_EPX_ERROR(Errc::kInvalidArgument,
                  "expert_weights: gate_up.extents[0] (local experts) = 2147483648, expected < 2^31",
                  expert_weights(TensorView<float const, 3>(gate_up.data(), {std::int64_t{1} << 31, 8, 4}), good_down));
}

namespace {

// gpt-oss's expert MLP in miniature: clamped SwiGLU over interleaved gate/up, hidden 16,
// intermediate 12 (so gate_up_rows 24 differs from hidden and a transposed tensor is visible).
struct GptOssLayer {
  static constexpr std::int64_t kLocal = 2, kHidden = 16, kInter = 12, kRows = 2 * kInter;
  ExpertMlpConfig mlp{.hidden = kHidden,
                      .intermediate = kInter,
                      .activation = Activation::kClampedSwiGLU,
                      .gate_up_layout = GateUpLayout::kInterleaved};
  std::vector<float> gate_up = std::vector<float>(kLocal * kRows * kHidden, 0.5f);
  std::vector<float> down = std::vector<float>(kLocal * kHidden * kInter, 0.25f);
  std::vector<float> bias = std::vector<float>(kLocal * kRows, 0.125f);

  [[nodiscard]] TensorView<float const, 3> gate_up_view() const { return {gate_up.data(), {kLocal, kRows, kHidden}}; }
  [[nodiscard]] TensorView<float const, 3> down_view() const { return {down.data(), {kLocal, kHidden, kInter}}; }
  [[nodiscard]] MoeConfig config(ExpertWeights const& w) const {
    return MoeConfig{
        .router = {.num_experts = 4, .top_k = 2, .scoring = Scoring::kTopKSoftmax}, .mlp = mlp, .weights = w};
  }
};

}  // namespace

TEST_CASE("ExpertParallel::ExpertParallel: weights in another layout are refused, naming the expected one") {
  GptOssLayer const g;
  LocalGroup group(2, {.timeout = 10s});
  auto& comm = group.communicator(0);  // 4 experts over 2 ranks: rank 0 owns 2
  using EP = ExpertParallel<Grouped, AllToAll, Host>;
  CHECK_NOTHROW(
      EP(g.config(expert_weights(g.gate_up_view(), g.down_view(), TensorView(g.bias.data(), {2, 24}))), comm));
  // gate_up_proj as the checkpoint stores it: [E, H, 2I], not transposed.
  CHECK_EPX_ERROR(Errc::kShapeMismatch,
                  "ExpertParallel: weights.gate_up.extents = [2, 16, 24], expected [2, 24, 16] = [local experts, "
                  "gate_up_rows (2 * intermediate), hidden], contiguous and K-major (gpt-oss's gate_up_proj is "
                  "[E, H, 2I]: pass its transpose [E, 2I, H], made contiguous)",
                  EP(g.config(expert_weights(TensorView(g.gate_up.data(), {2, 16, 24}), g.down_view())), comm));
  CHECK_EPX_ERROR(Errc::kShapeMismatch,
                  "(gpt-oss's gate_up_proj is [E, H, 2I]: pass its transpose [E, 2I, H], made contiguous)",
                  (ExpertParallel<Grouped, AllGather, Host>(
                      g.config(expert_weights(TensorView(g.gate_up.data(), {2, 16, 24}), g.down_view())), comm)));
  // Its transpose as a view (torch: gate_up_proj.transpose(1, 2) without .contiguous()).
  CHECK_EPX_ERROR(
      Errc::kInvalidArgument,
      "ExpertParallel: weights.gate_up.strides = [384, 1, 24], expected [384, 16, 1] (contiguous and "
      "K-major: [local experts, gate_up_rows (2 * intermediate), hidden] in row-major order, the last "
      "dimension moving fastest; a transposed or sliced view has other strides: make it contiguous "
      "first, e.g. torch's .contiguous())",
      EP(g.config(expert_weights(TensorView(g.gate_up.data(), {2, 24, 16}, {384, 1, 24}), g.down_view())), comm));
  CHECK_EPX_ERROR(Errc::kShapeMismatch,
                  "ExpertParallel: weights.down.extents = [2, 12, 16], expected [2, 16, 12] = [local experts, hidden, "
                  "intermediate], contiguous and K-major (gpt-oss's down_proj is [E, I, H]: pass its transpose "
                  "[E, H, I], made contiguous)",
                  EP(g.config(expert_weights(g.gate_up_view(), TensorView(g.down.data(), {2, 12, 16}))), comm));
  // Another expert count in down than in gate_up: no transposition hint.
  std::vector<float> const three(3 * 16 * 12, 0.25f);
  auto const text = [&] {
    try {
      EP(g.config(expert_weights(g.gate_up_view(), TensorView(three.data(), {3, 16, 12}))), comm);
    } catch (Error const& e) {
      return std::string(e.what());
    }
    return std::string();
  }();
  CHECK(text.find("ExpertParallel: weights.down.extents = [3, 16, 12], expected [2, 16, 12] = [local experts, hidden, "
                  "intermediate], contiguous and K-major [") != std::string::npos);
  CHECK_EPX_ERROR(
      Errc::kShapeMismatch,
      "ExpertParallel: weights.gate_up_bias.extents = [2, 12], expected [2, 24] = [local experts, "
      "gate_up_rows (2 * intermediate)], contiguous and K-major",
      EP(g.config(expert_weights(g.gate_up_view(), g.down_view(), TensorView(g.bias.data(), {2, 12}))), comm));
  std::vector<float> const down_bias(2 * 32, 0.5f);
  CHECK_EPX_ERROR(
      Errc::kInvalidArgument, "ExpertParallel: weights.down_bias.strides = [32, 1], expected [16, 1]",
      EP(g.config(expert_weights(g.gate_up_view(), g.down_view(), {}, TensorView(down_bias.data(), {2, 16}, {32, 1}))),
         comm));
  // Not gated (ReLU): gate_up_rows is intermediate.
  auto relu = g.config(expert_weights(g.gate_up_view(), g.down_view()));
  relu.mlp.activation = Activation::kReLU;
  CHECK_EPX_ERROR(Errc::kShapeMismatch,
                  "ExpertParallel: weights.gate_up.extents = [2, 24, 16], expected [2, 12, 16] = [local experts, "
                  "gate_up_rows (intermediate: not gated), hidden]",
                  EP(relu, comm));
  // A shape filled in by hand with the wrong rank.
  auto hand_made = g.config(expert_weights(g.gate_up_view(), g.down_view()));
  hand_made.weights.gate_up_shape.rank = 2;
  CHECK_EPX_ERROR(Errc::kInvalidArgument,
                  "ExpertParallel: weights.gate_up_shape.rank = 2, expected 3 ([local experts, gate_up_rows (2 * "
                  "intermediate), hidden])",
                  EP(hand_made, comm));
}

TEST_CASE("ExpertMlp::run: expert_mlp refuses weights in another layout too") {
  GptOssLayer const g;
  std::vector<float> x(3 * 16, 1.0f), out(3 * 16);
  std::vector<std::int32_t> const offsets{0, 1, 3};
  std::vector<std::byte> ws(expert_mlp_workspace_bytes<float>(g.mlp, 3));
  auto call = [&](ExpertWeights const& w) {
    expert_mlp(Host{}, g.mlp, w, MatrixView<float const>(x.data(), 3, 16), offsets,
               MatrixView<float>(out.data(), 3, 16), Workspace(ws.data(), ws.size()));
  };
  CHECK_NOTHROW(call(expert_weights(g.gate_up_view(), g.down_view())));
  CHECK_EPX_ERROR(Errc::kShapeMismatch,
                  "expert_mlp: weights.gate_up.extents = [2, 16, 24], expected [2, 24, 16] = [local experts, "
                  "gate_up_rows (2 * intermediate), hidden]",
                  call(expert_weights(TensorView(g.gate_up.data(), {2, 16, 24}), g.down_view())));
}

// ---------------------------------------------------------------------------------------------
// LocalGroup

TEST_CASE("LocalGroup::LocalGroup: a non-positive timeout is named") {
  CHECK_EPX_ERROR(Errc::kInvalidArgument, "LocalGroup: options.timeout (ms) = 0, expected > 0",
                  LocalGroup(2, LocalGroup::Options{.timeout = 0ms}));
  CHECK_EPX_ERROR(Errc::kInvalidArgument, "LocalGroup: options.timeout (ms) = -5, expected > 0",
                  LocalGroup(2, LocalGroup::Options{.timeout = -5ms}));
}

TEST_CASE("LocalGroup::communicator: a rank outside the group is named") {
  LocalGroup group(2, {.timeout = 10s});
  CHECK_EPX_ERROR(Errc::kInvalidArgument, "LocalGroup::communicator: rank = 2, expected in [0, 2)",
                  group.communicator(2));
  CHECK_EPX_ERROR(Errc::kInvalidArgument, "LocalGroup::communicator: rank = -1, expected in [0, 2)",
                  group.communicator(-1));
  CHECK_FALSE(group.aborted());  // a bad rank index is not a collective failure
}

TEST_CASE("LocalGroup::collectives: a null buffer with a non-zero size is named") {
  std::uint8_t buf[8] = {};
  {
    LocalGroup group(1, {.timeout = 10s});
    CHECK_EPX_ERROR(Errc::kInvalidArgument, "LocalGroup: rank 0: all_gather: send = nullptr, expected 4 bytes",
                    group.communicator(0).all_gather(nullptr, buf, 4, StreamRef::host()));
    CHECK(group.aborted());
  }
  {
    LocalGroup group(1, {.timeout = 10s});
    std::vector<std::size_t> const sizes{4};
    CHECK_EPX_ERROR(Errc::kInvalidArgument, "LocalGroup: rank 0: all_to_all_v: recv = nullptr, expected 4 bytes",
                    group.communicator(0).all_to_all_v(buf, sizes, nullptr, sizes, StreamRef::host()));
  }
  {
    LocalGroup group(1, {.timeout = 10s});
    CHECK_EPX_ERROR(Errc::kInvalidArgument, "LocalGroup: rank 0: all_reduce_sum: data = nullptr, expected ",
                    group.communicator(0).all_reduce_sum(nullptr, 3, DType::kF32, StreamRef::host()));
  }
}

TEST_CASE("LocalGroup::collectives: local misuse stops the peers with the first failure") {
  LocalGroup group(2, {.timeout = 10s});
  std::vector<std::exception_ptr> errors(2);
  group.run([&](int rank, Communicator& comm) {
    try {
      std::int32_t mine = rank, all[2] = {};
      comm.all_gather(rank == 0 ? nullptr : &mine, all, sizeof mine, StreamRef::host());
    } catch (...) {
      errors[static_cast<std::size_t>(rank)] = std::current_exception();
    }
  });
  CHECK_EPX_ERROR(Errc::kInvalidArgument, "LocalGroup: rank 0: all_gather: send = nullptr, expected 4 bytes",
                  rethrow(errors[0]));
  // The peer stops at once (not at the timeout) with kPeerFailed and the first failure's text.
  CHECK_EPX_ERROR(Errc::kPeerFailed,
                  "LocalGroup: rank 1 stopped: the group was aborted: LocalGroup: rank 0: all_gather: send = nullptr",
                  rethrow(errors[1]));
}

TEST_CASE("LocalGroup::collectives: different operations are named on every rank") {
  LocalGroup group(2, {.timeout = 10s});
  std::vector<std::exception_ptr> errors(2);
  group.run([&](int rank, Communicator& comm) {
    try {
      std::int64_t mine = rank, all[2] = {};
      if (rank == 0)
        comm.all_gather(&mine, all, sizeof mine, StreamRef::host());
      else
        comm.barrier(StreamRef::host());
    } catch (...) {
      errors[static_cast<std::size_t>(rank)] = std::current_exception();
    }
  });
  CHECK_EPX_ERROR(Errc::kCollectiveMismatch,
                  "LocalGroup: rank 0: collective #1: rank 0 called all_gather, rank 1 called barrier",
                  rethrow(errors[0]));
  CHECK_EPX_ERROR(Errc::kCollectiveMismatch,
                  "LocalGroup: rank 1: collective #1: rank 1 called barrier, rank 0 called all_gather",
                  rethrow(errors[1]));
}

TEST_CASE("LocalGroup::all_to_all and all_gather: unequal bytes per rank are named on every rank") {
  for (bool const gather : {false, true}) {
    CAPTURE(gather);
    LocalGroup group(2, {.timeout = 10s});
    std::vector<std::exception_ptr> errors(2);
    group.run([&](int rank, Communicator& comm) {
      try {
        std::uint8_t send[16] = {}, recv[16] = {};
        std::size_t const bytes = rank == 0 ? 4 : 8;
        if (gather)
          comm.all_gather(send, recv, bytes, StreamRef::host());
        else
          comm.all_to_all(send, recv, bytes, StreamRef::host());
      } catch (...) {
        errors[static_cast<std::size_t>(rank)] = std::current_exception();
      }
    });
    std::string const what = gather ? "all_gather" : "all_to_all";
    for (int r = 0; r < 2; ++r) {
      std::string const text = fmt::format(
          "LocalGroup: rank {}: {} (collective #1): rank 0 passes 4 bytes per rank, "
          "rank 1 passes 8",
          r, what);
      CHECK_EPX_ERROR(Errc::kCollectiveMismatch, text.c_str(), rethrow(errors[static_cast<std::size_t>(r)]));
    }
  }
}

TEST_CASE("LocalGroup::all_reduce_sum: unequal counts or element types are named on every rank") {
  struct Case {
    std::size_t count1;
    DType dtype1;
    char const* text;
  };
  for (auto const& c : {Case{2, DType::kF32, "rank 0 reduces 3 x f32, rank 1 reduces 2 x f32"},
                        Case{3, DType::kI32, "rank 0 reduces 3 x f32, rank 1 reduces 3 x i32"}}) {
    CAPTURE(c.text);
    LocalGroup group(2, {.timeout = 10s});
    std::vector<std::exception_ptr> errors(2);
    group.run([&](int rank, Communicator& comm) {
      try {
        float data[3] = {};  // 4-byte elements: room for either dtype
        if (rank == 0)
          comm.all_reduce_sum(data, 3, DType::kF32, StreamRef::host());
        else
          comm.all_reduce_sum(data, c.count1, c.dtype1, StreamRef::host());
      } catch (...) {
        errors[static_cast<std::size_t>(rank)] = std::current_exception();
      }
    });
    for (int r = 0; r < 2; ++r) {
      std::string const text = fmt::format("LocalGroup: rank {}: all_reduce_sum (collective #1): {}", r, c.text);
      CHECK_EPX_ERROR(Errc::kCollectiveMismatch, text.c_str(), rethrow(errors[static_cast<std::size_t>(r)]));
    }
  }
}

TEST_CASE("LocalGroup::abort: waiting and later collectives throw kPeerFailed with the reason") {
  LocalGroup group(2, {.timeout = 10s});
  std::exception_ptr waiting;
  {
    std::jthread rank0([&] {
      try {
        group.communicator(0).barrier(StreamRef::host());
      } catch (...) {
        waiting = std::current_exception();
      }
    });
    std::this_thread::sleep_for(50ms);  // usually waiting by now; either way it must stop with the reason
    group.abort(1, "rank 1 lost its device");
  }
  char const* text = "LocalGroup: rank 0 stopped: the group was aborted: rank 1 failed: rank 1 lost its device";
  CHECK_EPX_ERROR(Errc::kPeerFailed, text, rethrow(waiting));
  CHECK_EPX_ERROR(Errc::kPeerFailed, text, group.communicator(0).barrier(StreamRef::host()));
}

// ---------------------------------------------------------------------------------------------
// ExpertParallel

TEST_CASE("ExpertParallel::ExpertParallel: a placement of another expert count or a null gate_up is named") {
  Layer const layer;
  LocalGroup group(2, {.timeout = 10s});
  auto& comm = group.communicator(0);
  using EP = ExpertParallel<Grouped, AllToAll, Host>;
  auto c = layer.config(comm);
  CHECK_NOTHROW(EP(c, comm));
  c.placement = ExpertPlacement::contiguous(10, 2);
  CHECK_EPX_ERROR(Errc::kInvalidArgument,
                  "ExpertParallel: placement.num_experts() = 10, expected router.num_experts = 8", EP(c, comm));
  c = layer.config(comm);
  c.weights.gate_up = nullptr;
  CHECK_EPX_ERROR(Errc::kInvalidArgument,
                  "ExpertParallel: weights.gate_up = nullptr, expected the [4, 16, 16] gate_up weights of this rank's "
                  "experts",
                  EP(c, comm));
}

TEST_CASE("ExpertParallel::ExpertParallel: a device-memory communicator is refused on Host") {
  Layer const layer;
  test::UnusedCommunicator comm(MemorySpace::kDevice);  // refused before any collective
  CHECK_EPX_ERROR(Errc::kInvalidArgument,
                  "ExpertParallel<..., Host>: comm.memory_space() = device, expected host (a host-memory Communicator)",
                  ExpertParallel<Grouped, AllToAll, Host>(layer.config(comm), comm));
}

TEST_CASE("ExpertParallel::workspace_bytes: a non-float weight dtype and too many tokens are named") {
  Layer const layer;
  LocalGroup group(1, {.timeout = 10s});
  auto& comm = group.communicator(0);
  auto c = layer.config(comm);
  c.weights.dtype = DType::kI32;  // refused at construction, before any forward
  CHECK_EPX_ERROR(Errc::kInvalidArgument, "ExpertParallel: weights.dtype = i32, expected f32, f16 or bf16",
                  (ExpertParallel<Grouped, AllToAll, Host>(c, comm)));
  ExpertParallel<Grouped, AllToAll, Host> const ep(layer.config(comm), comm);
  CHECK_EPX_ERROR(
      Errc::kInvalidArgument,
      "workspace_bytes: max_tokens = 1073741824, expected >= 0 with max_tokens * ranks * top_k (2) < 2^31 - 1",
      ep.workspace_bytes(std::int64_t{1} << 30));
  // AllToAll's dropless worst case receives every rank's slots: 4 ranks x top_k 2 rows per token.
  LocalGroup four(4, {.timeout = 10s});
  ExpertParallel<Grouped, AllToAll, Host> const ep4(layer.config(four.communicator(0)), four.communicator(0));
  CHECK_EPX_ERROR(
      Errc::kInvalidArgument,
      "workspace_bytes: max_tokens = 268435456, expected >= 0 with max_tokens * ranks * top_k (8) < 2^31 - 1",
      ep4.workspace_bytes(std::int64_t{1} << 28));
  ExpertParallel<Grouped, AllGather, Host> const ag4(layer.config(four.communicator(0)), four.communicator(0));
  CHECK_EPX_ERROR(Errc::kInvalidArgument,
                  "workspace_bytes: max_tokens = 1073741824, expected >= 0 with max_tokens * top_k (2) < 2^31 - 1",
                  ag4.workspace_bytes(std::int64_t{1} << 30));
}

TEST_CASE("ExpertParallel::forward: router logits of the wrong shape are named") {
  Layer const layer;
  LocalGroup group(1, {.timeout = 10s});
  ExpertParallel<Grouped, AllToAll, Host> ep(layer.config(group.communicator(0)), group.communicator(0));
  std::int64_t const t = 6;
  std::vector<float> logits(t * 8, 0.0f), x(t * 16, 1.0f), y(t * 16);
  std::vector<std::byte> ws(ep.workspace_bytes(t));
  auto call = [&](std::int64_t rows, std::int64_t cols) {
    ep.forward(Host{}, MatrixView<float const>(logits.data(), rows, cols), MatrixView<float const>(x.data(), t, 16),
               MatrixView<float>(y.data(), t, 16), Workspace(ws.data(), ws.size()));
  };
  CHECK_NOTHROW(call(t, 8));
  CHECK_EPX_ERROR(Errc::kShapeMismatch, "forward: router_logits.rows = 5, expected 6", call(t - 1, 8));
  CHECK_EPX_ERROR(Errc::kShapeMismatch, "forward: router_logits.cols = 7, expected 8", call(t, 7));
}

TEST_CASE("ExpertParallel::forward: a non-finite correction bias is named before any collective") {
  Layer const layer;
  LocalGroup group(2, {.timeout = 10s});  // rank 1 never calls: an error after a collective would time out
  auto& comm = group.communicator(0);
  std::vector<float> bias(8, 0.0f);
  bias[2] = NAN;
  auto c = layer.config(comm);
  c.correction_bias = bias;
  ExpertParallel<Grouped, AllToAll, Host> ep(c, comm);
  std::int64_t const t = 3;
  std::vector<float> logits(t * 8, 0.0f), x(t * 16, 1.0f), y(t * 16);
  std::vector<std::byte> ws(ep.workspace_bytes(t));
  CHECK_EPX_ERROR(
      Errc::kInvalidArgument, "route: correction_bias[2] = nan, expected a finite number",
      ep.forward(Host{}, MatrixView<float const>(logits.data(), t, 8), MatrixView<float const>(x.data(), t, 16),
                 MatrixView<float>(y.data(), t, 16), Workspace(ws.data(), ws.size())));
  CHECK_FALSE(group.aborted());
}

TEST_CASE("ExpertParallel::forward: AllGather names a rank whose tokens exceed its workspace on every rank") {
  Layer const layer;
  LocalGroup group(2, {.timeout = 10s});
  std::vector<std::exception_ptr> errors(2);
  std::int64_t const t = 6;
  std::mt19937_64 rng(5);
  auto const x = test::random_vector<float>(static_cast<std::size_t>(t * 16), rng);
  auto const ids = test::random_ids(t, 2, 8, rng);
  auto const w = test::random_weights(ids.size(), rng);
  group.run([&](int rank, Communicator& comm) {
    ExpertParallel<Grouped, AllGather, Host> ep(layer.config(comm), comm);
    std::vector<std::byte> ws(ep.workspace_bytes(rank == 1 ? t - 2 : t));  // rank 1 sized for 4 tokens
    std::vector<float> y(x.size());
    try {
      ep.forward(Host{}, MatrixView<std::int32_t const>(ids.data(), t, 2), MatrixView<float const>(w.data(), t, 2),
                 MatrixView<float const>(x.data(), t, 16), MatrixView<float>(y.data(), t, 16),
                 Workspace(ws.data(), ws.size()));
    } catch (...) {
      errors[static_cast<std::size_t>(rank)] = std::current_exception();
    }
  });
  for (std::size_t r = 0; r < 2; ++r) {
    CAPTURE(r);
    CHECK_EPX_ERROR(Errc::kWorkspaceTooSmall,
                    "forward: rank 1: num_tokens = 6, expected <= 4 (the tokens its workspace holds; ask "
                    "workspace_bytes(max_tokens))",
                    rethrow(errors[r]));
  }
}

TEST_CASE("ExpertParallel::ExpertParallel: a correction bias of another length or without memory is named") {
  Layer const layer;
  LocalGroup group(2, {.timeout = 10s});
  auto& comm = group.communicator(0);
  using EP = ExpertParallel<Grouped, AllToAll, Host>;
  std::vector<float> const bias(8, 0.5f);
  auto c = layer.config(comm);
  c.correction_bias = bias;
  CHECK_NOTHROW(EP(c, comm));
  c.correction_bias = std::span<float const>(bias).first(7);
  CHECK_EPX_ERROR(Errc::kShapeMismatch,
                  "ExpertParallel: correction_bias.size() = 7, expected 0 (no bias) or router.num_experts = 8 (one "
                  "selection bias per expert)",
                  EP(c, comm));
  c.correction_bias = std::span<float const>(static_cast<float const*>(nullptr), 8);
  CHECK_EPX_ERROR(Errc::kInvalidArgument,
                  "ExpertParallel: correction_bias.data() = nullptr, expected a pointer to 8 floats", EP(c, comm));
}

TEST_CASE("ExpertParallel::ExpertParallel: a negative or non-finite received_rows_factor is named") {
  Layer const layer;
  LocalGroup group(2, {.timeout = 10s});
  auto& comm = group.communicator(0);
  auto c = layer.config(comm);
  for (double ok : {0.0, 0.25, 1.0, 2.0, 64.0}) {
    c.received_rows_factor = ok;
    CHECK_NOTHROW(ExpertParallel<Grouped, AllToAll, Host>(c, comm));
  }
  std::string const expected =
      ", expected a finite value >= 0 (0: the dropless worst case; f > 0: f even shares of max_tokens * top_k rows)";
  for (auto [bad, text] : {std::pair{-0.5, "-0.5"}, std::pair{std::numeric_limits<double>::quiet_NaN(), "nan"},
                           std::pair{std::numeric_limits<double>::infinity(), "inf"}}) {
    c.received_rows_factor = bad;
    std::string const message = std::string("ExpertParallel: received_rows_factor = ") + text + expected;
    CHECK_EPX_ERROR(Errc::kInvalidArgument, message.c_str(), (ExpertParallel<Grouped, AllToAll, Host>(c, comm)));
    CHECK_EPX_ERROR(Errc::kInvalidArgument, message.c_str(), (ExpertParallel<Grouped, AllGather, Host>(c, comm)));
  }
}

TEST_CASE("ExpertParallel::forward: AllGather names the rank, its token and the slot of an invalid id on every rank") {
  Layer const layer;
  LocalGroup group(2, {.timeout = 10s});
  std::vector<std::exception_ptr> errors(2);
  std::int64_t const t = 5;
  std::mt19937_64 rng(9);
  auto const x = test::random_vector<float>(static_cast<std::size_t>(t * 16), rng);
  auto ids = test::random_ids(t, 2, 8, rng, 0.0);
  ids[7] = -3;  // token 3, slot 1
  ids[8] = 8;   // token 4, slot 0: the second one, not named
  auto const w = test::random_weights(ids.size(), rng);
  group.run([&](int rank, Communicator& comm) {
    ExpertParallel<Grouped, AllGather, Host> ep(layer.config(comm), comm);
    std::vector<std::byte> ws(ep.workspace_bytes(t));
    std::vector<float> y(x.size());
    try {
      ep.forward(Host{}, MatrixView<std::int32_t const>(ids.data(), t, 2), MatrixView<float const>(w.data(), t, 2),
                 MatrixView<float const>(x.data(), t, 16), MatrixView<float>(y.data(), t, 16),
                 Workspace(ws.data(), ws.size()));
      (void)ep.status(Host{});  // AllGather raises invalid ids where it reads the counters: here
    } catch (...) {
      errors[static_cast<std::size_t>(rank)] = std::current_exception();
    }
  });
  for (int r = 0; r < 2; ++r) {
    std::string const text = fmt::format(
        "status: rank {}: topk_ids held 2 invalid expert id(s) (first: token 3 of rank {}, slot 1: topk_ids[3, 1] = "
        "-3), expected -1 or an id in [0, 8); those slots were dropped and the output written without them",
        r, r);
    CHECK_EPX_ERROR(Errc::kInvalidExpertId, text.c_str(), rethrow(errors[static_cast<std::size_t>(r)]));
  }
}
