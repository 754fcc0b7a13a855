// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

#include <epx/core/error.hpp>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace epx {

//! Counters a routing step leaves behind, written where the step runs (on the device without a host
//! sync) and read on request: ExpertParallel::status() on every execution space. Trivially
//! copyable, 32 bytes.
struct Status {
  std::uint64_t invalid_ids = 0;            //!< topk_ids outside [0, num_experts) other than -1
  std::uint64_t dropped_slots = 0;          //!< (token, slot) pairs not computed: invalid ids, capacity
  std::uint32_t max_tokens_per_expert = 0;  //!< largest row count any expert this rank computes received
  std::uint32_t overflow = 0;               //!< non-zero when a static capacity was exceeded (reserved)
  //! Tokens none of whose top_k slots held a valid expert id (every slot -1, or -1 and invalid
  //! ids): their output row is all zeros. Counted by make_plan over every slot of the tokens it
  //! is given (whatever expert range it sorts onto), so in ExpertParallel it counts this rank's
  //! tokens: with AllGather every rank holds the same tokens and reports the same count.
  //!
  //! Expected for padding: tokens a caller marks all -1 in the topk_ids it passes. From router
  //! logits it means a token with no selectable expert: every logit NaN or -inf (NaN is bad input
  //! upstream; -inf may be a mask the caller meant). Not part of ok(), see there.
  std::uint64_t tokens_without_expert = 0;

  //! Folds another step's counters into this one.
  Status& merge(Status const& other) noexcept {
    invalid_ids += other.invalid_ids;
    dropped_slots += other.dropped_slots;
    max_tokens_per_expert = std::max(max_tokens_per_expert, other.max_tokens_per_expert);
    overflow |= other.overflow;
    tokens_without_expert += other.tokens_without_expert;
    return *this;
  }

  //! True when every slot that named an expert was computed: no invalid id, nothing dropped, no
  //! capacity overflow. tokens_without_expert does not make it false: a token whose slots are all
  //! -1 was computed as asked (its row is zero, as the contract says), and padded batches are
  //! common, so counting them here would make ok() false on every padded step and useless there.
  //! A caller routing from logits, where such a token means NaN or -inf logits, checks
  //! `tokens_without_expert == 0` as well.
  [[nodiscard]] bool ok() const noexcept { return invalid_ids == 0 && dropped_slots == 0 && overflow == 0; }
};

static_assert(std::is_trivially_copyable_v<Status> && sizeof(Status) == 32);

//! What to do when topk_ids hold invalid ids (the routing-id contract): the slots are always dropped
//! and counted; kThrow then raises Errc::kInvalidExpertId once the call has finished its collectives.
enum class InvalidIds : std::uint8_t { kThrow, kDropAndCount };

}  // namespace epx
