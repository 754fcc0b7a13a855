// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! The grouped GEMM's backward on the GPU: the twins of host/grouped_gemm_backward.hpp, with its
//! semantics and argument checks, and its results bit for bit. Forward, for the rows r of group g:
//! c[r, n] = sum over k of a[r, k] * b[g][n, k] (+ bias[g][n]); so, for dc = dL/dc:
//!   data gradient:    da[r, k]    = sum over n of dc[r, n] * b[g][n, k]
//!   weight gradient:  db[g][n, k] = sum over the rows r of g of dc[r, n] * a[r, k]
//!                     dbias[g][n] = sum over the rows r of g of dc[r, n]
//!
//! **This is the correctness path**, not the fast one (that is CUTLASS's: cuda/gemm/
//! cutlass_grouped_backward.cuh, where CUTLASS is built and runs). Every output element
//! is accumulated by one thread, in the Host's order (n ascending for da; rows ascending for db and
//! dbias), each step `acc = __fadd_rn(acc, __fmul_rn(x, y))` (multiply, round, add, round: no fused
//! multiply-add, as the Host built with -ffp-contract=off), from the same element conversions
//! (element.cuh) and rounded once to the output type at the end: the results are bitwise equal to
//! the Host backend's and bitwise deterministic run to run (no atomics, no split reduction).
//! Shared-memory tiling (64 x 64 outputs per CTA of 256 threads, the reduction in slices of 16
//! loaded coalesced; the maps in gemm/backward_tiles.hpp) changes no element's order.
//!
//! The groups' row ranges (`offsets`) are **device** memory, as for grouped_gemm(StreamRef, ...):
//! no host copy, no sync, capturable in a CUDA graph. The host therefore checks their count only;
//! on the device each group's range is clamped into [0, M] (detail::group_rows): offsets that
//! decrease or leave the buffer give empty or shortened groups, never an access out of bounds.
//! Valid offsets (non-decreasing in [0, M], what the Host requires) give the Host's results; with
//! others the values written are unspecified (clamped groups may overlap), but stay in bounds.

#include <epx/core/stream.hpp>
#include <epx/cuda/element.cuh>
#include <epx/cuda/error.hpp>
#include <epx/cuda/gemm/backward_tiles.hpp>
#include <epx/cuda/gemm/tile_scheduler.cuh>
#include <epx/cuda/gemm/tile_walk.hpp>
#include <epx/cuda/launch.cuh>
#include <epx/cuda/nvtx.hpp>
#include <epx/host/grouped_gemm_backward.hpp>

#include <cuda_runtime.h>

#include <cstdint>
#include <limits>
#include <span>
#include <string_view>
#include <type_traits>

