// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! What loading one rank's share of one MoE layer reads, and where each byte goes: the family's
//! tensors of the layer resolved in the checkpoint (plain, FP8 block-scaled or MXFP4), checked
//! against the family's layout and the config, and turned into copy jobs, each a slice of one
//! stored tensor (experts [first, first + count) of a stacked one, or a per-expert tensor whole)
//! with the place in the destination buffers that its elements go to. Both loaders (host and CUDA)
//! run the same plan; nothing here reads tensor data.

#include <epx/core/placement.hpp>
#include <epx/io/checkpoint.hpp>
#include <epx/io/checkpoint_error.hpp>
#include <epx/io/moe_model.hpp>
#include <epx/io/mxfp4.hpp>

#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace epx::io {

//! How a checkpoint stores one weight's elements.
enum class WeightEncoding : std::uint8_t {
  kPlain,           //!< F32, F16 or BF16
  kFp8BlockScaled,  //!< F8_E4M3 + a block-scale tensor (DeepSeek-V3)
  kMxfp4,           //!< packed E2M1 blocks + E8M0 scales (gpt-oss)
};

constexpr std::string_view to_string(WeightEncoding e) noexcept {
  switch (e) {
    case WeightEncoding::kPlain: return "plain";
    case WeightEncoding::kFp8BlockScaled: return "fp8-block-scaled";
    case WeightEncoding::kMxfp4: return "mxfp4";
  }
  return "?";
}

//! The destination buffers of a layer load (LayerBuffers' fields).
enum class LayerBuffer : std::uint8_t {
  kGateUp,
  kDown,
  kGateUpBias,
  kDownBias,
  kRouterWeight,
  kRouterBias,
  kCorrectionBias,
};
inline constexpr std::size_t kNumLayerBuffers = 7;

//! Elements of each destination buffer for a set of local experts (0: the family has no such tensor).
struct LayerSizes {
  std::int64_t gate_up = 0;          //!< [L, gate_up_rows, H]
  std::int64_t down = 0;             //!< [L, H, I]
  std::int64_t gate_up_bias = 0;     //!< [L, gate_up_rows]
  std::int64_t down_bias = 0;        //!< [L, H]
  std::int64_t router_weight = 0;    //!< [E, H]
  std::int64_t router_bias = 0;      //!< [E]
  std::int64_t correction_bias = 0;  //!< [E], fp32

  [[nodiscard]] std::int64_t of(LayerBuffer b) const noexcept {
    switch (b) {
      case LayerBuffer::kGateUp: return gate_up;
      case LayerBuffer::kDown: return down;
      case LayerBuffer::kGateUpBias: return gate_up_bias;
      case LayerBuffer::kDownBias: return down_bias;
      case LayerBuffer::kRouterWeight: return router_weight;
      case LayerBuffer::kRouterBias: return router_bias;
      case LayerBuffer::kCorrectionBias: return correction_bias;
    }
    return 0;
  }
};

//! The buffer sizes for `num_local_experts` experts of `model` (pure arithmetic).
inline LayerSizes layer_sizes(MoeModel const& model, std::int64_t num_local_experts) {
  std::int64_t const l = num_local_experts, rows = model.mlp.gate_up_rows(), h = model.mlp.hidden,
                     i = model.mlp.intermediate, e = model.router.num_experts;
  auto const& f = model.family;
  bool const gate_up_bias = !f.gate_up_bias.empty() || !f.gate_bias.empty();
  return {.gate_up = l * rows * h,
          .down = l * h * i,
          .gate_up_bias = gate_up_bias ? l * rows : 0,
          .down_bias = f.down_bias.empty() ? 0 : l * h,
          .router_weight = e * h,
          .router_bias = f.router_bias.empty() ? 0 : e,
          .correction_bias = f.correction_bias.empty() ? 0 : e};
}

