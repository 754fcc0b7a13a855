// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// Must NOT compile: the default execution space is epx::Cuda, whose implementation lives in
// <epx/cuda.cuh>; <epx/epx.hpp> alone has only the Host one.
// Expected: "ExpertParallel has no implementation for this execution space".
#include <epx/epx.hpp>

int main() {
  using Layer = epx::ExpertParallel<epx::Grouped, epx::AllToAll>;
  return static_cast<int>(sizeof(Layer));
}