namespace epx {
namespace nvtx {
//! grouped_gemm_backward_data: dL/da of a grouped GEMM.
struct GroupedGemmBackwardData {
  static constexpr char const* message = "grouped_gemm_backward_data";
};
//! grouped_gemm_backward_weight: dL/db and dL/dbias of a grouped GEMM.
struct GroupedGemmBackwardWeight {
  static constexpr char const* message = "grouped_gemm_backward_weight";
};
}  // namespace nvtx

namespace detail {

//! grouped_gemm_backward_data_kernel's arguments.
template <class TDc, class TB, class TDa>
struct GemmBackwardDataParams {
  TDc const* dc;  // [num_rows, n], ldc apart
  std::int64_t ldc;
  TB const* b;  // [num_groups, n, k]
  TDa* da;      // [num_rows, k], ldda apart
  std::int64_t ldda;
  std::int32_t const* offsets;  // [num_groups + 1], device
  std::int64_t num_rows;
  int num_groups;
  int n;
  int k;
};

// A persistent grid walks the (group, row-block, k-block) tiles of da with the forward's scheduler
// (K in the place of N). Per slice of 16 n: dc's [64 rows, 16 n] strip (transposed in shared memory)
// and b[g]'s [16 n, 64 k] slice; each thread adds its 4 x 4 outputs' products in n order.
template <class TDc, class TB, class TDa>
__global__ void __launch_bounds__(BackwardTileShape::kThreads)
    grouped_gemm_backward_data_kernel(GemmBackwardDataParams<TDc, TB, TDa> const p) {
  using S = BackwardTileShape;
  constexpr int BM = S::kBM, BN = S::kBN, BK = S::kBK;
  __shared__ float dc_tile[BK][BM + 1];  // [n][row]; padded: the transposed stores hit distinct banks
  __shared__ float b_tile[BK][BN];       // [n][k]
  extern __shared__ long long tile_start[];
  TileScheduler<S::kThreads, BM, BN> scheduler(tile_start, p.offsets, p.num_groups, p.num_rows, p.k);
  long long const num_tiles = scheduler.num_tiles();
  int const tid = static_cast<int>(threadIdx.x);

  for (long long t = blockIdx.x; t < num_tiles; t += gridDim.x) {
    GemmTile const tile = scheduler.tile(t);  // tile.n_begin: the first k-column
    TB const* const bg = p.b + static_cast<std::int64_t>(tile.group) * p.n * p.k;
    float acc[4][4] = {};
    for (int n0 = 0; n0 < p.n; n0 += BK) {
#pragma unroll
      for (int pass = 0; pass < S::kLoadPasses; ++pass) {
        // Padding is 0 in both operands (0 * 0 = +0, and acc + 0 = acc: acc is never -0).
        FragmentCoord const s = S::strip_coord(tid, pass);  // (row, n)
        std::int64_t const row = tile.row_begin + s.row;
        int const dn = n0 + s.col;
        dc_tile[s.col][s.row] = (row < tile.row_end && dn < p.n) ? device_to_float(p.dc[row * p.ldc + dn]) : 0.0f;
        FragmentCoord const w = S::slice_coord(tid, pass);  // (n, k)
        int const bn = n0 + w.row, bk = tile.n_begin + w.col;
        b_tile[w.row][w.col] =
            (bn < p.n && bk < p.k) ? device_to_float(bg[static_cast<std::int64_t>(bn) * p.k + bk]) : 0.0f;
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < BK; ++kk)
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            FragmentCoord const o = S::output_coord(tid, i, j);
            acc[i][j] = __fadd_rn(acc[i][j], __fmul_rn(dc_tile[kk][o.row], b_tile[kk][o.col]));
          }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        FragmentCoord const o = S::output_coord(tid, i, j);
        std::int64_t const row = tile.row_begin + o.row;
        int const col = tile.n_begin + o.col;
        if (row < tile.row_end && col < p.k) p.da[row * p.ldda + col] = device_from_float<TDa>(acc[i][j]);
      }
  }
}

//! grouped_gemm_backward_weight_kernel's arguments.
template <class TA, class TDc, class TDb>
struct GemmBackwardWeightParams {
  TA const* a;  // [num_rows, k], lda apart
  std::int64_t lda;
  TDc const* dc;  // [num_rows, n], ldc apart
  std::int64_t ldc;
  TDb* db;                      // [num_groups, n, k]
  TDb* d_bias;                  // [num_groups, n] or nullptr
  std::int32_t const* offsets;  // [num_groups + 1], device
  std::int64_t num_rows;
  int num_groups;
  int n;
  int k;
};

// A grid-stride loop over the (group, n-block, k-block) tiles of db (weight_tile), every group
// included. Per slice of 16 of the group's rows: dc's [16 rows, 64 n] and a's [16 rows, 64 k]
// slices; each thread adds its 4 x 4 outputs' products in row order, and in the k-block 0 tile the
// first 64 threads add their n's column of dc in row order (the bias gradient). A group without
// rows runs no slice: zeros.
template <class TA, class TDc, class TDb>
__global__ void __launch_bounds__(BackwardTileShape::kThreads)
    grouped_gemm_backward_weight_kernel(GemmBackwardWeightParams<TA, TDc, TDb> const p) {
  using S = BackwardTileShape;
  constexpr int BM = S::kBM, BN = S::kBN, BK = S::kBK;
  __shared__ float dc_tile[BK][BM];  // [row][n]
  __shared__ float a_tile[BK][BN];   // [row][k]
  bool const with_bias = p.d_bias != nullptr;
  long long const num_tiles = weight_tiles(p.num_groups, p.n, p.k, with_bias);
  int const tid = static_cast<int>(threadIdx.x);

  for (long long t = blockIdx.x; t < num_tiles; t += gridDim.x) {
    WeightTile const tile = weight_tile(t, p.n, p.k, with_bias);
    GroupRows const rows = group_rows(p.offsets, tile.group, p.num_rows);
    bool const sums_bias = tile.bias && S::sums_bias(tid);  // the same for the whole tile's loop
    float acc[4][4] = {};
    float bias_acc = 0.0f;
    for (std::int64_t r0 = rows.begin; r0 < rows.end; r0 += BK) {
#pragma unroll
      for (int pass = 0; pass < S::kLoadPasses; ++pass) {
        // Rows past the group are 0 in both operands (neutral, as in the data kernel).
        FragmentCoord const s = S::slice_coord(tid, pass);  // (row, column)
        std::int64_t const r = r0 + s.row;
        int const dn = tile.n_begin + s.col, ak = tile.k_begin + s.col;
        dc_tile[s.row][s.col] = (r < rows.end && dn < p.n) ? device_to_float(p.dc[r * p.ldc + dn]) : 0.0f;
        a_tile[s.row][s.col] = (r < rows.end && ak < p.k) ? device_to_float(p.a[r * p.lda + ak]) : 0.0f;
      }
      __syncthreads();
#pragma unroll
      for (int rr = 0; rr < BK; ++rr) {
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            FragmentCoord const o = S::output_coord(tid, i, j);  // (n, k)
            acc[i][j] = __fadd_rn(acc[i][j], __fmul_rn(dc_tile[rr][o.row], a_tile[rr][o.col]));
          }
        if (sums_bias) bias_acc = __fadd_rn(bias_acc, dc_tile[rr][tid]);
      }
      __syncthreads();
    }
    TDb* const dbg = p.db + static_cast<std::int64_t>(tile.group) * p.n * p.k;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        FragmentCoord const o = S::output_coord(tid, i, j);
        int const dn = tile.n_begin + o.row, dk = tile.k_begin + o.col;
        if (dn < p.n && dk < p.k) dbg[static_cast<std::int64_t>(dn) * p.k + dk] = device_from_float<TDb>(acc[i][j]);
      }
    if (sums_bias && tile.n_begin + tid < p.n)
      p.d_bias[static_cast<std::int64_t>(tile.group) * p.n + tile.n_begin + tid] = device_from_float<TDb>(bias_acc);
  }
}

