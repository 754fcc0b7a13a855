// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! Expert policy CutlassGrouped: the expert MLP on CUTLASS's Hopper grouped GEMM
//! (cuda/gemm/cutlass_grouped.cuh), as torch runs an MoE block on sm_90: GEMM 1 (gate_up) into
//! fp32 h, one memory-bound kernel for the gate_up bias and the activation (rounded once to T, as
//! the Host and the fused Grouped kernel round it), GEMM 2 (down) into T, or, with a down bias, into
//! fp32 and one kernel adding the bias and rounding once. No host synchronisation, nothing
//! allocated: capturable in a CUDA graph. The activation is not fused into GEMM 1's epilogue (it
//! combines two output columns, which CUTLASS's stock epilogue visitors cannot); its extra traffic
//! is rows * (2I * 4 + I * 2) bytes written and read back, to be measured against a fused epilogue.
//!
//! Needs what cuda/gemm/cutlass_grouped.cuh needs (CUTLASS headers, sm_90a code, an sm_90 device);
//! include this header before any other CUTLASS header.

#include <epx/cuda/gemm/cutlass_grouped.cuh>
// CUTLASS's headers first (read under NDEBUG), then epx's
#include <epx/cuda/cutlass_expert_mlp_backward.cuh>
#include <epx/cuda/element.cuh>
#include <epx/cuda/error.hpp>
#include <epx/cuda/group_rows.cuh>
#include <epx/cuda/launch.cuh>
#include <epx/cuda/nvtx.hpp>
#include <epx/cuda/tuning.cuh>
#include <epx/gemm/expert_mlp.hpp>
#include <epx/parallel/execution.hpp>
#include <epx/parallel/moe_config.hpp>
#include <epx/parallel/tags.hpp>

#include <algorithm>
#include <cstdint>
#include <span>
#include <string_view>

namespace epx {
namespace detail {

//! The scratch of cutlass_expert_mlp for up to `max_rows` rows and `groups` experts.
template <class T>
struct CutlassMlpParts {
  std::span<float> h;         // [rows, gate_up_rows] GEMM 1's output
  std::span<T> act;           // [rows, intermediate] activated
  std::span<float> out32;     // [rows, hidden] GEMM 2's output before its bias (a down bias only)
  std::span<std::byte> gemm;  // either GEMM's arguments and CUTLASS's scratch (the larger)
};

template <class T, class Carver>
CutlassMlpParts<T> carve_cutlass_mlp(Carver& c, ExpertMlpConfig const& mlp, std::int64_t groups, std::int64_t max_rows,
                                     bool down_bias) {
  auto const rows = static_cast<std::size_t>(max_rows);
  std::size_t gemm = 0;
  for (CutlassTile tile : {CutlassTile::kPingpong64x128, CutlassTile::kCooperative128x256})
    gemm = std::max({gemm, cutlass_grouped_gemm_workspace_bytes<T, float>(groups, tile),
                     cutlass_grouped_gemm_workspace_bytes<T, T>(groups, tile)});
  CutlassMlpParts<T> p;
  p.h = c.template take<float>(rows * static_cast<std::size_t>(mlp.gate_up_rows()));
  p.act = c.template take<T>(rows * static_cast<std::size_t>(mlp.intermediate));
  p.out32 = c.template take<float>(down_bias ? rows * static_cast<std::size_t>(mlp.hidden) : 0);
  p.gemm = c.template take<std::byte>(gemm);
  return p;
}

}  // namespace detail

//! Workspace bytes of cutlass_expert_mlp for up to `max_rows` rows of `num_groups` local experts
//! (`down_bias`: whether the weights carry one; sizing for true covers both). Reads the current
//! device's SM count (CUTLASS's scratch depends on it).
template <float_element T>
[[nodiscard]] std::size_t cutlass_expert_mlp_workspace_bytes(ExpertMlpConfig const& mlp, std::int32_t num_groups,
                                                             std::int64_t max_rows, bool down_bias = true) {
  return detail::layout_bytes(
      [&](auto& c) { return detail::carve_cutlass_mlp<T>(c, mlp, num_groups, max_rows, down_bias); });
}

//! @brief The expert MLP (gemm/expert_mlp.hpp's semantics: rows of local expert l in
//! [offsets[l], offsets[l+1]), every activation, both gate/up layouts, optional biases) on
//! CUTLASS's Hopper grouped GEMM. bf16 or fp16; hidden and intermediate multiples of 8.
//! @param[in] rows_hint  the rows the offsets are expected to hold (picks the tile:
//!                       cutlass_tile_for); -1: x.rows
//! @param[out] gate_up_out  [x.rows, gate_up_rows] fp32, or empty: where GEMM 1's output h goes
//!                       instead of the workspace, kept with its bias added (the Host's
//!                       expert_mlp_gate_up), for a backward that reads it instead of recomputing
//! @throws Error as expert_mlp, and for a device or build without the CUTLASS path.
template <float_element T>
void cutlass_expert_mlp(StreamRef stream_ref, ExpertMlpConfig const& mlp, ExpertWeights const& weights,
                        MatrixView<T const> x, std::span<std::int32_t const> offsets, MatrixView<T> out,
                        Workspace workspace, std::int64_t rows_hint = -1, MatrixView<float> gate_up_out = {}) {
  constexpr std::string_view where = "expert_mlp (CutlassGrouped)";
  detail::CudaStream const stream(stream_ref, where);
  auto const w = detail::check_expert_mlp_args<T>(where, mlp, weights, x, out, offsets);
  std::int64_t const groups = weights.num_local_experts;
  bool const down_bias = w.down_bias != nullptr;
  auto const parts = detail::carve_layout(
      workspace, where, [&](auto& c) { return detail::carve_cutlass_mlp<T>(c, mlp, groups, x.rows, down_bias); });
  bool const keep = gate_up_out.data != nullptr;
  if (keep) {
    detail::check_matrix(where, "gate_up_out", MatrixView<float const>(gate_up_out), x.rows, mlp.gate_up_rows());
    detail::cutlass_path::check_aligned<float>(where, "gate_up_out.ld", gate_up_out.ld);
    detail::cutlass_path::check_pointer(where, "gate_up_out.data", gate_up_out.data);
  }
  if (groups == 0 || x.rows == 0) return;
  EPX_NVTX_RANGE(Experts);
  CutlassTile const tile =
      detail::cutlass_tile_for(detail::policy_for<detail::CutlassTilePolicy>(detail::current_device_traits()),
                               rows_hint < 0 ? x.rows : rows_hint, groups);
  Workspace const gemm_ws(parts.gemm.data(), parts.gemm.size());
  cudaStream_t const s = stream.get();
  // GEMM 1 into fp32 h; bias and activation, rounded once; GEMM 2.
  MatrixView<float> const h = keep ? gate_up_out : MatrixView<float>(parts.h.data(), x.rows, mlp.gate_up_rows());
  MatrixView<T> const act(parts.act.data(), x.rows, mlp.intermediate);
  cutlass_grouped_gemm<T, float>(stream, x, w.gate_up, offsets, h, gemm_ws, tile);
  // Kept h gets its bias here, where the activation reads it anyway.
  detail::launch_group_activation<T, float>(mlp, w.gate_up_bias, offsets, static_cast<int>(groups), x.rows,
                                            MatrixView<float const>(h), act, s,
                                            keep && w.gate_up_bias != nullptr ? h.data : nullptr);
  if (!down_bias) {
    cutlass_grouped_gemm<T, T>(stream, MatrixView<T const>(act), w.down, offsets, out, gemm_ws, tile);
    return;
  }
  MatrixView<float> const out32(parts.out32.data(), x.rows, mlp.hidden);
  cutlass_grouped_gemm<T, float>(stream, MatrixView<T const>(act), w.down, offsets, out32, gemm_ws, tile);
  auto const blocks = static_cast<unsigned>(std::min<std::int64_t>(x.rows, detail::kMaxGridStrideBlocks));
  detail::group_finish_kernel<T, float><<<blocks, detail::group_row_threads(mlp.hidden), 0, s>>>(
      out32.data, out32.ld, out.data, out.ld, w.down_bias, nullptr, offsets.data(), static_cast<int>(groups),
      mlp.hidden, out.rows);
  EPX_CUDA_CHECK_LAUNCH(group_finish_kernel);
}

namespace detail {

//! CutlassGrouped on Cuda: cutlass_expert_mlp, no sync. Backward: cutlass_expert_mlp_backward.
struct CudaCutlassGroupedExperts : CutlassBackward {
  //! What CUTLASS's TMA needs of the shapes, and bf16/fp16, said at construction.
  static void check(MoeConfig const& config) {
    constexpr std::string_view where = "ExpertParallel<CutlassGrouped, ..., Cuda>";
    require(config.weights.dtype == DType::kBF16 || config.weights.dtype == DType::kF16, Errc::kInvalidArgument, where,
            "weights.dtype", config.weights.dtype, "bf16 or f16 (CUTLASS's Hopper grouped GEMM)");
    for (auto const& [name, value] :
         {std::pair<std::string_view, std::int32_t>{"mlp.hidden", config.mlp.hidden},
          std::pair<std::string_view, std::int32_t>{"mlp.intermediate", config.mlp.intermediate}})
      require(value % 8 == 0, Errc::kInvalidArgument, where, name, value,
              "a multiple of 8 (16-byte rows for CUTLASS's TMA loads)");
  }

