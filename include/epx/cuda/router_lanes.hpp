// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! The CUDA router's warp layout, as plain C++ that the kernel calls and the host tests
//! (tests/kernel_math/router_lanes_test.cpp) check by emulating 32 lanes, with shfl_xor as an
//! array permutation. No CUDA include: every host preset builds those tests.
//!
//! One warp routes one token. Expert e lives in lane e % 32, register e / 32 (so a warp load of
//! one register reads 32 consecutive logits). Chosen slot j lives in lane j % 32, register j / 32:
//! two slot registers per lane cover kMaxTopK = 64 without a run-time-indexed array. Groups of
//! `group_size` consecutive experts are scored once, one lane per group, from a shared-memory stage
//! whose rows have an odd stride, so those reads never conflict on a bank.

#include <epx/config.hpp>
#include <epx/core/router_config.hpp>

#include <type_traits>

namespace epx::detail {

inline constexpr int kWarpLanes = 32;

//! Slot registers per lane: slots j and j + 32 of lane j.
inline constexpr int kRouterSlotRegisters = (kMaxTopK + kWarpLanes - 1) / kWarpLanes;
static_assert(kRouterSlotRegisters == 2, "the router keeps two slot registers per lane (kMaxTopK = 64)");

// ---- Expert and slot ownership ----

//! The expert in register `reg` of `lane`.
EPX_HOST_DEVICE constexpr int router_expert(int lane, int reg) { return lane + kWarpLanes * reg; }
EPX_HOST_DEVICE constexpr int router_expert_lane(int expert) { return expert % kWarpLanes; }
EPX_HOST_DEVICE constexpr int router_expert_register(int expert) { return expert / kWarpLanes; }

//! Registers per lane for `num_experts` experts (the kernel is instantiated for a bound of this).
EPX_HOST_DEVICE constexpr int router_registers(int num_experts) { return (num_experts + kWarpLanes - 1) / kWarpLanes; }

//! Calls launch(std::integral_constant<int, R>{}) with R the smallest of 1, 2, 4, 8, 16 registers per
//! lane that holds num_experts (the router kernels are instantiated for those five).
template <class Launch>
void with_router_registers(int num_experts, Launch&& launch) {
  int const per_lane = router_registers(num_experts);
  if (per_lane <= 1)
    launch(std::integral_constant<int, 1>{});
  else if (per_lane <= 2)
    launch(std::integral_constant<int, 2>{});
  else if (per_lane <= 4)
    launch(std::integral_constant<int, 4>{});
  else if (per_lane <= 8)
    launch(std::integral_constant<int, 8>{});
  else
    launch(std::integral_constant<int, 16>{});
}

EPX_HOST_DEVICE constexpr int router_slot_lane(int slot) { return slot % kWarpLanes; }
EPX_HOST_DEVICE constexpr int router_slot_register(int slot) { return slot / kWarpLanes; }
EPX_HOST_DEVICE constexpr int router_slot(int lane, int reg) { return lane + kWarpLanes * reg; }

// ---- Argmax with ties to the lower id ----

//! (value, id) ordered by value descending, then id ascending; id -1 = nothing, below everything.
//! A strict total order as long as no candidate with id >= 0 has a NaN value (the kernel never
//! makes one: NaN choices are unselectable, NaN group scores are mapped first).
struct RouterCandidate {
  float value;
  int id;
};

EPX_HOST_DEVICE constexpr bool router_better(RouterCandidate a, RouterCandidate b) {
  if (a.id < 0) return false;
  if (b.id < 0) return true;
  return a.value > b.value || (a.value == b.value && a.id < b.id);
}

//! The better of this lane's candidate and its butterfly partner's.
EPX_HOST_DEVICE constexpr RouterCandidate router_pick(RouterCandidate mine, RouterCandidate other) {
  return router_better(other, mine) ? other : mine;
}

//! Xor butterfly over the warp: afterwards every lane holds merge() over all 32 lanes' values
//! (merge must be associative and commutative on the values it meets). `shfl_xor(v, offset)` is
//! __shfl_xor_sync on the device and an array permutation in the host tests, where T holds all
//! 32 lanes at once.
template <class T, class ShflXor, class Merge>
EPX_HOST_DEVICE inline T warp_butterfly(T v, ShflXor&& shfl_xor, Merge&& merge) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int offset = kWarpLanes / 2; offset > 0; offset /= 2) v = merge(v, shfl_xor(v, offset));
  return v;
}

//! One bit per register of a lane (bit i: register i), e.g. which of its experts are selectable:
//! flags as bits keep one register for all of them (bool arrays take one register each).
using RouterLaneMask = unsigned;

template <int kPerLane>
EPX_HOST_DEVICE constexpr bool router_has(RouterLaneMask mask, int reg) {
  static_assert(kPerLane >= 1 && kPerLane <= 32, "one mask bit per register");
  return ((mask >> reg) & 1u) != 0;
}

