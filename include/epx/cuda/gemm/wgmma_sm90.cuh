// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! The Hopper (sm_90a) mainloop of the grouped GEMM: warpgroup wgmma.mma_async reading both
//! operands from shared memory through matrix descriptors. **Opt-in and not yet run on a GPU**:
//! compiled only when EPX_ENABLE_WGMMA is defined, which requires building for sm_90a
//! (CMAKE_CUDA_ARCHITECTURES=90a); grouped_gemm then uses it for large tiles on compute
//! capability 9.0 devices. tests/cuda builds grouped_gemm_test a second time this way.
//!
//! Why this first step: the mma.sync mainloop tops out near half of Hopper's tensor rate
//! (../shared/reference/hopper-grouped-gemm.md §2). This kernel keeps everything else of
//! mma_sm80.cuh (scheduler, cp.async ring, epilogue) and swaps the math: 2 consumer warpgroups of
//! 64 x 128 each. The stage layout is already the canonical K-major 128-byte swizzle (128-byte
//! rows, 16-byte chunk ^ (row % 8), 1024-byte aligned stages), so a descriptor with swizzle mode
//! 128B and a stride of 1024 bytes between 8-row groups describes it; one k16 step advances the
//! start address by 32 bytes. Next steps (TMA loads, a producer warpgroup, mbarriers, 128 x 256
//! tiles) are in bench/NOTES.md.

#include <epx/core/dtype.hpp>
#include <epx/cuda/gemm/epilogue.cuh>
#include <epx/cuda/gemm/mma_sm80.cuh>
#include <epx/cuda/gemm/tile_scheduler.cuh>

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#if defined(EPX_ENABLE_WGMMA) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "epx: EPX_ENABLE_WGMMA needs code for sm_90a (CMAKE_CUDA_ARCHITECTURES=90a): wgmma does not exist on plain sm_90"
#endif

namespace epx::detail {

struct WgmmaTileShape {
  static constexpr int kBM = 128, kBN = 128, kBK = 64, kStages = 4;
  static constexpr int kThreads = 256;  // 2 warpgroups, 64 rows each
  static constexpr std::size_t kStageElems = static_cast<std::size_t>(kBM + kBN) * kBK;
  static constexpr std::size_t kSmemBytes = kStages * kStageElems * 2;
  static constexpr std::size_t kAlignSlack = 1024;  // stages start on 1024-byte boundaries
  static_assert((kBM * kBK * 2) % 1024 == 0 && (kBN * kBK * 2) % 1024 == 0);
};

namespace wgmma {

//! Shared-memory matrix descriptor: K-major, 128-byte swizzle, 8-row groups 1024 bytes apart.
__device__ __forceinline__ std::uint64_t descriptor(std::uint32_t smem_address) {
  std::uint64_t desc = (smem_address & 0x3FFFFu) >> 4;  // start address, 16-byte units
  desc |= std::uint64_t{1} << 16;                       // leading byte offset: unused with this swizzle
  desc |= std::uint64_t{1024 >> 4} << 32;               // stride byte offset: next 8-row group
  desc |= std::uint64_t{1} << 62;                       // swizzle mode 1 = 128B
  return desc;
}

__device__ __forceinline__ void fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
//! Makes this thread's generic-proxy writes to shared memory (cp.async) visible to wgmma's async proxy.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

template <class T>
__device__ __forceinline__ void wgmma_m64n128k16(float (&d)[64], std::uint64_t desc_a, std::uint64_t desc_b) {
  if constexpr (std::is_same_v<T, bfloat16>) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(desc_a), "l"(desc_b), "r"(1));
  } else {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(desc_a), "l"(desc_b), "r"(1));
  }
}

}  // namespace wgmma

