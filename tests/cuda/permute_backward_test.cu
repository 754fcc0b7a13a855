// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// permute_backward and unpermute_backward on the GPU against their Host twins, on random data with
// every output poisoned first: dx and d_expert_out bitwise equal to the Host's (the same fp32
// operations in the same order); d_topk_weights within fp32 rounding of the Host's (the kernel sums
// the dot product in a blocked order) and bitwise equal to that order written in plain C++
// (detail::unpermute_backward_dot); padding, rows past the routed rows and the weights' padding
// untouched; a second run bitwise equal to the first.
//
// Covered: bf16, fp16 and fp32 inputs, fp32 and element-type gradients, expert_out and dy of
// different types, empty experts, tokens without any routed slot (-1 ids), invalid ids, a plan over
// a sub-range of the experts (AllGather's: slots of other experts have no row), padded leading
// dimensions, offset (unaligned) pointers, whole-vector rows (the vector loads), odd rows (the
// element path), a large hidden, hidden 0, no tokens; the argument errors and a host StreamRef;
// capture in a CUDA graph.

#include "../common/routing_comparison.hpp"
#include "cuda_backend.cuh"

#include <epx/cuda.cuh>
#include <epx/cuda/permute_backward.cuh>
#include <epx/host/permute_backward.hpp>

#include <cmath>
#include <cstring>
#include <vector>

using namespace epx;
using test::DeviceBuffer;
using test::RowLayout;

