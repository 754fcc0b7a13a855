// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! Tuning as data: the launch policy of every CUDA stage, in one place. A policy is a small
//! aggregate; `policy_for<Policy>(DeviceTraits)` is the one place that picks it for a device, and
//! launchers read nothing else (no launch shape is a literal inside a launcher or a kernel).
//!
//! Where the values come from: every default below is unmeasured. Each was chosen by reasoning
//! (whole warps, occupancy, coalescing, the expected rows per expert), none has been timed on a
//! GPU, and policy_for returns them for every device until a measurement says otherwise.
//! bench/NOTES.md lists what to measure and the predictions to check.

#include <epx/cuda/launch.cuh>

#include <cstdint>

namespace epx::detail {

//! The most blocks a grid-stride launch takes: enough to fill any current GPU many times over;
//! beyond it the loops stride. One cap for every grid-stride kernel.
inline constexpr int kMaxGridStrideBlocks = 65535 * 8;

//! route: one warp per token, `warps_per_block` tokens per block.
struct RouterPolicy {
  int warps_per_block = 4;
};
//! The largest warps_per_block the router kernel is compiled for (its __launch_bounds__).
inline constexpr int kMaxRouterWarps = 8;

//! make_plan's element-wise kernels. threads_per_block is a multiple of 32: the key kernel sums a
//! counter over whole warps.
struct PlanPolicy {
  int threads_per_block = 256;
  int max_blocks = kMaxGridStrideBlocks;
};

//! The row-moving kernels: permute, unpermute, the layer's regroup and its fp32 -> T rounding.
//! threads_per_block is a power of two of at least 32 (row_blocks.hpp's row_block).
struct RowPolicy {
  int threads_per_block = 256;
  int max_blocks = kMaxGridStrideBlocks;
};

//! The layer's small element-wise kernels (its count-table row, the first invalid id).
struct LayerPolicy {
  int threads_per_block = 256;
  int max_blocks = kMaxGridStrideBlocks;
};

//! CudaLocalGroup's rank-order sum.
struct RankSumPolicy {
  int threads_per_block = 256;
  int max_blocks = kMaxGridStrideBlocks;
};

//! CublasGrouped's activation and bias kernels: one block per row, threads across its columns.
struct CublasPolicy {
  int max_threads_per_block = 256;
};

//! The grouped GEMM's tile height, from the average rows per group: up to decode_rows, 16-row
//! tiles (each weight tile read by one CTA); up to medium_rows, 64-row tiles; beyond, 128-row tiles.
struct GemmTilePolicy {
  std::int64_t decode_rows = 16;
  std::int64_t medium_rows = 64;
};

}  // namespace epx::detail

namespace epx {

//! The two tile configurations of the CUTLASS Hopper grouped GEMM (cuda/gemm/cutlass_grouped.cuh),
//! torch._grouped_mm's on sm_90: Pingpong 64 x 128 x 128 for few rows per group (decode),
//! Cooperative 128 x 256 x 64 for many; both with 2 x 1 x 1 clusters.
enum class CutlassTile : std::uint8_t { kPingpong64x128, kCooperative128x256 };

}  // namespace epx

namespace epx::detail {

//! Which CUTLASS tile runs: Pingpong while the average rows per group fit one of its 64-row tiles
//! twice (torch picks by the same average), Cooperative beyond. Unmeasured, like the rest.
struct CutlassTilePolicy {
  std::int64_t pingpong_rows = 128;  //!< average rows per group up to which Pingpong runs
};

constexpr CutlassTile cutlass_tile_for(CutlassTilePolicy const& policy, std::int64_t rows,
                                       std::int64_t groups) noexcept {
  return groups > 0 && rows <= policy.pingpong_rows * groups ? CutlassTile::kPingpong64x128
                                                             : CutlassTile::kCooperative128x256;
}

//! The kernel the expert policy Grouped runs on Cuda for one forward.
enum class GroupedKernel : std::uint8_t {
  kEpx,      //!< epx's own grouped GEMM (mma.sync; fused activation epilogue): every device, every width
  kCutlass,  //!< CUTLASS's Hopper grouped GEMM (cuda/cutlass_grouped.cuh): EPX_HAVE_CUTLASS builds, sm_90
};

//! When Grouped takes CUTLASS's kernel: 16-bit weights, a build and device that run it, and at least
//! `cutlass_min_rows_per_expert` rows per local expert on average. Measured on an H200 (bench/RESULTS.md,
//! 2026-12-04: expert_mlp of the first session against cutlass_expert_mlp of the second, bf16, four
//! models): CUTLASS's expert MLP takes 1.36-1.48x the own kernel's time at 4-32 rows per expert
//! (decode, where the own kernel reads the weights at the HBM limit) and 0.49-0.71x from 128 rows on
//! (T = 4096 and 16384); between 32 and 128 is unmeasured, so the switch sits at the first measured win.
struct GroupedKernelPolicy {
  std::int64_t cutlass_min_rows_per_expert = 128;
};

constexpr GroupedKernel grouped_kernel_for(GroupedKernelPolicy const& policy, bool cutlass_runs, bool sixteen_bit,
                                           std::int64_t rows, std::int64_t groups) noexcept {
  return cutlass_runs && sixteen_bit && groups > 0 && rows >= policy.cutlass_min_rows_per_expert * groups
             ? GroupedKernel::kCutlass
             : GroupedKernel::kEpx;
}

//! The policy of a stage for `device`: the defaults above, the same for every device (unmeasured).
template <class Policy>
constexpr Policy policy_for(DeviceTraits const&) noexcept {
  return Policy{};
}

}  // namespace epx::detail
