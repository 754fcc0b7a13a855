// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! The one call: this rank's experts of MoE layer `layer`, and the router every rank needs, read
//! from a checkpoint into memory the caller owns, in epx's layout, returned as a MoeConfig ready
//! for ExpertParallel. Only the byte ranges of this rank's experts are read (plus the router and
//! the headers of the shards that hold them); see docs/loading.md.
//!
//!   epx::io::Checkpoint ckpt("/models/Qwen3-30B-A3B");
//!   epx::io::MoeModel const model = epx::io::read_model(ckpt);              // config.json + family
//!   epx::io::LayerRequest const request{.layer = 3, .placement = placement, .rank = comm.rank()};
//!   epx::io::HostLayerStorage<epx::bfloat16> storage(model, request);        // or your own buffers
//!   auto const layer = epx::io::load_layer(ckpt, model, request, storage.buffers());
//!   epx::ExpertParallel<epx::Grouped, epx::AllToAll, epx::Host> moe(layer.config, comm);
//!
//! For device memory, include <epx/io/cuda_upload.hpp> and call load_layer_to_device.

#include <epx/core/dtype.hpp>
#include <epx/core/placement.hpp>
#include <epx/core/tensor_view.hpp>
#include <epx/core/views.hpp>
#include <epx/gemm/expert_mlp.hpp>
#include <epx/io/checkpoint.hpp>
#include <epx/io/copy_executor.hpp>
#include <epx/io/element_conversion.hpp>
#include <epx/io/layer_plan.hpp>
#include <epx/io/moe_model.hpp>
#include <epx/parallel/expert_parallel.hpp>

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <type_traits>
#include <vector>

namespace epx::io {

//! Which layer and which experts: rank `rank`'s experts under `placement` (every rank passes the
//! same placement, as to ExpertParallel).
struct LayerRequest {
  std::int32_t layer = -1;
  ExpertPlacement placement = {};
  std::int32_t rank = 0;
};

//! Where load_layer_to_device dequantises FP8 and MXFP4 tensors (load_layer: always the host).
enum class Dequantize : std::uint8_t {
  kAuto,    //!< on the device when the call is compiled by nvcc (cuda_dequantize.cuh), else on the host
  kHost,    //!< decoded on the host, uploaded as T
  kDevice,  //!< uploaded as stored (bytes and scales), decoded by a kernel; needs the call compiled by nvcc
};

struct LoadOptions {
  //! The most memory the loader allocates for staging (raw bytes of a chunk; on the CUDA path the
  //! same again as pinned memory). A chunk is never less than one stored row. Jobs read verbatim into
  //! host memory use none.
  std::size_t staging_bytes = std::size_t{64} << 20;
  //! load_layer_to_device only: where quantised tensors are decoded (load_layer refuses kDevice).
  Dequantize dequantize = Dequantize::kAuto;
};

//! Caller-owned destination memory, each span at least LayerSizes' elements (spans for tensors the
//! family does not have may be empty). Host memory for load_layer (pinned memory is host memory),
//! device memory for load_layer_to_device.
template <float_element T>
struct LayerBuffers {
  std::span<T> gate_up = {};              //!< [L, gate_up_rows, H]
  std::span<T> down = {};                 //!< [L, H, I]
  std::span<T> gate_up_bias = {};         //!< [L, gate_up_rows]
  std::span<T> down_bias = {};            //!< [L, H]
  std::span<T> router_weight = {};        //!< [E, H]
  std::span<T> router_bias = {};          //!< [E]
  std::span<float> correction_bias = {};  //!< [E]

  //! The buffer `b` as bytes.
  [[nodiscard]] std::span<std::byte> bytes(LayerBuffer b) const noexcept {
    switch (b) {
      case LayerBuffer::kGateUp: return std::as_writable_bytes(gate_up);
      case LayerBuffer::kDown: return std::as_writable_bytes(down);
      case LayerBuffer::kGateUpBias: return std::as_writable_bytes(gate_up_bias);
      case LayerBuffer::kDownBias: return std::as_writable_bytes(down_bias);
      case LayerBuffer::kRouterWeight: return std::as_writable_bytes(router_weight);
      case LayerBuffer::kRouterBias: return std::as_writable_bytes(router_bias);
      case LayerBuffer::kCorrectionBias: return std::as_writable_bytes(correction_bias);
    }
    return {};
  }
};

//! What a load produced: the layer's configuration with its weights (views of the caller's
//! buffers), and the router's tensors for the caller's router projection (epx starts from logits).
template <float_element T>
struct LoadedLayer {
  MoeConfig config = {};                   //!< router, mlp, weights, correction_bias, placement
  ExpertRange experts = {};                //!< the global experts loaded: placement.local_range(rank)
  MatrixView<T const> router_weight = {};  //!< [num_experts, hidden]
  std::span<T const> router_bias = {};     //!< [num_experts] (gpt-oss), else empty
  ReadStats stats = {};                    //!< what this call read
  std::size_t staging_bytes = 0;           //!< the most memory the loader allocated (pageable; pinned likewise)
};

//! The buffer sizes rank `request.rank`'s load needs (pure arithmetic).
inline LayerSizes layer_sizes(MoeModel const& model, LayerRequest const& request) {
  return layer_sizes(model, request.placement.local_range(request.rank).count);
}

//! Host vectors sized for one rank's load: the simplest caller-owned buffers.
template <float_element T>
struct HostLayerStorage {
  std::vector<T> gate_up, down, gate_up_bias, down_bias, router_weight, router_bias;
  std::vector<float> correction_bias;

