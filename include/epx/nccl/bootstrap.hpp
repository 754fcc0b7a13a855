// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! The bootstrap behind `NcclCommunicator::from_env`: pick this rank's device from the launcher's
//! LOCAL_RANK and agree on NCCL's unique id, through NCCL_COMM_ID or a file in EPX_NCCL_ID_DIR.
//! Host code: needs cuda_runtime_api.h and nccl.h, not nvcc.

#include <epx/core/error.hpp>
#include <epx/cuda/error.hpp>
#include <epx/nccl/error.hpp>
#include <epx/nccl/id_file.hpp>
#include <epx/nccl/launch_env.hpp>

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <string>

namespace epx::detail {

//! The id every rank passes to ncclCommInitRankConfig, and the file rank 0 removes once the
//! communicator is up (empty with NCCL_COMM_ID).
struct UniqueIdExchange {
  ncclUniqueId id{};
  std::string id_file;
};

//! Makes LOCAL_RANK this thread's current device (one rank per GPU: NCCL refuses two ranks on one
//! device). Throws Errc::kInvalidArgument when the process sees fewer devices.
inline void select_launch_device(LaunchEnv const& env) {
  int count = 0;
  EPX_CUDA_CHECK(cudaGetDeviceCount(&count));
  std::string_view const name = env.launcher == "mpirun" ? "OMPI_COMM_WORLD_LOCAL_RANK" : "LOCAL_RANK";
  require(env.local_rank < count, Errc::kInvalidArgument, kFromEnv, name, env.local_rank,
          fmt::format("< {}, the CUDA devices this process sees (one rank per GPU; a launcher that gives each rank "
                      "one device through CUDA_VISIBLE_DEVICES must not also set a local rank above 0)",
                      count));
  EPX_CUDA_CHECK(cudaSetDevice(env.local_rank));
}

//! Counts the communicators this process bootstraps through id files. Every rank of a job
//! rebuilds in lockstep (after an abort, all ranks make a new communicator), so the count names
//! the same file on every rank and a rebuild never reads the id of the generation before.
[[nodiscard]] inline std::uint64_t next_id_file_generation() noexcept {
  static std::atomic<std::uint64_t> generation{0};
  return generation.fetch_add(1);
}

//! Agrees on the unique id as `env` says. With NCCL_COMM_ID, every rank calls ncclGetUniqueId,
//! which then encodes that address and starts nothing. With an id directory, rank 0 calls it
//! (which starts NCCL's root thread, so only rank 0 may) and publishes the id; the others wait for
//! it until `timeout`.
[[nodiscard]] inline UniqueIdExchange exchange_unique_id(LaunchEnv const& env, std::chrono::milliseconds timeout) {
  UniqueIdExchange out;
  if (env.exchange == IdExchange::kNcclCommId) {
    EPX_NCCL_CHECK(ncclGetUniqueId(&out.id));
    return out;
  }
  std::string const key = fmt::format("{}.g{}", env.job_key, next_id_file_generation());
  out.id_file = fmt::format("{}/{}.ncclid", env.id_dir, key);
  IdRecord expected{.num_ranks = env.size, .key_hash = id_key_hash(key)};
  EPX_NCCL_CHECK(ncclGetVersion(&expected.nccl_version));
  if (env.rank == 0) {
    IdRecord record = expected;
    EPX_NCCL_CHECK(ncclGetUniqueId(&record.id));
    write_id_file(out.id_file, record);
    out.id = record.id;
  } else {
    out.id = read_id_file(out.id_file, expected, timeout, env.rank).id;
  }
  return out;
}

}  // namespace epx::detail