//! Refuses extents the kernels' int indices cannot hold.
inline void check_int_extent(std::string_view where, std::string_view name, std::int64_t value) {
  require(value <= std::numeric_limits<int>::max(), Errc::kUnsupported, where, name, value, "< 2^31");
}

//! Device offsets: the count is checked on the host (as the Host does), the values on the device
//! (clamped, see the file comment).
inline void check_device_offsets(std::string_view where, std::span<std::int32_t const> offsets, std::int64_t num_groups,
                                 std::string_view groups_name) {
  require(offsets.size() == static_cast<std::size_t>(num_groups) + 1, Errc::kShapeMismatch, where, "offsets.size()",
          offsets.size(), fmt::format("{} + 1 = {}", groups_name, num_groups + 1));
  require(offsets.data() != nullptr, Errc::kInvalidArgument, where, "offsets.data()", "nullptr",
          fmt::format("device memory holding {} + 1 offsets", groups_name));
}

}  // namespace detail

//! @brief The grouped GEMM's data gradient on the GPU (semantics of host/grouped_gemm_backward.hpp):
//! da[r, :] = dc[r, :] · b[g] for the rows r of group g, fp32 accumulation in n order, one rounding
//! to TDa at the end: bitwise equal to the Host backend.
//! @param[in]  stream   the caller's stream; nothing syncs, nothing is allocated (graph-capturable)
//! @param[in]  dc       [M, N] device memory: dL/dc (fp32, bf16 or fp16)
//! @param[in]  b        [G, N, K] device memory, K-major: forward's weights (fp32, bf16 or fp16)
//! @param[in]  offsets  [G + 1] **device** memory: forward's row ranges. Values are expected
//!                      non-decreasing in [0, M]; others are clamped (never read out of bounds)
//! @param[out] da       [M, K] device memory: dL/da; rows outside [offsets[0], offsets[G]) are left untouched
//! @throws Error on bad shapes or a host stream (before any work); Errc::kUnsupported for more than
//!         kMaxGemmGroups groups (the tile list's prefix lives in shared memory) or extents >= 2^31
template <class TDc, class TB, float_element TDa>
requires float_element<TDc> && float_element<TB>
void grouped_gemm_backward_data(StreamRef stream, MatrixView<TDc> dc_in, BatchedMatrixView<TB> b_in,
                                std::span<std::int32_t const> offsets, MatrixView<TDa> da) {
  EPX_NVTX_RANGE(GroupedGemmBackwardData);
  constexpr std::string_view where = "grouped_gemm_backward_data";
  using Dc = std::remove_const_t<TDc>;
  using B = std::remove_const_t<TB>;
  using Da = std::remove_cv_t<TDa>;
  detail::CudaStream const s(stream, where);
  MatrixView<Dc const> const dc(dc_in);
  BatchedMatrixView<B const> const b{b_in.data, b_in.batch, b_in.rows, b_in.cols};
  detail::check_matrix(where, "dc", dc, -1, -1);
  detail::check_batched(where, "b", b, -1, dc.cols, -1);
  detail::check_matrix(where, "da", da, dc.rows, b.cols);
  detail::check_device_offsets(where, offsets, b.batch, "b.batch");
  detail::require(b.batch <= detail::kMaxGemmGroups, Errc::kUnsupported, where, "b.batch (groups)", b.batch,
                  fmt::format("<= {} (the tile list's prefix lives in shared memory)", detail::kMaxGemmGroups));
  detail::check_int_extent(where, "b.rows (n)", b.rows);
  detail::check_int_extent(where, "b.cols (k)", b.cols);
  if (b.batch == 0 || dc.rows == 0 || b.cols == 0) return;  // no output element (N = 0 still writes zeros)

  using S = detail::BackwardTileShape;
  detail::GemmBackwardDataParams<Dc, B, Da> const params{.dc = dc.data,
                                                         .ldc = dc.ld,
                                                         .b = b.data,
                                                         .da = da.data,
                                                         .ldda = da.ld,
                                                         .offsets = offsets.data(),
                                                         .num_rows = dc.rows,
                                                         .num_groups = static_cast<int>(b.batch),
                                                         .n = static_cast<int>(b.rows),
                                                         .k = static_cast<int>(b.cols)};
  std::size_t const prefix_bytes = (static_cast<std::size_t>(b.batch) + 1) * sizeof(long long);
  detail::launch_persistent(detail::grouped_gemm_backward_data_kernel<Dc, B, Da>,
                            "grouped_gemm_backward_data_kernel (64x64 tiles)", params, S::kThreads, prefix_bytes,
                            detail::data_max_tiles(dc.rows, params.num_groups, params.k),
                            detail::current_device_traits(), s, where);
}

