// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! MoeConfig, everything an MoE layer is for one rank, and its validation against a Communicator:
//! the first part every ExpertParallel asks (can_implement, then the constructor).

#include <epx/comm/communicator.hpp>
#include <epx/core/placement.hpp>
#include <epx/core/router_config.hpp>
#include <epx/core/status.hpp>
#include <epx/gemm/expert_mlp.hpp>

#include <cmath>
#include <cstdint>
#include <span>
#include <string_view>

namespace epx {

//! Everything an MoE layer is, for one rank. Aggregate: build it with designated initialisers.
struct MoeConfig {
  RouterConfig router = {};    //!< num_experts, top_k, scoring, groups, scaling
  ExpertMlpConfig mlp = {};    //!< hidden, intermediate, activation, gate/up layout
  ExpertWeights weights = {};  //!< this rank's local experts only (see placement)
  //! [num_experts] selection-only router bias (DeepSeek-V3's e_score_correction_bias), or empty.
  //! Its length is checked against router.num_experts at construction; the memory is the
  //! execution space's (Host: host, Cuda: device) and must outlive the layer. E.g.
  //! `.correction_bias = bias_vector` or `.correction_bias = {device_ptr, std::size_t(num_experts)}`.
  std::span<float const> correction_bias = {};
  ExpertPlacement placement = {};  //!< empty: contiguous, as even as possible over the group
  InvalidIds on_invalid_ids = InvalidIds::kThrow;
  //! AllToAll: the rows each rank's memory (workspace, SavedState, backward's workspace) holds for
  //! its experts, in balanced shares (max_tokens * top_k rows, what each rank receives when the
  //! routing is even). 0, the default, sizes for the dropless worst case, num_ranks shares (every
  //! token of every rank on this rank's experts); 2.0 holds twice an even share, num_ranks / 2
  //! times less memory for those rows. Nothing is ever dropped: a forward whose routing would give
  //! some rank more rows throws Errc::kWorkspaceTooSmall on every rank alike, at the count
  //! exchange, naming the rank, its rows and the factor it would need. Values >= num_ranks act as
  //! 0. AllGather ignores it (its experts run on each rank's own max_tokens * top_k slots).
  double received_rows_factor = 0;
  //! Training: forwards with a SavedState keep GEMM 1's output h (fp32, bias included) there, and
  //! backward reads it instead of recomputing it: a quarter of the experts' backward flops (8/3 of
  //! the forward's expert flops become 6/3) for expert rows * gate_up_rows * 4 bytes more per
  //! SavedState (saved_bytes says). On Cuda it saves the GEMM where the forward runs CUTLASS (which
  //! materialises h anyway); where it runs epx's own fused kernel, the forward computes h with one
  //! more GEMM instead. Layers without a backward ignore it.
  bool save_gate_up_output = false;
};

namespace detail {

//! Validates `config` for rank `comm.rank()` of `comm` and returns it with the placement filled
//! in. Throws Error naming the first field that is wrong.
inline MoeConfig resolve(MoeConfig config, Communicator const& comm) {
  constexpr std::string_view where = "ExpertParallel";
  validate(config.router, where);
  validate(config.mlp, where);
  require(config.weights.dtype == DType::kF32 || config.weights.dtype == DType::kF16 ||
              config.weights.dtype == DType::kBF16,
          Errc::kInvalidArgument, where, "weights.dtype", config.weights.dtype, "f32, f16 or bf16");
  if (config.placement.empty()) config.placement = ExpertPlacement::contiguous(config.router.num_experts, comm.size());
  require(config.placement.num_experts() == config.router.num_experts, Errc::kInvalidArgument, where,
          "placement.num_experts()", config.placement.num_experts(),
          fmt::format("router.num_experts = {}", config.router.num_experts));
  require(config.placement.num_ranks() == comm.size(), Errc::kInvalidArgument, where, "placement.num_ranks()",
          config.placement.num_ranks(), fmt::format("the communicator's size = {}", comm.size()));
  require(config.weights.num_local_experts == config.placement.num_local_experts(comm.rank()), Errc::kInvalidArgument,
          where, "weights.num_local_experts", config.weights.num_local_experts,
          fmt::format("placement.num_local_experts(rank {}) = {}", comm.rank(),
                      config.placement.num_local_experts(comm.rank())));
  if (config.weights.num_local_experts > 0) {
    require(config.weights.gate_up != nullptr, Errc::kInvalidArgument, where, "weights.gate_up", "nullptr",
            fmt::format("the [{}, {}, {}] gate_up weights of this rank's experts", config.weights.num_local_experts,
                        config.mlp.gate_up_rows(), config.mlp.hidden));
    require(config.weights.down != nullptr, Errc::kInvalidArgument, where, "weights.down", "nullptr",
            fmt::format("the [{}, {}, {}] down weights of this rank's experts", config.weights.num_local_experts,
                        config.mlp.hidden, config.mlp.intermediate));
  }
  check_weight_shapes(where, config.mlp, config.weights);
  require(
      config.correction_bias.empty() ||
          config.correction_bias.size() == static_cast<std::size_t>(config.router.num_experts),
      Errc::kShapeMismatch, where, "correction_bias.size()", config.correction_bias.size(),
      fmt::format("0 (no bias) or router.num_experts = {} (one selection bias per expert)", config.router.num_experts));
  require(config.correction_bias.empty() || config.correction_bias.data() != nullptr, Errc::kInvalidArgument, where,
          "correction_bias.data()", "nullptr", fmt::format("a pointer to {} floats", config.correction_bias.size()));
  require(std::isfinite(config.received_rows_factor) && config.received_rows_factor >= 0, Errc::kInvalidArgument, where,
          "received_rows_factor", config.received_rows_factor,
          "a finite value >= 0 (0: the dropless worst case; f > 0: f even shares of max_tokens * top_k rows)");
  return config;
}

//! Calls f with a null pointer of the element type `dtype` names (f32, f16, bf16).
template <class F>
decltype(auto) dispatch_on_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kF32: return f(static_cast<float*>(nullptr));
    case DType::kF16: return f(static_cast<half*>(nullptr));
    case DType::kBF16: return f(static_cast<bfloat16*>(nullptr));
    default: break;
  }
  throw_error(Errc::kInvalidArgument,
              fmt::format("ExpertParallel: weights.dtype = {}, expected f32, f16 or bf16", dtype));
}

}  // namespace detail
}  // namespace epx
