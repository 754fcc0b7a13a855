// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

// The body of the stage comparisons, written once for every execution space: make_plan, permute and
// unpermute of a backend against their Host twins on contiguous rows (ids, counts, offsets and
// permutations exactly equal; unpermute bitwise equal: same fp32 order), with the backend's buffers
// laid out with padding and offset pointers and its outputs poisoned first, so that a write past a
// row or past the routed rows shows. The cases themselves are routing_cases.hpp.

#include "test_util.hpp"

#include <algorithm>
#include <cstring>
#include <vector>

namespace epx::test {

//! A stage comparison to run: on `B`, in element type `T`.
template <class B, class T>
struct StageCase {
  using Backend = B;
  using Element = T;
};

//! The first `bytes` bytes at `a` and `b` are equal (no bytes: equal, whatever the pointers are).
inline bool same_bytes(void const* a, void const* b, std::size_t bytes) {
  return bytes == 0 || std::memcmp(a, b, bytes) == 0;
}

//! Row layout of the device buffers: `hidden` columns, rows `ld` apart (ld >= hidden), starting
//! `offset` elements into the allocation (an offset pointer that breaks 16-byte alignment).
struct RowLayout {
  std::int64_t hidden = 72;  // 9 vectors of bf16: the 16-byte path
  std::int64_t pad = 0;      // ld = hidden + pad
  std::int64_t offset = 0;
  std::int32_t plan_tokens = -1;  // the plan workspace is sized for this many tokens (-1: t)
};

//! `rows` x `hidden` of `m` (row stride ld, from `offset`) as a contiguous host vector.
template <class T>
std::vector<T> gather_rows(std::vector<T> const& m, std::int64_t rows, RowLayout const& l) {
  std::vector<T> out(static_cast<std::size_t>(rows * l.hidden));
  for (std::int64_t r = 0; r < rows; ++r)
    std::memcpy(out.data() + r * l.hidden, m.data() + l.offset + r * (l.hidden + l.pad), l.hidden * sizeof(T));
  return out;
}

//! Every element of `m` outside the `rows` x `hidden` matrix still holds the poison byte.
template <class T>
bool padding_untouched(std::vector<T> const& m, std::int64_t rows, RowLayout const& l, unsigned char poison) {
  std::vector<char> inside(m.size(), 0);
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t c = 0; c < l.hidden; ++c)
      inside[static_cast<std::size_t>(l.offset + r * (l.hidden + l.pad) + c)] = 1;
  auto const* bytes = reinterpret_cast<unsigned char const*>(m.data());
  for (std::size_t i = 0; i < m.size(); ++i)
    if (!inside[i])
      for (std::size_t b = 0; b < sizeof(T); ++b)
        if (bytes[i * sizeof(T) + b] != poison) return false;
  return true;
}

