// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! The permute and unpermute backward stages' protocol, shared by every backend: their argument
//! checks, and the chunking and summation order of the CUDA unpermute_backward's weight gradient in
//! plain C++ (so that tests/kernel_math checks it without a GPU and the GPU test compares the kernel
//! with it bit for bit). Semantics in host/permute_backward.hpp.

#include <epx/config.hpp>
#include <epx/permute/permute.hpp>

#include <array>
#include <cstdint>

namespace epx::detail {

//! permute_backward's arguments; `num_rows` is the plan's routed rows (Host) or every slot (a
//! backend whose routed-row count lives on the device).
template <class TG, class TDx>
void check_permute_backward_args(RoutingPlan const& plan, std::int64_t num_rows, MatrixView<TG const> d_x_perm,
                                 MatrixView<TDx> dx) {
  constexpr std::string_view where = "permute_backward";
  check_matrix(where, "d_x_perm", d_x_perm, -1, -1);
  require(d_x_perm.rows >= num_rows, Errc::kShapeMismatch, where, "d_x_perm.rows", d_x_perm.rows,
          fmt::format(">= the plan's routed rows ({})", num_rows));
  check_matrix(where, "dx", dx, plan.num_tokens, d_x_perm.cols);
}

//! unpermute_backward's arguments; `num_rows` as for check_permute_backward_args.
template <class TOut, class TDy, class TG>
void check_unpermute_backward_args(RoutingPlan const& plan, std::int64_t num_rows, MatrixView<TOut const> expert_out,
                                   MatrixView<float const> topk_weights, MatrixView<TDy const> dy,
                                   MatrixView<TG> d_expert_out, MatrixView<float> d_topk_weights) {
  constexpr std::string_view where = "unpermute_backward";
  check_matrix(where, "expert_out", expert_out, -1, -1);
  require(expert_out.rows >= num_rows, Errc::kShapeMismatch, where, "expert_out.rows", expert_out.rows,
          fmt::format(">= the plan's routed rows ({})", num_rows));
  check_matrix(where, "topk_weights", topk_weights, plan.num_tokens, plan.top_k);
  check_matrix(where, "dy", dy, plan.num_tokens, expert_out.cols);
  check_matrix(where, "d_expert_out", d_expert_out, -1, expert_out.cols);
  require(d_expert_out.rows >= num_rows, Errc::kShapeMismatch, where, "d_expert_out.rows", d_expert_out.rows,
          fmt::format(">= the plan's routed rows ({})", num_rows));
  check_matrix(where, "d_topk_weights", d_topk_weights, plan.num_tokens, plan.top_k);
}

// ---- The CUDA unpermute_backward's chunks and summation order ----
// A block takes one token; its `threads` threads (whole warps, a power of two) walk the row in
// chunks of `chunk_elems` columns, thread x taking chunks x, x + threads, x + 2 * threads, ... and
// each chunk's columns in order. The order of the weight gradient's dot product is a function of
// (cols, the two element sizes, threads) only: never of pointer alignment, which decides only
// whether a chunk loads as one word or element by element.

//! Columns per chunk: one 16-byte vector of the wider of the two element types read together
//! (expert_out and dy), when the row is whole such chunks; one column otherwise.
EPX_HOST_DEVICE constexpr int backward_chunk_elems(std::int64_t cols, std::int64_t a_bytes, std::int64_t b_bytes) {
  std::int64_t const wider = a_bytes > b_bytes ? a_bytes : b_bytes;
  auto const per_vector = static_cast<int>(16 / wider);
  return cols % per_vector == 0 ? per_vector : 1;
}

//! Whether every chunk of `chunk_elems` elements of `elem_bytes`, in rows `ld` elements apart from
//! `base`, is one aligned 8- or 16-byte word (chunk c of row r starts at base + (r * ld + c *
//! chunk_elems) * elem_bytes).
EPX_HOST_DEVICE constexpr bool chunks_load_whole(std::uintptr_t base, std::int64_t ld, int chunk_elems,
                                                 std::int64_t elem_bytes) {
  std::int64_t const bytes = chunk_elems * elem_bytes;
  return chunk_elems > 1 && (bytes == 8 || bytes == 16) && ld % chunk_elems == 0 &&
         base % static_cast<std::uintptr_t>(bytes) == 0;
}

//! The warp's sum as the kernel forms it: `for (offset = 16; offset >= 1; offset /= 2)
//! v += __shfl_down_sync(v, offset)`, read in lane 0. Lane i < offset adds lane i + offset.
inline float warp_tree_sum(std::array<float, 32> v) {
  for (int offset = 16; offset >= 1; offset /= 2)
    for (int lane = 0; lane < offset; ++lane) v[lane] = v[lane] + v[lane + offset];
  return v[0];
}

//! unpermute_backward's d_topk_weights[s] = dot(g, x) over `cols` columns exactly as the CUDA
//! kernel sums it with `threads` threads (a multiple of 32, at most 1024): each thread its chunks in
//! order with one fused multiply-add per term (add_weighted), then warp_tree_sum in each warp, then
//! (more than one warp) warp 0's warp_tree_sum of the warps' sums, zeros past the last warp.
//! Deterministic; differs from the Host's sequential order in the last bits.
inline float unpermute_backward_dot(float const* g, float const* x, std::int64_t cols, int chunk_elems, int threads) {
  std::int64_t const chunks = cols / chunk_elems;
  int const warps = threads / 32;
  std::array<float, 32> warp_sums{};
  for (int w = 0; w < warps; ++w) {
    std::array<float, 32> lanes{};
    for (int lane = 0; lane < 32; ++lane) {
      float acc = 0.0f;
      for (std::int64_t c = w * 32 + lane; c < chunks; c += threads)
        for (int e = 0; e < chunk_elems; ++e) {
          std::int64_t const col = c * chunk_elems + e;
          acc = add_weighted(acc, g[col], x[col]);
        }
      lanes[static_cast<std::size_t>(lane)] = acc;
    }
    warp_sums[static_cast<std::size_t>(w)] = warp_tree_sum(lanes);
  }
  return warps == 1 ? warp_sums[0] : warp_tree_sum(warp_sums);
}

}  // namespace epx::detail
