// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! The fp32 (CUDA-core) mainloop's tile and thread maps: 64 x 64 outputs per CTA of 256 threads,
//! K in slices of 16, each thread 4 x 4 outputs. Plain C++, walked by the host tests.

#include <epx/config.hpp>
#include <epx/cuda/gemm/mma_fragments.hpp>

namespace epx::detail {

struct SimtTileShape {
  static constexpr int kBM = 64, kBN = 64, kBK = 16, kThreads = 256;
  static_assert(kBM == kBN, "A and B slices are loaded by one loop");
  static constexpr int kLoadPasses = kBM * kBK / kThreads;
  static_assert(kBM * kBK % kThreads == 0);

  //! The (row, k) of the [64, 16] slices of A and B that thread `tid` loads in pass `pass`:
  //! consecutive threads read consecutive k of one row (coalesced).
  EPX_HOST_DEVICE static constexpr FragmentCoord load_coord(int tid, int pass) {
    int const i = tid + pass * kThreads;
    return {i / kBK, i % kBK};
  }
  //! The (row, column) of the tile that thread `tid`'s output (i, j) (each 0-3) is: a 4 x 4 block,
  //! so columns j = 0, 1 and 2, 3 are the pairs (p, p + 1) the epilogue stores.
  EPX_HOST_DEVICE static constexpr FragmentCoord output_coord(int tid, int i, int j) {
    return {(tid / 16) * 4 + i, (tid % 16) * 4 + j};
  }
};

}  // namespace epx::detail