  HostLayerStorage(MoeModel const& model, LayerRequest const& request) {
    LayerSizes const s = layer_sizes(model, request);
    auto n = [](std::int64_t v) { return static_cast<std::size_t>(v); };
    gate_up.resize(n(s.gate_up));
    down.resize(n(s.down));
    gate_up_bias.resize(n(s.gate_up_bias));
    down_bias.resize(n(s.down_bias));
    router_weight.resize(n(s.router_weight));
    router_bias.resize(n(s.router_bias));
    correction_bias.resize(n(s.correction_bias));
  }
  [[nodiscard]] LayerBuffers<T> buffers() {
    return {gate_up, down, gate_up_bias, down_bias, router_weight, router_bias, correction_bias};
  }
};

namespace detail {

inline constexpr std::string_view kLayerBufferNames[kNumLayerBuffers] = {
    "gate_up", "down", "gate_up_bias", "down_bias", "router_weight", "router_bias", "correction_bias"};

//! Checks the request against the model: a placement of the model's experts, a rank of it.
inline ExpertRange check_request(MoeModel const& model, LayerRequest const& request, std::string_view where) {
  epx::detail::require(!request.placement.empty(), Errc::kInvalidArgument, where, "request.placement", "empty",
                       "an ExpertPlacement (e.g. ExpertPlacement::contiguous(num_experts, ranks))");
  epx::detail::require(request.placement.num_experts() == model.router.num_experts, Errc::kInvalidArgument, where,
                       "request.placement.num_experts()", request.placement.num_experts(),
                       fmt::format("the model's num_experts = {}", model.router.num_experts));
  epx::detail::require(request.rank >= 0 && request.rank < request.placement.num_ranks(), Errc::kInvalidArgument, where,
                       "request.rank", request.rank,
                       fmt::format("in [0, {}) (the placement's ranks)", request.placement.num_ranks()));
  return request.placement.local_range(request.rank);
}

//! Checks that every buffer holds at least its elements.
template <class T>
void check_buffers(LayerSizes const& sizes, LayerBuffers<T> const& buffers, std::string_view where) {
  for (std::size_t k = 0; k < kNumLayerBuffers; ++k) {
    auto const b = static_cast<LayerBuffer>(k);
    std::size_t const esize = b == LayerBuffer::kCorrectionBias ? sizeof(float) : sizeof(T);
    auto const need = static_cast<std::size_t>(sizes.of(b));
    auto const have = buffers.bytes(b);
    epx::detail::require(have.size() >= need * esize && (need == 0 || have.data() != nullptr), Errc::kInvalidArgument,
                         where, fmt::format("buffers.{}.size()", kLayerBufferNames[k]), have.size() / esize,
                         fmt::format(">= {} elements (layer_sizes)", need));
  }
}

//! The LoadedLayer of `plan`, its weights viewing `buffers`.
template <class T>
LoadedLayer<T> loaded_layer(MoeModel const& model, LayerRequest const& request, LayerPlan const& plan,
                            LayerBuffers<T> const& buffers) {
  std::int64_t const l = plan.experts.count, rows = model.mlp.gate_up_rows(), h = model.mlp.hidden,
                     i = model.mlp.intermediate, e = model.router.num_experts;
  TensorView<T const, 2> gate_up_bias, down_bias;
  if (plan.sizes.gate_up_bias > 0) gate_up_bias = TensorView<T const, 2>(buffers.gate_up_bias.data(), {l, rows});
  if (plan.sizes.down_bias > 0) down_bias = TensorView<T const, 2>(buffers.down_bias.data(), {l, h});
  LoadedLayer<T> out{.config = model.moe_config(request.placement), .experts = plan.experts};
  out.config.weights = expert_weights(TensorView<T const, 3>(buffers.gate_up.data(), {l, rows, h}),
                                      TensorView<T const, 3>(buffers.down.data(), {l, h, i}), gate_up_bias, down_bias);
  if (plan.sizes.correction_bias > 0)
    out.config.correction_bias = std::span<float const>(buffers.correction_bias.data(), static_cast<std::size_t>(e));
  out.router_weight = MatrixView<T const>(buffers.router_weight.data(), e, h);
  if (plan.sizes.router_bias > 0)
    out.router_bias = std::span<T const>(buffers.router_bias.data(), static_cast<std::size_t>(e));
  return out;
}

//! ReadStats `after` less `before`.
inline ReadStats stats_since(ReadStats const& before, ReadStats const& after) {
  return {.index_bytes = after.index_bytes - before.index_bytes,
          .header_bytes = after.header_bytes - before.header_bytes,
          .data_bytes = after.data_bytes - before.data_bytes,
          .data_reads = after.data_reads - before.data_reads,
          .shards_opened = after.shards_opened - before.shards_opened};
}

//! Writes decoded elements straight into caller-owned host memory.
template <class T>
class HostSink {
 public:
  explicit HostSink(LayerBuffers<T> const& buffers) : buffers_(buffers) {}