namespace {

constexpr unsigned char kPoison = 0xcd;

//! One comparison: t tokens of top_k k over e experts, the plan over `range`, the row matrices laid
//! out as `layout` says (the weights' rows padded too when layout.pad > 0).
template <class TOut, class TDy, class TG>
void check_backward(std::int64_t t, std::int32_t k, std::int32_t e, ExpertRange range, RowLayout const& layout,
                    std::mt19937_64& rng) {
  CAPTURE(t);
  CAPTURE(k);
  CAPTURE(e);
  CAPTURE(range.first);
  CAPTURE(range.count);
  CAPTURE(layout.hidden);
  CAPTURE(layout.pad);
  CAPTURE(layout.offset);
  std::int64_t const h = layout.hidden, ld = layout.hidden + layout.pad, slots = t * k;
  std::int64_t const ldw = k + (layout.pad > 0 ? 3 : 0);

  // Routing: random distinct ids, some -1, two invalid, a token with no slot at all, a token with
  // only -1 and an invalid id.
  auto ids = test::random_ids(t, k, e, rng, 0.1);
  if (t > 0) {
    std::uniform_int_distribution<std::size_t> pick(0, ids.size() - 1);
    ids[pick(rng)] = e + 3;
    ids[pick(rng)] = -9;
    std::uniform_int_distribution<std::int64_t> token(0, t - 1);
    std::int64_t const padded = token(rng), mixed = token(rng);
    std::fill_n(ids.begin() + padded * k, k, -1);
    std::fill_n(ids.begin() + mixed * k, k, -1);
    ids[static_cast<std::size_t>(mixed * k)] = e + 1;
  }
  auto const weights = test::random_weights(static_cast<std::size_t>(slots), rng);
  auto const d_x_perm = test::random_vector<TDy>(static_cast<std::size_t>(slots * h), rng);
  auto const expert_out = test::random_vector<TOut>(static_cast<std::size_t>(slots * h), rng);
  auto const dy = test::random_vector<TDy>(static_cast<std::size_t>(t * h), rng);

  // Host reference on contiguous rows (matrices with room for every slot, as on the device).
  std::vector<std::byte> host_ws(plan_workspace_bytes(static_cast<std::int32_t>(t), k, range.count));
  Status host_status;
  RoutingPlan const hp = make_plan(Host{}, MatrixView<std::int32_t const>(ids.data(), t, k), e, range,
                                   Workspace(host_ws.data(), host_ws.size()), host_status);
  std::int64_t const rows = hp.expert_offsets.back();
  std::vector<TG> host_dx(static_cast<std::size_t>(t * h));
  permute_backward(Host{}, hp, MatrixView<TDy const>(d_x_perm.data(), slots, h), MatrixView<TG>(host_dx.data(), t, h));
  std::vector<TG> host_d_out(static_cast<std::size_t>(slots * h));
  std::vector<float> host_d_w(static_cast<std::size_t>(slots));
  unpermute_backward(Host{}, hp, MatrixView<TOut const>(expert_out.data(), slots, h),
                     MatrixView<float const>(weights.data(), t, k), MatrixView<TDy const>(dy.data(), t, h),
                     MatrixView<TG>(host_d_out.data(), slots, h), MatrixView<float>(host_d_w.data(), t, k));

  // The device's: rows ld apart from `offset`, weights ldw apart; outputs poisoned.
  auto const alloc = [&](std::int64_t r) {
    return static_cast<std::size_t>(layout.offset + std::max<std::int64_t>(r, 1) * ld);
  };
  auto spread = [&]<class T>(std::vector<T> const& dense, std::int64_t r) {
    std::vector<T> out(alloc(r), test::random_vector<T>(1, rng)[0]);
    for (std::int64_t i = 0; i < r; ++i)
      if (h > 0) std::memcpy(out.data() + layout.offset + i * ld, dense.data() + i * h, h * sizeof(T));
    return out;
  };
  auto spread_weights = [&](std::vector<float> const& dense) {
    std::vector<float> out(static_cast<std::size_t>(std::max<std::int64_t>(t, 1) * ldw), 7.0f);
    for (std::int64_t i = 0; i < t; ++i) std::copy_n(dense.data() + i * k, k, out.data() + i * ldw);
    return out;
  };
  test::CudaStream stream;
  DeviceBuffer<std::int32_t> d_ids(ids);
  DeviceBuffer<std::byte> d_ws(cuda_plan_workspace_bytes(static_cast<std::int32_t>(t), k, range.count));
  DeviceBuffer<Status> d_status(1);
  d_status.poison(0);
  d_ws.poison(0xab);
  RoutingPlan const dp = make_plan(stream.ref(), MatrixView<std::int32_t const>(d_ids.data(), t, k), e, range,
                                   Workspace(d_ws.data(), d_ws.size()), d_status.data());
  DeviceBuffer<TDy> dev_d_x_perm(spread(d_x_perm, slots)), dev_dy(spread(dy, t));
  DeviceBuffer<TOut> dev_expert_out(spread(expert_out, slots));
  DeviceBuffer<float> dev_weights(spread_weights(weights));

  struct Outputs {
    std::vector<TG> dx, d_out;
    std::vector<float> d_w;
  };
  auto run = [&] {
    DeviceBuffer<TG> dx(alloc(t)), d_out(alloc(slots));
    DeviceBuffer<float> d_w(static_cast<std::size_t>(std::max<std::int64_t>(t, 1) * ldw));
    dx.poison(kPoison);
    d_out.poison(kPoison);
    d_w.poison(kPoison);
    permute_backward(stream.ref(), dp, MatrixView<TDy const>(dev_d_x_perm.data() + layout.offset, slots, h, ld),
                     MatrixView<TG>(dx.data() + layout.offset, t, h, ld));
    unpermute_backward(stream.ref(), dp, MatrixView<TOut const>(dev_expert_out.data() + layout.offset, slots, h, ld),
                       MatrixView<float const>(dev_weights.data(), t, k, ldw),
                       MatrixView<TDy const>(dev_dy.data() + layout.offset, t, h, ld),
                       MatrixView<TG>(d_out.data() + layout.offset, slots, h, ld),
                       MatrixView<float>(d_w.data(), t, k, ldw));
    stream.sync();
    return Outputs{dx.to_host(), d_out.to_host(), d_w.to_host()};
  };
  Outputs const first = run();

  // The plan is the Host's (routing_test checks that in depth; here it decides which rows exist).
  CHECK(test::CudaBackend::to_host(dp.slot_rows) ==
        std::vector<std::int32_t>(hp.slot_rows.begin(), hp.slot_rows.end()));

  // dx: every row, bitwise; padding untouched.
  CHECK(test::same_bytes(test::gather_rows(first.dx, t, layout).data(), host_dx.data(), host_dx.size() * sizeof(TG)));
  CHECK(test::padding_untouched(first.dx, t, layout, kPoison));
  // d_expert_out: the routed rows bitwise; rows past them and padding untouched.
  CHECK(test::same_bytes(test::gather_rows(first.d_out, rows, layout).data(), host_d_out.data(),
                         static_cast<std::size_t>(rows * h) * sizeof(TG)));
  CHECK(test::padding_untouched(first.d_out, rows, layout, kPoison));

  // d_topk_weights: the kernel's blocked order bitwise, the Host's within rounding, the padding
  // columns untouched.
  int const chunk_elems = detail::backward_chunk_elems(h, sizeof(TOut), sizeof(TDy));
  int const threads =
      detail::row_block(h / chunk_elems,
                        detail::policy_for<detail::RowPolicy>(detail::current_device_traits()).threads_per_block)
          .threads_x;
  CAPTURE(chunk_elems);
  CAPTURE(threads);
  std::vector<float> g(static_cast<std::size_t>(h)), x(static_cast<std::size_t>(h));
  int mismatches = 0, out_of_tolerance = 0, nonzero = 0;
  for (std::int64_t tok = 0; tok < t; ++tok)
    for (std::int32_t j = 0; j < k; ++j) {
      auto const s = static_cast<std::size_t>(tok * k + j);
      float const got = first.d_w[static_cast<std::size_t>(tok * ldw + j)];
      std::int32_t const row = hp.slot_rows[s];
      float want = 0.0f;
      double magnitude = 0.0;
      if (row >= 0) {
        for (std::int64_t c = 0; c < h; ++c) {
          g[static_cast<std::size_t>(c)] = to_float(dy[static_cast<std::size_t>(tok * h + c)]);
          x[static_cast<std::size_t>(c)] = to_float(expert_out[static_cast<std::size_t>(row * h + c)]);
          magnitude += std::abs(double{g[static_cast<std::size_t>(c)]} * x[static_cast<std::size_t>(c)]);
        }
        want = detail::unpermute_backward_dot(g.data(), x.data(), h, chunk_elems, threads);
        nonzero += host_d_w[s] != 0.0f ? 1 : 0;
      }
      if (std::memcmp(&got, &want, sizeof(float)) != 0) ++mismatches;
      // Both sums are within h * 2^-24 * magnitude of the exact dot (sequential and blocked fp32).
      double const bound = 2.0 * static_cast<double>(h + 1) * 0x1p-24 * magnitude;
      if (!(std::abs(double{got} - double{host_d_w[s]}) <= bound)) ++out_of_tolerance;
    }
  CHECK(mismatches == 0);
  CHECK(out_of_tolerance == 0);
  if (h > 0 && rows > 0) CHECK(nonzero > 0);  // the comparison saw real dot products
  for (std::int64_t tok = 0; tok < t; ++tok)
    for (std::int64_t c = k; c < ldw; ++c) {
      float const v = first.d_w[static_cast<std::size_t>(tok * ldw + c)];
      unsigned char bytes[sizeof(float)];
      std::memcpy(bytes, &v, sizeof(float));
      CHECK(std::all_of(std::begin(bytes), std::end(bytes), [](unsigned char b) { return b == kPoison; }));
    }

  // Run to run: bitwise equal.
  Outputs const second = run();
  CHECK(test::same_bytes(first.dx.data(), second.dx.data(), first.dx.size() * sizeof(TG)));
  CHECK(test::same_bytes(first.d_out.data(), second.d_out.data(), first.d_out.size() * sizeof(TG)));
  CHECK(test::same_bytes(first.d_w.data(), second.d_w.data(), first.d_w.size() * sizeof(float)));
}

template <class TOut, class TDy, class TG>
void check_shapes(std::mt19937_64& rng) {
  std::int64_t const many = test::pick_size<std::int64_t>(2048, 97);
  // Whole-vector rows (72: 9 bf16 vectors, 18 fp32 ones), odd rows (70, 7: the element path), 0.
  for (std::int64_t h : {72, 70, 7, 0})
    for (std::int64_t t : {std::int64_t{0}, std::int64_t{1}, std::int64_t{7}, many})
      check_backward<TOut, TDy, TG>(t, 4, 64, {0, 64}, {.hidden = h}, rng);
  // Padded rows (aligned: still vectors), padded and offset (unaligned: same order, element loads).
  for (std::int64_t h : {72, 70})
    for (RowLayout l : {RowLayout{.hidden = h, .pad = 8}, RowLayout{.hidden = h, .pad = 1, .offset = 1},
                        RowLayout{.hidden = h, .pad = 8, .offset = 8}})
      check_backward<TOut, TDy, TG>(300, 8, 32, {0, 32}, l, rng);
  // A plan over some experts only (AllGather's: slots of the others have no row), few tokens so
  // that some of them are empty; top_k 1.
  check_backward<TOut, TDy, TG>(300, 8, 64, {16, 24}, {.hidden = 72}, rng);
  check_backward<TOut, TDy, TG>(5, 6, 256, {200, 56}, {.hidden = 72}, rng);
  check_backward<TOut, TDy, TG>(300, 1, 8, {3, 2}, {.hidden = 70}, rng);
  // A large row: every thread of the block takes several chunks, several warps reduce.
  check_backward<TOut, TDy, TG>(test::pick_size<std::int64_t>(256, 16), 8, 128, {0, 128}, {.hidden = 7168}, rng);
  check_backward<TOut, TDy, TG>(test::pick_size<std::int64_t>(64, 8), 2, 16, {0, 16}, {.hidden = 4097}, rng);
}

}  // namespace

