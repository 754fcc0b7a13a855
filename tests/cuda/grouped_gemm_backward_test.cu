// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// grouped_gemm_backward_data and grouped_gemm_backward_weight on the GPU against their Host twins,
// BITWISE: random inputs (never zeros), every output poisoned first. da: the rows of the groups
// equal the Host's bytes, rows outside [offsets[0], offsets[G]) and the padding of padded rows keep
// the poison. db and d_bias: every group's bytes equal the Host's (zeros for empty groups), guard
// elements past them keep the poison. A second run is bitwise equal to the first.
//
// Covered: fp32, bf16 and fp16 inputs, fp32 and 16-bit outputs, fp32 dc with 16-bit weights and
// activations (the layer's dh); empty groups first, in the middle and last; ragged rows; one group;
// > 256 groups; N and K of 1, 3, 65, 130 (tile tails) and 64 (whole tiles); N = 0 (da zeros), K = 0
// (d_bias only), no rows at all (db zeros); offsets that decrease or leave the buffer (clamped:
// groups clamped empty get zeros); d_bias nullptr and not; padded leading dimensions; capture in a
// CUDA graph; the argument errors. EPX_TEST_SMALL=1 (compute-sanitizer runs) shrinks the large cases.

#include "../common/test_util.hpp"
#include "device_buffer.cuh"

#include <epx/cuda.cuh>
#include <epx/cuda/grouped_gemm_backward.cuh>
#include <epx/host/grouped_gemm_backward.hpp>

#include <cstring>
#include <numeric>
#include <vector>

using namespace epx;
using test::CudaStream;
using test::DeviceBuffer;

