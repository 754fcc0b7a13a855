// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! The grouped GEMM's gradients on CUTLASS's Hopper grouped kernel (the tensor-core twins of
//! cuda/grouped_gemm_backward.cuh; semantics of host/grouped_gemm_backward.hpp). Forward, for the
//! rows r of group g: c[r, n] = sum over k of a[r, k] * b[g][n, k] (+ bias[g][n]); so
//!   data gradient:    da[r, k]    = sum over n of dc[r, n] * b[g][n, k]    (M, N, K) = (rows, k, n)
//!   weight gradient:  db[g][n, k] = sum over r of dc[r, n] * a[r, k]       (M, N, K) = (n, k, rows)
//!                     dbias[g][n] = sum over r of dc[r, n]                 (group_column_sums_kernel)
//! The same ptr-array kernel as the forward with other operand layouts: b read N-major (CUTLASS's
//! RowMajor B) for the data gradient, dc read M-major (ColumnMajor A) and a N-major for the weight
//! gradient (group_problem.hpp: the problems and strides, host-tested by emulation). 16-bit inputs,
//! fp32 accumulation, one rounding to the output type; the reduction order is CUTLASS's (not the
//! Host's): results agree with the Host to rounding, not bitwise. Deterministic: one CTA owns each
//! output tile over the whole reduction (no split-K, no atomics), the same bits every run.
//!
//! A group without rows would be an (n, k, 0) weight-gradient problem, whose tiles CUTLASS would
//! store without ever setting their accumulators: it is passed as (0, 0, 0) (no tile) and its
//! gradient zeroed by a kernel of its own. Offsets in
//! device memory, clamped into [0, rows] (group_rows); no host sync, nothing allocated: capturable.
//! Every operand: 16-byte aligned rows (n, k and the leading dimensions multiples of 8), checked.
//! One tile configuration, Cooperative 128 x 256 (training shapes are prefill-sized).
//! Needs what cuda/gemm/cutlass_grouped.cuh needs; include it before any other CUTLASS header.

#include <epx/cuda/gemm/cutlass_grouped.cuh>
// CUTLASS's headers first (read under NDEBUG), then epx's
#include <epx/cuda/group_rows.cuh>
#include <epx/host/grouped_gemm_backward.hpp>

#include <cstdint>
#include <span>
#include <string_view>
#include <type_traits>

