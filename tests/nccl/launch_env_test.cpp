// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// The launcher environment behind NcclCommunicator::from_env (include/epx/nccl/launch_env.hpp).

#include "env_map.hpp"

#include <epx/nccl/launch_env.hpp>

#include <doctest/doctest.h>

#include <string>

using namespace epx;
using epx::test::env_of;
using epx::test::EnvMap;

namespace {

// Parses `vars`, expecting Error(code) whose message contains every one of `parts`.
void check_refused(EnvMap vars, Errc code, std::initializer_list<std::string_view> parts) {
  bool thrown = false;
  try {
    (void)detail::parse_launch_env(env_of(std::move(vars)));
  } catch (Error const& e) {
    thrown = true;
    std::string const what = e.what();
    INFO(what);
    CHECK(e.code() == code);
    for (auto part : parts) CHECK(what.find(part) != std::string::npos);
  }
  CHECK(thrown);
}

EnvMap torchrun(std::string rank, std::string size, std::string local_rank) {
  return {{"RANK", std::move(rank)},
          {"WORLD_SIZE", std::move(size)},
          {"LOCAL_RANK", std::move(local_rank)},
          {"EPX_NCCL_ID_DIR", "/tmp/ids"}};
}

}  // namespace

TEST_CASE("NcclBootstrap::parse_launch_env: torchrun's variables") {
  auto env = torchrun("5", "8", "1");
  env["LOCAL_WORLD_SIZE"] = "4";
  auto const parsed = detail::parse_launch_env(env_of(env));
  CHECK(parsed.launcher == "torchrun");
  CHECK(parsed.rank == 5);
  CHECK(parsed.size == 8);
  CHECK(parsed.local_rank == 1);
  CHECK(parsed.exchange == detail::IdExchange::kIdFile);
  CHECK(parsed.id_dir == "/tmp/ids");
}

TEST_CASE("NcclBootstrap::parse_launch_env: Open MPI's variables, and torchrun's win when both are set") {
  EnvMap env{{"OMPI_COMM_WORLD_RANK", "3"},
             {"OMPI_COMM_WORLD_SIZE", "4"},
             {"OMPI_COMM_WORLD_LOCAL_RANK", "1"},
             {"OMPI_COMM_WORLD_LOCAL_SIZE", "2"},
             {"NCCL_COMM_ID", "10.0.0.1:29600"}};
  auto parsed = detail::parse_launch_env(env_of(env));
  CHECK(parsed.launcher == "mpirun");
  CHECK(parsed.rank == 3);
  CHECK(parsed.size == 4);
  CHECK(parsed.local_rank == 1);
  CHECK(parsed.exchange == detail::IdExchange::kNcclCommId);
  CHECK(parsed.nccl_comm_id == "10.0.0.1:29600");

  env["RANK"] = "0";
  env["WORLD_SIZE"] = "2";
  env["LOCAL_RANK"] = "0";
  parsed = detail::parse_launch_env(env_of(env));
  CHECK(parsed.launcher == "torchrun");
  CHECK(parsed.size == 2);
}

TEST_CASE("NcclBootstrap::parse_launch_env: no launcher variables name both sets") {
  check_refused({{"EPX_NCCL_ID_DIR", "/tmp"}}, Errc::kInvalidArgument,
                {"NcclCommunicator::from_env: RANK, WORLD_SIZE, LOCAL_RANK and OMPI_COMM_WORLD_RANK",
                 "expected one launcher's set: start the program with torchrun or mpirun"});
}

TEST_CASE("NcclBootstrap::parse_launch_env: a partial set names the missing variable") {
  check_refused({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"EPX_NCCL_ID_DIR", "/tmp"}}, Errc::kInvalidArgument,
                {"from_env: LOCAL_RANK = unset, expected set together with RANK, WORLD_SIZE and LOCAL_RANK (torchrun "
                 "sets all three)"});
  check_refused({{"OMPI_COMM_WORLD_RANK", "0"}, {"EPX_NCCL_ID_DIR", "/tmp"}}, Errc::kInvalidArgument,
                {"from_env: OMPI_COMM_WORLD_SIZE = unset", "(mpirun sets all three)"});
}

