// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

#include <chrono>

namespace epx {

//! Options of an NcclCommunicator (and of its bootstrap, `NcclCommunicator::from_env`).
struct NcclOptions {
  //! The one deadline for every wait: communicator creation, the unique-id file exchange, each
  //! collective's enqueue, and `NcclCommunicator::wait`. When it passes, the NCCL communicator is
  //! aborted and Errc::kTimeout is thrown. NCCL itself has no timeout for a peer on the same node
  //! (a dead peer leaves the others' kernels spinning), so this is the only one. It must cover
  //! the slowest legitimate wait: the first collective (NCCL connects peers lazily), and in
  //! `wait` all work enqueued on the stream, compute included.
  std::chrono::milliseconds timeout{std::chrono::minutes(5)};
};

}  // namespace epx