namespace {

constexpr unsigned char kPoison = 0xcd;
constexpr std::int64_t kGuard = 37;  // poisoned elements past db and d_bias

//! One problem: the groups' row counts, rows before the first group and after the last, N, K, the
//! padding of the row-major matrices' rows (ld = cols + pad).
struct Problem {
  std::vector<std::int32_t> counts;
  std::int32_t first_row = 3;
  std::int64_t tail_rows = 5;
  std::int64_t n = 65;
  std::int64_t k = 130;
  std::int64_t pad = 0;
};

std::vector<std::int32_t> offsets_of(Problem const& p) {
  std::vector<std::int32_t> offsets(p.counts.size() + 1, p.first_row);
  for (std::size_t g = 0; g < p.counts.size(); ++g) offsets[g + 1] = offsets[g] + p.counts[g];
  return offsets;
}

std::int64_t rows_of(Problem const& p) { return offsets_of(p).back() + p.tail_rows; }

template <class T>
bool poisoned(T const* p, std::size_t count) {
  auto const* b = reinterpret_cast<unsigned char const*>(p);
  return std::all_of(b, b + count * sizeof(T), [](unsigned char v) { return v == kPoison; });
}

template <class T>
bool same_bytes(T const* a, T const* b, std::size_t count) {
  return count == 0 || std::memcmp(a, b, count * sizeof(T)) == 0;
}

//! `dense` [rows, cols] laid out with rows ld apart (the padding random too: it must not be read
//! into any result).
template <class T>
std::vector<T> spread(std::vector<T> const& dense, std::int64_t rows, std::int64_t cols, std::int64_t ld,
                      std::mt19937_64& rng) {
  auto out = test::random_vector<T>(static_cast<std::size_t>(std::max<std::int64_t>(rows * ld, 1)), rng);
  for (std::int64_t r = 0; r < rows; ++r) std::copy_n(dense.data() + r * cols, cols, out.data() + r * ld);
  return out;
}

template <class T>
int nonzero(std::vector<T> const& v) {
  return static_cast<int>(std::count_if(v.begin(), v.end(), [](T x) { return to_float(x) != 0.0f; }));
}

template <class TDc, class TB, class TDa>
void check_data(Problem const& p, std::mt19937_64& rng, std::vector<std::int32_t> device_offsets = {}) {
  CAPTURE(p.counts.size());
  CAPTURE(p.n);
  CAPTURE(p.k);
  CAPTURE(p.pad);
  auto const offsets = offsets_of(p);
  bool const clamped = !device_offsets.empty();  // the device gets other (invalid) offsets
  if (!clamped) device_offsets = offsets;
  auto const groups = static_cast<std::int64_t>(p.counts.size());
  std::int64_t const m = rows_of(p), n = p.n, k = p.k, ldc = n + p.pad, ldd = k + p.pad;
  auto const dc = test::random_vector<TDc>(static_cast<std::size_t>(m * n), rng);
  auto const b = test::random_vector<TB>(static_cast<std::size_t>(groups * n * k), rng,
                                         1.0f / std::sqrt(static_cast<float>(std::max<std::int64_t>(n, 1))));

  // Host reference: rows of no group stay at the poison's value. Clamped offsets: group by group,
  // each over its clamped range (detail::group_rows, what the device does).
  std::vector<TDa> want(static_cast<std::size_t>(m * k));
  std::memset(static_cast<void*>(want.data()), kPoison, want.size() * sizeof(TDa));
  std::vector<char> written(static_cast<std::size_t>(m), 0);
  for (std::int64_t g = 0; g < groups; ++g) {
    detail::GroupRows const r = detail::group_rows(device_offsets.data(), static_cast<int>(g), m);
    std::fill(written.begin() + r.begin, written.begin() + r.end, 1);
  }
  if (clamped) {
    for (std::int64_t g = 0; g < groups; ++g) {
      detail::GroupRows const r = detail::group_rows(device_offsets.data(), static_cast<int>(g), m);
      std::vector<std::int32_t> const one{static_cast<std::int32_t>(r.begin), static_cast<std::int32_t>(r.end)};
      grouped_gemm_backward_data(Host{}, MatrixView<TDc const>(dc.data(), m, n),
                                 BatchedMatrixView<TB const>{b.data() + g * n * k, 1, n, k}, one,
                                 MatrixView<TDa>(want.data(), m, k));
    }
  } else {
    grouped_gemm_backward_data(Host{}, MatrixView<TDc const>(dc.data(), m, n),
                               BatchedMatrixView<TB const>{b.data(), groups, n, k}, offsets,
                               MatrixView<TDa>(want.data(), m, k));
  }

  CudaStream stream;
  DeviceBuffer<TDc> d_dc(spread(dc, m, n, ldc, rng));
  DeviceBuffer<TB> d_b(b);
  DeviceBuffer<std::int32_t> d_offsets(device_offsets);
  auto run = [&] {
    DeviceBuffer<TDa> d_da(static_cast<std::size_t>(std::max<std::int64_t>(m * ldd, 1)));
    d_da.poison(kPoison);
    grouped_gemm_backward_data(stream.ref(), MatrixView<TDc const>(d_dc.data(), m, n, ldc),
                               BatchedMatrixView<TB const>{d_b.data(), groups, n, k},
                               std::span<std::int32_t const>(d_offsets.data(), device_offsets.size()),
                               MatrixView<TDa>(d_da.data(), m, k, ldd));
    stream.sync();
    return d_da.to_host();
  };
  auto const first = run();
  int wrong_rows = 0, touched_outside = 0, padding_touched = 0;
  for (std::int64_t r = 0; r < m; ++r) {
    TDa const* got = first.data() + r * ldd;
    if (written[static_cast<std::size_t>(r)] != 0)
      wrong_rows += same_bytes(got, want.data() + r * k, static_cast<std::size_t>(k)) ? 0 : 1;
    else
      touched_outside += poisoned(got, static_cast<std::size_t>(k)) ? 0 : 1;
    padding_touched += poisoned(got + k, static_cast<std::size_t>(p.pad)) ? 0 : 1;
  }
  CHECK(wrong_rows == 0);
  CHECK(touched_outside == 0);
  CHECK(padding_touched == 0);
  int real = 0;  // the comparison saw real sums: nonzero outputs in the written rows
  for (std::int64_t r = 0; r < m; ++r)
    for (std::int64_t c = 0; c < k && written[static_cast<std::size_t>(r)] != 0; ++c)
      real += to_float(want[static_cast<std::size_t>(r * k + c)]) != 0.0f ? 1 : 0;
  if (n > 0 && k > 0 && std::accumulate(written.begin(), written.end(), 0) > 0) CHECK(real > 0);
  auto const second = run();
  CHECK(same_bytes(first.data(), second.data(), first.size()));
}

template <class TA, class TDc, class TDb>
void check_weight(Problem const& p, bool with_bias, std::mt19937_64& rng,
                  std::vector<std::int32_t> device_offsets = {}) {
  CAPTURE(p.counts.size());
  CAPTURE(p.n);
  CAPTURE(p.k);
  CAPTURE(p.pad);
  CAPTURE(with_bias);
  auto const offsets = offsets_of(p);
  bool const clamped = !device_offsets.empty();
  if (!clamped) device_offsets = offsets;
  auto const groups = static_cast<std::int64_t>(p.counts.size());
  std::int64_t const m = rows_of(p), n = p.n, k = p.k, lda = k + p.pad, ldc = n + p.pad;
  auto const a = test::random_vector<TA>(static_cast<std::size_t>(m * k), rng);
  auto const dc = test::random_vector<TDc>(static_cast<std::size_t>(m * n), rng);

  std::vector<TDb> want_db(static_cast<std::size_t>(groups * n * k)), want_bias(static_cast<std::size_t>(groups * n));
  std::memset(static_cast<void*>(want_db.data()), kPoison, want_db.size() * sizeof(TDb));
  std::memset(static_cast<void*>(want_bias.data()), kPoison, want_bias.size() * sizeof(TDb));
  if (clamped) {
    for (std::int64_t g = 0; g < groups; ++g) {
      detail::GroupRows const r = detail::group_rows(device_offsets.data(), static_cast<int>(g), m);
      std::vector<std::int32_t> const one{static_cast<std::int32_t>(r.begin), static_cast<std::int32_t>(r.end)};
      grouped_gemm_backward_weight(Host{}, MatrixView<TA const>(a.data(), m, k), MatrixView<TDc const>(dc.data(), m, n),
                                   one, BatchedMatrixView<TDb>{want_db.data() + g * n * k, 1, n, k},
                                   with_bias ? want_bias.data() + g * n : nullptr);
    }
  } else {
    grouped_gemm_backward_weight(Host{}, MatrixView<TA const>(a.data(), m, k), MatrixView<TDc const>(dc.data(), m, n),
                                 offsets, BatchedMatrixView<TDb>{want_db.data(), groups, n, k},
                                 with_bias ? want_bias.data() : nullptr);
  }

  CudaStream stream;
  DeviceBuffer<TA> d_a(spread(a, m, k, lda, rng));
  DeviceBuffer<TDc> d_dc(spread(dc, m, n, ldc, rng));
  DeviceBuffer<std::int32_t> d_offsets(device_offsets);
  struct Outputs {
    std::vector<TDb> db, bias;
  };
  auto run = [&] {
    DeviceBuffer<TDb> d_db(static_cast<std::size_t>(groups * n * k + kGuard)),
        d_bias(static_cast<std::size_t>(groups * n + kGuard));
    d_db.poison(kPoison);
    d_bias.poison(kPoison);
    grouped_gemm_backward_weight(
        stream.ref(), MatrixView<TA const>(d_a.data(), m, k, lda), MatrixView<TDc const>(d_dc.data(), m, n, ldc),
        std::span<std::int32_t const>(d_offsets.data(), device_offsets.size()),
        BatchedMatrixView<TDb>{d_db.data(), groups, n, k}, with_bias ? d_bias.data() : nullptr);
    stream.sync();
    return Outputs{d_db.to_host(), d_bias.to_host()};
  };
  auto const first = run();
  CHECK(same_bytes(first.db.data(), want_db.data(), want_db.size()));
  CHECK(poisoned(first.db.data() + want_db.size(), kGuard));
  if (with_bias)
    CHECK(same_bytes(first.bias.data(), want_bias.data(), want_bias.size()));
  else
    CHECK(poisoned(first.bias.data(), first.bias.size()));  // never written without a pointer
  CHECK(poisoned(first.bias.data() + want_bias.size(), kGuard));
  // Empty groups are zeros (the Host's, compared above); groups with rows give real sums.
  bool const has_rows = std::any_of(p.counts.begin(), p.counts.end(), [](std::int32_t c) { return c > 0; });
  if (has_rows && n > 0 && k > 0 && !clamped) CHECK(nonzero(want_db) > 0);
  auto const second = run();
  CHECK(same_bytes(first.db.data(), second.db.data(), first.db.size()));
  CHECK(same_bytes(first.bias.data(), second.bias.data(), first.bias.size()));
}

//! The problems every type combination runs.
std::vector<Problem> problems(std::mt19937_64& rng) {
  // Empty first, in the middle and last; around the 16-row slices and 64-row tiles.
  std::vector<std::int32_t> const mixed = {0, 1, 7, 63, 64, 65, 0, 130, 16, 17, 129, 0};
  std::vector<Problem> out;
  for (auto [n, k] : {std::pair<std::int64_t, std::int64_t>{1, 1}, {3, 65}, {65, 3}, {64, 64}, {130, 130}})
    out.push_back({.counts = mixed, .n = n, .k = k});
  out.push_back({.counts = mixed, .n = 65, .k = 130, .pad = 5});  // padded rows (odd: unaligned rows)
  out.push_back({.counts = mixed, .first_row = 0, .tail_rows = 0, .n = 3, .k = 3, .pad = 1});
  out.push_back({.counts = {100}, .n = 130, .k = 65});                   // one group
  out.push_back({.counts = {0}, .n = 65, .k = 65});                      // one group, empty
  out.push_back({.counts = {0, 0, 0}, .first_row = 0, .tail_rows = 0});  // no rows at all
  out.push_back({.counts = {5, 0, 9}, .n = 0, .k = 65});                 // N = 0: da zeros
  out.push_back({.counts = {5, 0, 9}, .n = 65, .k = 0});                 // K = 0: d_bias only
  // > 256 groups, ragged, a quarter empty.
  std::uniform_int_distribution<std::int32_t> count(1, 20), pick(0, 3);
  Problem many{.counts = {}, .n = 65, .k = 3};
  for (int g = 0; g < 300; ++g) many.counts.push_back(pick(rng) == 0 ? 0 : count(rng));
  out.push_back(many);
  // Model-like: many rows per group, several tiles of N and K (one group of one row too).
  std::int32_t const big = test::pick_size<std::int32_t>(1500, 90);
  std::int64_t const wide = test::pick_size<std::int64_t>(320, 70);
  out.push_back({.counts = {big, 1, 0, big / 3}, .n = wide, .k = wide + 8, .pad = 8});
  return out;
}

//! The problems a run checks: all of them, or under EPX_TEST_SMALL (the compute-sanitizer runs,
//! racecheck ~1000x slower) every fourth and the model-like last one.
std::vector<Problem> problems_to_run(std::mt19937_64& rng) {
  auto all = problems(rng);
  if (!test::small_sizes()) return all;
  std::vector<Problem> some;
  for (std::size_t i = 0; i < all.size(); ++i)
    if (i % 4 == 0 || i + 1 == all.size()) some.push_back(all[i]);
  return some;
}

template <class TDc, class TB, class TDa>
void check_data_all(std::mt19937_64& rng) {
  for (Problem const& p : problems_to_run(rng)) check_data<TDc, TB, TDa>(p, rng);
  // Offsets that decrease or leave the buffer: each group clamped into [0, M] (no overlap here).
  Problem const p{.counts = {0, 0, 0, 0}, .first_row = 0, .tail_rows = 60, .n = 65, .k = 70};
  check_data<TDc, TB, TDa>(p, rng, {5, 2, 300, 40, 7});
}

template <class TA, class TDc, class TDb>
void check_weight_all(std::mt19937_64& rng) {
  for (Problem const& p : problems_to_run(rng))
    for (bool with_bias : {true, false})
      if (with_bias || !test::small_sizes()) check_weight<TA, TDc, TDb>(p, with_bias, rng);
  Problem const p{.counts = {0, 0, 0, 0}, .first_row = 0, .tail_rows = 60, .n = 65, .k = 70};
  check_weight<TA, TDc, TDb>(p, true, rng, {5, 2, 300, 40, 7});  // groups 0, 2, 3 clamped empty: zeros
}

}  // namespace

