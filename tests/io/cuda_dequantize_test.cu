// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// Device dequantisation (cuda_dequantize.cuh) against the host's decode, bit for bit: the FP8 and
// MXFP4 kernels on random bytes and scales (every FP8 code, NaN scales), odd shapes (rows and
// columns not multiples of 128 or 32, sub-matrices at odd offsets), row-major with a padded leading
// dimension and transposed, into destinations poisoned first (padding must stay poisoned); their
// argument errors; and load_layer_to_device compiled by nvcc (Dequantize::kAuto / kDevice: stored
// bytes uploaded, decoded by the kernels) against load_layer on the host, every rank of an uneven
// placement, tiny and large staging. A CUDA test (exit 77 without a GPU).

#include "io_test_util.hpp"

#include <epx/io/cuda_dequantize.cuh>
#include <epx/io/cuda_upload.hpp>

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstring>

using namespace epx;
using namespace epx::test::io;

namespace {

template <class T>
struct DeviceArray {
  T* data = nullptr;
  std::size_t size = 0;
  explicit DeviceArray(std::size_t n) : size(n) {
    if (n > 0) EPX_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&data), n * sizeof(T)));
    if (n > 0) EPX_CUDA_CHECK(cudaMemset(data, 0xcd, n * sizeof(T)));  // poisoned: every element must be written
  }
  explicit DeviceArray(std::vector<T> const& host) : DeviceArray(host.size()) {
    if (size > 0) EPX_CUDA_CHECK(cudaMemcpy(data, host.data(), size * sizeof(T), cudaMemcpyHostToDevice));
  }
  DeviceArray(DeviceArray const&) = delete;
  DeviceArray& operator=(DeviceArray const&) = delete;
  ~DeviceArray() {
    if (data != nullptr) (void)cudaFree(data);
  }
  std::span<T> span() { return {data, size}; }
  std::vector<T> to_host() const {
    std::vector<T> out(size);
    if (size > 0) EPX_CUDA_CHECK(cudaMemcpy(out.data(), data, size * sizeof(T), cudaMemcpyDeviceToHost));
    return out;
  }
};

struct Stream {
  cudaStream_t s = nullptr;
  Stream() { EPX_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking)); }
  Stream(Stream const&) = delete;
  Stream& operator=(Stream const&) = delete;
  ~Stream() { (void)cudaStreamDestroy(s); }
  StreamRef ref() const { return StreamRef(s); }
};

template <class A>
void check_same_bits(std::vector<A> const& device, std::vector<A> const& host, char const* what) {
  CAPTURE(std::string(what));
  REQUIRE(device.size() == host.size());
  std::size_t mismatches = 0, first = host.size();
  for (std::size_t i = 0; i < host.size(); ++i)
    if (bits_of(device[i]) != bits_of(host[i])) {
      ++mismatches;
      first = std::min(first, i);
    }
  CAPTURE(first);
  std::uint32_t const got = first < host.size() ? bits_of(device[first]) : 0u;
  std::uint32_t const want = first < host.size() ? bits_of(host[first]) : 0u;
  CAPTURE(got);
  CAPTURE(want);
  CHECK(mismatches == 0);
}

template <class T>
T poison() {
  T v;
  std::memset(static_cast<void*>(&v), 0xcd, sizeof(T));
  return v;
}

float random_scale(std::mt19937_64& rng) {
  std::uniform_real_distribution<float> mantissa(1.0f, 2.0f);
  std::uniform_int_distribution<int> exponent(-20, 20);
  float const s = std::ldexp(mantissa(rng), exponent(rng));
  return rng() % 8 == 0 ? -s : s;
}

//! The host's expected destination: poisoned, then element (i, j) at i * row_step + j * col_step.
template <class T, class Source>
std::vector<T> expected(Source const& host_src, std::int64_t rows, std::int64_t cols, std::int64_t row_step,
                        std::int64_t col_step, std::size_t size) {
  std::vector<T> out(size, poison<T>());
  for (std::int64_t i = 0; i < rows; ++i)
    for (std::int64_t j = 0; j < cols; ++j)
      out[static_cast<std::size_t>(i * row_step + j * col_step)] = io::detail::round_to<T>(host_src.at(i, j));
  return out;
}

