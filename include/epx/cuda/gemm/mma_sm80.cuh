// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! The tensor-core mainloop of the grouped GEMM for bf16/fp16 (sm_80 and later): warp-level
//! mma.sync.m16n8k16 fed by ldmatrix from XOR-swizzled shared memory, filled by 16-byte cp.async
//! copies in a multi-stage ring, inside a persistent loop over the tiles of TileScheduler.
//!
//! A is [rows, K] row-major and B is [N, K] per group (K-major), so both operands are read along K
//! and neither needs a transposing load ("row.col" mma). Rows past a group's end and K past the end
//! are zero-filled by cp.async (src-size 0), so partial tiles need no special path; stores are
//! predicated per row and column.

#include <epx/core/dtype.hpp>
#include <epx/cuda/gemm/epilogue.cuh>
#include <epx/cuda/gemm/tile_scheduler.cuh>

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace epx::detail {

//! A CTA tile: BM x BN outputs, BK = 64 elements of K per stage (128-byte rows: 8 chunks of 16
//! bytes, swizzled chunk ^ (row % 8) so that ldmatrix's eight row addresses hit distinct banks).
template <int BM, int BN, int WarpsM, int WarpsN, int Stages, int MinBlocksPerSm>
struct MmaTileShape {
  static constexpr int kBM = BM, kBN = BN, kBK = 64;
  static constexpr int kWarpsM = WarpsM, kWarpsN = WarpsN, kStages = Stages;
  static constexpr int kMinBlocksPerSm = MinBlocksPerSm;
  static constexpr int kThreads = 32 * WarpsM * WarpsN;
  static constexpr int kWM = BM / WarpsM, kWN = BN / WarpsN;  // warp tile
  static constexpr int kMI = kWM / 16, kNI = kWN / 8;         // m16n8k16 instructions per warp tile
  static constexpr std::size_t kStageElems = static_cast<std::size_t>(BM + BN) * kBK;
  static constexpr std::size_t kSmemBytes = Stages * kStageElems * 2;  // 16-bit elements
  static_assert(kWM % 16 == 0 && kWN % 16 == 0, "warp tiles are whole ldmatrix.x4 loads of A and B");
  static_assert(Stages >= 2);
};

//! The tile shapes the policy picks from (grouped_gemm.cuh): rows per group decide.
using MmaDecodeTile = MmaTileShape<16, 128, 1, 4, 5, 2>;   // few rows per expert: stream the weights
using MmaMediumTile = MmaTileShape<64, 128, 2, 2, 4, 2>;
using MmaLargeTile = MmaTileShape<128, 128, 2, 4, 3, 2>;

template <class T, class TC>
struct GroupedGemmArgs {
  T const* a = nullptr;        //!< [num_rows, k]
  std::int64_t lda = 0;
  std::int64_t num_rows = 0;
  T const* b = nullptr;        //!< [num_groups, n, k]
  std::int32_t const* offsets = nullptr;  //!< [num_groups + 1] device
  int num_groups = 0;
  int n = 0;
  int k = 0;
  GemmEpilogue<TC, T> epilogue = {};
};

namespace mma {

__device__ __forceinline__ std::uint32_t smem_address(void const* p) {
  return static_cast<std::uint32_t>(__cvta_generic_to_shared(p));
}

//! 16 bytes global -> shared, or 16 zero bytes when !valid (src is then not read).
__device__ __forceinline__ void cp_async_16(std::uint32_t dst, void const* src, bool valid) {
  int const bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(std::uint32_t (&r)[4], std::uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}

template <class T>
__device__ __forceinline__ void mma_16816(float (&d)[4], std::uint32_t const (&a)[4], std::uint32_t const (&b)[2]) {
  if constexpr (std::is_same_v<T, bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

//! Element offset of (row, 16-byte chunk) in a swizzled [rows, 64] stage buffer.
__device__ __forceinline__ int swizzled(int row, int chunk) { return (row * 8 + (chunk ^ (row & 7))) * 8; }

//! Copies the k-slice `kt` (64 elements of K) of `tile`'s A rows and weight rows into one stage
//! (128-byte rows, swizzled). Rows past the group's end, columns past n and K past the end are
//! zero-filled, so partial tiles need no other path. Shared by the mma.sync and wgmma mainloops.
template <int BM, int BN, int kThreads, bool kGated, class T, class TC>
__device__ __forceinline__ void load_stage(GroupedGemmArgs<T, TC> const& args, GemmTile const& tile, T const* b_group,
                                           T* stage_a, T* stage_b, int kt) {
  constexpr int BK = 64;
  int const k0 = kt * BK;
  std::uint32_t const a_base = smem_address(stage_a);
  std::uint32_t const b_base = smem_address(stage_b);
#pragma unroll
  for (int i = static_cast<int>(threadIdx.x); i < BM * 8; i += kThreads) {
    int const r = i >> 3, c = i & 7;
    std::int64_t const row = tile.row_begin + r;
    bool const valid = row < tile.row_end && k0 + c * 8 < args.k;
    cp_async_16(a_base + swizzled(r, c) * 2, valid ? args.a + row * args.lda + k0 + c * 8 : args.a, valid);
  }
#pragma unroll
  for (int i = static_cast<int>(threadIdx.x); i < BN * 8; i += kThreads) {
    int const r = i >> 3, c = i & 7;
    int const p = tile.n_begin + r;
    bool const valid = p < args.n && k0 + c * 8 < args.k;
    T const* src = valid ? b_group + static_cast<std::int64_t>(args.epilogue.weight_row(p, kGated)) * args.k + k0 + c * 8
                         : args.b;
    cp_async_16(b_base + swizzled(r, c) * 2, src, valid);
  }
}

}  // namespace mma

template <class Shape, class T, class TC, bool kGated>
__global__ void __launch_bounds__(Shape::kThreads, Shape::kMinBlocksPerSm)
    grouped_gemm_mma_kernel(GroupedGemmArgs<T, TC> const args) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr int BM = Shape::kBM, BN = Shape::kBN, BK = Shape::kBK, kStages = Shape::kStages;
  constexpr int kThreads = Shape::kThreads, MI = Shape::kMI, NI = Shape::kNI;
  extern __shared__ __align__(128) unsigned char smem[];
  T* const stage_a = reinterpret_cast<T*>(smem);
  T* const stage_b = stage_a + kStages * BM * BK;
  auto* const tile_start = reinterpret_cast<long long*>(smem + Shape::kSmemBytes);

  TileScheduler<kThreads, BM, BN> scheduler(tile_start, args.offsets, args.num_groups, args.num_rows, args.n);
  long long const num_tiles = scheduler.num_tiles();
  int const lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  int const warp_m = warp / Shape::kWarpsN, warp_n = warp % Shape::kWarpsN;
  int const k_tiles = ceil_div(args.k, BK);
  auto const& epi = args.epilogue;

  for (long long t = blockIdx.x; t < num_tiles; t += gridDim.x) {
    GemmTile const tile = scheduler.tile(t);
    T const* const b_group = args.b + static_cast<std::int64_t>(tile.group) * args.n * args.k;

    auto load_stage = [&](int stage, int kt) {
      mma::load_stage<BM, BN, kThreads, kGated>(args, tile, b_group, stage_a + stage * BM * BK,
                                                stage_b + stage * BN * BK, kt);
    };

    float acc[MI][NI][4];
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int ni = 0; ni < NI; ++ni)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.0f;

#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
      if (s < k_tiles) load_stage(s, s);
      mma::cp_async_commit();  // empty groups keep the wait count uniform
    }
    for (int kt = 0; kt < k_tiles; ++kt) {
      mma::cp_async_wait<kStages - 2>();  // stage kt has landed (for this thread) ...
      __syncthreads();                    // ... for every thread, and stage kt - 1 is no longer read
      int const next = kt + kStages - 1;
      if (next < k_tiles) load_stage(next % kStages, next);
      mma::cp_async_commit();

      int const stage = kt % kStages;
      T const* const sa = stage_a + stage * BM * BK;
      T const* const sb = stage_b + stage * BN * BK;
#pragma unroll
      for (int kk = 0; kk < BK / 16; ++kk) {
        std::uint32_t af[MI][4];
        std::uint32_t bf[NI][2];
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) {
          int const row = warp_m * Shape::kWM + mi * 16 + (lane & 15);
          int const chunk = kk * 2 + (lane >> 4);
          mma::ldmatrix_x4(af[mi], mma::smem_address(sa + mma::swizzled(row, chunk)));
        }
#pragma unroll
        for (int nj = 0; nj < NI / 2; ++nj) {
          int const row = warp_n * Shape::kWN + nj * 16 + (lane & 7) + ((lane >> 4) << 3);
          int const chunk = kk * 2 + ((lane >> 3) & 1);
          std::uint32_t r[4];
          mma::ldmatrix_x4(r, mma::smem_address(sb + mma::swizzled(row, chunk)));
          bf[2 * nj][0] = r[0];
          bf[2 * nj][1] = r[1];
          bf[2 * nj + 1][0] = r[2];
          bf[2 * nj + 1][1] = r[3];
        }
#pragma unroll
        for (int mi = 0; mi < MI; ++mi)
#pragma unroll
          for (int ni = 0; ni < NI; ++ni) mma::mma_16816<T>(acc[mi][ni], af[mi], bf[ni]);
      }
    }
    mma::cp_async_wait<0>();
    __syncthreads();  // every warp is done with the ring before the next tile refills it

    // Accumulator (mi, ni): rows lane/4 and lane/4 + 8, columns 2 * (lane % 4) + {0, 1}.
#pragma unroll
    for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
      for (int ni = 0; ni < NI; ++ni) {
        int const p = tile.n_begin + warp_n * Shape::kWN + ni * 8 + 2 * (lane & 3);
        if (p >= args.n) continue;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          std::int64_t const row = tile.row_begin + warp_m * Shape::kWM + mi * 16 + (lane >> 2) + 8 * h;
          if (row < tile.row_end)
            epi.template store_pair<kGated>(tile.group, row, p, acc[mi][ni][2 * h], acc[mi][ni][2 * h + 1]);
        }
      }
    }
  }
#else
  __trap();  // built for an architecture without bf16/fp16 mma.sync; the launcher refuses such devices
#endif
}

}  // namespace epx::detail