namespace epx {
namespace detail::cutlass_path {

inline constexpr CutlassTile kBackwardTile = CutlassTile::kCooperative128x256;
//! Most groups of one gradient call: the zero and bias kernels put the group in blockIdx.y.
inline constexpr std::int64_t kMaxBackwardGroups = 65535;

template <class T, class TOut>
using DataGradientKernel = GroupedKernel<T, TOut, kBackwardTile, cutlass::layout::RowMajor, cutlass::layout::RowMajor>;
template <class T, class TOut>
using WeightGradientKernel =
    GroupedKernel<T, TOut, kBackwardTile, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor>;

//! db[g] = 0 for every group g without rows (block (x, g) strides over group g's n * k elements;
//! blocks of groups with rows leave at once).
template <class TOut>
__global__ void zero_empty_groups_kernel(TOut* db, std::int64_t per_group, std::int32_t const* offsets,
                                         std::int64_t num_rows) {
  int const g = static_cast<int>(blockIdx.y);
  GroupRows const r = group_rows(offsets, g, num_rows);
  if (r.end > r.begin) return;
  TOut* const out = db + static_cast<std::int64_t>(g) * per_group;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < per_group;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
    out[i] = device_from_float<TOut>(0.0f);
}

template <class TOut>
void check_aligned(std::string_view where, std::string_view what, std::int64_t elems) {
  constexpr std::int64_t kElems = 16 / static_cast<std::int64_t>(sizeof(TOut));
  require(elems % kElems == 0, Errc::kInvalidArgument, where, what, elems,
          fmt::format("a multiple of {} (16-byte rows for CUTLASS's TMA)", kElems));
}

inline void check_pointer(std::string_view where, std::string_view name, void const* p) {
  require(reinterpret_cast<std::uintptr_t>(p) % 16 == 0, Errc::kInvalidArgument, where, name, fmt::format("{}", p),
          "a 16-byte aligned pointer (TMA)");
}

}  // namespace detail::cutlass_path

//! Workspace bytes of cutlass_grouped_gemm_backward_data<T, TOut> for `groups` groups (per-group
//! arguments and CUTLASS's scratch; independent of the rows). Reads the current device's SM count.
template <float_element T, float_element TOut>
[[nodiscard]] std::size_t cutlass_grouped_gemm_backward_data_workspace_bytes(std::int64_t groups) {
  return detail::cutlass_path::grouped_workspace_bytes<detail::cutlass_path::DataGradientKernel<T, TOut>>(
      groups, detail::current_device_traits());
}

//! Workspace bytes of cutlass_grouped_gemm_backward_weight<T, TOut> for `groups` groups.
template <float_element T, float_element TOut>
[[nodiscard]] std::size_t cutlass_grouped_gemm_backward_weight_workspace_bytes(std::int64_t groups) {
  return detail::cutlass_path::grouped_workspace_bytes<detail::cutlass_path::WeightGradientKernel<T, TOut>>(
      groups, detail::current_device_traits());
}

//! @brief da[rows of g] = dc[rows of g] · b[g] on CUTLASS (the data gradient of
//! cutlass_grouped_gemm; see the file's comment). Rows outside every group are left untouched.
//! @param[in]  dc         [rows, n] bf16/fp16: dL/dc, ldc a multiple of 8
//! @param[in]  b          [groups, n, k] K-major: forward's weights, the same type
//! @param[in]  offsets    [groups + 1] **device** memory
//! @param[out] da         [rows, k] of T or fp32, rows 16-byte aligned
//! @param[in]  workspace  at least cutlass_grouped_gemm_backward_data_workspace_bytes<T, TOut>(groups)
//! @throws Error as cutlass_grouped_gemm.
template <float_element T, float_element TOut>
void cutlass_grouped_gemm_backward_data(StreamRef stream_ref, MatrixView<T const> dc, BatchedMatrixView<T const> b,
                                        std::span<std::int32_t const> offsets, MatrixView<TOut> da,
                                        Workspace workspace) {
  constexpr std::string_view where = "cutlass_grouped_gemm_backward_data";
  detail::CudaStream const stream(stream_ref, where);
  detail::cutlass_path::check_element_types<T, TOut>();
  detail::cutlass_path::require_runs_here(where);
  detail::check_matrix(where, "dc", dc, -1, -1);
  detail::check_batched(where, "b", b, -1, dc.cols, -1);
  detail::check_matrix(where, "da", MatrixView<TOut const>(da), dc.rows, b.cols);
  detail::require(offsets.size() == static_cast<std::size_t>(b.batch) + 1, Errc::kShapeMismatch, where,
                  "offsets.size()", offsets.size(), fmt::format("b.batch + 1 = {}", b.batch + 1));
  detail::cutlass_path::check_aligned<T>(where, "n (b.rows)", b.rows);
  detail::cutlass_path::check_aligned<T>(where, "k (b.cols)", b.cols);
  detail::cutlass_path::check_aligned<T>(where, "dc.ld", dc.ld);
  detail::cutlass_path::check_aligned<TOut>(where, "da.ld", da.ld);
  detail::cutlass_path::check_pointer(where, "dc.data", dc.data);
  detail::cutlass_path::check_pointer(where, "b.data", b.data);
  detail::cutlass_path::check_pointer(where, "da.data", da.data);
  detail::require(b.rows > 0, Errc::kInvalidArgument, where, "n (b.rows)", b.rows,
                  "at least 1 (a K = 0 problem would store accumulators CUTLASS never set)");
  if (b.batch == 0 || dc.rows == 0 || b.cols == 0) return;
  detail::DataGradientProblem const problem{.offsets = offsets.data(),
                                            .num_rows = dc.rows,
                                            .ldc = dc.ld,
                                            .ldda = da.ld,
                                            .n = static_cast<std::int32_t>(b.rows),
                                            .k = static_cast<std::int32_t>(b.cols)};
  detail::cutlass_path::run_problem<detail::cutlass_path::DataGradientKernel<T, TOut>>(
      stream, problem, dc.data, b.data, da.data, static_cast<int>(b.batch), workspace, where);
}

//! @brief db[g] = dc[rows of g]ᵀ · a[rows of g] and dbias[g] = the column sums of dc[rows of g] on
//! CUTLASS (the weight gradient of cutlass_grouped_gemm; see the file's comment). Every group is
//! written: zeros for one without rows.
//! @param[in]  a          [rows, k] bf16/fp16: forward's input, lda a multiple of 8
//! @param[in]  dc         [rows, n] the same type: dL/dc
//! @param[in]  offsets    [groups + 1] **device** memory
//! @param[out] db         [groups, n, k] of T or fp32, K-major like forward's b (overwritten)
//! @param[out] d_bias     [groups, n] of the same type, or nullptr
//! @param[in]  workspace  at least cutlass_grouped_gemm_backward_weight_workspace_bytes<T, TOut>(groups)
//! @throws Error as cutlass_grouped_gemm.
template <float_element T, float_element TOut>
void cutlass_grouped_gemm_backward_weight(StreamRef stream_ref, MatrixView<T const> a, MatrixView<T const> dc,
                                          std::span<std::int32_t const> offsets, BatchedMatrixView<TOut> db,
                                          std::type_identity_t<TOut*> d_bias, Workspace workspace) {
  constexpr std::string_view where = "cutlass_grouped_gemm_backward_weight";
  detail::CudaStream const stream(stream_ref, where);
  detail::cutlass_path::check_element_types<T, TOut>();
  detail::cutlass_path::require_runs_here(where);
  detail::check_matrix(where, "a", a, -1, -1);
  detail::check_matrix(where, "dc", dc, a.rows, -1);
  detail::check_batched(where, "db", db, -1, dc.cols, a.cols);
  detail::require(offsets.size() == static_cast<std::size_t>(db.batch) + 1, Errc::kShapeMismatch, where,
                  "offsets.size()", offsets.size(), fmt::format("db.batch + 1 = {}", db.batch + 1));
  detail::cutlass_path::check_aligned<T>(where, "n (db.rows)", db.rows);
  detail::cutlass_path::check_aligned<T>(where, "k (db.cols)", db.cols);
  detail::cutlass_path::check_aligned<T>(where, "a.ld", a.ld);
  detail::cutlass_path::check_aligned<T>(where, "dc.ld", dc.ld);
  detail::cutlass_path::check_aligned<TOut>(where, "k (db.cols)", db.cols);
  detail::cutlass_path::check_pointer(where, "a.data", a.data);
  detail::cutlass_path::check_pointer(where, "dc.data", dc.data);
  detail::cutlass_path::check_pointer(where, "db.data", db.data);
  detail::require(db.batch <= detail::cutlass_path::kMaxBackwardGroups, Errc::kUnsupported, where, "db.batch", db.batch,
                  fmt::format("at most {}", detail::cutlass_path::kMaxBackwardGroups));
  auto const groups = static_cast<int>(db.batch);
  std::int64_t const per_group = db.rows * db.cols;
  if (groups == 0) return;
  cudaStream_t const s = stream.get();
  if (per_group > 0) {
    detail::WeightGradientProblem const problem{.offsets = offsets.data(),
                                                .num_rows = a.rows,
                                                .ldc = dc.ld,
                                                .lda = a.ld,
                                                .n = static_cast<std::int32_t>(db.rows),
                                                .k = static_cast<std::int32_t>(db.cols)};
    detail::cutlass_path::run_problem<detail::cutlass_path::WeightGradientKernel<T, TOut>>(
        stream, problem, dc.data, a.data, db.data, groups, workspace, where);
    // The groups the GEMM gave no tile: zeros (a separate kernel, after the GEMM: the workspace
    // checks come first).
    constexpr int kThreads = 256;
    auto const blocks = static_cast<unsigned>(std::min<std::int64_t>((per_group + kThreads - 1) / kThreads, 1024));
    detail::cutlass_path::zero_empty_groups_kernel<TOut>
        <<<dim3(blocks, static_cast<unsigned>(groups)), kThreads, 0, s>>>(db.data, per_group, offsets.data(), a.rows);
    EPX_CUDA_CHECK_LAUNCH(zero_empty_groups_kernel);
  }
  if (d_bias != nullptr) detail::launch_group_column_sums<T, TOut>(dc, offsets, groups, d_bias, s);
}

}  // namespace epx
