// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// The README's usage example, built and run as a test; tests/readme_snippet.cmake keeps the two equal.
#include <cstdio>
// example-begin usage
#include <epx/epx.hpp>
#include <vector>

int main() {
  constexpr int kExperts = 8, kTopK = 2, kHidden = 64, kInter = 32, kTokens = 16, kRanks = 2;
  epx::LocalGroup group(kRanks);  // 2 EP ranks as threads; on GPUs, one NcclCommunicator per rank
  group.run([&](int rank, epx::Communicator& comm) {
    int const local = kExperts / kRanks;  // this rank owns experts [local * rank, local * (rank + 1))
    std::vector<float> gate_up(local * 2 * kInter * kHidden, 0.02f), down(local * kHidden * kInter, 0.03f);
    epx::ExpertParallel<epx::Grouped, epx::AllToAll, epx::Host> moe(
        {.router = {.num_experts = kExperts, .top_k = kTopK, .renormalize = true},
         .mlp = {.hidden = kHidden, .intermediate = kInter, .activation = epx::Activation::kSwiGLU},
         // Each weight with its extents ([experts, rows, cols], K-major): a mismatch is refused.
         .weights = epx::expert_weights(epx::TensorView(gate_up.data(), {local, 2 * kInter, kHidden}),
                                        epx::TensorView(down.data(), {local, kHidden, kInter}))},
        comm);
    std::vector<float> logits(kTokens * kExperts), x(kTokens * kHidden, 1.0f), y(x.size());
    for (std::size_t i = 0; i < logits.size(); ++i) logits[i] = float((i * 37 + rank) % 11);  // router output
    std::vector<std::byte> workspace(moe.workspace_bytes(kTokens));                           // caller-owned scratch
    moe.forward(epx::Host{}, epx::MatrixView(logits.data(), kTokens, kExperts),               // on GPUs: a StreamRef
                epx::MatrixView(x.data(), kTokens, kHidden), epx::MatrixView(y.data(), kTokens, kHidden),
                {workspace.data(), workspace.size()});
    epx::Status const status = moe.status(epx::Host{});  // the routing counters of that forward
    std::printf("rank %d: y[0] = %f, busiest expert got %u rows\n", rank, y[0], status.max_tokens_per_expert);
  });
}
// example-end usage