//! @brief The grouped GEMM's weight and bias gradients on the GPU (semantics of
//! host/grouped_gemm_backward.hpp): db[g] = dc[rows of g]ᵀ · a[rows of g] and dbias[g] = the column
//! sums of dc[rows of g], fp32 accumulation in row order, one rounding to TDb at the end: bitwise
//! equal to the Host backend. Every group is written: zeros for a group with no rows (or clamped
//! empty). One CTA per (group, 64 n, 64 k) tile loops over the group's rows in order: deterministic,
//! no atomics, and as slow as the largest group's rows (the correctness path).
//! @param[in]  stream   the caller's stream; nothing syncs, nothing is allocated (graph-capturable)
//! @param[in]  a        [M, K] device memory: forward's input (fp32, bf16 or fp16)
//! @param[in]  dc       [M, N] device memory: dL/dc (fp32, bf16 or fp16)
//! @param[in]  offsets  [G + 1] **device** memory: forward's row ranges. Values are expected
//!                      non-decreasing in [0, M]; others are clamped (never read out of bounds)
//! @param[out] db       [G, N, K] device memory, K-major like forward's b: dL/db (overwritten)
//! @param[out] d_bias   [G, N] device memory: dL/dbias, or nullptr when no bias gradient is wanted
//! @throws Error on bad shapes or a host stream (before any work); Errc::kUnsupported for extents >= 2^31
template <class TA, class TDc, float_element TDb>
requires float_element<TA> && float_element<TDc>
void grouped_gemm_backward_weight(StreamRef stream, MatrixView<TA> a_in, MatrixView<TDc> dc_in,
                                  std::span<std::int32_t const> offsets, BatchedMatrixView<TDb> db,
                                  std::type_identity_t<TDb*> d_bias) {
  EPX_NVTX_RANGE(GroupedGemmBackwardWeight);
  constexpr std::string_view where = "grouped_gemm_backward_weight";
  using A = std::remove_const_t<TA>;
  using Dc = std::remove_const_t<TDc>;
  using Db = std::remove_cv_t<TDb>;
  detail::CudaStream const s(stream, where);
  MatrixView<A const> const a(a_in);
  MatrixView<Dc const> const dc(dc_in);
  detail::check_matrix(where, "a", a, -1, -1);
  detail::check_matrix(where, "dc", dc, a.rows, -1);
  detail::check_batched(where, "db", db, -1, dc.cols, a.cols);
  detail::check_device_offsets(where, offsets, db.batch, "db.batch");
  detail::check_int_extent(where, "db.batch (groups)", db.batch);
  detail::check_int_extent(where, "db.rows (n)", db.rows);
  detail::check_int_extent(where, "db.cols (k)", db.cols);

  using S = detail::BackwardTileShape;
  detail::GemmBackwardWeightParams<A, Dc, Db> const params{.a = a.data,
                                                           .lda = a.ld,
                                                           .dc = dc.data,
                                                           .ldc = dc.ld,
                                                           .db = db.data,
                                                           .d_bias = d_bias,
                                                           .offsets = offsets.data(),
                                                           .num_rows = a.rows,
                                                           .num_groups = static_cast<int>(db.batch),
                                                           .n = static_cast<int>(db.rows),
                                                           .k = static_cast<int>(db.cols)};
  long long const tiles = detail::weight_tiles(params.num_groups, params.n, params.k, d_bias != nullptr);
  if (tiles == 0) return;  // no output element: no group, N = 0, or K = 0 without a bias gradient
  detail::launch_persistent(detail::grouped_gemm_backward_weight_kernel<A, Dc, Db>,
                            "grouped_gemm_backward_weight_kernel (64x64 tiles)", params, S::kThreads, 0, tiles,
                            detail::current_device_traits(), s, where);
}

}  // namespace epx
