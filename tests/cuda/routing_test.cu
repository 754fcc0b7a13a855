// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// make_plan, permute and unpermute on the GPU against their Host twins: ids, counts, offsets and
// permutations exactly equal; unpermute bitwise equal (same fp32 order); outputs poisoned first.

#include "../common/test_util.hpp"
#include "device_buffer.cuh"

#include <epx/cuda.cuh>

using namespace epx;
using test::DeviceBuffer;

namespace {

using Stream = test::CudaStream;

template <class T>
std::vector<T> span_to_vector(std::span<T> device_span) {
  std::vector<T> out(device_span.size());
  if (!out.empty())
    EPX_CUDA_CHECK(cudaMemcpy(out.data(), device_span.data(), out.size() * sizeof(T), cudaMemcpyDeviceToHost));
  return out;
}

//! Row layout of the device buffers: `hidden` columns, rows `ld` apart (ld >= hidden), starting
//! `offset` elements into the allocation (an offset pointer that breaks 16-byte alignment).
struct RowLayout {
  std::int64_t hidden = 72;  // 9 vectors of bf16: the 16-byte path
  std::int64_t pad = 0;      // ld = hidden + pad
  std::int64_t offset = 0;
  std::int32_t plan_tokens = -1;  // the plan workspace is sized for this many tokens (-1: t)
};

//! `rows` x `hidden` of `m` (row stride ld, from `offset`) as a contiguous host vector.
template <class T>
std::vector<T> gather_rows(std::vector<T> const& m, std::int64_t rows, RowLayout const& l) {
  std::vector<T> out(static_cast<std::size_t>(rows * l.hidden));
  for (std::int64_t r = 0; r < rows; ++r)
    std::memcpy(out.data() + r * l.hidden, m.data() + l.offset + r * (l.hidden + l.pad), l.hidden * sizeof(T));
  return out;
}

//! Every element of `m` outside the `rows` x `hidden` matrix still holds the poison byte.
template <class T>
bool padding_untouched(std::vector<T> const& m, std::int64_t rows, RowLayout const& l, unsigned char poison) {
  std::vector<char> inside(m.size(), 0);
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t c = 0; c < l.hidden; ++c) inside[static_cast<std::size_t>(l.offset + r * (l.hidden + l.pad) + c)] = 1;
  auto const* bytes = reinterpret_cast<unsigned char const*>(m.data());
  for (std::size_t i = 0; i < m.size(); ++i)
    if (!inside[i])
      for (std::size_t b = 0; b < sizeof(T); ++b)
        if (bytes[i * sizeof(T) + b] != poison) return false;
  return true;
}

