// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! The Hopper (sm_90a) mainloop of the grouped GEMM: warpgroup wgmma.mma_async reading both
//! operands from shared memory through matrix descriptors. Opt-in: compiled only when
//! EPX_ENABLE_WGMMA is defined, which requires building for sm_90a (CMAKE_CUDA_ARCHITECTURES=90a);
//! grouped_gemm then uses it for large tiles on compute capability 9.0 devices. tests/cuda builds
//! grouped_gemm_test a second time this way.
//!
//! Why: mma.sync issues Ampere-shaped (m16n8k16) instructions from single warps, which cannot keep
//! Hopper's tensor cores fed (about half of their rate); wgmma issues warpgroup-wide asynchronous
//! ones that read shared memory directly. This kernel keeps everything else of
//! mma_sm80.cuh (scheduler, cp.async copies, epilogue) and swaps the math: 2 consumer warpgroups of
//! 64 x 128 each. The stage layout is already the canonical K-major 128-byte swizzle with
//! 1024-byte aligned stages, so a descriptor (wgmma_layout.hpp) describes it as it is. One wgmma
//! group stays in flight across iterations (the tensor cores do not drain at every k-tile): the
//! ring (pipeline.hpp, WgmmaStageRing) refills a stage one iteration later than the mma.sync ring.

#include <epx/core/dtype.hpp>
#include <epx/cuda/gemm/epilogue.cuh>
#include <epx/cuda/gemm/mma_sm80.cuh>
#include <epx/cuda/gemm/pipeline.hpp>
#include <epx/cuda/gemm/tile_scheduler.cuh>
#include <epx/cuda/gemm/tile_shapes.hpp>
#include <epx/cuda/gemm/wgmma_layout.hpp>

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#if defined(EPX_ENABLE_WGMMA) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "epx: EPX_ENABLE_WGMMA needs code for sm_90a (CMAKE_CUDA_ARCHITECTURES=90a): wgmma does not exist on plain sm_90"
#endif

namespace epx::detail {

namespace wgmma {

__device__ __forceinline__ void fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
//! Waits until at most N of this warpgroup's committed wgmma groups are pending.
template <int N>
__device__ __forceinline__ void wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
//! Makes this thread's generic-proxy writes to shared memory (cp.async) visible to wgmma's async proxy.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

template <class T>
__device__ __forceinline__ void wgmma_m64n128k16(float (&d)[64], std::uint64_t desc_a, std::uint64_t desc_b) {
  if constexpr (std::is_same_v<T, bfloat16>) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, "
        "%13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, "
        "%35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, "
        "%57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),
          "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),
          "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),
          "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]),
          "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]),
          "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
          "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]),
          "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(desc_a), "l"(desc_b), "r"(1));
  } else {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, "
        "%13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, "
        "%35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, "
        "%57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),
          "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),
          "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),
          "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]),
          "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]),
          "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
          "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]),
          "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(desc_a), "l"(desc_b), "r"(1));
  }
}

}  // namespace wgmma

template <class T, class TC, EpilogueKind kKind>
__global__ void __launch_bounds__(WgmmaTileShape::kThreads, 1)
    grouped_gemm_wgmma_kernel(GroupedGemmArgs<T, TC> const args) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Shape = WgmmaTileShape;
  using Ring = WgmmaStageRing<Shape::kStages>;
  constexpr int BM = Shape::kBM, BN = Shape::kBN, kThreads = Shape::kThreads;
  constexpr bool kGated = epilogue_is_gated(kKind);
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  std::uint32_t const raw_address = mma::smem_address(smem_raw);
  std::uint32_t const padding = padding_to_swizzle_period(raw_address);
  std::uint32_t const a_stages = raw_address + padding;
  std::uint32_t const b_stages = a_stages + Shape::kStages * Shape::kStageBytesA;
  auto* const tile_start = reinterpret_cast<long long*>(smem_raw + padding + Shape::kSmemBytes);

  TileScheduler<kThreads, BM, BN> scheduler(tile_start, args.offsets, args.num_groups, args.num_rows, args.n);
  long long const num_tiles = scheduler.num_tiles();
  int const lane = static_cast<int>(threadIdx.x) & 31;
  int const warpgroup = static_cast<int>(threadIdx.x) / 128, warp_in_group = (static_cast<int>(threadIdx.x) / 32) & 3;
  int const k_tiles = ceil_div(args.k, Shape::kBK);
  auto const& epi = args.epilogue;

  for (long long t = blockIdx.x; t < num_tiles; t += gridDim.x) {
    GemmTile const tile = scheduler.tile(t);
    auto const copies = mma::tile_copies<BM, BN, kThreads, kGated>(args, tile);
    auto load_stage = [&](int kt) {
      int const stage = Ring::stage(kt);
      copies.load(a_stages + stage * Shape::kStageBytesA, b_stages + stage * Shape::kStageBytesB, kt);
    };

    float acc[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[i] = 0.0f;
    mma::CopyRing<Ring>::prefetch(k_tiles, load_stage);
    for (int kt = 0; kt < k_tiles; ++kt) {
      // This thread's copies made visible to the tensor cores' async proxy before the barrier.
      mma::CopyRing<Ring>::advance(kt, k_tiles, load_stage, [] { wgmma::fence_proxy_async(); });

      int const stage = Ring::stage(kt);
      std::uint64_t const desc_a = stage_wgmma_descriptor(a_stages + stage * Shape::kStageBytesA +
                                                          Shape::warpgroup_row(warpgroup) * kStageRowBytes);
      std::uint64_t const desc_b = stage_wgmma_descriptor(b_stages + stage * Shape::kStageBytesB);
      wgmma::fence();
#pragma unroll
      for (int kk = 0; kk < Shape::kBK / 16; ++kk)
        wgmma::wgmma_m64n128k16<T>(acc, wgmma_descriptor_k_step(desc_a, kk), wgmma_descriptor_k_step(desc_b, kk));
      wgmma::commit();
      // Leaves this k-tile's group in flight; the previous one is done, so its stage may be refilled
      // after the next barrier (WgmmaStageRing gives that stage up from the prefetch).
      wgmma::wait<Ring::kReadGroupsInFlight>();
    }
    wgmma::wait<0>();  // the accumulators are final
    mma::cp_async_wait<0>();
    __syncthreads();  // every warpgroup is done with the ring before the next tile refills it

    // Registers 4j + {0, 1} and 4j + {2, 3} are columns (p, p + 1) of two rows (wgmma_layout.hpp).
    std::int64_t const row0 = tile.row_begin + Shape::warpgroup_row(warpgroup);
    float factor[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      std::int64_t const row = row0 + wgmma_accumulator_coord(warp_in_group, lane, 2 * h).row;
      factor[h] = row < tile.row_end ? epi.template row_factor<kKind>(row) : 0.0f;
    }
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
      int const p = tile.n_begin + wgmma_accumulator_coord(warp_in_group, lane, 4 * j).col;
      if (p >= args.n) continue;
      auto const columns = epi.template columns<kKind>(tile.group, p);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        std::int64_t const row = row0 + wgmma_accumulator_coord(warp_in_group, lane, 4 * j + 2 * h).row;
        if (row < tile.row_end)
          epi.template store<kKind>(row, columns, factor[h], acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1]);
      }
    }
  }
#else
  __trap();  // not built for sm_90a: the launcher only picks this kernel when EPX_ENABLE_WGMMA is set
#endif
}

}  // namespace epx::detail