template <class T, class TC, bool kGated>
__global__ void __launch_bounds__(WgmmaTileShape::kThreads, 1)
    grouped_gemm_wgmma_kernel(GroupedGemmArgs<T, TC> const args) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Shape = WgmmaTileShape;
  constexpr int BM = Shape::kBM, BN = Shape::kBN, BK = Shape::kBK, kStages = Shape::kStages;
  constexpr int kThreads = Shape::kThreads;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  std::uint32_t const raw_address = mma::smem_address(smem_raw);
  unsigned char* const smem = smem_raw + ((1024u - (raw_address & 1023u)) & 1023u);
  T* const stage_a = reinterpret_cast<T*>(smem);
  T* const stage_b = stage_a + kStages * BM * BK;
  auto* const tile_start = reinterpret_cast<long long*>(smem + Shape::kSmemBytes);

  TileScheduler<kThreads, BM, BN> scheduler(tile_start, args.offsets, args.num_groups, args.num_rows, args.n);
  long long const num_tiles = scheduler.num_tiles();
  int const lane = static_cast<int>(threadIdx.x) & 31;
  int const warpgroup = static_cast<int>(threadIdx.x) / 128, warp_in_group = (static_cast<int>(threadIdx.x) / 32) & 3;
  int const k_tiles = ceil_div(args.k, BK);
  auto const& epi = args.epilogue;

  for (long long t = blockIdx.x; t < num_tiles; t += gridDim.x) {
    GemmTile const tile = scheduler.tile(t);
    T const* const b_group = args.b + static_cast<std::int64_t>(tile.group) * args.n * args.k;
    auto load_stage = [&](int stage, int kt) {
      mma::load_stage<BM, BN, kThreads, kGated>(args, tile, b_group, stage_a + stage * BM * BK,
                                                stage_b + stage * BN * BK, kt);
    };

    float acc[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[i] = 0.0f;
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
      if (s < k_tiles) load_stage(s, s);
      mma::cp_async_commit();
    }
    for (int kt = 0; kt < k_tiles; ++kt) {
      mma::cp_async_wait<kStages - 2>();
      wgmma::fence_proxy_async();  // this thread's copies, visible to the tensor cores' async proxy
      __syncthreads();             // everyone's copies landed; the stage refilled below is no longer read
      int const next = kt + kStages - 1;
      if (next < k_tiles) load_stage(next % kStages, next);
      mma::cp_async_commit();

      int const stage = kt % kStages;
      std::uint64_t const desc_a =
          wgmma::descriptor(mma::smem_address(stage_a + stage * BM * BK + warpgroup * 64 * BK));
      std::uint64_t const desc_b = wgmma::descriptor(mma::smem_address(stage_b + stage * BN * BK));
      wgmma::fence();
#pragma unroll
      for (int kk = 0; kk < BK / 16; ++kk)  // +32 bytes along K per step: +2 in the descriptor's address
        wgmma::wgmma_m64n128k16<T>(acc, desc_a + 2 * kk, desc_b + 2 * kk);
      wgmma::commit();
      wgmma::wait_all();  // the stage may be refilled after the next barrier
    }
    mma::cp_async_wait<0>();
    __syncthreads();

    // Accumulator 4j + {0,1,2,3}: rows r and r + 8 (r = 16 * warp + lane / 4), columns 8j + 2 (lane % 4) + {0, 1}.
    std::int64_t const row0 = tile.row_begin + warpgroup * 64 + warp_in_group * 16 + (lane >> 2);
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
      int const p = tile.n_begin + 8 * j + 2 * (lane & 3);
      if (p >= args.n) continue;
      if (row0 < tile.row_end) epi.template store_pair<kGated>(tile.group, row0, p, acc[4 * j], acc[4 * j + 1]);
      if (row0 + 8 < tile.row_end)
        epi.template store_pair<kGated>(tile.group, row0 + 8, p, acc[4 * j + 2], acc[4 * j + 3]);
    }
  }
#else
  __trap();  // not built for sm_90a: the launcher only picks this kernel when EPX_ENABLE_WGMMA is set
#endif
}

}  // namespace epx::detail