TEST_CASE("GroupedGemmBackward::data[cuda]: fp32, bf16 and fp16 equal the Host twin bitwise") {
  EPX_TEST_SEEDED_RNG(rng);
  check_data_all<float, float, float>(rng);
  check_data_all<bfloat16, bfloat16, float>(rng);
  check_data_all<bfloat16, bfloat16, bfloat16>(rng);
  check_data_all<epx::half, epx::half, epx::half>(rng);  // CUDA has a global ::half too
}

TEST_CASE("GroupedGemmBackward::data[cuda]: mixed types (the layer's dh and dy) equal the Host bitwise") {
  EPX_TEST_SEEDED_RNG(rng);
  check_data_all<float, bfloat16, float>(rng);
  check_data_all<float, bfloat16, bfloat16>(rng);
  check_data_all<float, epx::half, epx::half>(rng);
  check_data_all<epx::half, epx::half, float>(rng);  // 16-bit dy, fp32 d_act (the down projection's)
}

TEST_CASE("GroupedGemmBackward::weight[cuda]: fp32, bf16 and fp16 equal the Host twin bitwise") {
  EPX_TEST_SEEDED_RNG(rng);
  check_weight_all<float, float, float>(rng);
  check_weight_all<bfloat16, bfloat16, float>(rng);
  check_weight_all<epx::half, epx::half, epx::half>(rng);
}

