// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! Expert policy CublasGrouped: the expert MLP on cublasGemmGroupedBatchedEx, a fallback and the
//! in-process baseline of epx's own kernel.
//!
//! cuBLAS takes each group's sizes in *host* arrays, so every run copies the expert offsets to the
//! host and **synchronises the caller's stream once** (not capturable in a CUDA graph). The gate_up
//! product is stored in T and activated by a separate kernel, and biases and row scales are applied
//! after the down GEMM's rounding: results differ from the fused Grouped path by about one
//! rounding of T, as a PyTorch MoE block's do (cuBLAS's grouped GEMM writes C in the inputs' type;
//! the tests give CublasGrouped twice Grouped's 16-bit tolerance for it).

#include <epx/core/math.hpp>
#include <epx/core/space.hpp>
#include <epx/core/workspace.hpp>
#include <epx/cuda/element.cuh>
#include <epx/cuda/error.hpp>
#include <epx/cuda/group_rows.cuh>
#include <epx/cuda/launch.cuh>
#include <epx/cuda/nvtx.hpp>
#include <epx/cuda/tuning.cuh>
#include <epx/gemm/expert_mlp.hpp>
#include <epx/gemm/paired_columns.hpp>
#include <epx/parallel/execution.hpp>
#include <epx/parallel/moe_config.hpp>

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

namespace epx::detail {

template <class T>
constexpr cudaDataType_t cuda_data_type() {
  if constexpr (std::is_same_v<T, float>)
    return CUDA_R_32F;
  else if constexpr (std::is_same_v<T, half>)
    return CUDA_R_16F;
  else
    return CUDA_R_16BF;
}

//! CublasGrouped on Cuda. Owns a cuBLAS handle (created in the constructor: not on the forward path).
class CudaCublasGroupedExperts {
 public:
  CudaCublasGroupedExperts() { EPX_CUBLAS_CHECK(cublasCreate(&handle_)); }
  CudaCublasGroupedExperts(CudaCublasGroupedExperts const&) = delete;
  CudaCublasGroupedExperts& operator=(CudaCublasGroupedExperts const&) = delete;
  CudaCublasGroupedExperts(CudaCublasGroupedExperts&& other) noexcept
      : handle_(std::exchange(other.handle_, nullptr)) {}
  CudaCublasGroupedExperts& operator=(CudaCublasGroupedExperts&& other) noexcept {
    std::swap(handle_, other.handle_);
    return *this;
  }
  ~CudaCublasGroupedExperts() {
    if (handle_ != nullptr) (void)cublasDestroy(handle_);  // a destructor never throws
  }

  template <class T>
  [[nodiscard]] std::size_t workspace_bytes(ExpertMlpConfig const& mlp, std::int32_t /*num_groups*/,
                                            std::int64_t max_rows) const {
    return layout_bytes([&](auto& c) { return carve<T>(c, mlp, max_rows); });
  }

  [[nodiscard]] static std::string_view kernel_name() noexcept { return "cublas"; }

  //! cuBLAS runs every shape the configuration allows.
  static void check(MoeConfig const&) {}

  //! Runs the experts; synchronises `stream` once (to read the offsets).
  template <class T>
  void run(CudaStream stream, ExpertMlpConfig const& mlp, ExpertWeights const& weights, MatrixView<T const> x,
           std::span<std::int32_t const> device_offsets, MatrixView<T> out, Workspace ws, std::int64_t /*rows_hint*/) {
    EPX_NVTX_RANGE(Experts);  // includes the offsets' copy to the host and the stream sync it waits for
    constexpr std::string_view where = "expert_mlp (CublasGrouped)";
    auto const w = check_expert_mlp_args<T>(where, mlp, weights, x, out, device_offsets);
    std::size_t const groups = static_cast<std::size_t>(weights.num_local_experts);
    auto const parts = carve_layout(ws, where, [&](auto& c) { return carve<T>(c, mlp, x.rows); });
    if (groups == 0 || x.rows == 0) return;
    cudaStream_t const s = stream.get();

    // The one sync: cuBLAS needs every group's row count on the host.
    std::vector<std::int32_t> offsets(groups + 1);
    EPX_CUDA_CHECK(cudaMemcpyAsync(offsets.data(), device_offsets.data(), offsets.size() * sizeof(std::int32_t),
                                   cudaMemcpyDeviceToHost, s));
    EPX_CUDA_CHECK(cudaStreamSynchronize(s));
    for (std::size_t g = 0; g < groups; ++g)
      require(offsets[g] >= 0 && offsets[g] <= offsets[g + 1] && offsets[g + 1] <= x.rows, Errc::kInvalidArgument,
              where, fmt::format("expert_offsets[{}..{}]", g, g + 1),
              fmt::format("[{}, {}]", offsets[g], offsets[g + 1]),
              fmt::format("0 <= offsets[g] <= offsets[g+1] <= x.rows = {}", x.rows));
    std::int64_t const rows = offsets[groups] - offsets[0];
    if (rows == 0) return;
    EPX_CUBLAS_CHECK(cublasSetStream(handle_, s));

    int const gate_up_rows = mlp.gate_up_rows();
    MatrixView<T> const h(parts.h.data(), x.rows, gate_up_rows);
    MatrixView<T> const act(parts.act.data(), x.rows, mlp.intermediate);
    auto const half_of_pointers = parts.pointers.size() / 2;
    gemm<T>(offsets, w.gate_up, x, h, parts.pointers.first(half_of_pointers), s);
    launch_group_activation<T, T>(mlp, w.gate_up_bias, device_offsets, static_cast<int>(groups), rows,
                                  MatrixView<T const>(h), act, s);
    gemm<T>(offsets, w.down, MatrixView<T const>(act), out, parts.pointers.last(half_of_pointers), s);
    if (w.down_bias != nullptr) {
      group_finish_kernel<T, T><<<static_cast<unsigned>(rows), group_row_threads(mlp.hidden), 0, s>>>(
          out.data, out.ld, out.data, out.ld, w.down_bias, nullptr, device_offsets.data(), static_cast<int>(groups),
          mlp.hidden, out.rows);
      EPX_CUDA_CHECK_LAUNCH(group_finish_kernel);
    }
  }

