// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! grouped_gemm on the GPU (semantics of gemm/grouped_gemm.hpp), with the groups' row ranges in
//! device memory: no host copy of the counts, no sync, capturable in a CUDA graph.
//!
//! bf16 and fp16 run on tensor cores (mma.sync, sm_80+; gemm/mma_sm80.cuh); fp32 runs on CUDA cores
//! in k order (gemm/simt.cuh). epx has no Hopper mainloop of its own: on sm_90 the expert policy
//! Grouped runs CUTLASS's grouped GEMM instead of this one at prefill, in builds that have CUTLASS
//! (grouped_experts.cuh); this kernel is what every other call, device and build runs.
//! The tile shape is picked from the expected rows per group (pick_mma_mainloop, GemmTilePolicy in
//! tuning.cuh): decode-like calls (few rows per expert) are bound by reading the weights and use
//! 16-row tiles, so that each weight tile is read by one CTA; larger calls use 64- or 128-row tiles.

#include <epx/core/math.hpp>
#include <epx/core/stream.hpp>
#include <epx/cuda/error.hpp>
#include <epx/cuda/gemm/mma_sm80.cuh>
#include <epx/cuda/gemm/simt.cuh>
#include <epx/cuda/gemm/tile_shapes.hpp>
#include <epx/cuda/launch.cuh>
#include <epx/cuda/nvtx.hpp>
#include <epx/cuda/tuning.cuh>
#include <epx/gemm/grouped_gemm.hpp>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <span>
#include <string_view>
#include <type_traits>
#include <utility>