TEST_CASE("NcclBootstrap::parse_launch_env: values that are not integers are named") {
  check_refused(torchrun("abc", "2", "0"), Errc::kInvalidArgument,
                {"from_env: RANK = \"abc\", expected an integer >= 0"});
  check_refused(torchrun("1x", "2", "0"), Errc::kInvalidArgument, {"RANK = \"1x\""});
  check_refused(torchrun("-1", "2", "0"), Errc::kInvalidArgument, {"RANK = \"-1\", expected an integer >= 0"});
  check_refused(torchrun("0", " 2", "0"), Errc::kInvalidArgument, {"WORLD_SIZE = \" 2\", expected an integer >= 1"});
  check_refused(torchrun("0", "0", "0"), Errc::kInvalidArgument, {"WORLD_SIZE = \"0\", expected an integer >= 1"});
  check_refused(torchrun("0", "99999999999", "0"), Errc::kInvalidArgument, {"WORLD_SIZE = \"99999999999\""});
  check_refused(torchrun("0", "2", "zero"), Errc::kInvalidArgument, {"LOCAL_RANK = \"zero\""});
}

TEST_CASE("NcclBootstrap::parse_launch_env: rank >= size and a local rank out of range are named") {
  check_refused(torchrun("4", "4", "0"), Errc::kInvalidArgument,
                {"from_env: RANK = 4, expected in [0, WORLD_SIZE = 4)"});
  check_refused(torchrun("0", "2", "2"), Errc::kInvalidArgument,
                {"from_env: LOCAL_RANK = 2, expected in [0, WORLD_SIZE = 2)"});
  auto env = torchrun("3", "4", "2");
  env["LOCAL_WORLD_SIZE"] = "2";
  check_refused(env, Errc::kInvalidArgument, {"from_env: LOCAL_RANK = 2, expected in [0, LOCAL_WORLD_SIZE = 2)"});
  check_refused({{"OMPI_COMM_WORLD_RANK", "2"},
                 {"OMPI_COMM_WORLD_SIZE", "2"},
                 {"OMPI_COMM_WORLD_LOCAL_RANK", "0"},
                 {"EPX_NCCL_ID_DIR", "/tmp"}},
                Errc::kInvalidArgument, {"OMPI_COMM_WORLD_RANK = 2, expected in [0, OMPI_COMM_WORLD_SIZE = 2)"});
}

TEST_CASE("NcclBootstrap::parse_launch_env: NCCL_COMM_ID on torchrun's MASTER_PORT is refused, naming both") {
  auto env = torchrun("0", "2", "0");
  env["MASTER_ADDR"] = "10.1.2.3";
  env["MASTER_PORT"] = "29500";
  env["NCCL_COMM_ID"] = "10.1.2.3:29500";
  check_refused(env, Errc::kInvalidArgument,
                {"from_env: NCCL_COMM_ID = \"10.1.2.3:29500\", expected a port other than MASTER_PORT = 29500",
                 "torchrun's TCP store listens there", "NCCL_COMM_ID=10.1.2.3:29501"});
  env["NCCL_COMM_ID"] = "[fd00::1]:29500";
  check_refused(env, Errc::kInvalidArgument, {"NCCL_COMM_ID=[fd00::1]:29501"});
  env["NCCL_COMM_ID"] = "10.1.2.3:29501";
  auto const parsed = detail::parse_launch_env(env_of(env));
  CHECK(parsed.exchange == detail::IdExchange::kNcclCommId);  // wins over EPX_NCCL_ID_DIR
  CHECK(parsed.nccl_comm_id == "10.1.2.3:29501");
  env["MASTER_PORT"] = "port";
  check_refused(env, Errc::kInvalidArgument, {"from_env: MASTER_PORT = \"port\", expected an integer >= 1"});
}

