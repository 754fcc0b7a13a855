// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! The expert policy Grouped on Cuda: the fastest correct grouped GEMM for the device and the call.
//! In a translation unit built with CUTLASS (EPX_HAVE_CUTLASS: link epx::cutlass; sm_90a code), on
//! an sm_90 device, with 16-bit weights and prefill-sized calls (GroupedKernelPolicy in tuning.cuh:
//! rows per local expert on average), it runs CUTLASS's Hopper grouped GEMM (cuda/cutlass_grouped.cuh);
//! otherwise epx's own kernel (cuda/expert_mlp.cuh), which is also the faster one for decode.
//! `ExpertParallel::expert_kernel()` says which one the last forward ran. The backward runs CUTLASS's
//! gradients wherever CUTLASS runs (16-bit weights), at every size. CutlassGrouped forces CUTLASS;
//! the own kernel alone is what a build without CUTLASS runs.

#include <epx/cuda/expert_mlp.cuh>
#include <epx/cuda/expert_mlp_backward.cuh>
#include <epx/cuda/tuning.cuh>
#include <epx/parallel/execution.hpp>
#include <epx/parallel/moe_config.hpp>
#if defined(EPX_HAVE_CUTLASS)
#include <epx/cuda/cutlass_grouped.cuh>
#endif

#include <algorithm>
#include <cstdint>
#include <optional>
#include <span>
#include <string_view>
#include <type_traits>
#include <utility>

namespace epx::detail {

//! Grouped on Cuda: no sync; the kernel picked per forward from the expected rows.
struct CudaGroupedExperts : CudaRecomputingBackward {
  //! Whether this translation unit carries the CUTLASS path.
#if defined(EPX_HAVE_CUTLASS)
  static constexpr bool kWithCutlass = true;
#else
  static constexpr bool kWithCutlass = false;
#endif

  //! The tensor-core kernels read rows in 16-byte chunks: bf16 and fp16 widths must be multiples of
  //! 8 (what expert_mlp would refuse at the first forward, said at construction).
  static void check(MoeConfig const& config) {
    if (config.weights.dtype == DType::kF32) return;
    for (auto const& [name, value] :
         {std::pair<std::string_view, std::int32_t>{"mlp.hidden", config.mlp.hidden},
          std::pair<std::string_view, std::int32_t>{"mlp.intermediate", config.mlp.intermediate}})
      require(value % 8 == 0, Errc::kInvalidArgument, "ExpertParallel<Grouped, ..., Cuda>", name, value,
              fmt::format("a multiple of 8 for {} weights (rows of 16-byte chunks for the tensor-core kernel)",
                          config.weights.dtype));
  }

  //! Enough for either kernel.
  template <class T>
  [[nodiscard]] std::size_t workspace_bytes(ExpertMlpConfig const& mlp, std::int32_t num_groups,
                                            std::int64_t max_rows) const {
    std::size_t bytes = cuda_expert_mlp_workspace_bytes<T>(mlp, max_rows);
#if defined(EPX_HAVE_CUTLASS)
    if constexpr (!std::is_same_v<T, float>)
      bytes = std::max(bytes, cutlass_expert_mlp_workspace_bytes<T>(mlp, num_groups, max_rows));
#else
    (void)num_groups;
#endif
    return bytes;
  }

  //! The kernel a forward of `rows_hint` rows over `groups` local experts runs here.
  template <class T>
  [[nodiscard]] static GroupedKernel pick(std::int64_t rows_hint, std::int64_t groups) {
    bool runs = false;
#if defined(EPX_HAVE_CUTLASS)
    runs = cutlass_grouped_gemm_available();  // once per device
#endif
    if (!runs) return GroupedKernel::kEpx;  // no device query on builds or devices without CUTLASS
    return grouped_kernel_for(policy_for<GroupedKernelPolicy>(current_device_traits()), runs, !std::is_same_v<T, float>,
                              rows_hint, groups);
  }

  template <class T>
  void run(CudaStream stream, ExpertMlpConfig const& mlp, ExpertWeights const& weights, MatrixView<T const> x,
           std::span<std::int32_t const> device_offsets, MatrixView<T> out, Workspace ws, std::int64_t rows_hint) {
    run<T>(stream, mlp, weights, x, device_offsets, out, ws, rows_hint, MatrixView<float>{});
  }