template <class T>
void check_routing(std::int64_t t, std::int32_t k, std::int32_t e, ExpertRange range, bool hot, std::mt19937_64& rng,
                   RowLayout const& layout = {}) {
  CAPTURE(t);
  CAPTURE(k);
  CAPTURE(e);
  CAPTURE(layout.hidden);
  CAPTURE(layout.pad);
  CAPTURE(layout.offset);
  CAPTURE(layout.plan_tokens);
  std::int64_t const h = layout.hidden, ld = layout.hidden + layout.pad;
  auto ids = test::random_ids(t, k, e, rng, 0.1);
  std::uniform_int_distribution<std::size_t> pick(0, ids.empty() ? 0 : ids.size() - 1);
  if (!ids.empty()) {
    ids[pick(rng)] = e + 3;  // invalid
    ids[pick(rng)] = -9;     // invalid
  }
  if (hot)
    for (std::int64_t i = 0; i < t; ++i) ids[static_cast<std::size_t>(i * k)] = 0;
  if (t > 0) {  // tokens with no expert: one all -1 (padding), one -1 and invalid (counted in both)
    std::uniform_int_distribution<std::int64_t> token(0, t - 1);
    std::int64_t const padded = token(rng), mixed = token(rng);
    std::fill_n(ids.begin() + padded * k, k, -1);
    std::fill_n(ids.begin() + mixed * k, k, -1);
    ids[static_cast<std::size_t>(mixed * k)] = -4;
  }
  auto const weights = test::random_weights(ids.size(), rng);
  auto const x = test::random_vector<T>(static_cast<std::size_t>(t * h), rng);

  // Host reference (contiguous rows).
  std::vector<std::byte> host_ws(plan_workspace_bytes(static_cast<std::int32_t>(t), k, range.count));
  Status host_status;
  RoutingPlan const hp = make_plan(Host{}, MatrixView<std::int32_t const>(ids.data(), t, k), e, range,
                                   Workspace(host_ws.data(), host_ws.size()), host_status);
  std::int64_t const rows = hp.expert_offsets.back();
  std::vector<T> host_perm(static_cast<std::size_t>(std::max<std::int64_t>(rows, 1) * h));
  permute(Host{}, hp, MatrixView<T const>(x.data(), t, h), MatrixView<T>(host_perm.data(), rows, h));
  auto const expert_out = test::random_vector<T>(static_cast<std::size_t>(std::max<std::int64_t>(t * k, 1) * h), rng);
  std::vector<T> host_y(static_cast<std::size_t>(t * h));
  unpermute(Host{}, hp, MatrixView<T const>(expert_out.data(), rows, h), MatrixView<float const>(weights.data(), t, k),
            MatrixView<T>(host_y.data(), t, h));

  // Device: every matrix laid out with stride ld from `offset`; outputs poisoned.
  auto const alloc = [&](std::int64_t r) { return static_cast<std::size_t>(layout.offset + std::max<std::int64_t>(r, 1) * ld); };
  auto spread = [&](std::vector<T> const& dense, std::int64_t r) {
    std::vector<T> out(alloc(r), test::random_vector<T>(1, rng)[0]);
    for (std::int64_t i = 0; i < r; ++i)
      std::memcpy(out.data() + layout.offset + i * ld, dense.data() + i * h, h * sizeof(T));
    return out;
  };
  Stream stream;
  DeviceBuffer<std::int32_t> d_ids(ids);
  DeviceBuffer<float> d_w(weights);
  DeviceBuffer<T> d_x(spread(x, t)), d_perm(alloc(t * k)), d_out(spread(expert_out, t * k)), d_y(alloc(t));
  std::int32_t const plan_tokens = layout.plan_tokens < 0 ? static_cast<std::int32_t>(t) : layout.plan_tokens;
  DeviceBuffer<std::byte> d_ws(cuda_plan_workspace_bytes(plan_tokens, k, range.count));
  DeviceBuffer<Status> d_status(1);
  d_status.poison(0);
  d_ws.poison(0xab);
  d_perm.poison(0xcd);
  d_y.poison(0xcd);
  RoutingPlan const dp = make_plan(stream.ref(), MatrixView<std::int32_t const>(d_ids.data(), t, k), e, range,
                                   Workspace(d_ws.data(), d_ws.size()), d_status.data());
  permute(stream.ref(), dp, MatrixView<T const>(d_x.data() + layout.offset, t, h, ld),
          MatrixView<T>(d_perm.data() + layout.offset, t * k, h, ld));
  unpermute(stream.ref(), dp, MatrixView<T const>(d_out.data() + layout.offset, t * k, h, ld),
            MatrixView<float const>(d_w.data(), t, k), MatrixView<T>(d_y.data() + layout.offset, t, h, ld));
  EPX_CUDA_CHECK(cudaStreamSynchronize(stream.s));

  CHECK(span_to_vector(dp.expert_offsets) == std::vector<std::int32_t>(hp.expert_offsets.begin(), hp.expert_offsets.end()));
  CHECK(span_to_vector(dp.tokens_per_expert) == std::vector<std::int32_t>(hp.tokens_per_expert.begin(), hp.tokens_per_expert.end()));
  CHECK(span_to_vector(dp.sorted_slots) == std::vector<std::int32_t>(hp.sorted_slots.begin(), hp.sorted_slots.end()));
  CHECK(span_to_vector(dp.slot_rows) == std::vector<std::int32_t>(hp.slot_rows.begin(), hp.slot_rows.end()));
  auto const st = d_status.to_host()[0];
  CHECK(st.invalid_ids == host_status.invalid_ids);
  CHECK(st.dropped_slots == host_status.dropped_slots);
  CHECK(st.max_tokens_per_expert == host_status.max_tokens_per_expert);
  CHECK(st.tokens_without_expert == host_status.tokens_without_expert);  // summed per warp on the device
  if (t > 0) CHECK(host_status.tokens_without_expert >= 1);
  auto const perm = d_perm.to_host();
  CHECK(std::memcmp(gather_rows(perm, rows, layout).data(), host_perm.data(), static_cast<std::size_t>(rows * h) * sizeof(T)) == 0);
  CHECK(padding_untouched(perm, rows, layout, 0xcd));  // nothing past a row's end, nor past the routed rows
  auto const y = d_y.to_host();
  CHECK(std::memcmp(gather_rows(y, t, layout).data(), host_y.data(), host_y.size() * sizeof(T)) == 0);
  CHECK(padding_untouched(y, t, layout, 0xcd));
}

}  // namespace

