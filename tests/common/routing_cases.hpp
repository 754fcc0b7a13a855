// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

// The stage comparisons (routing_comparison.hpp), written once for every execution space. The
// including file includes routing_comparison.hpp, defines EPX_STAGE_CASES (StageCase<Backend, T>
// types) and EPX_STAGE_BACKENDS, names them with TYPE_TO_STRING_AS, then includes this header once:
// tests/host/plan_test.cpp (Host, in CI: the strided layouts against the contiguous reference) and
// tests/cuda/routing_test.cu (Cuda, on a GPU).

#include "routing_comparison.hpp"

#if !defined(EPX_STAGE_CASES) || !defined(EPX_STAGE_BACKENDS)
#error "define EPX_STAGE_CASES and EPX_STAGE_BACKENDS before including routing_cases.hpp"
#endif

TEST_CASE_TEMPLATE("Plan::make_plan: plan, permute and unpermute equal the host twins", C, EPX_STAGE_CASES) {
  using T = typename C::Element;
  EPX_TEST_SEEDED_RNG(rng);
  std::vector<std::int64_t> const tokens = epx::test::small_sizes()
                                               ? std::vector<std::int64_t>{0, 1, 7, 128}
                                               : std::vector<std::int64_t>{0, 1, 7, 128, 4096, 16384};
  for (std::int32_t e : {8, 128, 256, 384})
    for (std::int32_t k : {1, 2, 4, 8})
      for (std::int64_t t : tokens) {
        if (k > e || (t == 16384 && !std::is_same_v<T, epx::bfloat16>)) continue;
        epx::test::check_routing<typename C::Backend, T>(t, k, e, {0, e}, false, rng);
      }
}

TEST_CASE_TEMPLATE("Permute::permute: rows that are not whole 16-byte vectors, padded rows, offset pointers", C,
                   EPX_STAGE_CASES) {
  // h = 7 and 70 are not whole vectors (the element path); ld > h leaves padding that must stay
  // poisoned; an offset of one element breaks 16-byte alignment even when h is whole vectors.
  EPX_TEST_SEEDED_RNG(rng);
  std::int64_t const t = epx::test::pick_size<std::int64_t>(777, 97);
  for (std::int64_t h : {7, 70, 64, 72})
    for (std::int64_t pad : {0, 1, 8})
      for (std::int64_t offset : {0, 1, 8})
        epx::test::check_routing<typename C::Backend, typename C::Element>(t, 4, 32, {0, 32}, false, rng,
                                                                           {.hidden = h, .pad = pad, .offset = offset});
}

TEST_CASE_TEMPLATE("Plan::make_plan: a workspace sized for many tokens (CUB's multi-tile sort) used with few", B,
                   EPX_STAGE_BACKENDS) {
  // A layer sizes the plan once for its capacity (tokens x top_k far above CUB's single-tile limit
  // of a few thousand items), then plans a decode step of a handful of tokens inside it: CUB must
  // take the small sort's path with a temporary-storage size computed for a larger one.
  EPX_TEST_SEEDED_RNG(rng);
  int const plan_tokens = epx::test::pick_size(65536, 8192);
  for (std::int64_t t : {0, 1, 5, 64, 300})
    epx::test::check_routing<B, epx::bfloat16>(t, 8, 256, {0, 256}, false, rng, {.plan_tokens = plan_tokens});
  epx::test::check_routing<B, epx::bfloat16>(3, 8, 256, {64, 64}, true, rng, {.plan_tokens = plan_tokens});
}

TEST_CASE_TEMPLATE("Plan::make_plan: a rank's expert range and one hot expert", B, EPX_STAGE_BACKENDS) {
  EPX_TEST_SEEDED_RNG(rng);
  epx::test::check_routing<B, epx::bfloat16>(4096, 8, 256, {96, 32}, false, rng);
  epx::test::check_routing<B, epx::bfloat16>(4096, 8, 256, {0, 256}, true, rng);
  epx::test::check_routing<B, epx::bfloat16>(777, 4, 10, {7, 3}, true, rng);
}