TEST_CASE("PermuteBackward::backward[cuda]: bf16 inputs, fp32 and bf16 gradients, equal the Host twins") {
  EPX_TEST_SEEDED_RNG(rng);
  check_shapes<bfloat16, bfloat16, float>(rng);
  check_shapes<bfloat16, bfloat16, bfloat16>(rng);
}

TEST_CASE("PermuteBackward::backward[cuda]: fp16 inputs, fp32 and fp16 gradients, equal the Host twins") {
  EPX_TEST_SEEDED_RNG(rng);
  check_shapes<epx::half, epx::half, float>(rng);
  check_shapes<epx::half, epx::half, epx::half>(rng);
}

TEST_CASE("PermuteBackward::backward[cuda]: fp32 inputs and gradients equal the Host twins") {
  EPX_TEST_SEEDED_RNG(rng);
  check_shapes<float, float, float>(rng);
}

TEST_CASE("PermuteBackward::backward[cuda]: expert_out and dy of different types (chunks of the wider one's vector)") {
  EPX_TEST_SEEDED_RNG(rng);
  check_shapes<bfloat16, float, float>(rng);
  check_shapes<float, epx::half, bfloat16>(rng);  // CUDA has a global ::half too
}

TEST_CASE("PermuteBackward::errors[cuda]: argument errors name the parameter; a host StreamRef is refused") {
  // The checks run on the host before any launch: a Host plan's shapes suffice.
  std::int32_t const t = 5, k = 2, e = 4;
  std::int64_t const h = 6;
  std::vector<std::int32_t> ids{0, 1, 2, 3, 0, 2, 1, 3, -1, 2};
  std::vector<std::byte> ws(plan_workspace_bytes(t, k, e));
  Status st;
  RoutingPlan const plan = make_plan(Host{}, MatrixView<std::int32_t const>(ids.data(), t, k), e, {0, e},
                                     Workspace(ws.data(), ws.size()), st);
  test::CudaStream stream;
  DeviceBuffer<float> buf(static_cast<std::size_t>(t * k * h)), out(static_cast<std::size_t>(t * k * h)),
      w(static_cast<std::size_t>(t * k)), dw(static_cast<std::size_t>(t * k));
  MatrixView<float const> const perm(buf.data(), t * k, h);
  MatrixView<float> const dx(out.data(), t, h);
  test::check_throws(Errc::kInvalidArgument, "permute_backward: stream = StreamRef::host()",
                     [&] { permute_backward(StreamRef::host(), plan, perm, dx); });
  test::check_throws(Errc::kShapeMismatch, "permute_backward: dx.rows = 4, expected 5",
                     [&] { permute_backward(stream.ref(), plan, perm, MatrixView<float>(out.data(), 4, h)); });
  test::check_throws(Errc::kShapeMismatch, "permute_backward: dx.cols = 5, expected 6",
                     [&] { permute_backward(stream.ref(), plan, perm, MatrixView<float>(out.data(), t, 5)); });
  // Room for every slot is required (the routed rows, 9 here, are only known on the device).
  test::check_throws(Errc::kShapeMismatch,
                     "permute_backward: d_x_perm.rows = 9, expected >= the plan's routed rows (10)",
                     [&] { permute_backward(stream.ref(), plan, MatrixView<float const>(buf.data(), 9, h), dx); });
  test::check_throws(Errc::kInvalidArgument, "permute_backward: plan.expert_offsets.size() = 0",
                     [&] { permute_backward(stream.ref(), RoutingPlan{}, perm, dx); });

  MatrixView<float const> const tw(w.data(), t, k), dy(buf.data(), t, h);
  MatrixView<float> const d_eo(out.data(), t * k, h), d_w(dw.data(), t, k);
  auto unperm = [&](RoutingPlan const& p, MatrixView<float const> eo, MatrixView<float const> weights,
                    MatrixView<float const> g, MatrixView<float> deo,
                    MatrixView<float> dwt) { unpermute_backward(stream.ref(), p, eo, weights, g, deo, dwt); };
  test::check_throws(Errc::kInvalidArgument, "unpermute_backward: stream = StreamRef::host()",
                     [&] { unpermute_backward(StreamRef::host(), plan, perm, tw, dy, d_eo, d_w); });
  test::check_throws(Errc::kShapeMismatch,
                     "unpermute_backward: expert_out.rows = 9, expected >= the plan's routed rows (10)",
                     [&] { unperm(plan, MatrixView<float const>(buf.data(), 9, h), tw, dy, d_eo, d_w); });
  test::check_throws(Errc::kShapeMismatch, "unpermute_backward: topk_weights.rows = 4, expected 5",
                     [&] { unperm(plan, perm, MatrixView<float const>(w.data(), 4, k), dy, d_eo, d_w); });
  test::check_throws(Errc::kShapeMismatch, "unpermute_backward: dy.cols = 5, expected 6",
                     [&] { unperm(plan, perm, tw, MatrixView<float const>(buf.data(), t, 5), d_eo, d_w); });
  test::check_throws(Errc::kShapeMismatch, "unpermute_backward: d_expert_out.cols = 5, expected 6",
                     [&] { unperm(plan, perm, tw, dy, MatrixView<float>(out.data(), t * k, 5), d_w); });
  test::check_throws(Errc::kShapeMismatch,
                     "unpermute_backward: d_expert_out.rows = 9, expected >= the plan's routed rows (10)",
                     [&] { unperm(plan, perm, tw, dy, MatrixView<float>(out.data(), 9, h), d_w); });
  test::check_throws(Errc::kShapeMismatch, "unpermute_backward: d_topk_weights.cols = 3, expected 2",
                     [&] { unperm(plan, perm, tw, dy, d_eo, MatrixView<float>(dw.data(), t, 3)); });
  test::check_throws(Errc::kInvalidArgument, "unpermute_backward: plan.expert_offsets.size() = 0",
                     [&] { unperm(RoutingPlan{}, perm, tw, dy, d_eo, d_w); });
  test::check_throws(Errc::kInvalidArgument, "unpermute_backward: dy has rows = 5, cols = 6, ld = 2",
                     [&] { unperm(plan, perm, tw, MatrixView<float const>(buf.data(), t, h, 2), d_eo, d_w); });
}