  template <class T>
  [[nodiscard]] std::size_t workspace_bytes(ExpertMlpConfig const& mlp, std::int32_t num_groups,
                                            std::int64_t max_rows) const {
    if constexpr (std::is_same_v<T, float>) {
      return 0;  // refused by check()
    } else {
      return cutlass_expert_mlp_workspace_bytes<T>(mlp, num_groups, max_rows);
    }
  }

  template <class T>
  void run(CudaStream stream, ExpertMlpConfig const& mlp, ExpertWeights const& weights, MatrixView<T const> x,
           std::span<std::int32_t const> device_offsets, MatrixView<T> out, Workspace ws,
           std::int64_t rows_hint) const {
    run<T>(stream, mlp, weights, x, device_offsets, out, ws, rows_hint, MatrixView<float>{});
  }

  //! run keeping GEMM 1's output (bias included) in `h` (empty: not kept), for backward(..., h, ...).
  template <class T>
  void run(CudaStream stream, ExpertMlpConfig const& mlp, ExpertWeights const& weights, MatrixView<T const> x,
           std::span<std::int32_t const> device_offsets, MatrixView<T> out, Workspace ws, std::int64_t rows_hint,
           MatrixView<float> h) const {
    if constexpr (std::is_same_v<T, float>) {
      throw_error(Errc::kInvalidArgument, "expert_mlp (CutlassGrouped): fp32 weights, expected bf16 or f16");
    } else {
      cutlass_expert_mlp<T>(stream, mlp, weights, x, device_offsets, out, ws, rows_hint, h);
    }
  }

  [[nodiscard]] static std::string_view kernel_name() noexcept { return "cutlass"; }
};

template <>
struct ExpertKernelSelector<CutlassGrouped, Cuda> {
  using type = CudaCutlassGroupedExperts;
};

}  // namespace detail
}  // namespace epx