template <class T>
void check_fp8_kernel(std::mt19937_64& rng, std::int64_t rows, std::int64_t cols, std::int64_t br, std::int64_t bc,
                      bool transposed) {
  CAPTURE(rows);
  CAPTURE(cols);
  CAPTURE(br);
  CAPTURE(bc);
  CAPTURE(transposed);
  // A stored [R, C] matrix with 3 extra columns; the sub-matrix starts at row r0, column c0.
  std::int64_t const r0 = rows % 5 + 1, c0 = cols % 7 + 1, stored_rows = r0 + rows, ld = c0 + cols + 3;
  std::int64_t const scale_cols = io::num_scale_blocks(ld, bc), scale_rows = io::num_scale_blocks(stored_rows, br);
  std::vector<std::uint8_t> values(static_cast<std::size_t>(stored_rows * ld));
  for (auto& v : values) v = static_cast<std::uint8_t>(rng());
  for (std::size_t k = 0; k < std::min<std::size_t>(256, values.size()); ++k) values[k] = static_cast<std::uint8_t>(k);
  std::shuffle(values.begin(), values.end(), rng);
  std::vector<float> scales(static_cast<std::size_t>(scale_rows * scale_cols));
  for (auto& s : scales) s = random_scale(rng);
  DeviceArray<std::uint8_t> d_values(values);
  DeviceArray<float> d_scales(scales);
  // Destination: row-major with a padded leading dimension, or transposed ([cols, rows] padded).
  std::int64_t const dst_ld = (transposed ? rows : cols) + 5;
  std::int64_t const row_step = transposed ? 1 : dst_ld, col_step = transposed ? dst_ld : 1;
  std::size_t const dst_size = static_cast<std::size_t>((transposed ? cols : rows) * dst_ld);
  DeviceArray<T> dst(dst_size);
  io::Fp8Source const host_src{.values = values.data() + r0 * ld,
                               .values_ld = ld,
                               .scales = scales.data(),
                               .scale_ld = scale_cols,
                               .row0 = r0,
                               .col0 = c0,
                               .block_rows = br,
                               .block_cols = bc};
  io::Fp8Source device_src = host_src;
  device_src.values = d_values.data + r0 * ld;
  device_src.scales = d_scales.data;
  Stream stream;
  io::dequantize_fp8_on_device<T>(device_src, rows, cols, io::DequantizeOut<T>{dst.data, row_step, col_step},
                                  stream.ref());
  EPX_CUDA_CHECK(cudaStreamSynchronize(stream.s));
  check_same_bits(dst.to_host(), expected<T>(host_src, rows, cols, row_step, col_step, dst_size), "fp8 kernel");
}

template <class T>
void check_mxfp4_kernel(std::mt19937_64& rng, std::int64_t rows, std::int64_t cols, bool transposed) {
  CAPTURE(rows);
  CAPTURE(cols);
  CAPTURE(transposed);
  // Stored rows of `stored_cols` elements (a multiple of 32); the sub-matrix starts at odd column c0.
  std::int64_t const c0 = 2 * (cols % 5) + 1;
  std::int64_t const stored_cols = io::num_scale_blocks(c0 + cols, 32) * 32 + 32;
  std::int64_t const row_bytes = stored_cols / 2, row_scales = stored_cols / 32;
  std::vector<std::uint8_t> blocks(static_cast<std::size_t>(rows * row_bytes)),
      scales(static_cast<std::size_t>(rows * row_scales));
  for (auto& b : blocks) b = static_cast<std::uint8_t>(rng());
  for (auto& s : scales) s = static_cast<std::uint8_t>(rng() % 8 == 0 ? rng() : 100 + rng() % 50);
  for (std::uint8_t const special : {0x00, 0xff, 0xfe, 0x01}) scales[rng() % scales.size()] = special;
  DeviceArray<std::uint8_t> d_blocks(blocks), d_scales(scales);
  std::int64_t const dst_ld = (transposed ? rows : cols) + 3;
  std::int64_t const row_step = transposed ? 1 : dst_ld, col_step = transposed ? dst_ld : 1;
  std::size_t const dst_size = static_cast<std::size_t>((transposed ? cols : rows) * dst_ld);
  DeviceArray<T> dst(dst_size);
  io::Mxfp4Source const host_src{
      .blocks = blocks.data(), .blocks_ld = row_bytes, .scales = scales.data(), .scale_ld = row_scales, .col0 = c0};
  io::Mxfp4Source device_src = host_src;
  device_src.blocks = d_blocks.data;
  device_src.scales = d_scales.data;
  Stream stream;
  io::dequantize_mxfp4_on_device<T>(device_src, rows, cols, io::DequantizeOut<T>{dst.data, row_step, col_step},
                                    stream.ref());
  EPX_CUDA_CHECK(cudaStreamSynchronize(stream.s));
  check_same_bits(dst.to_host(), expected<T>(host_src, rows, cols, row_step, col_step, dst_size), "mxfp4 kernel");
}

