// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// Control: the same shape of code with a valid combination MUST compile, so a failing case above
// fails because of its misuse and not because the harness cannot build anything.
#include <epx/epx.hpp>

#include <cstddef>
#include <cstdint>
#include <vector>

int main() {
  constexpr std::int32_t kExperts = 2, kHidden = 4, kInter = 2;
  epx::ExpertMlpConfig const mlp{.hidden = kHidden, .intermediate = kInter};
  std::vector<float> gate_up(std::size_t{kExperts} * 2 * kInter * kHidden, 0.0f);
  std::vector<float> down(std::size_t{kExperts} * kHidden * kInter, 0.0f);
  epx::MoeConfig const config{.router = {.num_experts = kExperts, .top_k = 1},
                              .mlp = mlp,
                              .weights = epx::expert_weights<float>(kExperts, gate_up.data(), down.data())};
  epx::LocalGroup group(1);
  epx::ExpertParallel<epx::Grouped, epx::AllGather, epx::Host> layer(config, group.communicator(0));
  std::vector<std::byte> workspace(layer.workspace_bytes(0));
  epx::MatrixView<std::int32_t const> ids(nullptr, 0, 1);
  epx::MatrixView<float const> weights(nullptr, 0, 1);
  epx::MatrixView<float const> x(nullptr, 0, kHidden);
  epx::MatrixView<float> y(nullptr, 0, kHidden);
  layer.forward<float>(epx::Host{}, ids, weights, x, y, {workspace.data(), workspace.size()});
  epx::Status const status = layer.status(epx::Host{});
  return status.ok() ? 0 : 1;
}
