// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// Built and run by the tests/package/cutlass consumer project: a host-only translation unit (no CUTLASS
// kernel: each costs ~45 s and 3.5 GB) against epx::cutlass when EPX_CONSUMER_EXPECT_CUTLASS is 1, or
// against epx::epx when it is 0. It checks that the target's headers and EPX_HAVE_CUTLASS reach the
// consumer (or do not), and runs epx's host-side index math of the CUTLASS grouped GEMM.

#include <epx/cuda/gemm/group_problem.hpp>

#include <cstdint>
#include <cstdio>

#if EPX_CONSUMER_EXPECT_CUTLASS
#ifndef EPX_HAVE_CUTLASS
#error "epx::cutlass did not define EPX_HAVE_CUTLASS"
#endif
#include <cutlass/cutlass.h>
#include <cutlass/version.h>
static_assert(CUTLASS_MAJOR * 100 + CUTLASS_MINOR >= 309, "epx::cutlass needs CUTLASS 3.9 or newer");
#else
#ifdef EPX_HAVE_CUTLASS
#error "EPX_HAVE_CUTLASS is defined, but this consumer did not link epx::cutlass"
#endif
#endif

int main() {
  // Three groups of 3, 0 and 4 rows; group 2 of a [7, 16] A into a [7, 8] D with B [3, 8, 16].
  std::int32_t const offsets[] = {0, 3, 3, 7};
  auto const g = epx::detail::group_problem(offsets, 2, 16, 8, 8, 16);
  bool const ok = g.m == 4 && g.n == 8 && g.k == 16 && g.a_offset == 3 * 16 && g.b_offset == 2 * 8 * 16 &&
                  g.d_offset == 3 * 8 && epx::detail::group_problem(offsets, 1, 16, 8, 8, 16).m == 0;
#if EPX_CONSUMER_EXPECT_CUTLASS
  std::printf("epx::cutlass consumer: CUTLASS %d.%d.%d, EPX_HAVE_CUTLASS defined: %s\n", CUTLASS_MAJOR, CUTLASS_MINOR,
              CUTLASS_PATCH, ok ? "OK" : "MISMATCH");
#else
  std::printf("epx consumer without CUTLASS: EPX_HAVE_CUTLASS undefined: %s\n", ok ? "OK" : "MISMATCH");
#endif
  return ok ? 0 : 1;
}