//! This lane's best selectable expert among its kPerLane registers, and that expert's score
//! (what its weight starts from). Registers whose bit of `selectable` is clear (incl. those past
//! num_experts) give nothing.
struct RouterLaneBest {
  RouterCandidate candidate;
  float score;
};

template <int kPerLane>
EPX_HOST_DEVICE constexpr RouterLaneBest router_lane_best(int lane, float const (&choice)[kPerLane],
                                                          float const (&score)[kPerLane], RouterLaneMask selectable) {
  RouterLaneBest best{{0.0f, -1}, 0.0f};
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int i = 0; i < kPerLane; ++i) {
    RouterCandidate const c{choice[i], router_has<kPerLane>(selectable, i) ? router_expert(lane, i) : -1};
    if (router_better(c, best.candidate)) best = {c, score[i]};
  }
  return best;
}

//! The chosen expert leaves its owner's registers (every lane calls this; only the owner changes).
template <int kPerLane>
EPX_HOST_DEVICE constexpr RouterLaneMask router_retire(int lane, int expert, RouterLaneMask selectable) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int i = 0; i < kPerLane; ++i)
    if (router_expert(lane, i) == expert) selectable &= ~(1u << i);
  return selectable;
}

//! The slots one lane owns: slot router_slot(lane, r) in register r. Every access indexes with
//! the unrolled r, so the arrays stay in registers.
struct RouterSlots {
  int id[kRouterSlotRegisters] = {-1, -1};
  float weight[kRouterSlotRegisters] = {0.0f, 0.0f};

  //! Slot `slot` chose (id, weight): the owning lane records it, the others ignore it.
  EPX_HOST_DEVICE constexpr void keep(int lane, int slot, int chosen, float w) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int r = 0; r < kRouterSlotRegisters; ++r)
      if (lane == router_slot_lane(slot) && r == router_slot_register(slot)) {
        id[r] = chosen;
        weight[r] = w;
      }
  }
};

// ---- Groups (num_groups > 1) ----

//! Group of an expert: num_groups consecutive runs of group_size experts.
EPX_HOST_DEVICE constexpr int router_group(int expert, int group_size) { return expert / group_size; }

//! Shared-memory row stride of one group: the smallest odd number >= group_size. Lane g reads
//! member m of group g at g * stride + m, so the 32 lanes of one read touch 32 banks (odd stride);
//! the stores of one register (32 consecutive experts) are conflict-free when group_size is odd or
//! a multiple of 32 and at most 2-way otherwise (one padding word inside a 32-word run).
EPX_HOST_DEVICE constexpr int router_group_stride(int group_size) { return group_size | 1; }

//! Where expert e's choice is staged for group scoring.
EPX_HOST_DEVICE constexpr int router_group_word(int expert, int group_size) {
  return router_group(expert, group_size) * router_group_stride(group_size) + expert % group_size;
}

//! Words the stage needs: num_groups rows of the stride; at most 3/2 num_experts (an even
//! group_size is at least 2).
EPX_HOST_DEVICE constexpr int router_group_words(int num_experts, int group_size) {
  return num_experts / group_size * router_group_stride(group_size);
}

//! Upper bound of router_group_words for kPerLane registers (the kernel's static stage).
EPX_HOST_DEVICE constexpr int router_group_stage_words(int per_lane) { return per_lane * kWarpLanes * 3 / 2; }

//! A group's score as RouterConfig defines it, folded over its selectable members in any order:
//! the sum of the two largest choices, the largest alone when there is one, -inf when none.
//! Written as host/router.hpp writes it, so that the same choices give the same bits (incl.
//! -inf members and sums that overflow).
struct RouterGroupTop2 {
  float first = -__builtin_huge_valf();
  float second = -__builtin_huge_valf();
  int found = 0;

  EPX_HOST_DEVICE constexpr void add(float c) {
    ++found;
    if (c > first) {
      second = first;
      first = c;
    } else if (c > second) {
      second = c;
    }
  }
  [[nodiscard]] EPX_HOST_DEVICE constexpr float score() const {
    return found == 0 ? -__builtin_huge_valf() : (found == 1 ? first : first + second);
  }
};

//! Group g as a candidate of one keep round, exactly as the host's scan picks: groups already kept
//! and groups scored -inf never compete; among the rest the best score wins with ties to the lower
//! id, except that a NaN score (a sum of +inf and -inf choices) wins when its group is the lowest
//! competing one (the host's scan starts from it and `>` never replaces a NaN) and never competes
//! otherwise. `first_competing` is the lowest competing group id of this round (any value when no
//! competing group has a NaN score).
EPX_HOST_DEVICE constexpr RouterCandidate router_group_candidate(float score, int group, bool kept,
                                                                 int first_competing) {
  bool const competes = !kept && score != -__builtin_huge_valf();
  if (!competes) return {0.0f, -1};
  if (score != score) {
    if (group == first_competing) return {__builtin_huge_valf(), group};
    return {0.0f, -1};
  }
  return {score, group};
}

}  // namespace epx::detail
