// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! The backward of the expert MLP on CUTLASS's Hopper grouped GEMM: every GEMM on tensor cores (the
//! semantics of host/expert_mlp_backward.hpp; cuda/expert_mlp_backward.cuh is the SIMT twin that
//! matches the Host bit for bit in its GEMMs). For the rows of local expert e:
//!   h  = x · gate_up[e]ᵀ                 cutlass_grouped_gemm, fp32 (recomputed; bias added below)
//!   a  = activation(h + gate_up_bias)    group_activation_kernel, rounded to T
//!   d_down = dyᵀ · a, d_down_bias        cutlass_grouped_gemm_backward_weight
//!   da = dy · down                       cutlass_grouped_gemm_backward_data, fp32
//!   dh = da * activation'(h + bias)      group_activation_backward_kernel, rounded to T
//!   d_gate_up = dhᵀ · x, d_gate_up_bias  cutlass_grouped_gemm_backward_weight
//!   dx = dh · gate_up                    cutlass_grouped_gemm_backward_data
//! The tensor cores read 16-bit operands: dy (when the caller's gradients are fp32) and dh are
//! rounded to T first, as PyTorch's autograd keeps a bf16 layer's gradients in bf16; accumulation
//! is fp32 and each output is rounded once to G. So results agree with the Host to bf16/fp16
//! rounding of those two operands, not bitwise; they are the same bits run to run (no split-K, no
//! atomics). Flops: 3 GEMM-1-sized and 2 GEMM-2-sized, i.e. 8/3 of the forward's expert flops
//! (2 without the recomputation of h, which would cost rows * gate_up_rows * 4 bytes of saved memory).
//!
//! Needs what cuda/gemm/cutlass_grouped.cuh needs; include this header before any other CUTLASS one.

#include <epx/cuda/gemm/cutlass_grouped_backward.cuh>
// CUTLASS's headers first (read under NDEBUG), then epx's
#include <epx/cuda/expert_mlp_backward.cuh>
#include <epx/cuda/group_rows.cuh>
#include <epx/cuda/launch.cuh>
#include <epx/cuda/nvtx.hpp>
#include <epx/gemm/expert_mlp.hpp>
#include <epx/gemm/expert_mlp_backward.hpp>

#include <algorithm>
#include <cstdint>
#include <span>
#include <string_view>
#include <type_traits>
#include <utility>

