// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// The NVTX ranges of the CUDA stages (epx/cuda/nvtx.hpp), on any machine: nvtx_recorder.cpp is this
// program's NVTX tool, and every launcher below is refused by its host-side checks before any CUDA
// call (fake device pointers are never touched), so no GPU is needed. What this shows: each
// launcher opens one range named after its stage, in domain "epx", as a registered string, before
// its argument checks, and closes it when they throw. What it cannot show without a GPU: the ranges
// of calls that reach the GPU, CublasGrouped's (its constructor needs a device), and how a profiler
// draws them (docs/profiling.md).

#ifndef EPX_ENABLE_NVTX
#define EPX_ENABLE_NVTX 1  // this test checks the ranges, whatever the build's EPX_ENABLE_NVTX option
#endif
#include <epx/cuda.cuh>

#include "../common/test_util.hpp"
#include "nvtx_recorder.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <random>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

using namespace epx;
using test::NvtxEvent;

namespace {

static_assert(nvtx::kEnabled);

// Device pointers that are never dereferenced: every call below fails its host-side checks first.
template <class T>
T* fake(std::uintptr_t address = 0x10000) {
  return reinterpret_cast<T*>(address);
}

NvtxEvent push(std::string const& name) { return {NvtxEvent::Kind::kPush, "epx", name, true}; }
NvtxEvent pop() { return {NvtxEvent::Kind::kPop, "epx", "", false}; }

// Events as text, so that a failed check prints them.
std::string text(std::vector<NvtxEvent> const& events) {
  std::ostringstream os;
  for (NvtxEvent const& e : events) os << e << " ";
  return os.str();
}

void require_recorder() {
  char const* const tool = std::getenv("NVTX_INJECTION64_PATH");
  std::string const why = "NVTX_INJECTION64_PATH = " + std::string(tool != nullptr ? tool : "(unset)") +
                          ": run this test without a profiler (its own recorder must be NVTX's tool)";
  INFO(why);
  REQUIRE(test::nvtx_recorder_attached());
  (void)test::take_nvtx_events();
}

// Runs `call`, which must throw epx::Error, and returns the NVTX events it caused.
std::vector<NvtxEvent> events_of_refused(std::function<void()> const& call) {
  (void)test::take_nvtx_events();
  bool thrown = false;
  try {
    call();
  } catch (Error const&) {
    thrown = true;
  }
  CHECK(thrown);
  return test::take_nvtx_events();
}

}  // namespace

TEST_CASE("Nvtx::ScopedRange[nvtx]: a range pushes its stage's registered name in domain epx and pops once") {
  require_recorder();
  {
    nvtx::ScopedRange<nvtx::Dispatch> dispatch;
    dispatch.end();
    dispatch.end();  // a second end() pops nothing, nor does the destructor
  }
  CHECK(text(test::take_nvtx_events()) == text({push("dispatch"), pop()}));
  {
    EPX_NVTX_RANGE(Forward);
    { EPX_NVTX_RANGE(Combine); }
    EPX_NVTX_RANGE(Unpermute);
  }
  CHECK(text(test::take_nvtx_events()) ==
        text({push("forward"), push("combine"), pop(), push("unpermute"), pop(), pop()}));
  // The names profilers filter on (docs/profiling.md).
  CHECK(std::string(nvtx::Domain::name) == "epx");
  std::vector<std::string> const names{nvtx::Route::message,    nvtx::Plan::message,        nvtx::Permute::message,
                                       nvtx::Experts::message,  nvtx::GroupedGemm::message, nvtx::Unpermute::message,
                                       nvtx::Dispatch::message, nvtx::Combine::message,     nvtx::Forward::message};
  CHECK(names == std::vector<std::string>{"route", "plan", "permute", "experts", "grouped_gemm", "unpermute",
                                          "dispatch", "combine", "forward"});
}

TEST_CASE("Nvtx::stages[nvtx]: each CUDA stage launcher opens its range before its checks, closes it when they throw") {
  require_recorder();
  EPX_TEST_SEEDED_RNG(rng);
  // Shapes drawn at random: the ranges do not depend on them, and every call is refused whatever they are.
  auto draw = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  std::int64_t const tokens = draw(1, 300), hidden = 8 * draw(1, 64);
  std::int32_t const experts = draw(2, 512), top_k = draw(1, std::min(8, experts));
  CAPTURE(tokens);
  CAPTURE(hidden);
  CAPTURE(experts);
  CAPTURE(top_k);
  StreamRef const host = StreamRef::host();  // refused by every CUDA launcher
  RoutingPlan plan;
  plan.num_tokens = static_cast<std::int32_t>(tokens);
  plan.top_k = top_k;

  // Each launcher and the range it must open; every call is refused (at the latest by its stream).
  std::vector<std::pair<std::string, std::function<void()>>> const launchers{
      {"route",
       [&] {
         route(host, RouterConfig{.num_experts = experts, .top_k = top_k},
               MatrixView<float const>(fake<float const>(), tokens, experts), {},
               MatrixView<std::int32_t>(fake<std::int32_t>(), tokens, top_k),
               MatrixView<float>(fake<float>(), tokens, top_k));
       }},
      {"plan",
       [&] {
         (void)make_plan(host, MatrixView<std::int32_t const>(fake<std::int32_t const>(), tokens, top_k), experts,
                         ExpertRange{0, experts}, Workspace(fake<std::byte>(), std::size_t{1} << 24), fake<Status>());
       }},
      {"permute",
       [&] {
         permute(host, plan, MatrixView<float const>(fake<float const>(), tokens, hidden),
                 MatrixView<float>(fake<float>(), tokens * top_k, hidden));
       }},
      {"unpermute",
       [&] {
         unpermute(host, plan, MatrixView<float const>(fake<float const>(), tokens * top_k, hidden),
                   MatrixView<float const>(fake<float const>(), tokens, top_k),
                   MatrixView<float>(fake<float>(), tokens, hidden));
       }},
      {"grouped_gemm",
       [&] {
         grouped_gemm(host, MatrixView<float const>(fake<float const>(), tokens, hidden),
                      BatchedMatrixView<float const>{fake<float const>(), 2, hidden, hidden}, nullptr,
                      std::span<std::int32_t const>(fake<std::int32_t const>(), 3),
                      MatrixView<float>(fake<float>(), tokens, hidden));
       }},
      {"experts",
       [&] {
         ExpertMlpConfig const mlp{.hidden = static_cast<std::int32_t>(hidden), .intermediate = 8 * draw(1, 32)};
         expert_mlp<float>(host, mlp, expert_weights<float>(2, fake<float const>(), fake<float const>()),
                           MatrixView<float const>(fake<float const>(), tokens, hidden),
                           std::span<std::int32_t const>(fake<std::int32_t const>(), 3),
                           MatrixView<float>(fake<float>(), tokens, hidden), Workspace(fake<std::byte>(), 1 << 20));
       }},
  };
  for (auto const& [name, call] : launchers) {
    CAPTURE(name);
    CHECK(text(events_of_refused(call)) == text({push(name), pop()}));
  }
}