template <class T>
void check_device_load(std::string const& family, Encoding enc, std::size_t staging_bytes, io::Dequantize mode) {
  EPX_TEST_SEEDED_RNG(rng);
  CAPTURE(family);
  CAPTURE(staging_bytes);
  CAPTURE(static_cast<int>(mode));
  CaseShape shape;
  shape.hidden = test::pick_size(160, 96);
  shape.intermediate = 96;
  TempDir dir;
  write_model(build_model(family, enc, shape, rng), dir.path());
  Stream stream;
  auto const placement = ExpertPlacement::from_counts(std::vector<std::int32_t>{2, 0, 3, 1});
  for (std::int32_t rank = 0; rank < placement.num_ranks(); ++rank) {
    CAPTURE(rank);
    io::Checkpoint host_ckpt(dir.path()), device_ckpt(dir.path());
    auto const model = io::read_model(host_ckpt, {family_named(family)});
    io::LayerRequest const request{.layer = shape.layer, .placement = placement, .rank = rank};
    io::HostLayerStorage<T> host(model, request);
    auto const on_host = io::load_layer(host_ckpt, model, request, host.buffers(), {.staging_bytes = staging_bytes});
    io::LayerSizes const sizes = io::layer_sizes(model, request);
    auto n = [](std::int64_t v) { return static_cast<std::size_t>(v); };
    DeviceArray<T> gate_up(n(sizes.gate_up)), down(n(sizes.down)), gate_up_bias(n(sizes.gate_up_bias)),
        down_bias(n(sizes.down_bias)), router_weight(n(sizes.router_weight)), router_bias(n(sizes.router_bias));
    DeviceArray<float> correction_bias(n(sizes.correction_bias));
    io::LayerBuffers<T> const buffers{gate_up.span(),       down.span(),        gate_up_bias.span(),   down_bias.span(),
                                      router_weight.span(), router_bias.span(), correction_bias.span()};
    auto const on_device = io::load_layer_to_device(device_ckpt, model, request, buffers, stream.ref(),
                                                    {.staging_bytes = staging_bytes, .dequantize = mode});
    check_same_bits(gate_up.to_host(), host.gate_up, "gate_up");
    check_same_bits(down.to_host(), host.down, "down");
    check_same_bits(gate_up_bias.to_host(), host.gate_up_bias, "gate_up_bias");
    check_same_bits(down_bias.to_host(), host.down_bias, "down_bias");
    check_same_bits(router_weight.to_host(), host.router_weight, "router_weight");
    check_same_bits(router_bias.to_host(), host.router_bias, "router_bias");
    check_same_bits(correction_bias.to_host(), host.correction_bias, "correction_bias");
    CHECK(on_device.stats.data_bytes == on_host.stats.data_bytes);  // the same bytes read from disk
    CHECK(on_device.config.weights.gate_up == static_cast<void const*>(gate_up.data));
  }
}

}  // namespace

TEST_CASE("io dequantize: the FP8 kernel equals the host decode, odd shapes, padded and transposed") {
  EPX_TEST_SEEDED_RNG(rng);
  for (auto [rows, cols, br, bc] : {std::array<std::int64_t, 4>{300, 257, 128, 128},
                                    {129, 130, 128, 128},
                                    {77, 45, 16, 32},
                                    {1, 3, 128, 128},
                                    {64, 200, 64, 128}}) {
    for (bool const transposed : {false, true}) {
      check_fp8_kernel<bfloat16>(rng, rows, cols, br, bc, transposed);
      check_fp8_kernel<epx::half>(rng, rows, cols, br, bc, transposed);
      check_fp8_kernel<float>(rng, rows, cols, br, bc, transposed);
    }
  }
}

TEST_CASE("io dequantize: the MXFP4 kernel equals the host decode, odd shapes, padded and transposed") {
  EPX_TEST_SEEDED_RNG(rng);
  for (auto [rows, cols] : {std::array<std::int64_t, 2>{131, 95}, {1, 1}, {45, 289}, {200, 64}, {2048, 300}}) {
    for (bool const transposed : {false, true}) {
      check_mxfp4_kernel<bfloat16>(rng, rows, cols, transposed);
      check_mxfp4_kernel<epx::half>(rng, rows, cols, transposed);
      check_mxfp4_kernel<float>(rng, rows, cols, transposed);
    }
  }
}

TEST_CASE("io dequantize: load_layer_to_device decoding on the device equals load_layer") {
  for (std::size_t staging : {std::size_t{4} << 10, std::size_t{64} << 20}) {
    for (io::Dequantize const mode : {io::Dequantize::kAuto, io::Dequantize::kDevice, io::Dequantize::kHost}) {
      check_device_load<bfloat16>("deepseek_v3", Encoding::kFp8, staging, mode);  // + fp32 correction bias
      check_device_load<bfloat16>("gpt_oss", Encoding::kMxfp4, staging, mode);    // transposed, biases
    }
    check_device_load<epx::half>("deepseek_v3", Encoding::kFp8, staging, io::Dequantize::kDevice);
    check_device_load<float>("gpt_oss", Encoding::kMxfp4, staging, io::Dequantize::kDevice);
    check_device_load<bfloat16>("qwen3_moe", Encoding::kF32, staging, io::Dequantize::kDevice);  // nothing quantised
  }
}

