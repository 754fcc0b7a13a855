// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// Must NOT compile: CublasGrouped is a CUDA-only expert policy.
// Expected: "CublasGrouped runs cuBLAS on a GPU and has no Host implementation".
#include <epx/epx.hpp>

int main() {
  epx::LocalGroup group(1);
  epx::MoeConfig config;
  epx::ExpertParallel<epx::CublasGrouped, epx::AllToAll, epx::Host> layer(config, group.communicator(0));
  return layer.workspace_bytes(1) > 0 ? 0 : 1;
}