 private:
  template <class T>
  struct Parts {
    std::span<T> h;                   // [rows, gate_up_rows]
    std::span<T> act;                 // [rows, intermediate]
    std::span<void const*> pointers;  // 2 GEMMs x (A, B, C) x non-empty groups (<= rows)
  };

  template <class T, class Carver>
  static Parts<T> carve(Carver& c, ExpertMlpConfig const& mlp, std::int64_t max_rows) {
    auto const rows = static_cast<std::size_t>(max_rows);
    Parts<T> p;
    p.h = c.template take<T>(rows * static_cast<std::size_t>(mlp.gate_up_rows()));
    p.act = c.template take<T>(rows * static_cast<std::size_t>(mlp.intermediate));
    // Only non-empty groups go to cuBLAS, and each holds a row: max_rows bounds their number.
    p.pointers = c.template take<void const*>(6 * rows);
    return p;
  }

  //! c[rows of g] = a[rows of g] · b[g]ᵀ for the non-empty groups, in column-major terms
  //! cᵀ (n x rows_g) = b[g] (op T, n x k) · aᵀ (k x rows_g).
  template <class T>
  void gemm(std::vector<std::int32_t> const& offsets, BatchedMatrixView<T const> b, MatrixView<T const> a,
            MatrixView<T> c, std::span<void const*> device_pointers, cudaStream_t s) {
    std::size_t const groups = offsets.size() - 1;
    std::vector<void const*> a_ptrs, b_ptrs, c_ptrs;
    std::vector<int> m, n, k, lda, ldb, ldc;
    std::vector<cublasOperation_t> ta, tb;
    std::size_t used = 0;
    for (std::size_t g = 0; g < groups; ++g) {
      int const rows_g = offsets[g + 1] - offsets[g];
      if (rows_g == 0) continue;
      a_ptrs.push_back(b[static_cast<std::int64_t>(g)].data);  // cuBLAS's A is our weight
      b_ptrs.push_back(a.row(offsets[g]));
      c_ptrs.push_back(c.row(offsets[g]));
      m.push_back(static_cast<int>(b.rows));
      n.push_back(rows_g);
      k.push_back(static_cast<int>(b.cols));
      lda.push_back(static_cast<int>(b.cols));
      ldb.push_back(static_cast<int>(a.ld));
      ldc.push_back(static_cast<int>(c.ld));
      ta.push_back(CUBLAS_OP_T);
      tb.push_back(CUBLAS_OP_N);
      ++used;
    }
    std::vector<void const*> ptrs = a_ptrs;  // [A..., B..., C...] for the non-empty groups
    ptrs.insert(ptrs.end(), b_ptrs.begin(), b_ptrs.end());
    ptrs.insert(ptrs.end(), c_ptrs.begin(), c_ptrs.end());
    require(ptrs.size() <= device_pointers.size(), Errc::kWorkspaceTooSmall, "expert_mlp (CublasGrouped)",
            "pointer slots", device_pointers.size(), fmt::format(">= {}", ptrs.size()));
    // Pageable source: cudaMemcpyAsync returns once `ptrs` is staged, so it may go out of scope.
    EPX_CUDA_CHECK(cudaMemcpyAsync(device_pointers.data(), ptrs.data(), ptrs.size() * sizeof(void const*),
                                   cudaMemcpyHostToDevice, s));
    std::vector<float> const alpha(used, 1.0f), beta(used, 0.0f);
    std::vector<int> const group_size(used, 1);
    auto const type = cuda_data_type<T>();
    EPX_CUBLAS_CHECK(
        cublasGemmGroupedBatchedEx(handle_, ta.data(), tb.data(), m.data(), n.data(), k.data(), alpha.data(),
                                   device_pointers.data(), type, lda.data(), device_pointers.data() + used, type,
                                   ldb.data(), beta.data(), const_cast<void* const*>(device_pointers.data() + 2 * used),
                                   type, ldc.data(), static_cast<int>(used), group_size.data(), CUBLAS_COMPUTE_32F));
  }

  cublasHandle_t handle_ = nullptr;
};

template <>
struct ExpertKernelSelector<CublasGrouped, Cuda> {
  using type = CudaCublasGroupedExperts;
};

}  // namespace epx::detail