namespace epx {
namespace detail {

//! The scratch of cutlass_expert_mlp_backward for up to `max_rows` rows and `groups` experts.
template <class T>
struct CutlassMlpBackwardParts {
  std::span<float> h;         // [rows, gate_up_rows] GEMM 1 recomputed, without its bias
  std::span<T> act;           // [rows, intermediate] activated
  std::span<float> d_act;     // [rows, intermediate] its gradient
  std::span<T> dh;            // [rows, gate_up_rows] the gradient of h, rounded to T
  std::span<T> dy;            // [rows, hidden] an fp32 dy rounded to T (unused when dy is T)
  std::span<std::byte> gemm;  // the arguments and CUTLASS scratch of the largest of the GEMMs
};

template <class T, class Carver>
CutlassMlpBackwardParts<T> carve_cutlass_mlp_backward(Carver& c, ExpertMlpConfig const& mlp, std::int64_t groups,
                                                      std::int64_t max_rows, bool h_kept) {
  auto const rows = static_cast<std::size_t>(max_rows);
  auto const gate_up = static_cast<std::size_t>(mlp.gate_up_rows());
  auto const inter = static_cast<std::size_t>(mlp.intermediate);
  std::size_t gemm = 0;
  for (CutlassTile tile : {CutlassTile::kPingpong64x128, CutlassTile::kCooperative128x256})
    gemm = std::max(gemm, cutlass_grouped_gemm_workspace_bytes<T, float>(groups, tile));
  gemm = std::max({gemm, cutlass_grouped_gemm_backward_data_workspace_bytes<T, float>(groups),
                   cutlass_grouped_gemm_backward_data_workspace_bytes<T, T>(groups),
                   cutlass_grouped_gemm_backward_weight_workspace_bytes<T, float>(groups),
                   cutlass_grouped_gemm_backward_weight_workspace_bytes<T, T>(groups)});
  CutlassMlpBackwardParts<T> p;
  p.h = c.template take<float>(h_kept ? 0 : rows * gate_up);  // none when the caller gives the kept h
  p.act = c.template take<T>(rows * inter);
  p.d_act = c.template take<float>(rows * inter);
  p.dh = c.template take<T>(rows * gate_up);
  p.dy = c.template take<T>(rows * static_cast<std::size_t>(mlp.hidden));
  p.gemm = c.template take<std::byte>(gemm);
  return p;
}

}  // namespace detail

//! Workspace bytes of cutlass_expert_mlp_backward for up to `max_rows` rows of `num_groups` local
//! experts: max_rows * (gate_up_rows * (4 + sizeof(T)) + intermediate * (sizeof(T) + 4) + hidden *
//! sizeof(T)) plus CUTLASS's per-group arguments; `h_kept` (calls that pass gate_up_out): without
//! the max_rows * gate_up_rows * 4 bytes of h. Reads the current device's SM count.
template <float_element T>
[[nodiscard]] std::size_t cutlass_expert_mlp_backward_workspace_bytes(ExpertMlpConfig const& mlp,
                                                                      std::int32_t num_groups, std::int64_t max_rows,
                                                                      bool h_kept = false) {
  return detail::layout_bytes(
      [&](auto& c) { return detail::carve_cutlass_mlp_backward<T>(c, mlp, num_groups, max_rows, h_kept); });
}

//! @brief The backward of expert_mlp on CUTLASS (see the file's comment): dx and the local experts'
//! weight and bias gradients from forward's input rows x and dy. Semantics, shapes and errors of
//! expert_mlp_backward, with h recomputed here (no gate_up_out argument); bf16 or fp16 weights,
//! hidden and intermediate multiples of 8; G: T or fp32 (the layer's parts run fp16 weights with fp32
//! gradients on the SIMT path instead: kCutlassBackward).
//! @param[in] workspace  at least cutlass_expert_mlp_backward_workspace_bytes<T>(config, groups, x.rows)
//! @param[in] gate_up_out  [x.rows, gate_up_rows] fp32 h with its bias (what a forward kept:
//!                         cutlass_expert_mlp's gate_up_out, expert_mlp_gate_up's), or empty:
//!                         recomputed here (one GEMM 1 more)
//! Every local expert's gradients are written (zeros for one without rows); dx rows outside
//! [offsets[0], offsets[G]) are left untouched. No output may alias an input or the workspace.
template <float_element T, float_element G>
void cutlass_expert_mlp_backward(StreamRef stream_ref, ExpertMlpConfig const& config, ExpertWeights const& weights,
                                 MatrixView<T const> x, std::span<std::int32_t const> expert_offsets,
                                 std::type_identity_t<MatrixView<G const>> dy, std::type_identity_t<MatrixView<G>> dx,
                                 ExpertWeightGrads<G> const& grads, Workspace workspace,
                                 MatrixView<float const> gate_up_out = {}) {
  static_assert(!std::is_same_v<T, float>, "epx: the CUTLASS expert backward takes bf16 or fp16 weights");
  static_assert(std::is_same_v<G, T> || std::is_same_v<G, float>, "epx: gradients of the weights' type or fp32");
  EPX_NVTX_RANGE(Experts);
  constexpr std::string_view where = "expert_mlp_backward (CutlassGrouped)";
  detail::CudaStream const stream(stream_ref, where);
  std::int64_t const rows = x.rows, groups = weights.num_local_experts;
  bool const kept = gate_up_out.data != nullptr;
  auto const parts = detail::carve_layout(
      workspace, where, [&](auto& c) { return detail::carve_cutlass_mlp_backward<T>(c, config, groups, rows, kept); });
  MatrixView<float const> const h =
      kept ? gate_up_out : MatrixView<float const>(parts.h.data(), rows, config.gate_up_rows());
  auto const w = detail::check_expert_mlp_backward_args<T, G>(where, config, weights, x, expert_offsets, h, dy,
                                                              MatrixView<G const>(dx), grads);
  // h's bias: kept h carries it; a recomputed one gets it in the activation kernels below.
  T const* const h_bias = kept ? nullptr : w.gate_up_bias;
  detail::require(expert_offsets.data() != nullptr, Errc::kInvalidArgument, where, "expert_offsets.data()", "nullptr",
                  "device memory holding num_local_experts + 1 offsets");
  // What the GEMMs below would refuse, refused here, before any gradient is written.
  detail::cutlass_path::require_runs_here(where);
  detail::require(groups <= detail::cutlass_path::kMaxBackwardGroups, Errc::kUnsupported, where,
                  "weights.num_local_experts", groups,
                  fmt::format("at most {}", detail::cutlass_path::kMaxBackwardGroups));
  namespace cp = detail::cutlass_path;
  cp::check_aligned<T>(where, "mlp.hidden", config.hidden);
  cp::check_aligned<T>(where, "mlp.intermediate", config.intermediate);
  cp::check_aligned<T>(where, "x.ld", x.ld);
  cp::check_aligned<G>(where, "dx.ld", dx.ld);
  if constexpr (std::is_same_v<G, T>) cp::check_aligned<T>(where, "dy.ld", dy.ld);
  using Named = std::pair<std::string_view, void const*>;
  Named const pointers[] = {Named{"x.data", x.data},
                            Named{"dy.data", dy.data},
                            Named{"dx.data", dx.data},
                            Named{"weights gate_up", w.gate_up.data},
                            Named{"weights down", w.down.data},
                            Named{"grads.gate_up.data", grads.gate_up.data},
                            Named{"grads.down.data", grads.down.data}};
  for (Named const& p : pointers) cp::check_pointer(where, p.first, p.second);
  if (groups == 0) return;
  cudaStream_t const s = stream.get();
  auto const g = static_cast<int>(groups);
  Workspace const gemm_ws(parts.gemm.data(), parts.gemm.size());
  MatrixView<T> const act(parts.act.data(), rows, config.intermediate);
  MatrixView<float> const d_act(parts.d_act.data(), rows, config.intermediate);
  MatrixView<T> const dh(parts.dh.data(), rows, config.gate_up_rows());

  // dy as T: the caller's, or an fp32 dy rounded once.
  MatrixView<T const> dy16;
  if constexpr (std::is_same_v<G, T>) {
    dy16 = dy;
  } else {
    MatrixView<T> const rounded(parts.dy.data(), rows, config.hidden);
    if (rows > 0) {
      auto const blocks = static_cast<unsigned>(std::min<std::int64_t>(rows, detail::kMaxGridStrideBlocks));
      detail::group_finish_kernel<T, float><<<blocks, detail::group_row_threads(config.hidden), 0, s>>>(
          dy.data, dy.ld, rounded.data, rounded.ld, nullptr, nullptr, expert_offsets.data(), g, config.hidden, rows);
      EPX_CUDA_CHECK_LAUNCH(group_finish_kernel);
    }
    dy16 = MatrixView<T const>(rounded);
  }

  // GEMM 1 again (h without its bias) unless forward kept h, then a = activation(h + bias) as the
  // forward rounded it.
  if (rows > 0) {
    if (!kept) {
      CutlassTile const tile = detail::cutlass_tile_for(
          detail::policy_for<detail::CutlassTilePolicy>(detail::current_device_traits()), rows, groups);
      cutlass_grouped_gemm<T, float>(stream, x, w.gate_up, expert_offsets,
                                     MatrixView<float>(parts.h.data(), rows, config.gate_up_rows()), gemm_ws, tile);
    }
    detail::launch_group_activation<T, float>(config, h_bias, expert_offsets, g, rows, h, act, s);
  }
  // GEMM 2's gradients (its weight gradients written even without rows), the activation's, GEMM 1's.
  // The down bias's gradient needs no tensor core: summed from dy as given (an fp32 dy: the Host's bits).
  cutlass_grouped_gemm_backward_weight<T, G>(stream, MatrixView<T const>(act), dy16, expert_offsets, grads.down,
                                             nullptr, gemm_ws);
  if (grads.down_bias != nullptr) detail::launch_group_column_sums<G, G>(dy, expert_offsets, g, grads.down_bias, s);
  if (rows == 0) {
    cutlass_grouped_gemm_backward_weight<T, G>(stream, x, MatrixView<T const>(dh), expert_offsets, grads.gate_up,
                                               grads.gate_up_bias, gemm_ws);
    return;
  }
  cutlass_grouped_gemm_backward_data<T, float>(stream, dy16, w.down, expert_offsets, d_act, gemm_ws);
  detail::launch_group_activation_backward<T, T>(config, expert_offsets, g, rows, h, MatrixView<float const>(d_act), dh,
                                                 s, h_bias);
  cutlass_grouped_gemm_backward_weight<T, G>(stream, x, MatrixView<T const>(dh), expert_offsets, grads.gate_up,
                                             grads.gate_up_bias, gemm_ws);
  cutlass_grouped_gemm_backward_data<T, G>(stream, MatrixView<T const>(dh), w.gate_up, expert_offsets, dx, gemm_ws);
}

namespace detail {

//! Whether a backward with weights T and gradients G runs on CUTLASS: bf16 weights with bf16 or fp32
//! gradients, fp16 weights with fp16 gradients. fp16 weights with fp32 gradients keep the SIMT path:
//! rounding an fp32 dy or dh to fp16 would flush what lies below 6e-8 and overflow above 65504
//! (bf16 has fp32's range).
template <class T, class G>
inline constexpr bool kCutlassBackward = std::is_same_v<T, bfloat16> ||
                                         (std::is_same_v<T, half> && std::is_same_v<G, half>);

//! The backward of the Cuda expert parts that run CUTLASS (CutlassGrouped; Grouped where CUTLASS
//! runs): cutlass_expert_mlp_backward where kCutlassBackward, CudaRecomputingBackward otherwise.
struct CutlassBackward {
  template <class T>
  [[nodiscard]] std::size_t backward_workspace_bytes(ExpertMlpConfig const& mlp, std::int32_t num_groups,
                                                     std::int64_t max_rows, bool h_kept = false) const {
    if constexpr (std::is_same_v<T, float>) {
      return 0;  // refused: CUTLASS's path is 16-bit
    } else {
      return std::max(cutlass_expert_mlp_backward_workspace_bytes<T>(mlp, num_groups, max_rows, h_kept),
                      CudaRecomputingBackward{}.backward_workspace_bytes<T>(mlp, num_groups, max_rows, h_kept));
    }
  }

