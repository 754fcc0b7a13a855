// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! How wgmma sees a stage and where its accumulators land: the shared-memory matrix descriptor
//! (PTX ISA, "Matrix Descriptor Format") of a K-major operand in the stage layout of
//! smem_layout.hpp, its advance by one k16 step, and the m64nNk16 f32 accumulator map.
//!
//! Descriptor fields (64 bits): start address >> 4 in bits [0, 14), leading dimension byte offset
//! >> 4 in [16, 30), stride dimension byte offset >> 4 in [32, 46), base offset in [49, 52),
//! swizzle mode in [62, 64) (1 = 128B, 2 = 64B, 3 = 32B). A stage is the canonical K-major
//! 128B-swizzled layout: 8-row groups of 128-byte rows, 1024 bytes apart (the stride dimension byte
//! offset), the two 8-element core matrices of a k16 step side by side within a row (the leading
//! dimension byte offset is not used by swizzled K-major layouts: 16 bytes by convention), and the
//! stage 1024-byte aligned (base offset 0). A k16 step starts 32 bytes further along the row; the
//! hardware applies the swizzle to the address, so the start address simply moves by 32 bytes.
//! tests/kernel_math/gemm_wgmma_test.cpp decodes these fields as the ISA defines them and runs an
//! emulated wgmma over a stage image built by the copy placement.

#include <epx/config.hpp>
#include <epx/cuda/gemm/mma_fragments.hpp>
#include <epx/cuda/gemm/smem_layout.hpp>

#include <cstdint>

namespace epx::detail {

//! The descriptor's swizzle-mode field values.
enum class WgmmaSwizzle : std::uint8_t { kNone = 0, k128B = 1, k64B = 2, k32B = 3 };

//! A byte address or offset as the descriptor stores it: 14 bits of (x mod 2^18) / 16.
EPX_HOST_DEVICE constexpr std::uint64_t wgmma_descriptor_encode(std::uint32_t bytes) { return (bytes & 0x3FFFFu) >> 4; }

//! Packs a descriptor from its fields.
EPX_HOST_DEVICE constexpr std::uint64_t make_wgmma_descriptor(std::uint32_t start_address, std::uint32_t leading_bytes,
                                                              std::uint32_t stride_bytes, std::uint32_t base_offset,
                                                              WgmmaSwizzle swizzle) {
  return wgmma_descriptor_encode(start_address) | (wgmma_descriptor_encode(leading_bytes) << 16) |
         (wgmma_descriptor_encode(stride_bytes) << 32) | (std::uint64_t{base_offset & 7u} << 49) |
         (std::uint64_t{static_cast<std::uint8_t>(swizzle)} << 62);
}

//! Bytes between 8-row groups of a stage: the stride dimension byte offset.
inline constexpr std::uint32_t kStageRowGroupBytes = 8 * kStageRowBytes;

//! Bytes from shared address `address` to the next 1024-byte boundary (0 if on one): where the
//! wgmma kernel's stages start, so that the swizzle pattern repeats from each stage's first row.
EPX_HOST_DEVICE constexpr std::uint32_t padding_to_swizzle_period(std::uint32_t address) {
  return (kStageRowGroupBytes - (address & (kStageRowGroupBytes - 1))) & (kStageRowGroupBytes - 1);
}

//! The descriptor of the K-major operand whose rows start at shared address `smem_address` (a
//! stage, or a 64-row slice of one: 1024-byte aligned), at k16 step 0.
EPX_HOST_DEVICE constexpr std::uint64_t stage_wgmma_descriptor(std::uint32_t smem_address) {
  return make_wgmma_descriptor(smem_address, kStageChunkBytes, kStageRowGroupBytes, 0, WgmmaSwizzle::k128B);
}

//! The descriptor of k16 step `kk` (0-3) of the k-tile: 32 bytes (2 in the start-address field) per
//! step. The field cannot carry into the next one: shared addresses stay below 2^18 - 96.
EPX_HOST_DEVICE constexpr std::uint64_t wgmma_descriptor_k_step(std::uint64_t descriptor, int kk) {
  return descriptor + static_cast<std::uint64_t>(kk) * (2 * kStageChunkBytes >> 4);
}

//! The (row, column) of the 64 x N accumulator tile of a warpgroup that f32 register i of lane
//! `lane` in warp `warp` (0-3 within the warpgroup) holds: warp w owns rows 16w..16w+15; registers
//! 4j..4j+3 are columns 8j + 2 (lane % 4) + {0, 1} of rows lane / 4 and lane / 4 + 8 - pairs (p, p + 1).
EPX_HOST_DEVICE constexpr FragmentCoord wgmma_accumulator_coord(int warp, int lane, int i) {
  return {16 * warp + (lane >> 2) + 8 * ((i >> 1) & 1), 8 * (i >> 2) + 2 * (lane & 3) + (i & 1)};
}

}  // namespace epx::detail