TEST_CASE_TEMPLATE("Plan::make_plan[cuda]: plan, permute and unpermute equal the host twins", T, float, bfloat16, epx::half) {  // CUDA has a global ::half too
  EPX_TEST_SEEDED_RNG(rng);
  std::vector<std::int64_t> const tokens = test::small_sizes() ? std::vector<std::int64_t>{0, 1, 7, 128}
                                                                 : std::vector<std::int64_t>{0, 1, 7, 128, 4096, 16384};
  for (std::int32_t e : {8, 128, 256, 384})
    for (std::int32_t k : {1, 2, 4, 8})
      for (std::int64_t t : tokens) {
        if (k > e || (t == 16384 && !std::is_same_v<T, bfloat16>)) continue;
        check_routing<T>(t, k, e, {0, e}, false, rng);
      }
}

TEST_CASE_TEMPLATE("Permute::permute[cuda]: rows that are not whole 16-byte vectors, padded rows, offset pointers", T,
                   float, bfloat16, epx::half) {
  // h = 7 and 70 are not whole vectors (the element path); ld > h leaves padding that must stay
  // poisoned; an offset of one element breaks 16-byte alignment even when h is whole vectors.
  EPX_TEST_SEEDED_RNG(rng);
  std::int64_t const t = test::pick_size<std::int64_t>(777, 97);
  for (std::int64_t h : {7, 70, 64, 72})
    for (std::int64_t pad : {0, 1, 8})
      for (std::int64_t offset : {0, 1, 8})
        check_routing<T>(t, 4, 32, {0, 32}, false, rng, {.hidden = h, .pad = pad, .offset = offset});
}

TEST_CASE("Plan::make_plan[cuda]: a workspace sized for many tokens (CUB's multi-tile sort) used with few") {
  // A layer sizes the plan once for its capacity (tokens x top_k far above CUB's single-tile limit
  // of a few thousand items), then plans a decode step of a handful of tokens inside it: CUB must
  // take the small sort's path with a temporary-storage size computed for a larger one.
  EPX_TEST_SEEDED_RNG(rng);
  for (std::int64_t t : {0, 1, 5, 64, 300})
    check_routing<bfloat16>(t, 8, 256, {0, 256}, false, rng, {.plan_tokens = test::pick_size(65536, 8192)});
  check_routing<bfloat16>(3, 8, 256, {64, 64}, true, rng, {.plan_tokens = test::pick_size(65536, 8192)});
}

TEST_CASE("Plan::make_plan[cuda]: a rank's expert range and one hot expert") {
  EPX_TEST_SEEDED_RNG(rng);
  check_routing<bfloat16>(4096, 8, 256, {96, 32}, false, rng);
  check_routing<bfloat16>(4096, 8, 256, {0, 256}, true, rng);
  check_routing<bfloat16>(777, 4, 10, {7, 3}, true, rng);
}

