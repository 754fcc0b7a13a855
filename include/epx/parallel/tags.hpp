// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! The policies a user picks for ExpertParallel<Experts, Dispatch, Space>: empty tag types.

#include <type_traits>

namespace epx {

//! Expert policy: epx's own grouped-GEMM kernel (on Host: the reference loops).
struct Grouped {};
//! Expert policy: cuBLAS grouped GEMM (cublasGemmGroupedBatchedEx), a baseline and a fallback.
//! CUDA only.
struct CublasGrouped {};

//! Expert policy: CUTLASS's Hopper grouped GEMM (TMA, warp-specialised wgmma; torch._grouped_mm's
//! kernel on sm_90). CUDA only; needs CUTLASS (EPX_WITH_CUTLASS) and an sm_90a build for an H100/H200.
struct CutlassGrouped {};

//! Dispatch policy: exchange per-expert counts, then all-to-all-v the rows to the experts' ranks
//! and back. Each rank brings its own tokens.
struct AllToAll {};
//! Dispatch policy: tokens are already replicated on every rank (e.g. after tensor-parallel
//! attention); each rank computes its local experts' share and an all-reduce sums the shares.
struct AllGather {};

namespace detail {

template <class...>
inline constexpr bool dependent_false = false;

template <class T>
inline constexpr bool is_expert_tag = std::is_same_v<T, Grouped> || std::is_same_v<T, CublasGrouped>;
template <class T>
inline constexpr bool is_dispatch_tag = std::is_same_v<T, AllToAll> || std::is_same_v<T, AllGather>;

}  // namespace detail
}  // namespace epx
