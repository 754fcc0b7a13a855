// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// EPX_NCCL_CHECK (include/epx/nccl/error.hpp), on any machine: no communicator is created.

#include <epx/nccl/error.hpp>

#include <doctest/doctest.h>

#include <string>

namespace {

bool contains(std::string const& text, std::string const& part) { return text.find(part) != std::string::npos; }

}  // namespace

TEST_CASE("Nccl::check: a failing call throws Errc::kNccl naming the call and the file") {
  int n = -1;
  bool thrown = false;
  try {
    EPX_NCCL_CHECK(ncclCommCount(nullptr, &n));
  } catch (epx::Error const& e) {
    thrown = true;
    INFO(std::string(e.what()));
    CHECK(e.code() == epx::Errc::kNccl);
    CHECK(contains(e.what(), "NCCL call `ncclCommCount(nullptr, &n)` failed: "));
    CHECK(contains(e.what(), "nccl_error_test.cpp:"));
    CHECK(contains(e.what(), "(" + std::to_string(static_cast<int>(ncclInvalidArgument)) + ")"));
  }
  CHECK(thrown);
}

TEST_CASE("Nccl::check: success and ncclInProgress do not throw") {
  int version = 0;
  CHECK_NOTHROW(EPX_NCCL_CHECK(ncclGetVersion(&version)));
  CHECK(version > 0);
  CHECK_NOTHROW(EPX_NCCL_CHECK(ncclSuccess));
  CHECK_NOTHROW(EPX_NCCL_CHECK(ncclInProgress));
  CHECK_NOTHROW(EPX_NCCL_CHECK_COMM(ncclInProgress, nullptr));
}

TEST_CASE("Nccl::check: the call is evaluated exactly once") {
  int calls = 0;
  auto fails = [&] {
    ++calls;
    return ncclInternalError;
  };
  CHECK_THROWS_AS(EPX_NCCL_CHECK(fails()), epx::Error);
  CHECK(calls == 1);
}
