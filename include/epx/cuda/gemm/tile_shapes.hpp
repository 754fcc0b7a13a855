// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! The CTA tiles of the grouped GEMM's tensor-core (mma.sync) mainloop and how their warps split them, as
//! plain C++ so that host tests (tests/kernel_math/gemm_*_test.cpp) walk the same tiles as the
//! kernels. The policy that picks one per call is in grouped_gemm.cuh.

#include <epx/config.hpp>
#include <epx/cuda/gemm/smem_layout.hpp>

#include <cstddef>

namespace epx::detail {

//! An mma.sync CTA tile: BM x BN outputs, BK = 64 elements of K per stage, WarpsM x WarpsN warps
//! each owning a (BM / WarpsM) x (BN / WarpsN) warp tile of m16n8k16 instructions, a ring of
//! `Stages` stages, and __launch_bounds__(threads, MinBlocksPerSm).
template <int BM, int BN, int WarpsM, int WarpsN, int Stages, int MinBlocksPerSm>
struct MmaTileShape {
  static constexpr int kBM = BM, kBN = BN, kBK = kStageRowElems;
  static constexpr int kWarpsM = WarpsM, kWarpsN = WarpsN, kStages = Stages;
  static constexpr int kMinBlocksPerSm = MinBlocksPerSm;
  static constexpr int kThreads = 32 * WarpsM * WarpsN;
  static constexpr int kWM = BM / WarpsM, kWN = BN / WarpsN;  // warp tile
  static constexpr int kMI = kWM / 16, kNI = kWN / 8;         // m16n8k16 instructions per warp tile and k16 step
  static constexpr int kStageBytesA = BM * kStageRowBytes, kStageBytesB = BN * kStageRowBytes;
  static constexpr std::size_t kSmemBytes = static_cast<std::size_t>(Stages) * (kStageBytesA + kStageBytesB);
  static_assert(kWM % 16 == 0 && kWN % 16 == 0, "warp tiles are whole ldmatrix.x4 loads of A and B");
  static_assert(Stages >= 2);

  //! Row of the CTA tile where warp `warp`'s m16 block `mi` starts.
  EPX_HOST_DEVICE static constexpr int warp_row(int warp, int mi) { return (warp / WarpsN) * kWM + mi * 16; }
  //! Column of the CTA tile where warp `warp`'s n8 block `ni` starts.
  EPX_HOST_DEVICE static constexpr int warp_col(int warp, int ni) { return (warp % WarpsN) * kWN + ni * 8; }
};

//! Few rows per group (decode): 16-row tiles read each weight tile once. The narrower ones serve
//! calls whose 128-wide tiles would leave SMs idle (few local experts: the weights of a handful of
//! groups spread over all SMs instead of a third of them); deeper rings keep their bytes in flight.
using MmaDecodeTile = MmaTileShape<16, 128, 1, 4, 5, 2>;    // 92 KB of stages
using MmaDecodeN64Tile = MmaTileShape<16, 64, 1, 4, 8, 2>;  // 80 KB
using MmaDecodeN32Tile = MmaTileShape<16, 32, 1, 2, 8, 4>;  // 48 KB
using MmaMediumTile = MmaTileShape<64, 128, 2, 2, 4, 2>;    // 96 KB
//! 128 x 128 with 8 warps of 64 x 32, one CTA per SM: a bound of 2 CTAs (128 registers per
//! thread) made the gated variant spill; with one CTA each warp has up to 255 registers, and the
//! smem of the second CTA goes to a deeper ring (4 stages, 128 KB) instead.
using MmaLargeTile = MmaTileShape<128, 128, 2, 4, 4, 1>;

}  // namespace epx::detail
