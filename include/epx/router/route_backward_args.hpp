// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! The router backward's protocol, shared by every backend: route_backward's data-independent
//! argument checks (the Host adds the id checks it can make on host memory), and the per-slot and
//! per-expert bookkeeping of the CUDA kernel as plain EPX_HOST_DEVICE C++, so that
//! tests/kernel_math checks it without a GPU. Semantics: host/router_backward.hpp.

#include <epx/config.hpp>
#include <epx/core/router_config.hpp>
#include <epx/core/views.hpp>
#include <epx/cuda/router_lanes.hpp>  // plain C++: the warp layout the CUDA kernel shares
#include <epx/router/router.hpp>

#include <cstdint>

namespace epx::detail {

//! route_backward's shapes and config (no element is read).
template <class L>
void check_route_backward_args(RouterConfig const& config, MatrixView<L const> logits,
                               MatrixView<std::int32_t const> topk_ids, MatrixView<float const> d_topk_weights,
                               MatrixView<float> d_logits) {
  constexpr std::string_view where = "route_backward";
  validate(config, where);
  check_matrix(where, "logits", logits, -1, config.num_experts);
  check_matrix(where, "topk_ids", topk_ids, logits.rows, config.top_k);
  check_matrix(where, "d_topk_weights", d_topk_weights, logits.rows, config.top_k);
  check_matrix(where, "d_logits", d_logits, logits.rows, config.num_experts);
}

// ---- The CUDA kernel's bookkeeping (one warp per token; router_lanes.hpp's layout) ----

//! What a slot of topk_ids holds, as route_backward reads it.
enum class BackwardSlot : std::uint8_t {
  kEmpty,       //!< -1: no expert, no gradient
  kExpert,      //!< an id in [0, num_experts)
  kOutOfRange,  //!< anything else: the token is rejected (Status::invalid_ids)
};

EPX_HOST_DEVICE constexpr BackwardSlot backward_slot(std::int32_t id, std::int32_t num_experts) {
  if (id == -1) return BackwardSlot::kEmpty;
  return id >= 0 && id < num_experts ? BackwardSlot::kExpert : BackwardSlot::kOutOfRange;
}

//! The owner's record of the experts its registers hold that a slot chose (bit i: register i).
//! Marking an expert twice is a repeated id (the token is rejected).
struct BackwardChosen {
  unsigned mask = 0;
  bool repeated = false;
};

//! A slot's `expert` (already in range) is seen by every lane; only its owner (router_expert_lane)
//! records it, in bit router_expert_register. Returns whether this lane is the owner.
EPX_HOST_DEVICE constexpr bool backward_mark_chosen(int lane, int expert, BackwardChosen& chosen) {
  if (router_expert_lane(expert) != lane) return false;
  unsigned const bit = 1u << router_expert_register(expert);
  if ((chosen.mask & bit) != 0) chosen.repeated = true;
  chosen.mask |= bit;
  return true;
}

//! A rejected token's contribution to Status: `invalid_ids` counts its out-of-range ids,
//! `dropped_slots` every slot that named something (in range or not) and got no gradient.
struct BackwardRejected {
  std::uint32_t invalid_ids = 0;
  std::uint32_t dropped_slots = 0;
};

//! The Status counts of one token from its slots' kinds and whether it was rejected (an
//! out-of-range, repeated or unselectable id): nothing when accepted.
EPX_HOST_DEVICE constexpr BackwardRejected backward_rejected(int out_of_range, int named, bool rejected) {
  return rejected ? BackwardRejected{static_cast<std::uint32_t>(out_of_range), static_cast<std::uint32_t>(named)}
                  : BackwardRejected{};
}

}  // namespace epx::detail
