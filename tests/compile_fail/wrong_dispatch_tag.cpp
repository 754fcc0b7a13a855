// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// Must NOT compile: the second template argument is not a dispatch policy.
// Expected: "ExpertParallel's second argument is the dispatch policy: epx::AllToAll or epx::AllGather".
#include <epx/epx.hpp>

int main() {
  using Layer = epx::ExpertParallel<epx::Grouped, int, epx::Host>;
  return static_cast<int>(sizeof(Layer));
}
