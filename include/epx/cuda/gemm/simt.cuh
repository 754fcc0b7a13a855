// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! The fp32 mainloop of the grouped GEMM: CUDA cores, 64 x 64 tiles, 4 x 4 outputs per thread,
//! each output accumulated in k order like the Host reference (so fp32 results agree with it to
//! rounding of fused multiply-adds). Same scheduler and epilogue as the tensor-core mainloop; it
//! exists for fp32 models and as an exact oracle on the GPU, not for speed.

#include <epx/cuda/gemm/epilogue.cuh>
#include <epx/cuda/gemm/mma_sm80.cuh>
#include <epx/cuda/gemm/tile_scheduler.cuh>

#include <cstdint>

namespace epx::detail {

struct SimtTileShape {
  static constexpr int kBM = 64, kBN = 64, kBK = 16, kThreads = 256;
  static_assert(kBM == kBN, "A and B tiles are loaded by one loop");
};

template <class TC, bool kGated>
__global__ void __launch_bounds__(SimtTileShape::kThreads)
    grouped_gemm_simt_kernel(GroupedGemmArgs<float, TC> const args) {
  constexpr int BM = SimtTileShape::kBM, BN = SimtTileShape::kBN, BK = SimtTileShape::kBK;
  __shared__ float a_tile[BK][BM];  // transposed: a thread's 4 rows are one broadcast read
  __shared__ float b_tile[BK][BN];
  extern __shared__ long long tile_start[];
  TileScheduler<SimtTileShape::kThreads, BM, BN> scheduler(tile_start, args.offsets, args.num_groups, args.num_rows,
                                                           args.n);
  long long const num_tiles = scheduler.num_tiles();
  int const tx = static_cast<int>(threadIdx.x) % 16, ty = static_cast<int>(threadIdx.x) / 16;
  auto const& epi = args.epilogue;

  for (long long t = blockIdx.x; t < num_tiles; t += gridDim.x) {
    GemmTile const tile = scheduler.tile(t);
    float const* const b_group = args.b + static_cast<std::int64_t>(tile.group) * args.n * args.k;
    float acc[4][4] = {};
    for (int k0 = 0; k0 < args.k; k0 += BK) {
      for (int i = static_cast<int>(threadIdx.x); i < BM * BK; i += SimtTileShape::kThreads) {
        int const r = i / BK, kk = i % BK;  // consecutive threads read consecutive k
        std::int64_t const row = tile.row_begin + r;
        a_tile[kk][r] = (row < tile.row_end && k0 + kk < args.k) ? args.a[row * args.lda + k0 + kk] : 0.0f;
        int const p = tile.n_begin + r;
        b_tile[kk][r] = (p < args.n && k0 + kk < args.k)
                            ? b_group[static_cast<std::int64_t>(epi.weight_row(p, kGated)) * args.k + k0 + kk]
                            : 0.0f;
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < BK; ++kk)
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] += a_tile[kk][ty * 4 + i] * b_tile[kk][tx * 4 + j];
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      std::int64_t const row = tile.row_begin + ty * 4 + i;
      if (row >= tile.row_end) continue;
#pragma unroll
      for (int j = 0; j < 4; j += 2) {
        int const p = tile.n_begin + tx * 4 + j;
        if (p < args.n) epi.template store_pair<kGated>(tile.group, row, p, acc[i][j], acc[i][j + 1]);
      }
    }
  }
}

}  // namespace epx::detail