  template <class U>
  [[nodiscard]] std::span<std::byte> verbatim(CopyJob const& job) const {
    if (!job.is_verbatim_copy(safetensors_dtype_of_or_f32<U>())) return {};
    std::size_t const bytes = static_cast<std::size_t>(job.count * job.stored_rows * job.stored_cols) * sizeof(U);
    return buffers_.bytes(job.buffer).subspan(static_cast<std::size_t>(job.offset) * sizeof(U), bytes);
  }
  template <class U>
  [[nodiscard]] StridedOut<U> begin_chunk(CopyJob const& job, std::int64_t m, std::int64_t s0, std::int64_t) const {
    U* base = reinterpret_cast<U*>(buffers_.bytes(job.buffer).data()) + job.offset + m * job.matrix_stride +
              s0 * (job.transposed ? job.col_stride : job.row_stride);
    return job.transposed ? StridedOut<U>{base, job.col_stride, job.row_stride}
                          : StridedOut<U>{base, job.row_stride, job.col_stride};
  }
  template <class U>
  void end_chunk(CopyJob const&, std::int64_t, std::int64_t, std::int64_t) const {}
  template <class U>
  [[nodiscard]] std::int64_t max_chunk_rows(CopyJob const&) const noexcept {
    return std::numeric_limits<std::int64_t>::max();
  }

 private:
  template <class U>
  static constexpr SafetensorsDType safetensors_dtype_of_or_f32() noexcept {
    if constexpr (std::is_same_v<U, float>)
      return SafetensorsDType::kF32;
    else
      return safetensors_dtype_of<U>();
  }
  LayerBuffers<T> buffers_;
};

//! Runs every job of `plan` through `sink`: the correction bias as fp32, the rest as T.
template <class T, class Sink>
void run_plan(Checkpoint& ckpt, LayerPlan const& plan, Sink& sink, Staging& staging) {
  for (auto const& job : plan.jobs) {
    if (job.buffer == LayerBuffer::kCorrectionBias)
      run_copy_job<float>(ckpt, job, sink, staging);
    else
      run_copy_job<T>(ckpt, job, sink, staging);
  }
}

}  // namespace detail

//! @brief Loads rank `request.rank`'s experts of MoE layer `request.layer`, and the router, from
//! `ckpt` into host memory (`buffers`, at least layer_sizes() elements each; pinned memory works the
//! same), converted to T as docs/loading.md describes (same type: bits copied; F32/F16/BF16 rounded
//! to nearest even; FP8 and MXFP4 dequantised), in epx's K-major layout.
//! @return the MoeConfig for ExpertParallel (weights viewing `buffers`, correction bias, placement),
//!         the router's weight and bias, and what was read. The buffers must outlive its use.
//! @throws Error naming the file and tensor for any malformed, missing or mismatched tensor, and the
//!         parameter for a bad request or buffer; the buffers may then hold part of the layer.
template <float_element T>
LoadedLayer<T> load_layer(Checkpoint& ckpt, MoeModel const& model, LayerRequest const& request,
                          LayerBuffers<T> const& buffers, LoadOptions const& options = {}) {
  constexpr std::string_view where = "epx::io::load_layer";
  epx::detail::require(options.dequantize != Dequantize::kDevice, Errc::kInvalidArgument, where, "options.dequantize",
                       "Dequantize::kDevice",
                       "kAuto or kHost (load_layer decodes on the host; kDevice is for "
                       "load_layer_to_device)");
  ExpertRange const experts = detail::check_request(model, request, where);
  ReadStats const before = ckpt.stats();
  LayerPlan const plan = plan_layer(ckpt, model, request.layer, experts);
  detail::check_buffers(plan.sizes, buffers, where);
  detail::HostSink<T> sink(buffers);
  detail::Staging staging(options.staging_bytes);
  detail::run_plan<T>(ckpt, plan, sink, staging);
  LoadedLayer<T> out = detail::loaded_layer(model, request, plan, buffers);
  out.stats = detail::stats_since(before, ckpt.stats());
  out.staging_bytes = staging.peak_bytes();
  return out;
}

}  // namespace epx::io