TEST_CASE("PermuteBackward::graph[cuda]: both stages captured in a CUDA graph replay the eager results") {
  EPX_TEST_SEEDED_RNG(rng);
  std::int64_t const t = 512, h = 128, slots = t * 4;
  std::int32_t const k = 4, e = 64;
  auto const ids = test::random_ids(t, k, e, rng);
  auto const weights = test::random_weights(static_cast<std::size_t>(slots), rng);
  auto const rows_in = test::random_vector<bfloat16>(static_cast<std::size_t>(slots * h), rng);
  auto const dy_in = test::random_vector<bfloat16>(static_cast<std::size_t>(t * h), rng);
  test::CudaStream stream;
  DeviceBuffer<std::int32_t> d_ids(ids);
  DeviceBuffer<float> d_w(weights), d_dw(static_cast<std::size_t>(slots)), d_dw2(static_cast<std::size_t>(slots));
  DeviceBuffer<bfloat16> d_rows(rows_in), d_dy(dy_in);
  DeviceBuffer<float> d_dx(static_cast<std::size_t>(t * h)), d_dx2(static_cast<std::size_t>(t * h)),
      d_deo(static_cast<std::size_t>(slots * h)), d_deo2(static_cast<std::size_t>(slots * h));
  DeviceBuffer<std::byte> d_ws(cuda_plan_workspace_bytes(t, k, e));
  DeviceBuffer<Status> d_status(1);
  d_status.poison(0);
  RoutingPlan const plan = make_plan(stream.ref(), MatrixView<std::int32_t const>(d_ids.data(), t, k), e, {0, e},
                                     Workspace(d_ws.data(), d_ws.size()), d_status.data());
  auto backward = [&](float* dx, float* deo, float* dw) {
    permute_backward(stream.ref(), plan, MatrixView<bfloat16 const>(d_rows.data(), slots, h),
                     MatrixView<float>(dx, t, h));
    unpermute_backward(stream.ref(), plan, MatrixView<bfloat16 const>(d_rows.data(), slots, h),
                       MatrixView<float const>(d_w.data(), t, k), MatrixView<bfloat16 const>(d_dy.data(), t, h),
                       MatrixView<float>(deo, slots, h), MatrixView<float>(dw, t, k));
  };
  d_deo.poison(kPoison);
  d_deo2.poison(kPoison);
  backward(d_dx.data(), d_deo.data(), d_dw.data());  // eager
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  EPX_CUDA_CHECK(cudaStreamBeginCapture(stream.s, cudaStreamCaptureModeGlobal));
  backward(d_dx2.data(), d_deo2.data(), d_dw2.data());  // an allocation or a sync here would break the capture
  EPX_CUDA_CHECK(cudaStreamEndCapture(stream.s, &graph));
  EPX_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  d_dx2.poison(kPoison);
  d_dw2.poison(kPoison);
  for (int replay = 0; replay < 2; ++replay) EPX_CUDA_CHECK(cudaGraphLaunch(exec, stream.s));
  stream.sync();
  EPX_CUDA_CHECK(cudaGraphExecDestroy(exec));
  EPX_CUDA_CHECK(cudaGraphDestroy(graph));
  auto const dx = d_dx.to_host(), dx2 = d_dx2.to_host(), deo = d_deo.to_host(), deo2 = d_deo2.to_host(),
             dw = d_dw.to_host(), dw2 = d_dw2.to_host();
  CHECK(test::same_bytes(dx.data(), dx2.data(), dx.size() * sizeof(float)));
  CHECK(test::same_bytes(deo.data(), deo2.data(), deo.size() * sizeof(float)));
  CHECK(test::same_bytes(dw.data(), dw2.data(), dw.size() * sizeof(float)));
  CHECK(std::any_of(dw.begin(), dw.end(), [](float v) { return v != 0.0f; }));  // non-trivial
}