TEST_CASE("io dequantize: bad arguments are refused, naming the parameter") {
  Stream stream;
  DeviceArray<std::uint8_t> bytes(4096);
  DeviceArray<float> scales(64);
  DeviceArray<bfloat16> dst(4096);
  io::Fp8Source const fp8{.values = bytes.data, .values_ld = 64, .scales = scales.data, .scale_ld = 1};
  io::Mxfp4Source const mx{.blocks = bytes.data, .blocks_ld = 32, .scales = bytes.data, .scale_ld = 2};
  io::DequantizeOut<bfloat16> const out{dst.data, 64, 1};
  auto fp8_call = [&](io::Fp8Source const& s, std::int64_t rows, std::int64_t cols, io::DequantizeOut<bfloat16> o,
                      StreamRef st) { io::dequantize_fp8_on_device<bfloat16>(s, rows, cols, o, st); };
  auto mx_call = [&](io::Mxfp4Source const& s, std::int64_t rows, std::int64_t cols, io::DequantizeOut<bfloat16> o,
                     StreamRef st) { io::dequantize_mxfp4_on_device<bfloat16>(s, rows, cols, o, st); };
  test::check_throws(Errc::kInvalidArgument, "stream", [&] { fp8_call(fp8, 8, 64, out, StreamRef::host()); });
  test::check_throws(Errc::kInvalidArgument, "rows = -1", [&] { fp8_call(fp8, -1, 64, out, stream.ref()); });
  test::check_throws(Errc::kInvalidArgument, "cols = -2", [&] { mx_call(mx, 8, -2, out, stream.ref()); });
  test::check_throws(Errc::kInvalidArgument, "dst.data", [&] {
    fp8_call(fp8, 8, 64, io::DequantizeOut<bfloat16>{nullptr, 64, 1}, stream.ref());
  });
  test::check_throws(Errc::kInvalidArgument, "dst (row_step, col_step) = (32, 1)", [&] {
    fp8_call(fp8, 8, 64, io::DequantizeOut<bfloat16>{dst.data, 32, 1}, stream.ref());
  });
  test::check_throws(Errc::kInvalidArgument, "dst.col_step = 0", [&] {
    fp8_call(fp8, 8, 64, io::DequantizeOut<bfloat16>{dst.data, 64, 0}, stream.ref());
  });
  auto bad = fp8;
  bad.values_ld = 63;
  test::check_throws(Errc::kInvalidArgument, "src.values_ld = 63", [&] { fp8_call(bad, 8, 64, out, stream.ref()); });
  bad = fp8;
  bad.scale_ld = 0;
  test::check_throws(Errc::kInvalidArgument, "src.scale_ld = 0", [&] { fp8_call(bad, 8, 64, out, stream.ref()); });
  bad = fp8;
  bad.block_cols = 0;
  test::check_throws(Errc::kInvalidArgument, "src.block_cols = 0", [&] { fp8_call(bad, 8, 64, out, stream.ref()); });
  bad = fp8;
  bad.scales = nullptr;
  test::check_throws(Errc::kInvalidArgument, "src.scales", [&] { fp8_call(bad, 8, 64, out, stream.ref()); });
  bad = fp8;
  bad.row0 = -1;
  test::check_throws(Errc::kInvalidArgument, "src.row0 = -1", [&] { fp8_call(bad, 8, 64, out, stream.ref()); });
  auto bad_mx = mx;
  bad_mx.blocks_ld = 31;
  test::check_throws(Errc::kInvalidArgument, "src.blocks_ld = 31", [&] { mx_call(bad_mx, 8, 64, out, stream.ref()); });
  bad_mx = mx;
  bad_mx.col0 = 1;  // columns 1 .. 64: 33 bytes and 3 scales a row
  bad_mx.blocks_ld = 33;
  test::check_throws(Errc::kInvalidArgument, "src.scale_ld = 2", [&] { mx_call(bad_mx, 8, 64, out, stream.ref()); });
  bad_mx = mx;
  bad_mx.blocks = nullptr;
  test::check_throws(Errc::kInvalidArgument, "src.blocks", [&] { mx_call(bad_mx, 8, 64, out, stream.ref()); });
  // Nothing to do is no error, and launches nothing.
  fp8_call(io::Fp8Source{}, 0, 64, io::DequantizeOut<bfloat16>{}, stream.ref());
  mx_call(io::Mxfp4Source{}, 8, 0, io::DequantizeOut<bfloat16>{}, stream.ref());
  EPX_CUDA_CHECK(cudaStreamSynchronize(stream.s));
}
