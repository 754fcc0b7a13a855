// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! The shared-memory layout of one stage of the tensor-core mainloops: an operand's [rows, 64]
//! slice of K (16-bit elements) as rows of 128 bytes, each eight 16-byte chunks, with chunk c of
//! row r stored at chunk c ^ (r % 8).
//!
//! Why this swizzle: ldmatrix reads eight 16-byte row pieces at one chunk index per 8x8 matrix; with
//! plain 128-byte rows all eight would sit in the same four banks (8-way conflict). XOR with the row
//! spreads them over all 32 banks. It is the PTX ISA's 128-byte swizzle of a K-major operand
//! (address bits [4, 7) ^= bits [7, 10)) when a stage starts on a 1024-byte boundary: an independent
//! statement of the same layout, which tests/kernel_math checks along with the conflict-free reads.

#include <epx/config.hpp>

namespace epx::detail {

inline constexpr int kStageRowBytes = 128;   //!< one row of a stage: 64 16-bit elements of K
inline constexpr int kStageChunkBytes = 16;  //!< one cp.async copy, one ldmatrix row piece
inline constexpr int kStageChunksPerRow = kStageRowBytes / kStageChunkBytes;
inline constexpr int kStageChunkElems = 8;  //!< 16-bit elements per chunk
inline constexpr int kStageRowElems = 64;   //!< BK of the tensor-core mainloops

//! The chunk slot that logical chunk `chunk` (0-7, i.e. K elements [8 chunk, 8 chunk + 8)) of `row` occupies.
EPX_HOST_DEVICE constexpr int swizzled_chunk(int row, int chunk) { return chunk ^ (row & 7); }

//! Byte offset, from the stage's start, of logical chunk `chunk` of `row`.
EPX_HOST_DEVICE constexpr int stage_byte_offset(int row, int chunk) {
  return row * kStageRowBytes + swizzled_chunk(row, chunk) * kStageChunkBytes;
}

}  // namespace epx::detail