template <class B, class T>
void check_routing(std::int64_t t, std::int32_t k, std::int32_t e, ExpertRange range, bool hot, std::mt19937_64& rng,
                   RowLayout const& layout = {}) {
  CAPTURE(t);
  CAPTURE(k);
  CAPTURE(e);
  CAPTURE(layout.hidden);
  CAPTURE(layout.pad);
  CAPTURE(layout.offset);
  CAPTURE(layout.plan_tokens);
  std::int64_t const h = layout.hidden, ld = layout.hidden + layout.pad;
  auto ids = random_ids(t, k, e, rng, 0.1);
  std::uniform_int_distribution<std::size_t> pick(0, ids.empty() ? 0 : ids.size() - 1);
  if (!ids.empty()) {
    ids[pick(rng)] = e + 3;  // invalid
    ids[pick(rng)] = -9;     // invalid
  }
  if (hot)
    for (std::int64_t i = 0; i < t; ++i) ids[static_cast<std::size_t>(i * k)] = 0;
  if (t > 0) {  // tokens with no expert: one all -1 (padding), one -1 and invalid (counted in both)
    std::uniform_int_distribution<std::int64_t> token(0, t - 1);
    std::int64_t const padded = token(rng), mixed = token(rng);
    std::fill_n(ids.begin() + padded * k, k, -1);
    std::fill_n(ids.begin() + mixed * k, k, -1);
    ids[static_cast<std::size_t>(mixed * k)] = -4;
  }
  auto const weights = random_weights(ids.size(), rng);
  auto const x = random_vector<T>(static_cast<std::size_t>(t * h), rng);

  // Host reference (contiguous rows).
  std::vector<std::byte> host_ws(plan_workspace_bytes(static_cast<std::int32_t>(t), k, range.count));
  Status host_status;
  RoutingPlan const hp = make_plan(Host{}, MatrixView<std::int32_t const>(ids.data(), t, k), e, range,
                                   Workspace(host_ws.data(), host_ws.size()), host_status);
  std::int64_t const rows = hp.expert_offsets.back();
  std::vector<T> host_perm(static_cast<std::size_t>(std::max<std::int64_t>(rows, 1) * h));
  permute(Host{}, hp, MatrixView<T const>(x.data(), t, h), MatrixView<T>(host_perm.data(), rows, h));
  auto const expert_out = random_vector<T>(static_cast<std::size_t>(std::max<std::int64_t>(t * k, 1) * h), rng);
  std::vector<T> host_y(static_cast<std::size_t>(t * h));
  unpermute(Host{}, hp, MatrixView<T const>(expert_out.data(), rows, h), MatrixView<float const>(weights.data(), t, k),
            MatrixView<T>(host_y.data(), t, h));

  // The backend's: every matrix laid out with stride ld from `offset`; outputs poisoned.
  auto const alloc = [&](std::int64_t r) {
    return static_cast<std::size_t>(layout.offset + std::max<std::int64_t>(r, 1) * ld);
  };
  auto spread = [&](std::vector<T> const& dense, std::int64_t r) {
    std::vector<T> out(alloc(r), random_vector<T>(1, rng)[0]);
    for (std::int64_t i = 0; i < r; ++i)
      std::memcpy(out.data() + layout.offset + i * ld, dense.data() + i * h, h * sizeof(T));
    return out;
  };
  typename B::Rank const on;
  typename B::template Buffer<std::int32_t> d_ids(ids);
  typename B::template Buffer<float> d_w(weights);
  typename B::template Buffer<T> d_x(spread(x, t)), d_perm(alloc(t * k)), d_out(spread(expert_out, t * k)),
      d_y(alloc(t));
  std::int32_t const plan_tokens = layout.plan_tokens < 0 ? static_cast<std::int32_t>(t) : layout.plan_tokens;
  typename B::template Buffer<std::byte> d_ws(B::plan_workspace_bytes(plan_tokens, k, range.count));
  typename B::template Buffer<Status> d_status(1);
  d_status.poison(0);
  d_ws.poison(0xab);
  d_perm.poison(0xcd);
  d_y.poison(0xcd);
  RoutingPlan const dp = B::make_plan(on, MatrixView<std::int32_t const>(d_ids.data(), t, k), e, range,
                                      Workspace(d_ws.data(), d_ws.size()), d_status.data());
  permute(on.context(), dp, MatrixView<T const>(d_x.data() + layout.offset, t, h, ld),
          MatrixView<T>(d_perm.data() + layout.offset, t * k, h, ld));
  unpermute(on.context(), dp, MatrixView<T const>(d_out.data() + layout.offset, t * k, h, ld),
            MatrixView<float const>(d_w.data(), t, k), MatrixView<T>(d_y.data() + layout.offset, t, h, ld));
  on.sync();

  CHECK(B::to_host(dp.expert_offsets) == std::vector<std::int32_t>(hp.expert_offsets.begin(), hp.expert_offsets.end()));
  CHECK(B::to_host(dp.tokens_per_expert) ==
        std::vector<std::int32_t>(hp.tokens_per_expert.begin(), hp.tokens_per_expert.end()));
  CHECK(B::to_host(dp.sorted_slots) == std::vector<std::int32_t>(hp.sorted_slots.begin(), hp.sorted_slots.end()));
  CHECK(B::to_host(dp.slot_rows) == std::vector<std::int32_t>(hp.slot_rows.begin(), hp.slot_rows.end()));
  auto const st = d_status.to_host()[0];
  CHECK(st.invalid_ids == host_status.invalid_ids);
  CHECK(st.dropped_slots == host_status.dropped_slots);
  CHECK(st.max_tokens_per_expert == host_status.max_tokens_per_expert);
  CHECK(st.tokens_without_expert == host_status.tokens_without_expert);  // summed per warp on a device
  if (t > 0) CHECK(host_status.tokens_without_expert >= 1);
  auto const perm = d_perm.to_host();
  CHECK(same_bytes(gather_rows(perm, rows, layout).data(), host_perm.data(),
                   static_cast<std::size_t>(rows * h) * sizeof(T)));
  CHECK(padding_untouched(perm, rows, layout, 0xcd));  // nothing past a row's end, nor past the routed rows
  auto const y = d_y.to_host();
  CHECK(same_bytes(gather_rows(y, t, layout).data(), host_y.data(), host_y.size() * sizeof(T)));
  CHECK(padding_untouched(y, t, layout, 0xcd));
}

}  // namespace epx::test
