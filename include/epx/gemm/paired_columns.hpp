// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! Gated GEMMs (gate_up with SwiGLU, GeGLU, clamped SwiGLU) run over *paired* product columns:
//! column 2i is gate channel i and 2i + 1 is up channel i, so that the one thread holding an
//! accumulator pair (every mainloop hands the epilogue columns p, p + 1 with p even) can activate it
//! alone. Interleaved weights are already in that order; concatenated weights (gate rows [0, n/2),
//! up rows [n/2, n)) are read in it through paired_weight_row, so no repacking is needed.

#include <epx/config.hpp>

namespace epx::detail {

//! The weight row that product column p reads: gated GEMMs run over paired columns (2i = gate i,
//! 2i + 1 = up i); concatenated weights keep gate rows in [0, n/2) and up rows in [n/2, n).
EPX_HOST_DEVICE constexpr int paired_weight_row(int p, int n, bool gated, bool concatenated) {
  if (!gated || !concatenated) return p;
  return (p & 1) != 0 ? (n >> 1) + (p >> 1) : (p >> 1);
}

//! paired_weight_row(p + step) - paired_weight_row(p) for an even `step` (the parity of p, hence the
//! half it reads, does not change): what a copy loop adds per pass instead of recomputing the row.
EPX_HOST_DEVICE constexpr int paired_weight_row_step(int step, bool gated, bool concatenated) {
  return gated && concatenated ? step >> 1 : step;
}

//! Where gate channel i and up channel i of a gated MLP with `inter` channels sit among the gate_up
//! product's 2 * inter columns when the product is kept in the weights' own row order (the Host
//! reference and the cuBLAS path do): interleaved 2i and 2i + 1, concatenated i and inter + i. The
//! same rule as paired_weight_row, which the fused epilogue uses to read the rows in paired order.
EPX_HOST_DEVICE constexpr int gate_column(int i, int inter, bool concatenated) {
  return paired_weight_row(2 * i, 2 * inter, true, concatenated);
}
EPX_HOST_DEVICE constexpr int up_column(int i, int inter, bool concatenated) {
  return paired_weight_row(2 * i + 1, 2 * inter, true, concatenated);
}

}  // namespace epx::detail