  template <class T, class G>
  void backward(CudaStream stream, ExpertMlpConfig const& mlp, ExpertWeights const& weights, MatrixView<T const> x,
                std::span<std::int32_t const> device_offsets, MatrixView<G const> dy, MatrixView<G> dx,
                ExpertWeightGrads<G> const& grads, Workspace ws) const {
    if constexpr (std::is_same_v<T, float>) {
      throw_error(Errc::kInvalidArgument, "expert_mlp_backward (CutlassGrouped): fp32 weights, expected bf16 or f16");
    } else if constexpr (kCutlassBackward<T, G>) {
      cutlass_expert_mlp_backward<T, G>(stream, mlp, weights, x, device_offsets, dy, dx, grads, ws);
    } else {
      CudaRecomputingBackward{}.backward<T, G>(stream, mlp, weights, x, device_offsets, dy, dx, grads, ws);
    }
  }

  //! backward from the h a forward kept (bias included): no GEMM 1.
  template <class T, class G>
  void backward(CudaStream stream, ExpertMlpConfig const& mlp, ExpertWeights const& weights, MatrixView<T const> x,
                std::span<std::int32_t const> device_offsets, MatrixView<float const> h, MatrixView<G const> dy,
                MatrixView<G> dx, ExpertWeightGrads<G> const& grads, Workspace ws) const {
    if constexpr (std::is_same_v<T, float>) {
      throw_error(Errc::kInvalidArgument, "expert_mlp_backward (CutlassGrouped): fp32 weights, expected bf16 or f16");
    } else if constexpr (kCutlassBackward<T, G>) {
      cutlass_expert_mlp_backward<T, G>(stream, mlp, weights, x, device_offsets, dy, dx, grads, ws, h);
    } else {
      CudaRecomputingBackward{}.backward<T, G>(stream, mlp, weights, x, device_offsets, h, dy, dx, grads, ws);
    }
  }
};

}  // namespace detail
}  // namespace epx