namespace epx {

//! Options of grouped_gemm(StreamRef, ...).
struct GroupedGemmOptions {
  //! [a.rows] device memory, or nullptr: row r of c is multiplied by row_scale[r] after the bias
  //! (e.g. the routing weight of each permuted row, in the down projection).
  float const* row_scale = nullptr;
  //! The rows the groups are expected to hold in total (picks the tile shape); -1: a.rows.
  std::int64_t rows_hint = -1;
};

namespace detail {

//! The mainloop (and tile) of one grouped-GEMM launch.
enum class GemmMainloop : std::uint8_t {
  kSimt,          //!< fp32 on CUDA cores, 64 x 64 (simt.cuh)
  kMmaDecode,     //!< mma.sync 16 x 128 (mma_sm80.cuh, tile_shapes.hpp)
  kMmaDecodeN64,  //!< mma.sync 16 x 64
  kMmaDecodeN32,  //!< mma.sync 16 x 32
  kMmaMedium,     //!< mma.sync 64 x 128
  kMmaLarge,      //!< mma.sync 128 x 128
};

//! The kernel a mainloop launches, as errors name it.
constexpr std::string_view kernel_name(GemmMainloop mainloop) noexcept {
  switch (mainloop) {
    case GemmMainloop::kSimt: return "grouped_gemm_simt_kernel (64x64 tiles)";
    case GemmMainloop::kMmaDecode: return "grouped_gemm_mma_kernel (16x128 tiles)";
    case GemmMainloop::kMmaDecodeN64: return "grouped_gemm_mma_kernel (16x64 tiles)";
    case GemmMainloop::kMmaDecodeN32: return "grouped_gemm_mma_kernel (16x32 tiles)";
    case GemmMainloop::kMmaMedium: return "grouped_gemm_mma_kernel (64x128 tiles)";
    case GemmMainloop::kMmaLarge: return "grouped_gemm_mma_kernel (128x128 tiles)";
  }
  return "grouped_gemm kernel";
}

//! Whether `mainloop` can run elements of type T on `dev` in this build.
template <class T>
bool gemm_mainloop_available(GemmMainloop mainloop, DeviceTraits const& dev) {
  if constexpr (std::is_same_v<T, float>)
    return mainloop == GemmMainloop::kSimt;
  else if (mainloop == GemmMainloop::kSimt)
    return false;
  else
    return dev.major >= 8;
}

//! The tensor-core mainloop for `rows` rows expected over `groups` groups, n product columns, on a
//! device with `sms` SMs. The average rows per group decide the tile height (GemmTilePolicy): up to
//! decode_rows, one 16-row tile reads each weight tile once; up to medium_rows, 64-row tiles;
//! beyond, 128-row tiles. Decode tiles get narrower (64, then 32 columns) when the 128-wide ones
//! would be fewer than the SMs (few groups with rows, e.g. one local expert's down projection): the
//! weights are then streamed by all SMs, deterministically (no split-K reduction).
inline GemmMainloop pick_mma_mainloop(std::int64_t rows, int groups, int n, int sms, GemmTilePolicy const& policy) {
  std::int64_t const per_group = groups > 0 ? ceil_div<std::int64_t>(rows, groups) : rows;
  if (per_group <= policy.decode_rows) {
    // One m-block per group with rows: the tiles are those groups times the n-blocks.
    long long const busy_groups = std::min<long long>(groups, rows);
    if (busy_groups * ceil_div(n, MmaDecodeTile::kBN) >= sms) return GemmMainloop::kMmaDecode;
    if (busy_groups * ceil_div(n, MmaDecodeN64Tile::kBN) >= sms) return GemmMainloop::kMmaDecodeN64;
    return GemmMainloop::kMmaDecodeN32;
  }
  if (per_group <= policy.medium_rows) return GemmMainloop::kMmaMedium;
  return GemmMainloop::kMmaLarge;
}

//! Launches one grouped GEMM with epilogue kKind through `mainloop` (which the caller checked with
//! gemm_mainloop_available, or picked): run_grouped_gemm picks; tests name each mainloop.
template <EpilogueKind kKind, class T, class TC>
void launch_grouped_gemm(GroupedGemmArgs<T, TC> const& args, GemmMainloop mainloop, DeviceTraits const& dev,
                         CudaStream stream, std::string_view where) {
  if (args.num_groups == 0 || args.num_rows == 0 || args.n == 0) return;
  require(gemm_mainloop_available<T>(mainloop, dev), Errc::kUnsupported, where, "GEMM mainloop", kernel_name(mainloop),
          fmt::format("one this build can run on device {} (compute capability {}.{}, element size {})", dev.device,
                      dev.major, dev.minor, sizeof(T)));
  std::size_t const prefix_bytes = (static_cast<std::size_t>(args.num_groups) + 1) * sizeof(long long);
  auto max_tiles = [&](int bm, int bn) {
    return (ceil_div<long long>(args.num_rows, bm) + args.num_groups) * ceil_div<long long>(args.n, bn);
  };
  std::string_view const name = kernel_name(mainloop);
  if constexpr (std::is_same_v<T, float>) {
    using S = SimtTileShape;
    launch_persistent(grouped_gemm_simt_kernel<TC, kKind>, name, args, S::kThreads, prefix_bytes,
                      max_tiles(S::kBM, S::kBN), dev, stream, where);
  } else {
    auto launch_mma = [&]<class Shape>(Shape*) {
      launch_persistent(grouped_gemm_mma_kernel<Shape, T, TC, kKind>, name, args, Shape::kThreads,
                        Shape::kSmemBytes + prefix_bytes, max_tiles(Shape::kBM, Shape::kBN), dev, stream, where);
    };
    switch (mainloop) {
      case GemmMainloop::kMmaDecode: launch_mma(static_cast<MmaDecodeTile*>(nullptr)); break;
      case GemmMainloop::kMmaDecodeN64: launch_mma(static_cast<MmaDecodeN64Tile*>(nullptr)); break;
      case GemmMainloop::kMmaDecodeN32: launch_mma(static_cast<MmaDecodeN32Tile*>(nullptr)); break;
      case GemmMainloop::kMmaMedium: launch_mma(static_cast<MmaMediumTile*>(nullptr)); break;
      case GemmMainloop::kMmaLarge: launch_mma(static_cast<MmaLargeTile*>(nullptr)); break;
      case GemmMainloop::kSimt: break;  // refused above
    }
  }
}

//! Runs one grouped GEMM with epilogue kKind (gated kinds: paired columns, see epilogue.cuh) through
//! the mainloop the element type, the expected rows and the device call for.
template <EpilogueKind kKind, class T, class TC>
void run_grouped_gemm(GroupedGemmArgs<T, TC> const& args, std::int64_t rows_hint, CudaStream stream,
                      std::string_view where) {
  if (args.num_groups == 0 || args.num_rows == 0 || args.n == 0) return;
  DeviceTraits const dev = current_device_traits();
  if constexpr (std::is_same_v<T, float>) {
    launch_grouped_gemm<kKind>(args, GemmMainloop::kSimt, dev, stream, where);
  } else {
    require(dev.major >= 8, Errc::kUnsupported, where, "device compute capability",
            fmt::format("{}.{}", dev.major, dev.minor), ">= 8.0 (bf16/fp16 tensor cores: mma.sync m16n8k16)");
    GemmMainloop const mainloop = pick_mma_mainloop(rows_hint < 0 ? args.num_rows : rows_hint, args.num_groups, args.n,
                                                    dev.sms, policy_for<GemmTilePolicy>(dev));
    launch_grouped_gemm<kKind>(args, mainloop, dev, stream, where);
  }
}

inline bool aligned_to(void const* p, std::size_t bytes) { return reinterpret_cast<std::uintptr_t>(p) % bytes == 0; }

//! The layout requirements of the mainloops, checked at the call: K-rows of 16 bytes for the
//! tensor-core copies, and aligned bases.
template <class T>
void check_gemm_layout(std::string_view where, std::string_view k_name, std::int64_t k, MatrixView<T const> a,
                       void const* b, int num_groups) {
  require(num_groups <= kMaxGemmGroups, Errc::kUnsupported, where, "number of groups", num_groups,
          fmt::format("<= {}", kMaxGemmGroups));
  require(k <= std::numeric_limits<int>::max(), Errc::kUnsupported, where, k_name, k, "< 2^31");
  if constexpr (!std::is_same_v<T, float>) {
    constexpr std::int64_t kChunk = 16 / static_cast<std::int64_t>(sizeof(T));
    require(k % kChunk == 0, Errc::kInvalidArgument, where, k_name, k,
            fmt::format("a multiple of {} (rows of 16-byte chunks for the tensor-core kernel)", kChunk));
    require(a.rows == 0 || (aligned_to(a.data, 16) && a.ld % kChunk == 0), Errc::kInvalidArgument, where,
            "a (data, ld)", fmt::format("({}, {})", static_cast<void const*>(a.data), a.ld),
            fmt::format("16-byte aligned data and ld a multiple of {}", kChunk));
    require(b == nullptr || aligned_to(b, 16), Errc::kInvalidArgument, where, "b.data", b, "16-byte aligned");
  }
}

template <class TC>
bool paired_stores_ok(MatrixView<TC> c) {
  return aligned_to(c.data, 2 * sizeof(TC)) && c.ld % 2 == 0;
}

//! The launch arguments of c = (a · bᵀ + bias) · row_scale over the groups of `offsets` (device);
//! a gated or ReLU GEMM starts from these and sets its epilogue fields.
template <class T, class TC>
GroupedGemmArgs<T, TC> linear_gemm_args(MatrixView<T const> a, BatchedMatrixView<T const> b, T const* bias,
                                        std::span<std::int32_t const> offsets, MatrixView<TC> c,
                                        float const* row_scale) {
  GroupedGemmArgs<T, TC> args;
  args.a = a.data;
  args.lda = a.ld;
  args.num_rows = a.rows;
  args.b = b.data;
  args.offsets = offsets.data();
  args.num_groups = static_cast<int>(b.batch);
  args.n = static_cast<int>(b.rows);
  args.k = static_cast<int>(a.cols);
  args.epilogue.c = c.data;
  args.epilogue.ldc = c.ld;
  args.epilogue.bias = bias;
  args.epilogue.row_scale = row_scale;
  args.epilogue.n = args.n;
  args.epilogue.paired_stores = paired_stores_ok(c);
  return args;
}

}  // namespace detail

//! @brief grouped_gemm on the GPU: c[r, :] = (a[r, :] · b[g]ᵀ + bias[g]) · row_scale[r] for the rows r of
//! group g, fp32 accumulation, one rounding to TC.
//! @param[in]  stream   the caller's stream; nothing syncs
//! @param[in]  a        [M, K] device memory; bf16/fp16 need K % 8 == 0, 16-byte aligned data and ld % 8 == 0
//! @param[in]  b        [G, N, K] device memory, K-major, 16-byte aligned (bf16/fp16)
//! @param[in]  bias     [G, N] device memory or nullptr
//! @param[in]  offsets  [G + 1] **device** memory: the row ranges of the groups. Values are expected
//!                      non-decreasing in [0, M]; others are clamped (never read out of bounds)
//! @param[out] c        [M, N] device memory; rows outside [offsets[0], offsets[G]) are left untouched
//! @throws Error on bad shapes or layouts (before any work), Errc::kUnsupported on devices below sm_80 (bf16/fp16)
template <class TA, class TB, float_element TC>
requires float_element<TA> && float_element<TB>
void grouped_gemm(StreamRef stream, MatrixView<TA> a_in, BatchedMatrixView<TB> b_in,
                  std::type_identity_t<std::remove_const_t<TB> const*> bias, std::span<std::int32_t const> offsets,
                  MatrixView<TC> c, GroupedGemmOptions const& options = {}) {
  EPX_NVTX_RANGE(GroupedGemm);
  using T = std::remove_const_t<TA>;
  static_assert(std::is_same_v<T, std::remove_const_t<TB>>,
                "epx: grouped_gemm on CUDA needs a and b of one element type (bf16, fp16 or fp32)");
  constexpr std::string_view where = "grouped_gemm";
  MatrixView<T const> const a(a_in);
  BatchedMatrixView<T const> const b{b_in.data, b_in.batch, b_in.rows, b_in.cols};
  detail::CudaStream const s(stream, where);
  detail::check_grouped_gemm_args(a, b, bias, offsets, c);
  detail::require(b.rows <= std::numeric_limits<int>::max(), Errc::kUnsupported, where, "b.rows (n)", b.rows, "< 2^31");
  detail::require(offsets.data() != nullptr || offsets.empty(), Errc::kInvalidArgument, where, "offsets.data()",
                  "nullptr", "device memory holding G + 1 offsets");
  detail::check_gemm_layout<T>(where, "a.cols (k)", a.cols, a, b.data, static_cast<int>(b.batch));
  auto const args = detail::linear_gemm_args<T, TC>(a, b, bias, offsets, c, options.row_scale);
  detail::run_grouped_gemm<detail::EpilogueKind::kLinear>(args, options.rows_hint, s, where);
}

}  // namespace epx