//! One stored tensor's slice and where its elements go. Element (m, r, c) of the slice, r and c in
//! epx's orientation (the stored matrix transposed when `transposed`), goes to destination element
//! offset + m * matrix_stride + r * row_stride + c * col_stride of buffer `buffer`.
struct CopyJob {
  std::string label = {};  //!< what it is, for messages: "gate of expert 17"
  WeightEncoding encoding = WeightEncoding::kPlain;
  TensorRef values = {};         //!< plain / FP8 values / MXFP4 blocks
  TensorRef scales = {};         //!< FP8 scale_inv / MXFP4 scales; none when plain
  std::int64_t stored_rows = 0;  //!< one matrix as stored (MXFP4: elements, before packing)
  std::int64_t stored_cols = 0;
  std::int64_t first = 0;  //!< first matrix of the tensor (expert, for a stacked tensor)
  std::int64_t count = 1;  //!< matrices
  bool transposed = false;
  std::array<std::int64_t, 2> fp8_block = {kFp8DefaultBlock, kFp8DefaultBlock};
  LayerBuffer buffer = LayerBuffer::kGateUp;
  std::int64_t offset = 0;
  std::int64_t row_stride = 0;
  std::int64_t col_stride = 1;
  std::int64_t matrix_stride = 0;

  //! Destination rows and columns of one matrix (epx's orientation).
  [[nodiscard]] std::int64_t rows() const noexcept { return transposed ? stored_cols : stored_rows; }
  [[nodiscard]] std::int64_t cols() const noexcept { return transposed ? stored_rows : stored_cols; }
  [[nodiscard]] SafetensorsDType values_dtype() const noexcept { return values.info->dtype; }
  //! Bytes of one stored row of the values (MXFP4: packed) and of its scales (MXFP4 only).
  [[nodiscard]] std::int64_t value_row_bytes() const noexcept {
    if (encoding == WeightEncoding::kMxfp4) return stored_cols / 2;
    return stored_cols * static_cast<std::int64_t>(bits_of(values_dtype()) / 8);
  }
  [[nodiscard]] std::int64_t scale_row_bytes() const noexcept {
    return encoding == WeightEncoding::kMxfp4 ? stored_cols / kMxfp4BlockElements : 0;
  }
  //! Scale rows and columns of one FP8 matrix.
  [[nodiscard]] std::int64_t fp8_scale_rows() const noexcept { return num_scale_blocks(stored_rows, fp8_block[0]); }
  [[nodiscard]] std::int64_t fp8_scale_cols() const noexcept { return num_scale_blocks(stored_cols, fp8_block[1]); }
  //! Whether the slice's bytes are the destination's: plain, same element type, not transposed,
  //! dense rows and matrices (one read straight into the destination does it).
  [[nodiscard]] bool is_verbatim_copy(SafetensorsDType destination) const noexcept {
    return encoding == WeightEncoding::kPlain && values_dtype() == destination && !transposed && col_stride == 1 &&
           row_stride == stored_cols && (count == 1 || matrix_stride == stored_rows * stored_cols);
  }
};

//! Everything one rank's load of one layer reads: the jobs, and the buffer sizes they fill.
struct LayerPlan {
  std::int32_t layer = 0;
  ExpertRange experts = {};
  LayerSizes sizes = {};
  std::vector<CopyJob> jobs = {};
  //! Bytes of tensor data the jobs read (values and scales of the slices): what ReadStats.data_bytes grows by.
  [[nodiscard]] std::uint64_t data_bytes() const noexcept {
    std::uint64_t total = 0;
    for (auto const& j : jobs) {
      auto const count = static_cast<std::uint64_t>(j.count);
      total += count * static_cast<std::uint64_t>(j.stored_rows * j.value_row_bytes());
      if (j.encoding == WeightEncoding::kMxfp4)
        total += count * static_cast<std::uint64_t>(j.stored_rows * j.scale_row_bytes());
      if (j.encoding == WeightEncoding::kFp8BlockScaled)
        total += count * static_cast<std::uint64_t>(j.fp8_scale_rows() * j.fp8_scale_cols()) *
                 (bits_of(j.scales.info->dtype) / 8);
    }
    return total;
  }
};

