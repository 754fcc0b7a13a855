// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// load_layer_to_device against load_layer: the same plan through pinned staging blocks and
// cudaMemcpy2DAsync must put the same bits in device memory as the host load puts in host memory,
// for every kind of job (verbatim, converted, transposed, FP8, MXFP4, interleaved biases) and with
// staging so small that every tensor takes many chunks. Host code (g++ + the CUDA runtime); run as
// a CUDA test (exit 77 without a GPU).

#include "io_test_util.hpp"

#include <epx/io/cuda_upload.hpp>

#include <cuda_runtime_api.h>

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

template <class A>
void check_same_bits(std::vector<A> const& device, std::vector<A> const& host, char const* what) {
  CAPTURE(what);
  REQUIRE(device.size() == host.size());
  std::size_t mismatches = 0;
  for (std::size_t i = 0; i < host.size(); ++i) mismatches += bits_of(device[i]) != bits_of(host[i]);
  CHECK(mismatches == 0);
}

template <class T>
void check_upload(std::string const& family, Encoding enc, std::size_t staging_bytes) {
  EPX_TEST_SEEDED_RNG(rng);
  CAPTURE(family);
  CAPTURE(to_string(enc));
  CAPTURE(staging_bytes);
  CaseShape shape;
  shape.hidden = test::pick_size(96, 64);
  shape.intermediate = 64;
  TempDir dir;
  auto const built = build_model(family, enc, shape, rng);
  write_model(built, dir.path());
  cudaStream_t stream = nullptr;
  EPX_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
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
    auto const on_device = io::load_layer_to_device(device_ckpt, model, request, buffers, StreamRef(stream),
                                                    {.staging_bytes = staging_bytes});
    check_same_bits(gate_up.to_host(), host.gate_up, "gate_up");
    check_same_bits(down.to_host(), host.down, "down");
    check_same_bits(gate_up_bias.to_host(), host.gate_up_bias, "gate_up_bias");
    check_same_bits(down_bias.to_host(), host.down_bias, "down_bias");
    check_same_bits(router_weight.to_host(), host.router_weight, "router_weight");
    check_same_bits(router_bias.to_host(), host.router_bias, "router_bias");
    check_same_bits(correction_bias.to_host(), host.correction_bias, "correction_bias");
    // The same bytes read; the views point into device memory.
    CHECK(on_device.stats.data_bytes == on_host.stats.data_bytes);
    CHECK(on_device.stats.header_bytes == on_host.stats.header_bytes);
    CHECK(on_device.config.weights.gate_up == static_cast<void const*>(gate_up.data));
    CHECK(on_device.config.weights.num_local_experts == placement.num_local_experts(rank));
    CHECK(on_device.staging_bytes <= std::max<std::size_t>(staging_bytes, 64 << 10) * 2);
  }
  EPX_CUDA_CHECK(cudaStreamDestroy(stream));
}

}  // namespace

TEST_CASE("io upload: device buffers hold the host load's bits, every kind of job, tiny staging") {
  for (std::size_t staging : {std::size_t{4} << 10, std::size_t{64} << 20}) {
    check_upload<bfloat16>("qwen3_moe", Encoding::kBF16, staging);  // verbatim on the host, chunks on the device
    check_upload<bfloat16>("qwen3_moe", Encoding::kF32, staging);   // converted
    check_upload<epx::half>("mixtral", Encoding::kBF16, staging);
    check_upload<bfloat16>("gpt_oss", Encoding::kBF16, staging);  // transposed, biases
    check_upload<bfloat16>("gpt_oss", Encoding::kMxfp4, staging);
    check_upload<bfloat16>("deepseek_v3", Encoding::kFp8, staging);  // + fp32 correction bias
    check_upload<float>("qwen2_moe_stacked", Encoding::kF16, staging);
  }
}

TEST_CASE("io upload: the host stream is refused") {
  EPX_TEST_SEEDED_RNG(rng);
  TempDir dir;
  CaseShape shape;
  write_model(build_model("qwen3_moe", Encoding::kBF16, shape, rng), dir.path());
  io::Checkpoint ckpt(dir.path());
  auto const model = io::read_model(ckpt);
  io::LayerRequest const request{.layer = shape.layer, .placement = ExpertPlacement::contiguous(6, 1), .rank = 0};
  test::check_throws(Errc::kInvalidArgument, "a CUDA stream", [&] {
    (void)io::load_layer_to_device(ckpt, model, request, io::LayerBuffers<bfloat16>{}, StreamRef::host());
  });
}

TEST_CASE("io upload: Dequantize::kDevice is refused where the call is not compiled by nvcc") {
  EPX_TEST_SEEDED_RNG(rng);
  TempDir dir;
  CaseShape shape;
  write_model(build_model("deepseek_v3", Encoding::kFp8, shape, rng), dir.path());
  io::Checkpoint ckpt(dir.path());
  auto const model = io::read_model(ckpt);
  io::LayerRequest const request{.layer = shape.layer, .placement = ExpertPlacement::contiguous(6, 1), .rank = 0};
  cudaStream_t stream = nullptr;
  EPX_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  test::check_throws(Errc::kUnsupported, "options.dequantize = Dequantize::kDevice", [&] {
    (void)io::load_layer_to_device(ckpt, model, request, io::LayerBuffers<bfloat16>{}, StreamRef(stream),
                                   {.dequantize = io::Dequantize::kDevice});
  });
  EPX_CUDA_CHECK(cudaStreamDestroy(stream));
}