TEST_CASE("GroupedGemmBackward::weight[cuda]: mixed types (16-bit activations, fp32 or 16-bit dc) equal the Host") {
  EPX_TEST_SEEDED_RNG(rng);
  check_weight_all<bfloat16, float, bfloat16>(rng);
  check_weight_all<epx::half, float, float>(rng);
  check_weight_all<epx::half, float, epx::half>(rng);
  check_weight_all<bfloat16, bfloat16, bfloat16>(rng);
}

TEST_CASE("GroupedGemmBackward::graph[cuda]: both gradients captured in a CUDA graph replay the eager results") {
  EPX_TEST_SEEDED_RNG(rng);
  Problem const p{.counts = {0, 40, 7, 0, 100}, .n = 96, .k = 72};
  auto const offsets = offsets_of(p);
  auto const g = static_cast<std::int64_t>(p.counts.size());
  std::int64_t const m = rows_of(p), n = p.n, k = p.k;
  CudaStream stream;
  DeviceBuffer<bfloat16> d_a(test::random_vector<bfloat16>(static_cast<std::size_t>(m * k), rng)),
      d_b(test::random_vector<bfloat16>(static_cast<std::size_t>(g * n * k), rng));
  DeviceBuffer<float> d_dc(test::random_vector<float>(static_cast<std::size_t>(m * n), rng));
  DeviceBuffer<std::int32_t> d_offsets(offsets);
  std::span<std::int32_t const> const off(d_offsets.data(), offsets.size());
  auto backward = [&](DeviceBuffer<float>& da, DeviceBuffer<bfloat16>& db, DeviceBuffer<bfloat16>& dbias) {
    grouped_gemm_backward_data(stream.ref(), MatrixView<float const>(d_dc.data(), m, n),
                               BatchedMatrixView<bfloat16 const>{d_b.data(), g, n, k}, off,
                               MatrixView<float>(da.data(), m, k));
    grouped_gemm_backward_weight(stream.ref(), MatrixView<bfloat16 const>(d_a.data(), m, k),
                                 MatrixView<float const>(d_dc.data(), m, n), off,
                                 BatchedMatrixView<bfloat16>{db.data(), g, n, k}, dbias.data());
  };
  auto const da_size = static_cast<std::size_t>(m * k), db_size = static_cast<std::size_t>(g * n * k);
  DeviceBuffer<float> da(da_size), da2(da_size);
  DeviceBuffer<bfloat16> db(db_size), db2(db_size), dbias(static_cast<std::size_t>(g * n)),
      dbias2(static_cast<std::size_t>(g * n));
  da.poison(kPoison);
  da2.poison(kPoison);
  backward(da, db, dbias);  // eager
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  EPX_CUDA_CHECK(cudaStreamBeginCapture(stream.s, cudaStreamCaptureModeGlobal));
  backward(da2, db2, dbias2);  // an allocation or a sync here would break the capture
  EPX_CUDA_CHECK(cudaStreamEndCapture(stream.s, &graph));
  EPX_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  db2.poison(kPoison);
  dbias2.poison(kPoison);
  for (int replay = 0; replay < 2; ++replay) EPX_CUDA_CHECK(cudaGraphLaunch(exec, stream.s));
  stream.sync();
  EPX_CUDA_CHECK(cudaGraphExecDestroy(exec));
  EPX_CUDA_CHECK(cudaGraphDestroy(graph));
  auto const h_da = da.to_host(), h_da2 = da2.to_host();
  auto const h_db = db.to_host(), h_db2 = db2.to_host(), h_bias = dbias.to_host(), h_bias2 = dbias2.to_host();
  CHECK(same_bytes(h_da.data(), h_da2.data(), h_da.size()));
  CHECK(same_bytes(h_db.data(), h_db2.data(), h_db.size()));
  CHECK(same_bytes(h_bias.data(), h_bias2.data(), h_bias.size()));
  CHECK(nonzero(h_db) > 0);
}