namespace detail {

//! What a plan needs to resolve one weight of the layer.
struct WeightSpec {
  std::string name = {};   //!< the tensor's name for this layer (and expert)
  std::string label = {};  //!< "gate of expert 17", "router weight"
  std::int32_t layer = 0;
  std::int64_t rows = 0;  //!< epx's orientation: [rows, cols] per matrix
  std::int64_t cols = 0;
  std::int64_t stacked = -1;  //!< experts in a stacked tensor; -1: one matrix (per-expert or router)
  bool vector = false;        //!< stored as [cols] (or [E, cols] stacked) instead of [rows, cols]
  bool transposed = false;    //!< plain / FP8 stored [cols, rows]
  bool mxfp4_transposed = false;
  bool quantisable = true;        //!< biases and the correction bias are plain only
  std::string_view meaning = {};  //!< the dimensions, for messages: "[I, H] (gate_proj: [out, in])"
};

inline std::string expected_shape(std::int64_t stacked, std::int64_t a, std::int64_t b, bool vector) {
  std::vector<std::int64_t> shape;
  if (stacked >= 0) shape.push_back(stacked);
  if (!vector) shape.push_back(a);
  shape.push_back(b);
  return format_shape(shape);
}

inline bool shape_is(TensorInfo const& t, std::initializer_list<std::int64_t> expected) {
  return std::equal(t.shape.begin(), t.shape.end(), expected.begin(), expected.end());
}

//! Resolves `spec` in the checkpoint: its encoding, tensors and stored geometry, checked.
inline CopyJob resolve_weight(Checkpoint& ckpt, MoeModel const& model, WeightSpec const& spec) {
  auto const& family = model.family;
  CopyJob job{.label = spec.label};
  bool const stacked = spec.stacked >= 0;
  std::int64_t const rows = spec.vector ? 1 : spec.rows;
  auto const values = ckpt.find(spec.name);
  auto shape_error = [&](TensorRef const& t, std::string const& expected, std::string_view what) {
    tensor_error(Errc::kShapeMismatch, ckpt.shard_path(t.shard), t.info->name,
                 fmt::format("shape {}, expected {} {} for the {} of family {} (config: {} experts, hidden {}, "
                             "intermediate {})",
                             format_shape(t.info->shape), expected, what, spec.label, family.name,
                             model.router.num_experts, model.mlp.hidden, model.mlp.intermediate));
  };
  if (values) {
    TensorInfo const& t = *values->info;
    job.values = *values;
    bool const transposed = spec.transposed && !spec.vector;
    std::int64_t const sr = transposed ? spec.cols : rows, sc = transposed ? rows : spec.cols;
    if (is_plain_float(t.dtype) || (t.dtype == SafetensorsDType::kF8E4M3 && spec.quantisable)) {
      bool const ok = spec.vector ? (stacked ? shape_is(t, {spec.stacked, sc}) : shape_is(t, {sc}))
                                  : (stacked ? shape_is(t, {spec.stacked, sr, sc}) : shape_is(t, {sr, sc}));
      if (!ok)
        shape_error(*values, expected_shape(spec.stacked, sr, sc, spec.vector),
                    fmt::format("= {}{}", spec.meaning, transposed ? " stored transposed, [in, out]" : ""));
    }
    job.stored_rows = sr;
    job.stored_cols = sc;
    job.transposed = transposed;
    if (is_plain_float(t.dtype)) {
      job.encoding = WeightEncoding::kPlain;
    } else if (t.dtype == SafetensorsDType::kF8E4M3 && spec.quantisable) {
      job.encoding = WeightEncoding::kFp8BlockScaled;
      job.fp8_block = {model.fp8_block[0], model.fp8_block[1]};
      std::string const scale_name = spec.name + family.fp8_scale_suffix;
      auto const scales = ckpt.find(scale_name);
      if (!scales)
        tensor_error(Errc::kInvalidArgument, ckpt.shard_path(values->shard), t.name,
                     fmt::format("F8_E4M3 without its block scales: no tensor '{}' in {}", printable(scale_name),
                                 ckpt.source()));
      if (!is_plain_float(scales->info->dtype))
        tensor_error(Errc::kUnsupported, ckpt.shard_path(scales->shard), scale_name,
                     fmt::format("dtype {}, expected F32 (or F16, BF16) block scales", to_string(scales->info->dtype)));
      std::int64_t const br = job.fp8_scale_rows(), bc = job.fp8_scale_cols();
      if (!(stacked ? shape_is(*scales->info, {spec.stacked, br, bc}) : shape_is(*scales->info, {br, bc})))
        shape_error(
            *scales, expected_shape(spec.stacked, br, bc, false),
            fmt::format("= ceil({} / {}) x ceil({} / {}) block scales", sr, job.fp8_block[0], sc, job.fp8_block[1]));
      job.scales = *scales;
    } else {
      tensor_error(
          Errc::kUnsupported, ckpt.shard_path(values->shard), t.name,
          fmt::format(
              "dtype {} for the {} of family {}, expected F32, F16 or BF16{}", to_string(t.dtype), spec.label,
              family.name,
              spec.quantisable ? fmt::format(" (or F8_E4M3 with '{}' block scales)", family.fp8_scale_suffix) : ""));
    }
    return job;
  }
  std::string const blocks_name = spec.name + family.mxfp4_blocks_suffix;
  auto const blocks = spec.quantisable ? ckpt.find(blocks_name) : std::nullopt;
  if (!blocks)
    file_error(Errc::kInvalidArgument, ckpt.source(),
               fmt::format("no tensor '{}' (the {} of layer {}, family {}){}", printable(spec.name), spec.label,
                           spec.layer, family.name,
                           spec.quantisable ? fmt::format(", nor its MXFP4 form '{}'", printable(blocks_name))
                                            : std::string()));
  // MXFP4: blocks [.., R, C / 32, 16] and scales [.., R, C / 32], (R, C) = [out, in] unless mxfp4_transposed.
  std::int64_t const sr = spec.mxfp4_transposed ? spec.cols : rows, sc = spec.mxfp4_transposed ? rows : spec.cols;
  job.encoding = WeightEncoding::kMxfp4;
  job.values = *blocks;
  job.stored_rows = sr;
  job.stored_cols = sc;
  job.transposed = spec.mxfp4_transposed;
  if (blocks->info->dtype != SafetensorsDType::kU8)
    tensor_error(
        Errc::kUnsupported, ckpt.shard_path(blocks->shard), blocks_name,
        fmt::format("dtype {}, expected U8 (MXFP4 blocks: two E2M1 codes per byte)", to_string(blocks->info->dtype)));
  if (sc % kMxfp4BlockElements != 0)
    tensor_error(Errc::kShapeMismatch, ckpt.shard_path(blocks->shard), blocks_name,
                 fmt::format("MXFP4 blocks for the {} of {} columns, expected a multiple of {} columns", spec.label, sc,
                             kMxfp4BlockElements));
  std::int64_t const nb = sc / kMxfp4BlockElements;
  if (!(stacked ? shape_is(*blocks->info, {spec.stacked, sr, nb, kMxfp4BlockBytes})
                : shape_is(*blocks->info, {sr, nb, kMxfp4BlockBytes})))
    shape_error(*blocks,
                stacked ? format_shape(std::vector<std::int64_t>{spec.stacked, sr, nb, kMxfp4BlockBytes})
                        : format_shape(std::vector<std::int64_t>{sr, nb, kMxfp4BlockBytes}),
                fmt::format("= MXFP4 blocks of a [{}, {}] matrix ({} / 32 blocks of 16 bytes per row)", sr, sc, sc));
  std::string const scales_name = spec.name + family.mxfp4_scales_suffix;
  auto const scales = ckpt.find(scales_name);
  if (!scales)
    tensor_error(
        Errc::kInvalidArgument, ckpt.shard_path(blocks->shard), blocks_name,
        fmt::format("MXFP4 blocks without their scales: no tensor '{}' in {}", printable(scales_name), ckpt.source()));
  if (scales->info->dtype != SafetensorsDType::kU8 && scales->info->dtype != SafetensorsDType::kF8E8M0)
    tensor_error(Errc::kUnsupported, ckpt.shard_path(scales->shard), scales_name,
                 fmt::format("dtype {}, expected U8 or F8_E8M0 (MXFP4 scales)", to_string(scales->info->dtype)));
  if (!(stacked ? shape_is(*scales->info, {spec.stacked, sr, nb}) : shape_is(*scales->info, {sr, nb})))
    shape_error(*scales,
                stacked ? format_shape(std::vector<std::int64_t>{spec.stacked, sr, nb})
                        : format_shape(std::vector<std::int64_t>{sr, nb}),
                "= one MXFP4 scale per 32 elements");
  job.scales = *scales;
  return job;
}

}  // namespace detail

