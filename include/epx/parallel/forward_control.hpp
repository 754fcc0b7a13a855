// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! The control block of one ExpertParallel forward: the routing counters and where the first
//! invalid id was, written where the forward's work runs (host memory on Host, device memory on
//! Cuda) and read by the host once the forward has finished, on every execution space alike.

#include <epx/config.hpp>
#include <epx/core/error.hpp>
#include <epx/core/status.hpp>

#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>

namespace epx::detail {

//! The key of "no invalid id seen": larger than every recorded key, so the lowest slot wins a min.
inline constexpr std::uint64_t kNoInvalidId = ~std::uint64_t{0};

//! What a forward leaves for the host to read. It starts the workspace's control part; a dispatch
//! part that gathers a count table puts the table right after it, so one read brings both over.
struct ForwardControl {
  Status status;
  //! invalid_id_key of the lowest slot holding an invalid id; kNoInvalidId when none.
  std::uint64_t first_invalid = kNoInvalidId;
};
static_assert(sizeof(ForwardControl) % sizeof(std::int64_t) == 0 && std::is_trivially_copyable_v<ForwardControl>);

//! ForwardControl in int64 words (the control part is carved and copied as int64 words).
inline constexpr std::size_t kControlWords = sizeof(ForwardControl) / sizeof(std::int64_t);

//! The ForwardControl at the start of a control part.
inline ForwardControl* forward_control(std::span<std::int64_t> control) noexcept {
  return reinterpret_cast<ForwardControl*>(control.data());
}

//! The ForwardControl at the start of `words` (host memory), by value.
inline ForwardControl read_forward_control(std::span<std::int64_t const> words) noexcept {
  ForwardControl control;
  std::memcpy(static_cast<void*>(&control), words.data(), sizeof(control));  // trivially copyable
  return control;
}

//! An id neither -1 ("no expert") nor in [0, num_experts): dropped and counted (the routing-id contract).
EPX_HOST_DEVICE constexpr bool is_invalid_expert_id(std::int32_t id, std::int32_t num_experts) {
  return id != -1 && (id < 0 || id >= num_experts);
}

//! (slot << 32) | uint32(id): ordered by slot first, so the minimum over every invalid slot (a loop
//! on the host, an atomicMin on the device) keeps the first one in row-major order.
EPX_HOST_DEVICE constexpr std::uint64_t invalid_id_key(std::uint32_t slot, std::int32_t id) {
  return (std::uint64_t{slot} << 32) | static_cast<std::uint32_t>(id);
}

//! Where the first invalid id of a forward was, in the topk_ids of the rank that held it.
struct InvalidIdSite {
  std::int64_t token = -1;  //!< row of that rank's topk_ids (its own token index); -1: not recorded
  std::int32_t slot = 0;    //!< column of topk_ids
  std::int32_t id = 0;
};

//! The site an invalid_id_key names, for `top_k` slots per token.
constexpr InvalidIdSite invalid_id_site(std::uint64_t key, std::int32_t top_k) {
  if (key == kNoInvalidId) return {};
  auto const slot = static_cast<std::int64_t>(key >> 32);
  return {.token = slot / top_k,
          .slot = static_cast<std::int32_t>(slot % top_k),
          .id = static_cast<std::int32_t>(static_cast<std::uint32_t>(key & 0xffffffffu))};
}

//! The Error of InvalidIds::kThrow. Token indices are rank-local (each rank's forward has its own
//! tokens), so the message names the rank with them.
[[noreturn]] inline void throw_invalid_ids(std::string_view where, int rank, std::uint64_t count,
                                           InvalidIdSite const& first, std::int32_t num_experts) {
  std::string const first_text = first.token < 0
                                     ? std::string("not recorded")
                                     : fmt::format("token {} of rank {}, slot {}: topk_ids[{}, {}] = {}", first.token,
                                                   rank, first.slot, first.token, first.slot, first.id);
  throw_error(Errc::kInvalidExpertId,
              fmt::format("{}: rank {}: topk_ids held {} invalid expert id(s) (first: {}), expected -1 or an id in "
                          "[0, {}); those slots were dropped and the output written without them",
                          where, rank, count, first_text, num_experts));
}

}  // namespace epx::detail
