// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! The fp32 mainloop of the grouped GEMM: CUDA cores, 64 x 64 tiles, 4 x 4 outputs per thread,
//! each output accumulated in k order like the Host reference (so fp32 results agree with it to
//! rounding of fused multiply-adds). Same scheduler and epilogue as the tensor-core mainloop; it
//! exists for fp32 models and as an exact oracle on the GPU, not for speed. Its thread maps are in
//! simt_layout.hpp.

#include <epx/cuda/gemm/epilogue.cuh>
#include <epx/cuda/gemm/mma_sm80.cuh>
#include <epx/cuda/gemm/simt_layout.hpp>
#include <epx/cuda/gemm/tile_scheduler.cuh>

#include <cstdint>

namespace epx::detail {

template <class TC, EpilogueKind kKind>
__global__ void __launch_bounds__(SimtTileShape::kThreads)
    grouped_gemm_simt_kernel(GroupedGemmArgs<float, TC> const args) {
  using Shape = SimtTileShape;
  constexpr int BM = Shape::kBM, BN = Shape::kBN, BK = Shape::kBK;
  constexpr bool kGated = epilogue_is_gated(kKind);
  __shared__ float a_tile[BK][BM];  // transposed: a thread's 4 rows are one broadcast read
  __shared__ float b_tile[BK][BN];
  extern __shared__ long long tile_start[];
  TileScheduler<Shape::kThreads, BM, BN> scheduler(tile_start, args.offsets, args.num_groups, args.num_rows, args.n);
  long long const num_tiles = scheduler.num_tiles();
  int const tid = static_cast<int>(threadIdx.x);
  auto const& epi = args.epilogue;

  for (long long t = blockIdx.x; t < num_tiles; t += gridDim.x) {
    GemmTile const tile = scheduler.tile(t);
    float const* const b_group = args.b + static_cast<std::int64_t>(tile.group) * args.n * args.k;
    float acc[4][4] = {};
    for (int k0 = 0; k0 < args.k; k0 += BK) {
#pragma unroll
      for (int pass = 0; pass < Shape::kLoadPasses; ++pass) {
        FragmentCoord const e = Shape::load_coord(tid, pass);
        int const k = k0 + e.col;
        std::int64_t const row = tile.row_begin + e.row;
        a_tile[e.col][e.row] = (row < tile.row_end && k < args.k) ? args.a[row * args.lda + k] : 0.0f;
        int const p = tile.n_begin + e.row;
        b_tile[e.col][e.row] = (p < args.n && k < args.k)
                                   ? b_group[static_cast<std::int64_t>(epi.weight_row(p, kGated)) * args.k + k]
                                   : 0.0f;
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < BK; ++kk)
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            FragmentCoord const o = Shape::output_coord(tid, i, j);
            acc[i][j] += a_tile[kk][o.row] * b_tile[kk][o.col];
          }
      __syncthreads();
    }
#pragma unroll
    for (int j = 0; j < 4; j += 2) {
      int const p = tile.n_begin + Shape::output_coord(tid, 0, j).col;
      if (p >= args.n) continue;
      auto const columns = epi.template columns<kKind>(tile.group, p);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        std::int64_t const row = tile.row_begin + Shape::output_coord(tid, i, j).row;
        if (row < tile.row_end)
          epi.template store<kKind>(row, columns, epi.template row_factor<kKind>(row), acc[i][j], acc[i][j + 1]);
      }
    }
  }
}

}  // namespace epx::detail