//! @brief Plans the load of experts `experts` (global ids) of MoE layer `layer`, with the router's
//! tensors: finds every tensor (opening the shards that hold them), checks dtypes and shapes
//! against the family and the config, and lists the slices to read.
//! @throws Error naming the file and tensor: the layer is not an MoE layer, the experts are not in
//!         [0, num_experts), a tensor is missing, has an unsupported dtype or the wrong shape.
inline LayerPlan plan_layer(Checkpoint& ckpt, MoeModel const& model, std::int32_t layer, ExpertRange experts) {
  validate(model.family);
  epx::detail::validate(model.router, "MoeModel.router");
  epx::detail::validate(model.mlp, "MoeModel.mlp");
  auto const& f = model.family;
  std::string const where = fmt::format("load_layer (family {})", f.name);
  epx::detail::require(
      model.is_moe_layer(layer), Errc::kInvalidArgument, where, "layer", layer,
      fmt::format("an MoE layer of this model ({} layers{}{}{})", model.num_layers,
                  model.first_moe_layer > 0 ? fmt::format(", the first {} dense", model.first_moe_layer) : "",
                  model.moe_layer_step > 1 ? fmt::format(", MoE every {} layers", model.moe_layer_step) : "",
                  model.dense_layers.empty() ? "" : ", some listed as dense"));
  epx::detail::require(experts.first >= 0 && experts.count >= 0 &&
                           std::int64_t{experts.first} + experts.count <= model.router.num_experts,
                       Errc::kInvalidArgument, where, "experts",
                       fmt::format("[{}, {})", experts.first, std::int64_t{experts.first} + experts.count),
                       fmt::format("a range of expert ids in [0, {})", model.router.num_experts));

  LayerPlan plan{.layer = layer, .experts = experts, .sizes = layer_sizes(model, experts.count)};
  std::int64_t const h = model.mlp.hidden, inter = model.mlp.intermediate, rows = model.mlp.gate_up_rows(),
                     e = model.router.num_experts;
  bool const interleaved = model.mlp.gate_up_layout == GateUpLayout::kInterleaved;
  bool const stacked = f.storage == ExpertStorage::kStacked;
  bool const gated = is_gated(model.mlp.activation);
  epx::detail::require(
      f.gate.empty() || gated, Errc::kInvalidArgument, where, "family.gate / family.up", f.gate,
      fmt::format("one gate_up tensor for the ungated activation {}", to_string(model.mlp.activation)));

  auto add = [&](detail::WeightSpec const& spec, LayerBuffer buffer, std::int64_t offset, std::int64_t row_stride,
                 std::int64_t col_stride, std::int64_t matrix_stride, std::int64_t first, std::int64_t count) {
    CopyJob job = detail::resolve_weight(ckpt, model, spec);
    job.buffer = buffer;
    job.offset = offset;
    job.row_stride = row_stride;
    job.col_stride = col_stride;
    job.matrix_stride = matrix_stride;
    job.first = first;
    job.count = count;
    plan.jobs.push_back(std::move(job));
  };
  auto weight = [&](std::string_view pattern, std::int64_t expert, std::string label, std::int64_t r, std::int64_t c,
                    std::string_view meaning) {
    return detail::WeightSpec{.name = tensor_name(pattern, layer, expert),
                              .label = std::move(label),
                              .layer = layer,
                              .rows = r,
                              .cols = c,
                              .stacked = stacked ? e : -1,
                              .transposed = f.transposed,
                              .mxfp4_transposed = f.mxfp4_transposed,
                              .meaning = meaning};
  };
  auto bias = [&](std::string_view pattern, std::int64_t expert, std::string label, std::int64_t c,
                  std::string_view meaning) {
    return detail::WeightSpec{.name = tensor_name(pattern, layer, expert),
                              .label = std::move(label),
                              .layer = layer,
                              .rows = 1,
                              .cols = c,
                              .stacked = stacked ? e : -1,
                              .vector = true,
                              .quantisable = false,
                              .meaning = meaning};
  };

  // The router: every rank loads all of it.
  add({.name = tensor_name(f.router_weight, layer),
       .label = "router weight",
       .layer = layer,
       .rows = e,
       .cols = h,
       .meaning = "[num_experts, hidden]"},
      LayerBuffer::kRouterWeight, 0, h, 1, e * h, 0, 1);
  if (!f.router_bias.empty())
    add({.name = tensor_name(f.router_bias, layer),
         .label = "router bias",
         .layer = layer,
         .rows = 1,
         .cols = e,
         .vector = true,
         .quantisable = false,
         .meaning = "[num_experts]"},
        LayerBuffer::kRouterBias, 0, e, 1, e, 0, 1);
  if (!f.correction_bias.empty())
    add({.name = tensor_name(f.correction_bias, layer),
         .label = "correction bias",
         .layer = layer,
         .rows = 1,
         .cols = e,
         .vector = true,
         .quantisable = false,
         .meaning = "[num_experts]"},
        LayerBuffer::kCorrectionBias, 0, e, 1, e, 0, 1);
  if (experts.count == 0) return plan;

  // Gate and up: one tensor, or two whose rows go to halves (concatenated) or alternate rows (interleaved).
  std::int64_t const up_offset = interleaved ? h : inter * h, split_stride = interleaved ? 2 * h : h;
  std::int64_t const up_bias_offset = interleaved ? 1 : inter, split_bias_stride = interleaved ? 2 : 1;
  // Per expert: one job per expert and tensor; stacked: one job per tensor for all local experts.
  std::int64_t const n_jobs = stacked ? 1 : experts.count;
  for (std::int64_t j = 0; j < n_jobs; ++j) {
    std::int64_t const expert = experts.first + j;  // global id (per expert)
    std::int64_t const first = stacked ? experts.first : 0, count = stacked ? experts.count : 1;
    std::int64_t const local = stacked ? 0 : j;  // first destination matrix
    std::string const of =
        stacked ? fmt::format("experts {}..{}", experts.first, experts.end() - 1) : fmt::format("expert {}", expert);
    if (!f.gate_up.empty()) {
      add(weight(f.gate_up, expert, "gate_up of " + of, rows, h, "[gate_up_rows, hidden]"), LayerBuffer::kGateUp,
          local * rows * h, h, 1, rows * h, first, count);
      if (!f.gate_up_bias.empty())
        add(bias(f.gate_up_bias, expert, "gate_up bias of " + of, rows, "[gate_up_rows]"), LayerBuffer::kGateUpBias,
            local * rows, rows, 1, rows, first, count);
    } else {
      add(weight(f.gate, expert, "gate of " + of, inter, h, "[intermediate, hidden]"), LayerBuffer::kGateUp,
          local * rows * h, split_stride, 1, rows * h, first, count);
      add(weight(f.up, expert, "up of " + of, inter, h, "[intermediate, hidden]"), LayerBuffer::kGateUp,
          local * rows * h + up_offset, split_stride, 1, rows * h, first, count);
      if (!f.gate_bias.empty()) {
        add(bias(f.gate_bias, expert, "gate bias of " + of, inter, "[intermediate]"), LayerBuffer::kGateUpBias,
            local * rows, inter, split_bias_stride, rows, first, count);
        add(bias(f.up_bias, expert, "up bias of " + of, inter, "[intermediate]"), LayerBuffer::kGateUpBias,
            local * rows + up_bias_offset, inter, split_bias_stride, rows, first, count);
      }
    }
    add(weight(f.down, expert, "down of " + of, h, inter, "[hidden, intermediate]"), LayerBuffer::kDown,
        local * h * inter, inter, 1, h * inter, first, count);
    if (!f.down_bias.empty())
      add(bias(f.down_bias, expert, "down bias of " + of, h, "[hidden]"), LayerBuffer::kDownBias, local * h, h, 1, h,
          first, count);
  }
  return plan;
}

}  // namespace epx::io
