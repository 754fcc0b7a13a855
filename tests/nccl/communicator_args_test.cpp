// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// NcclCommunicator's argument checks that come before any CUDA or NCCL call, so they run on any
// machine. Everything that needs a device is in tests/cuda/nccl_communicator_test.cu.

#include "../common/test_util.hpp"

#include <epx/nccl/communicator.hpp>

#include <doctest/doctest.h>

#include <string>

using namespace epx;
using namespace std::chrono_literals;

namespace {

template <class F>
void check_refused(F&& make, Errc code, std::string const& part) {
  test::check_throws(code, part, make);
}

}  // namespace

TEST_CASE("NcclCommunicator::NcclCommunicator: bad rank, size, device and timeout are named before any CUDA call") {
  ncclUniqueId const id{};
  check_refused([&] { NcclCommunicator c(0, 0, id, 0); }, Errc::kInvalidArgument,
                "epx: NcclCommunicator: size = 0, expected >= 1");
  check_refused([&] { NcclCommunicator c(2, 2, id, 0); }, Errc::kInvalidArgument,
                "epx: NcclCommunicator: rank = 2, expected in [0, size = 2)");
  check_refused([&] { NcclCommunicator c(-1, 2, id, 0); }, Errc::kInvalidArgument,
                "NcclCommunicator: rank = -1, expected in [0, size = 2)");
  check_refused([&] { NcclCommunicator c(0, 1, id, -1); }, Errc::kInvalidArgument,
                "NcclCommunicator: device = -1, expected >= 0 (a CUDA device ordinal)");
  check_refused([&] { NcclCommunicator c(0, 1, id, 0, NcclOptions{.timeout = 0ms}); }, Errc::kInvalidArgument,
                "NcclCommunicator: options.timeout (ms) = 0, expected > 0");
}

TEST_CASE("NcclCommunicator::NcclCommunicator: adopting a null ncclComm_t is refused") {
  check_refused([] { NcclCommunicator c(ncclComm_t{nullptr}); }, Errc::kInvalidArgument,
                "NcclCommunicator: comm = nullptr, expected an initialised ncclComm_t (ncclCommInitRank*, "
                "ncclCommSplit)");
  check_refused([] { NcclCommunicator c(ncclComm_t{nullptr}, NcclOptions{.timeout = -5ms}); }, Errc::kInvalidArgument,
                "NcclCommunicator: options.timeout (ms) = -5, expected > 0");
}

TEST_CASE("NcclCommunicator::from_env: a non-positive timeout is named before the environment is read") {
  check_refused([] { (void)NcclCommunicator::from_env(NcclOptions{.timeout = 0ms}); }, Errc::kInvalidArgument,
                "NcclCommunicator::from_env: options.timeout (ms) = 0, expected > 0");
}