  //! run keeping GEMM 1's output (bias included) in `h` (empty: not kept), for backward(..., h, ...).
  //! CUTLASS writes h anyway; epx's own kernel fuses it away, so there h costs one more GEMM 1.
  template <class T>
  void run(CudaStream stream, ExpertMlpConfig const& mlp, ExpertWeights const& weights, MatrixView<T const> x,
           std::span<std::int32_t const> device_offsets, MatrixView<T> out, Workspace ws, std::int64_t rows_hint,
           MatrixView<float> h) {
    std::int64_t const rows = rows_hint < 0 ? x.rows : rows_hint;
    last_ = pick<T>(rows, weights.num_local_experts);
#if defined(EPX_HAVE_CUTLASS)
    if constexpr (!std::is_same_v<T, float>) {
      if (last_ == GroupedKernel::kCutlass) {
        cutlass_expert_mlp<T>(stream, mlp, weights, x, device_offsets, out, ws, rows, h);
        return;
      }
    }
#endif
    expert_mlp<T>(stream, mlp, weights, x, device_offsets, out, ws, ExpertMlpOptions{.rows_hint = rows_hint});
    if (h.data != nullptr) expert_mlp_gate_up(stream, mlp, weights, x, device_offsets, h, rows_hint);
  }

  //! The backward: CUTLASS's tensor-core gradients wherever CUTLASS runs (CutlassBackward: bf16
  //! weights, or fp16 with fp16 gradients), at every size (its weight gradients beat the SIMT ones
  //! everywhere: those reduce over all of an expert's rows per output element); else
  //! CudaRecomputingBackward (the Host's results bit for bit in its GEMMs).
  template <class T>
  [[nodiscard]] std::size_t backward_workspace_bytes(ExpertMlpConfig const& mlp, std::int32_t num_groups,
                                                     std::int64_t max_rows, bool h_kept = false) const {
    std::size_t bytes = CudaRecomputingBackward::backward_workspace_bytes<T>(mlp, num_groups, max_rows, h_kept);
#if defined(EPX_HAVE_CUTLASS)
    bytes = std::max(bytes, CutlassBackward{}.backward_workspace_bytes<T>(mlp, num_groups, max_rows, h_kept));
#endif
    return bytes;
  }

  template <class T, class G>
  void backward(CudaStream stream, ExpertMlpConfig const& mlp, ExpertWeights const& weights, MatrixView<T const> x,
                std::span<std::int32_t const> device_offsets, MatrixView<G const> dy, MatrixView<G> dx,
                ExpertWeightGrads<G> const& grads, Workspace ws) const {
#if defined(EPX_HAVE_CUTLASS)
    if constexpr (!std::is_same_v<T, float>) {
      if (cutlass_grouped_gemm_available()) {
        CutlassBackward{}.backward<T, G>(stream, mlp, weights, x, device_offsets, dy, dx, grads, ws);
        return;
      }
    }
#endif
    CudaRecomputingBackward::backward<T, G>(stream, mlp, weights, x, device_offsets, dy, dx, grads, ws);
  }

  //! backward from the h a forward kept: the same choice of path, without GEMM 1.
  template <class T, class G>
  void backward(CudaStream stream, ExpertMlpConfig const& mlp, ExpertWeights const& weights, MatrixView<T const> x,
                std::span<std::int32_t const> device_offsets, MatrixView<float const> h, MatrixView<G const> dy,
                MatrixView<G> dx, ExpertWeightGrads<G> const& grads, Workspace ws) const {
#if defined(EPX_HAVE_CUTLASS)
    if constexpr (!std::is_same_v<T, float>) {
      if (cutlass_grouped_gemm_available()) {
        CutlassBackward{}.backward<T, G>(stream, mlp, weights, x, device_offsets, h, dy, dx, grads, ws);
        return;
      }
    }
#endif
    CudaRecomputingBackward::backward<T, G>(stream, mlp, weights, x, device_offsets, h, dy, dx, grads, ws);
  }

  //! The kernel of the last forward: "epx" or "cutlass" ("none" before the first).
  [[nodiscard]] std::string_view kernel_name() const noexcept {
    if (!last_) return "none";
    return *last_ == GroupedKernel::kCutlass ? "cutlass" : "epx";
  }

 private:
  std::optional<GroupedKernel> last_;
};

template <>
struct ExpertKernelSelector<Grouped, Cuda> {
  using type = CudaGroupedExperts;
};

}  // namespace epx::detail