TEST_CASE("GroupedGemmBackward::errors[cuda]: argument errors name the parameter; a host StreamRef is refused") {
  std::int64_t const m = 5, n = 6, k = 4, g = 2;
  CudaStream stream;
  DeviceBuffer<float> buf(256), out(256);
  DeviceBuffer<std::int32_t> d_offsets(std::vector<std::int32_t>{0, 2, 5});
  std::span<std::int32_t const> const off(d_offsets.data(), 3);
  MatrixView<float const> const dc(buf.data(), m, n), a(buf.data(), m, k);
  BatchedMatrixView<float const> const b{buf.data(), g, n, k};
  MatrixView<float> const da(out.data(), m, k);
  BatchedMatrixView<float> const db{out.data(), g, n, k};

  // Data gradient.
  auto data = [&](StreamRef s, MatrixView<float const> c, BatchedMatrixView<float const> w,
                  std::span<std::int32_t const> o, MatrixView<float> d) { grouped_gemm_backward_data(s, c, w, o, d); };
  test::check_throws(Errc::kInvalidArgument, "grouped_gemm_backward_data: stream = StreamRef::host()",
                     [&] { data(StreamRef::host(), dc, b, off, da); });
  test::check_throws(Errc::kInvalidArgument, "grouped_gemm_backward_data: dc has rows = 5, cols = 6, ld = 3",
                     [&] { data(stream.ref(), MatrixView<float const>(buf.data(), m, n, 3), b, off, da); });
  test::check_throws(Errc::kInvalidArgument, "grouped_gemm_backward_data: dc.data = nullptr",
                     [&] { data(stream.ref(), MatrixView<float const>(nullptr, m, n), b, off, da); });
  test::check_throws(Errc::kShapeMismatch,
                     "grouped_gemm_backward_data: b (batch, rows, cols) = (2, 5, 4), expected (any, 6, any)", [&] {
                       data(stream.ref(), dc, {buf.data(), g, n - 1, k}, off, da);
                     });
  test::check_throws(Errc::kInvalidArgument, "grouped_gemm_backward_data: b.data = nullptr", [&] {
    data(stream.ref(), dc, {nullptr, g, n, k}, off, da);
  });
  test::check_throws(Errc::kShapeMismatch, "grouped_gemm_backward_data: da.rows = 4, expected 5",
                     [&] { data(stream.ref(), dc, b, off, MatrixView<float>(out.data(), m - 1, k)); });
  test::check_throws(Errc::kShapeMismatch, "grouped_gemm_backward_data: da.cols = 3, expected 4",
                     [&] { data(stream.ref(), dc, b, off, MatrixView<float>(out.data(), m, k - 1)); });
  test::check_throws(Errc::kInvalidArgument, "grouped_gemm_backward_data: da.data = nullptr",
                     [&] { data(stream.ref(), dc, b, off, MatrixView<float>(nullptr, m, k)); });
  test::check_throws(Errc::kShapeMismatch, "grouped_gemm_backward_data: offsets.size() = 2, expected b.batch + 1 = 3",
                     [&] { data(stream.ref(), dc, b, off.first(2), da); });
  test::check_throws(Errc::kInvalidArgument, "grouped_gemm_backward_data: offsets.data() = nullptr", [&] {
    data(stream.ref(), dc, b, std::span<std::int32_t const>(static_cast<std::int32_t const*>(nullptr), 3), da);
  });
  {  // More groups than the scheduler's shared-memory prefix holds (N = 0: no weights to allocate).
    auto const groups = static_cast<std::int64_t>(detail::kMaxGemmGroups) + 1;
    DeviceBuffer<std::int32_t> many(static_cast<std::size_t>(groups) + 1);
    test::check_throws(Errc::kUnsupported, "grouped_gemm_backward_data: b.batch (groups) = 4097, expected <= 4096",
                       [&] {
                         data(stream.ref(), MatrixView<float const>(buf.data(), m, 0), {nullptr, groups, 0, k},
                              std::span<std::int32_t const>(many.data(), static_cast<std::size_t>(groups) + 1), da);
                       });
  }

  // Weight gradient.
  auto weight = [&](StreamRef s, MatrixView<float const> x, MatrixView<float const> c, std::span<std::int32_t const> o,
                    BatchedMatrixView<float> d, float* bias) { grouped_gemm_backward_weight(s, x, c, o, d, bias); };
  float* const bias = out.data() + 128;
  test::check_throws(Errc::kInvalidArgument, "grouped_gemm_backward_weight: stream = StreamRef::host()",
                     [&] { weight(StreamRef::host(), a, dc, off, db, bias); });
  test::check_throws(Errc::kInvalidArgument, "grouped_gemm_backward_weight: a has rows = 5, cols = 4, ld = 2",
                     [&] { weight(stream.ref(), MatrixView<float const>(buf.data(), m, k, 2), dc, off, db, bias); });
  test::check_throws(Errc::kInvalidArgument, "grouped_gemm_backward_weight: a.data = nullptr",
                     [&] { weight(stream.ref(), MatrixView<float const>(nullptr, m, k), dc, off, db, bias); });
  test::check_throws(Errc::kShapeMismatch, "grouped_gemm_backward_weight: dc.rows = 4, expected 5",
                     [&] { weight(stream.ref(), a, MatrixView<float const>(buf.data(), m - 1, n), off, db, bias); });
  test::check_throws(Errc::kInvalidArgument, "grouped_gemm_backward_weight: dc.data = nullptr",
                     [&] { weight(stream.ref(), a, MatrixView<float const>(nullptr, m, n), off, db, bias); });
  test::check_throws(Errc::kShapeMismatch,
                     "grouped_gemm_backward_weight: db (batch, rows, cols) = (2, 6, 3), expected (any, 6, 4)", [&] {
                       weight(stream.ref(), a, dc, off, {out.data(), g, n, k - 1}, bias);
                     });
  test::check_throws(Errc::kShapeMismatch,
                     "grouped_gemm_backward_weight: db (batch, rows, cols) = (2, 7, 4), expected (any, 6, 4)", [&] {
                       weight(stream.ref(), a, dc, off, {out.data(), g, n + 1, k}, bias);
                     });
  test::check_throws(Errc::kInvalidArgument, "grouped_gemm_backward_weight: db.data = nullptr", [&] {
    weight(stream.ref(), a, dc, off, {nullptr, g, n, k}, bias);
  });
  test::check_throws(Errc::kShapeMismatch,
                     "grouped_gemm_backward_weight: offsets.size() = 3, expected db.batch + 1 = 4", [&] {
                       weight(stream.ref(), a, dc, off, {out.data(), g + 1, n, k}, bias);
                     });
  test::check_throws(Errc::kInvalidArgument, "grouped_gemm_backward_weight: offsets.data() = nullptr", [&] {
    weight(stream.ref(), a, dc, std::span<std::int32_t const>(static_cast<std::int32_t const*>(nullptr), 3), db, bias);
  });
  stream.sync();  // nothing was launched by a refused call
}