TEST_CASE("NcclBootstrap::parse_host_port: NCCL_COMM_ID's forms") {
  auto a = detail::parse_host_port("NCCL_COMM_ID", "127.0.0.1:29501");
  CHECK(a.host == "127.0.0.1");
  CHECK(a.port == 29501);
  a = detail::parse_host_port("NCCL_COMM_ID", "node-0.cluster:1234");
  CHECK(a.host == "node-0.cluster");
  CHECK(a.port == 1234);
  a = detail::parse_host_port("NCCL_COMM_ID", "[fe80::1%eth0]:65535");
  CHECK(a.host == "fe80::1%eth0");
  CHECK(a.port == 65535);
  for (std::string_view bad : {"::1:29500", "127.0.0.1", "127.0.0.1:", ":29500", "host:0", "host:65536", "host:12ab",
                               "[::1]29500", "[]:1", "[::1"}) {
    INFO(bad);
    CHECK_THROWS_WITH_AS((void)detail::parse_host_port("NCCL_COMM_ID", bad),
                         doctest::Contains("expected <host>:<port> with a port in [1, 65535] (an IPv6 address in "
                                           "brackets: [addr]:port)"),
                         Error);
  }
  auto env = torchrun("0", "2", "0");
  env["NCCL_COMM_ID"] = "::1:29500";
  check_refused(env, Errc::kInvalidArgument, {"from_env: NCCL_COMM_ID = \"::1:29500\", expected <host>:<port>"});
}

TEST_CASE("NcclBootstrap::parse_launch_env: neither NCCL_COMM_ID nor EPX_NCCL_ID_DIR says how to set one") {
  check_refused({{"RANK", "0"}, {"WORLD_SIZE", "1"}, {"LOCAL_RANK", "0"}}, Errc::kInvalidArgument,
                {"from_env: NCCL_COMM_ID and EPX_NCCL_ID_DIR = unset, expected one of them: NCCL_COMM_ID=<rank 0's "
                 "host>:<free port>",
                 "EPX_NCCL_ID_DIR=<a directory every rank can read and rank 0 can write>"});
}

TEST_CASE("NcclBootstrap::parse_launch_env: the id file's job key comes from the launcher and is file-name safe") {
  auto env = torchrun("0", "2", "0");
  CHECK(detail::parse_launch_env(env_of(env)).job_key == "epx");
  env["MASTER_PORT"] = "29500";
  CHECK(detail::parse_launch_env(env_of(env)).job_key == "port29500");
  env["TORCHELASTIC_RUN_ID"] = "none";  // torchrun's static default: not a job id
  CHECK(detail::parse_launch_env(env_of(env)).job_key == "port29500");
  env["TORCHELASTIC_RUN_ID"] = "3f2c/uuid:1";
  env["TORCHELASTIC_RESTART_COUNT"] = "2";
  CHECK(detail::parse_launch_env(env_of(env)).job_key == "3f2c_uuid_1.restart2");
  env["EPX_NCCL_JOB_ID"] = "mine";
  CHECK(detail::parse_launch_env(env_of(env)).job_key == "mine.restart2");
  EnvMap mpi{{"OMPI_COMM_WORLD_RANK", "0"},
             {"OMPI_COMM_WORLD_SIZE", "2"},
             {"OMPI_COMM_WORLD_LOCAL_RANK", "0"},
             {"EPX_NCCL_ID_DIR", "/tmp"},
             {"PMIX_NAMESPACE", "prterun-host-123@1"}};
  CHECK(detail::parse_launch_env(env_of(mpi)).job_key == "prterun-host-123_1");
}

TEST_CASE("NcclBootstrap::check_comm_blocking: NCCL_COMM_BLOCKING=1 is refused") {
  CHECK_NOTHROW(detail::check_comm_blocking(env_of({}), "NcclCommunicator"));
  CHECK_NOTHROW(detail::check_comm_blocking(env_of({{"NCCL_COMM_BLOCKING", "0"}}), "NcclCommunicator"));
  bool thrown = false;
  try {
    detail::check_comm_blocking(env_of({{"NCCL_COMM_BLOCKING", "1"}}), "NcclCommunicator");
  } catch (Error const& e) {
    thrown = true;
    CHECK(e.code() == Errc::kInvalidArgument);
    CHECK(std::string(e.what()).find("NcclCommunicator: NCCL_COMM_BLOCKING = \"1\", expected unset or 0 (a blocking "
                                     "NCCL communicator cannot be aborted at epx's deadline") != std::string::npos);
  }
  CHECK(thrown);
}
