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
//!
//! Every index computation lives in a plain C++ header that host tests check against the PTX ISA
//! (tests/kernel_math/gemm_*_test.cpp): the tiles and warp split (tile_shapes.hpp), the stage
//! layout and swizzle (smem_layout.hpp), the copy placement and sources (stage_copy.hpp), the
//! ldmatrix lane addresses and fragment maps (mma_fragments.hpp), the ring schedule (pipeline.hpp).

#include <epx/core/dtype.hpp>
#include <epx/cuda/gemm/epilogue.cuh>
#include <epx/cuda/gemm/mma_fragments.hpp>
#include <epx/cuda/gemm/pipeline.hpp>
#include <epx/cuda/gemm/smem_layout.hpp>
#include <epx/cuda/gemm/stage_copy.hpp>
#include <epx/cuda/gemm/tile_scheduler.cuh>
#include <epx/cuda/gemm/tile_shapes.hpp>

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace epx::detail {

template <class T, class TC>
struct GroupedGemmArgs {
  T const* a = nullptr;  //!< [num_rows, k]
  std::int64_t lda = 0;
  std::int64_t num_rows = 0;
  T const* b = nullptr;                   //!< [num_groups, n, k]
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

//! One tile's copy sources for this thread, computed once per tile (stage_copy.hpp).
template <class CopyA, class CopyB, class T>
struct TileCopies {
  T const* a;  //!< A
  T const* b;  //!< the tile's group's weights [n, k]
  CopySource a_source;
  CopySource b_source;
  int k;

  //! Copies k-tile `kt` of the tile's A rows and weight rows into the stages at shared addresses
  //! `a_stage` and `b_stage`.
  __device__ __forceinline__ void load(std::uint32_t a_stage, std::uint32_t b_stage, int kt) const {
    int const tid = static_cast<int>(threadIdx.x);
    bool const in_k = CopyA::in_k(tid, kt, k);
#pragma unroll
    for (int pass = 0; pass < CopyA::kPasses; ++pass) {
      bool const valid = in_k && a_source.row_valid(pass);
      cp_async_16(a_stage + CopyA::smem_offset(tid, pass), valid ? a + a_source.offset(pass, kt) : a, valid);
    }
#pragma unroll
    for (int pass = 0; pass < CopyB::kPasses; ++pass) {
      bool const valid = in_k && b_source.row_valid(pass);
      cp_async_16(b_stage + CopyB::smem_offset(tid, pass), valid ? b + b_source.offset(pass, kt) : b, valid);
    }
  }
};

//! This thread's copies of `tile` for a CTA tile of BM x BN, kThreads threads.
template <int BM, int BN, int kThreads, bool kGated, class T, class TC>
__device__ __forceinline__ TileCopies<StageCopy<BM, kThreads>, StageCopy<BN, kThreads>, T> tile_copies(
    GroupedGemmArgs<T, TC> const& args, GemmTile const& tile) {
  int const tid = static_cast<int>(threadIdx.x);
  return {args.a, args.b + static_cast<std::int64_t>(tile.group) * args.n * args.k,
          activation_copy_source<StageCopy<BM, kThreads>>(tid, tile.row_begin, tile.row_end, args.lda),
          weight_copy_source<StageCopy<BN, kThreads>>(tid, tile.n_begin, args.n, args.k, kGated,
                                                      args.epilogue.concatenated),
          args.k};
}

//! The cp.async side of the stage ring (pipeline.hpp): the prologue that runs kPrefetch k-tiles
//! ahead, and the top of each k-iteration.
template <class Ring>
struct CopyRing {
  //! The copies of the first kPrefetch k-tiles; empty groups past k_tiles keep the wait counts uniform.
  template <class LoadStage>
  __device__ __forceinline__ static void prefetch(int k_tiles, LoadStage const& load_stage) {
#pragma unroll
    for (int kt = 0; kt < Ring::kPrefetch; ++kt) {
      if (kt < k_tiles) load_stage(kt);
      cp_async_commit();
    }
  }

  //! The top of k-iteration `kt`: k-tile kt has landed for this thread, then (after the barrier) for
  //! every thread; the stage no warp reads any more is refilled with k-tile refill_tile(kt).
  template <class LoadStage>
  __device__ __forceinline__ static void advance(int kt, int k_tiles, LoadStage const& load_stage) {
    cp_async_wait<Ring::kCopyGroupsPending>();
    __syncthreads();
    if (Ring::refill_tile(kt) < k_tiles) load_stage(Ring::refill_tile(kt));
    cp_async_commit();
  }
};

}  // namespace mma

template <class Shape, class T, class TC, EpilogueKind kKind>
__global__ void __launch_bounds__(Shape::kThreads, Shape::kMinBlocksPerSm)
    grouped_gemm_mma_kernel(GroupedGemmArgs<T, TC> const args) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr int BM = Shape::kBM, BN = Shape::kBN, kStages = Shape::kStages;
  constexpr int kThreads = Shape::kThreads, MI = Shape::kMI, NI = Shape::kNI;
  constexpr bool kGated = epilogue_is_gated(kKind);
  using Ring = MmaStageRing<kStages>;
  extern __shared__ __align__(128) unsigned char smem[];
  std::uint32_t const a_stages = mma::smem_address(smem);
  std::uint32_t const b_stages = a_stages + kStages * Shape::kStageBytesA;
  auto* const tile_start = reinterpret_cast<long long*>(smem + Shape::kSmemBytes);

  TileScheduler<kThreads, BM, BN> scheduler(tile_start, args.offsets, args.num_groups, args.num_rows, args.n);
  long long const num_tiles = scheduler.num_tiles();
  int const lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  int const k_tiles = ceil_div(args.k, Shape::kBK);
  auto const& epi = args.epilogue;

  for (long long t = blockIdx.x; t < num_tiles; t += gridDim.x) {
    GemmTile const tile = scheduler.tile(t);
    auto const copies = mma::tile_copies<BM, BN, kThreads, kGated>(args, tile);
    auto load_stage = [&](int kt) {
      int const stage = Ring::stage(kt);
      copies.load(a_stages + stage * Shape::kStageBytesA, b_stages + stage * Shape::kStageBytesB, kt);
    };

    float acc[MI][NI][4];
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int ni = 0; ni < NI; ++ni)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.0f;

    mma::CopyRing<Ring>::prefetch(k_tiles, load_stage);
    for (int kt = 0; kt < k_tiles; ++kt) {
      mma::CopyRing<Ring>::advance(kt, k_tiles, load_stage);

      int const stage = Ring::stage(kt);
      std::uint32_t const sa = a_stages + stage * Shape::kStageBytesA;
      std::uint32_t const sb = b_stages + stage * Shape::kStageBytesB;
#pragma unroll
      for (int kk = 0; kk < Shape::kBK / 16; ++kk) {
        std::uint32_t af[MI][4];
        std::uint32_t bf[NI][2];
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) {
          StageChunk const c = ldmatrix_a_chunk(Shape::warp_row(warp, mi), kk, lane);
          mma::ldmatrix_x4(af[mi], sa + stage_byte_offset(c.row, c.chunk));
        }
#pragma unroll
        for (int nj = 0; nj < NI / 2; ++nj) {
          StageChunk const c = ldmatrix_b_chunk(Shape::warp_col(warp, 2 * nj), kk, lane);
          std::uint32_t r[4];
          mma::ldmatrix_x4(r, sb + stage_byte_offset(c.row, c.chunk));
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            BFragmentSlot const slot = ldmatrix_b_slot(i);
            bf[2 * nj + slot.n8][slot.reg] = r[i];
          }
        }
#pragma unroll
        for (int mi = 0; mi < MI; ++mi)
#pragma unroll
          for (int ni = 0; ni < NI; ++ni) mma::mma_16816<T>(acc[mi][ni], af[mi], bf[ni]);
      }
    }
    mma::cp_async_wait<0>();
    __syncthreads();  // every warp is done with the ring before the next tile refills it

    // Registers (2h, 2h + 1) of accumulator (mi, ni) are columns (p, p + 1) of one row.
    float factor[MI][2];
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        std::int64_t const row = tile.row_begin + Shape::warp_row(warp, mi) + mma_accumulator_coord(lane, 2 * h).row;
        factor[mi][h] = row < tile.row_end ? epi.template row_factor<kKind>(row) : 0.0f;
      }
#pragma unroll
    for (int ni = 0; ni < NI; ++ni) {
      int const p = tile.n_begin + Shape::warp_col(warp, ni) + mma_accumulator_coord(lane, 0).col;
      if (p >= args.n) continue;
      auto const columns = epi.template columns<kKind>(tile.group, p);
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          std::int64_t const row = tile.row_begin + Shape::warp_row(warp, mi) + mma_accumulator_coord(lane, 2 * h).row;
          if (row < tile.row_end)
            epi.template store<kKind>(row, columns, factor[mi][h], acc[mi][ni][2 * h], acc[mi][ni][2 * h + 1]);
        }
    }
  }
#else
  __trap();  // built for an architecture without bf16/fp16 mma.sync; the launcher refuses such devices
#endif
}

}  // namespace epx::detail
