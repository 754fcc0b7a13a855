// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! The permute and unpermute stages' protocol, shared by every backend:
//!   permute:   x_perm[row, :] = x[sorted_slots[row] / top_k, :]             for each routed row
//!   unpermute: y[t, :] = sum over j = 0..top_k-1 of topk_weights[t, j] * expert_out[slot_rows[t*top_k + j], :]
//!              in slot order, fp32 accumulation, slots without a row contributing nothing;
//!              every row of y is written (zeros for a token with no routed slot).
//!              Each term is added with one rounding: acc = fma(w, x, acc) (add_weighted).

#include <epx/config.hpp>
#include <epx/core/dtype.hpp>
#include <epx/permute/plan.hpp>

#include <cmath>

namespace epx::detail {

//! One term of unpermute's sum, acc + w * x rounded once (a fused multiply-add), on every backend.
//! Written out because compilers decide differently on their own: nvcc contracts `acc += w * x`
//! into an FMA by default, GCC does so only where the target has FMA (-march=native, aarch64) and
//! not for plain x86-64. Saying the rounding keeps the CUDA and Host results bitwise equal, and the
//! host's independent of its build flags. On the host std::fma is one instruction where the CPU
//! has FMA (glibc dispatches at run time) and exact in software elsewhere.
EPX_HOST_DEVICE inline float add_weighted(float acc, float w, float x) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(w, x, acc);
#else
  return std::fma(w, x, acc);
#endif
}

//! The routed rows of a plan; throws for a plan that make_plan did not fill in.
inline std::int64_t plan_rows(RoutingPlan const& plan, std::string_view where) {
  require(!plan.expert_offsets.empty(), Errc::kInvalidArgument, where, "plan.expert_offsets.size()", 0,
          ">= 1 (a plan made by make_plan)");
  return plan.expert_offsets.back();
}

template <class T>
void check_permute_args(RoutingPlan const& plan, std::int64_t num_rows, MatrixView<T const> x, MatrixView<T> x_perm) {
  constexpr std::string_view where = "permute";
  check_matrix(where, "x", x, plan.num_tokens, -1);
  check_matrix(where, "x_perm", x_perm, -1, x.cols);
  require(x_perm.rows >= num_rows, Errc::kShapeMismatch, where, "x_perm.rows", x_perm.rows,
          fmt::format(">= the plan's routed rows ({})", num_rows));
}

template <class T, class TOut>
void check_unpermute_args(RoutingPlan const& plan, std::int64_t num_rows, MatrixView<T const> expert_out,
                          MatrixView<float const> topk_weights, MatrixView<TOut> y) {
  constexpr std::string_view where = "unpermute";
  check_matrix(where, "expert_out", expert_out, -1, -1);
  require(expert_out.rows >= num_rows, Errc::kShapeMismatch, where, "expert_out.rows", expert_out.rows,
          fmt::format(">= the plan's routed rows ({})", num_rows));
  check_matrix(where, "topk_weights", topk_weights, plan.num_tokens, plan.top_k);
  check_matrix(where, "y", y, plan.num_tokens, expert_out.cols);
}

}  // namespace epx::detail
