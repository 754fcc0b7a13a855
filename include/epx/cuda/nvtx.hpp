// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! NVTX ranges around the CUDA backend's stages, for profiler users (docs/profiling.md). Off unless
//! EPX_ENABLE_NVTX is defined (the CMake option EPX_ENABLE_NVTX puts it on epx::cuda): then each
//! stage launcher pushes one range named after its stage in the NVTX domain "epx", through the
//! NVTX3 C++ API that ships, header-only, with the CUDA toolkit. Off, no NVTX header is included
//! and a range is an empty object the compiler removes.
//!
//! A range is host-side: it spans the launcher's CPU time (argument checks, launches, and any
//! synchronisation the stage has), not the kernels' GPU time; Nsight Systems projects it onto the
//! GPU. Define EPX_ENABLE_NVTX the same way in every translation unit of a program (epx is
//! header-only: two definitions of one launcher, with and without its range, break the ODR).
//! NVTX_DISABLE, NVTX's own switch for a whole program (CUB's ranges obey it too), turns epx's off.

#if defined(EPX_ENABLE_NVTX) && !defined(NVTX_DISABLE)
#include <nvtx3/nvtx3.hpp>
#endif

namespace epx::nvtx {

//! Whether this build pushes epx's ranges.
#if defined(EPX_ENABLE_NVTX) && !defined(NVTX_DISABLE)
inline constexpr bool kEnabled = true;
#else
inline constexpr bool kEnabled = false;
#endif

//! The NVTX domain of every epx range: profilers show and filter epx's ranges under this name
//! (nsys --nvtx-domain-include epx, ncu --nvtx-include "epx@experts/").
struct Domain {
  static constexpr char const* name = "epx";
};

// One tag per stage; `message` is the range's name on the timeline. The names exist in both
// builds, so a launcher that names a stage compiles (or fails) the same way with the switch off.

//! route: the router (top-k and weights from logits).
struct Route {
  static constexpr char const* message = "route";
};
//! make_plan: the routing plan (sort by expert, offsets, inverse permutation).
struct Plan {
  static constexpr char const* message = "plan";
};
//! permute: token rows gathered into expert order.
struct Permute {
  static constexpr char const* message = "permute";
};
//! The expert MLP: expert_mlp (Grouped) or CublasGrouped's run.
struct Experts {
  static constexpr char const* message = "experts";
};
//! grouped_gemm called on its own (the expert MLP's GEMMs run inside its "experts" range).
struct GroupedGemm {
  static constexpr char const* message = "grouped_gemm";
};
//! unpermute: the weighted sum of each token's expert rows.
struct Unpermute {
  static constexpr char const* message = "unpermute";
};
//! ExpertParallel: rows to the ranks that hold their experts.
struct Dispatch {
  static constexpr char const* message = "dispatch";
};
//! ExpertParallel: expert outputs back to (or summed over) the ranks that own the tokens.
struct Combine {
  static constexpr char const* message = "combine";
};
//! ExpertParallel::forward: the whole layer.
struct Forward {
  static constexpr char const* message = "forward";
};

//! One push/pop range named Stage::message in domain "epx", from construction to end() or the end
//! of the scope, whichever comes first. Ranges nest as a stack: end() closes the innermost range
//! of this thread, so call it only on the innermost one still open.
template <class Stage>
class ScopedRange {
 public:
#if defined(EPX_ENABLE_NVTX) && !defined(NVTX_DISABLE)
  ScopedRange() noexcept { nvtxDomainRangePushEx(domain(), attributes().get()); }
  ~ScopedRange() { end(); }
  //! Closes the range now (once); the destructor then does nothing.
  void end() noexcept {
    if (open_) nvtxDomainRangePop(domain());
    open_ = false;
  }
#else
  ScopedRange() noexcept {}  // user-provided: an unused range is no unused-variable warning
  ~ScopedRange() {}
  void end() noexcept {}
#endif
  ScopedRange(ScopedRange const&) = delete;
  ScopedRange& operator=(ScopedRange const&) = delete;

 private:
#if defined(EPX_ENABLE_NVTX) && !defined(NVTX_DISABLE)
  static nvtxDomainHandle_t domain() noexcept { return ::nvtx3::domain::get<Domain>(); }
  // The name is registered with the tool once per stage (a registered string: the tool keeps a
  // handle, not a copy of the text per range), and its attributes are built once: each range
  // then costs one push and one pop.
  static ::nvtx3::event_attributes const& attributes() noexcept {
    static ::nvtx3::event_attributes const attributes{::nvtx3::registered_string_in<Domain>::get<Stage>()};
    return attributes;
  }
  bool open_ = true;
#endif
};

}  // namespace epx::nvtx

//! A range over the rest of the enclosing scope for `Stage`, one of the tags above:
//! `EPX_NVTX_RANGE(Route);`. Off, an empty object (the tag is still checked).
#define EPX_NVTX_RANGE(Stage) \
  ::epx::nvtx::ScopedRange<::epx::nvtx::Stage> const epx_nvtx_range_##Stage {}
