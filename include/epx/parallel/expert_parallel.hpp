// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! ExpertParallel<Experts, Dispatch, Space>: the composed MoE layer. This header holds what
//! every execution space shares (the configuration, its validation, the policy selectors); each
//! space specialises the class in its own folder (host/expert_parallel.hpp, cuda/...).

#include <epx/comm/communicator.hpp>
#include <epx/core/placement.hpp>
#include <epx/core/router_config.hpp>
#include <epx/core/space.hpp>
#include <epx/core/status.hpp>
#include <epx/gemm/expert_mlp.hpp>
#include <epx/parallel/tags.hpp>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <string_view>

namespace epx {

//! Everything an MoE layer is, for one rank. Aggregate: build it with designated initialisers.
struct MoeConfig {
  RouterConfig router = {};                     //!< num_experts, top_k, scoring, groups, scaling
  ExpertMlpConfig mlp = {};                     //!< hidden, intermediate, activation, gate/up layout
  ExpertWeights weights = {};                   //!< this rank's local experts only (see placement)
  //! [num_experts] selection-only router bias (DeepSeek-V3's e_score_correction_bias), or empty.
  //! Its length is checked against router.num_experts at construction; the memory is the
  //! execution space's (Host: host, Cuda: device) and must outlive the layer. E.g.
  //! `.correction_bias = bias_vector` or `.correction_bias = {device_ptr, std::size_t(num_experts)}`.
  std::span<float const> correction_bias = {};
  ExpertPlacement placement = {};  //!< empty: contiguous, as even as possible over the group
  InvalidIds on_invalid_ids = InvalidIds::kThrow;
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
  require(config.correction_bias.empty() ||
              config.correction_bias.size() == static_cast<std::size_t>(config.router.num_experts),
          Errc::kShapeMismatch, where, "correction_bias.size()", config.correction_bias.size(),
          fmt::format("0 (no bias) or router.num_experts = {} (one selection bias per expert)",
                      config.router.num_experts));
  require(config.correction_bias.empty() || config.correction_bias.data() != nullptr, Errc::kInvalidArgument, where,
          "correction_bias.data()", "nullptr", fmt::format("a pointer to {} floats", config.correction_bias.size()));
  return config;
}

//! Where the first invalid id of a forward was, in the topk_ids of the rank that held it.
struct InvalidIdSite {
  std::int64_t token = -1;  //!< row of that rank's topk_ids (its own token index); -1: not recorded
  std::int32_t slot = 0;    //!< column of topk_ids
  std::int32_t id = 0;
};

//! The Error of InvalidIds::kThrow, worded the same by every backend. Token indices are
//! rank-local (each rank's forward has its own tokens), so the message names the rank with them.
[[noreturn]] inline void throw_invalid_ids(std::string_view where, int rank, std::uint64_t count,
                                           InvalidIdSite const& first, std::int32_t num_experts) {
  std::string const first_text =
      first.token < 0 ? std::string("not recorded")
                      : fmt::format("token {} of rank {}, slot {}: topk_ids[{}, {}] = {}", first.token, rank,
                                    first.slot, first.token, first.slot, first.id);
  throw_error(Errc::kInvalidExpertId,
              fmt::format("{}: rank {}: topk_ids held {} invalid expert id(s) (first: {}), expected -1 or an id in "
                          "[0, {}); those slots were dropped and the output written without them",
                          where, rank, count, first_text, num_experts));
}

//! Rows one rank's buffers may hold per token it is sized for: the dropless AllToAll worst case
//! receives every rank's slots (ranks x top_k); AllGather routes its own (top_k). Row indices and
//! offsets are int32, so max_tokens times this must stay below 2^31 - 1.
constexpr std::int64_t rows_per_token(bool all_to_all, std::int32_t num_ranks, std::int32_t top_k) noexcept {
  return (all_to_all ? std::int64_t{num_ranks} : std::int64_t{1}) * top_k;
}

//! The largest max_tokens whose rows fit in int32.
constexpr std::int64_t max_tokens_limit(bool all_to_all, std::int32_t num_ranks, std::int32_t top_k) noexcept {
  return (std::int64_t{std::numeric_limits<std::int32_t>::max()} - 1) /
         std::max<std::int64_t>(1, rows_per_token(all_to_all, num_ranks, top_k));
}

inline void check_max_tokens(std::int64_t max_tokens, bool all_to_all, std::int32_t num_ranks, std::int32_t top_k) {
  require(max_tokens >= 0 && max_tokens <= max_tokens_limit(all_to_all, num_ranks, top_k), Errc::kInvalidArgument,
          "workspace_bytes", "max_tokens", max_tokens,
          fmt::format(">= 0 with max_tokens * {} ({}) < 2^31 - 1 (the rows a rank may hold are indexed with int32)",
                      all_to_all ? "ranks * top_k" : "top_k", rows_per_token(all_to_all, num_ranks, top_k)));
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
  throw_error(Errc::kInvalidArgument, fmt::format("ExpertParallel: weights.dtype = {}, expected f32, f16 or bf16", dtype));
}

//! Maps an expert policy and an execution space to the code that runs the experts. Each space
//! specialises it for the policies it has.
template <class Experts, class Space>
struct ExpertKernelSelector {
  static_assert(dependent_false<Experts, Space>,
                "epx: ExpertParallel's first argument is the expert policy: epx::Grouped or epx::CublasGrouped");
};

}  // namespace detail

//! @brief The MoE layer with expert parallelism: router -> plan -> permute -> dispatch ->
//! experts -> combine -> unpermute, over a Communicator.
//! @tparam Experts   expert policy: Grouped or CublasGrouped
//! @tparam Dispatch  dispatch policy: AllToAll or AllGather
//! @tparam Space     execution space: Cuda (default; include <epx/cuda.cuh>) or Host
//! Each space defines the class in a specialisation; this primary template only says what is missing.
template <class Experts, class Dispatch, class Space = Cuda>
class ExpertParallel {
  static_assert(detail::dependent_false<Space>,
                "epx: ExpertParallel has no implementation for this execution space here: use epx::Host (include "
                "<epx/epx.hpp>) or epx::Cuda (include <epx/cuda.cuh> and compile with nvcc)");
};

}  // namespace epx