TEST_CASE("Plan::make_plan[cuda]: router-free pipeline captured in a CUDA graph and replayed") {
  EPX_TEST_SEEDED_RNG(rng);
  std::int64_t const t = 512, h = 128;
  std::int32_t const k = 4, e = 64;
  auto const ids = test::random_ids(t, k, e, rng);
  auto const weights = test::random_weights(ids.size(), rng);
  auto const x = test::random_vector<bfloat16>(static_cast<std::size_t>(t * h), rng);
  Stream stream;
  DeviceBuffer<std::int32_t> d_ids(ids);
  DeviceBuffer<float> d_w(weights);
  DeviceBuffer<bfloat16> d_x(x), d_perm(static_cast<std::size_t>(t * k * h)), d_y(static_cast<std::size_t>(t * h)),
      d_y2(static_cast<std::size_t>(t * h));
  DeviceBuffer<std::byte> d_ws(cuda_plan_workspace_bytes(t, k, e));
  DeviceBuffer<Status> d_status(1);
  d_status.poison(0);
  auto pipeline = [&](bfloat16* y) {
    RoutingPlan const plan = make_plan(stream.ref(), MatrixView<std::int32_t const>(d_ids.data(), t, k), e, {0, e},
                                       Workspace(d_ws.data(), d_ws.size()), d_status.data());
    permute(stream.ref(), plan, MatrixView<bfloat16 const>(d_x.data(), t, h), MatrixView<bfloat16>(d_perm.data(), t * k, h));
    // permuted rows stand in for expert outputs: y = sum_j w_j * x_t
    unpermute(stream.ref(), plan, MatrixView<bfloat16 const>(d_perm.data(), t * k, h),
              MatrixView<float const>(d_w.data(), t, k), MatrixView<bfloat16>(y, t, h));
  };
  pipeline(d_y.data());  // eager
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  EPX_CUDA_CHECK(cudaStreamBeginCapture(stream.s, cudaStreamCaptureModeGlobal));
  pipeline(d_y2.data());  // any allocation or sync here would break the capture
  EPX_CUDA_CHECK(cudaStreamEndCapture(stream.s, &graph));
  EPX_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  d_y2.poison(0xcd);
  for (int replay = 0; replay < 3; ++replay) EPX_CUDA_CHECK(cudaGraphLaunch(exec, stream.s));
  EPX_CUDA_CHECK(cudaStreamSynchronize(stream.s));
  EPX_CUDA_CHECK(cudaGraphExecDestroy(exec));
  EPX_CUDA_CHECK(cudaGraphDestroy(graph));
  auto const y1 = d_y.to_host(), y2 = d_y2.to_host();
  CHECK(std::memcmp(y1.data(), y2.data(), y1.size() * sizeof(bfloat16)) == 0);
  // and y is really sum_j w_j x_t (token 0, first element)
  float want = 0.0f;
  for (std::int32_t j = 0; j < k; ++j)
    if (ids[static_cast<std::size_t>(j)] >= 0) want += weights[static_cast<std::size_t>(j)] * static_cast<float>(x[0]);
  CHECK(static_cast<float>(y1[0]) == doctest::Approx(want).epsilon(1e-2));
}

TEST_CASE("Permute::permute[cuda]: a host StreamRef is refused") {
  std::vector<std::int32_t> ids{0, 1};
  std::vector<std::byte> ws(plan_workspace_bytes(1, 2, 2));
  Status st;
  RoutingPlan const plan = make_plan(Host{}, MatrixView<std::int32_t const>(ids.data(), 1, 2), 2, {0, 2},
                                     Workspace(ws.data(), ws.size()), st);
  std::vector<float> x(8), xp(16);
  CHECK_THROWS_WITH_AS(permute(StreamRef::host(), plan, MatrixView<float const>(x.data(), 1, 8), MatrixView<float>(xp.data(), 2, 8)),
                       doctest::Contains("permute: stream = StreamRef::host()"), Error);
}
