// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! What a launcher (torchrun, mpirun) tells a process through its environment, parsed and
//! validated into a LaunchEnv. Pure host code over an injected lookup, so every rule is tested
//! without a GPU and without touching the test's own environment.

#include <epx/core/error.hpp>

#include <charconv>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <limits>
#include <optional>
#include <string>
#include <string_view>

namespace epx::detail {

//! Reads one environment variable; nullopt when unset. An empty value counts as unset.
using EnvLookup = std::function<std::optional<std::string>(std::string_view name)>;

//! The process's own environment (getenv).
[[nodiscard]] inline EnvLookup process_environment() {
  return [](std::string_view name) -> std::optional<std::string> {
    char const* value = std::getenv(std::string(name).c_str());
    if (value == nullptr || *value == '\0') return std::nullopt;
    return std::string(value);
  };
}

inline constexpr std::string_view kFromEnv = "NcclCommunicator::from_env";

//! How the ranks agree on NCCL's unique id.
enum class IdExchange : std::uint8_t {
  kNcclCommId,  //!< NCCL_COMM_ID is set: every rank computes the same id itself
  kIdFile,      //!< EPX_NCCL_ID_DIR is set: rank 0 writes the id there, the others read it
};

//! Everything from_env needs from the environment, validated.
struct LaunchEnv {
  std::string_view launcher;  //!< "torchrun" or "mpirun", for messages
  int rank = 0;
  int size = 1;
  int local_rank = 0;  //!< the CUDA device this rank uses
  IdExchange exchange = IdExchange::kIdFile;
  std::string nccl_comm_id;  //!< kNcclCommId: the value of NCCL_COMM_ID
  std::string id_dir;        //!< kIdFile: the value of EPX_NCCL_ID_DIR
  std::string job_key;       //!< kIdFile: names this job's id file (file-name safe)
};

//! `value` of variable `name` as an integer >= `min`; throws naming the variable otherwise.
[[nodiscard]] inline int parse_env_int(std::string_view name, std::string_view value, int min) {
  long long parsed = 0;
  auto const* first = value.data();
  auto const* last = value.data() + value.size();
  auto const [end, ec] = std::from_chars(first, last, parsed);
  bool const ok =
      !value.empty() && ec == std::errc{} && end == last && parsed >= min && parsed <= std::numeric_limits<int>::max();
  require(ok, Errc::kInvalidArgument, kFromEnv, name, fmt::format("\"{}\"", value),
          fmt::format("an integer >= {}", min));
  return static_cast<int>(parsed);
}

//! A `<host>:<port>` address as NCCL_COMM_ID accepts it.
struct HostPort {
  std::string host;  //!< without the brackets of an IPv6 address
  int port = 0;
};

//! Parses `<ipv4>:<port>`, `<hostname>:<port>` or `[<ipv6>]:<port>`. NCCL rejects a bare IPv6
//! address (`::1:29500`), since the port cannot be told apart; so does this.
[[nodiscard]] inline HostPort parse_host_port(std::string_view name, std::string_view value) {
  std::string_view host, port;
  bool ok = false;
  if (!value.empty() && value.front() == '[') {
    auto const close = value.find(']');
    ok = close != std::string_view::npos && close > 1 && close + 1 < value.size() && value[close + 1] == ':';
    if (ok) {
      host = value.substr(1, close - 1);
      port = value.substr(close + 2);
    }
  } else {
    auto const colon = value.find(':');
    ok = colon != std::string_view::npos && colon > 0 && value.find(':', colon + 1) == std::string_view::npos;
    if (ok) {
      host = value.substr(0, colon);
      port = value.substr(colon + 1);
    }
  }
  int port_number = 0;
  if (ok) {
    auto const [end, ec] = std::from_chars(port.data(), port.data() + port.size(), port_number);
    ok = !port.empty() && ec == std::errc{} && end == port.data() + port.size() && port_number >= 1 &&
         port_number <= 65535;
  }
  require(ok, Errc::kInvalidArgument, kFromEnv, name, fmt::format("\"{}\"", value),
          "<host>:<port> with a port in [1, 65535] (an IPv6 address in brackets: [addr]:port)");
  return {std::string(host), port_number};
}

//! Keeps [A-Za-z0-9._-] and replaces anything else by '_', so a launcher's job id can name a file.
[[nodiscard]] inline std::string file_name_safe(std::string_view text) {
  std::string out(text);
  for (auto& c : out) {
    bool const keep =
        (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-';
    if (!keep) c = '_';
  }
  return out;
}

//! NCCL_COMM_BLOCKING=1 forces every communicator to be blocking, and a blocking call cannot be
//! abandoned at a deadline: epx refuses it rather than silently losing its no-hang promise.
inline void check_comm_blocking(EnvLookup const& env, std::string_view where) {
  auto const value = env("NCCL_COMM_BLOCKING");
  require(!value || *value == "0", Errc::kInvalidArgument, where, "NCCL_COMM_BLOCKING",
          fmt::format("\"{}\"", value.value_or("")),
          "unset or 0 (a blocking NCCL communicator cannot be aborted at epx's deadline, so a lost peer would hang "
          "this process)");
}

namespace launch_env_detail {

// One launcher's variable names.
struct Names {
  std::string_view launcher, rank, size, local_rank, local_size;
};

inline constexpr Names kTorchrun{"torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"};
inline constexpr Names kOpenMpi{"mpirun", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
                                "OMPI_COMM_WORLD_LOCAL_SIZE"};

// Reads a launcher's rank, size and local rank; every one must be set once any is.
inline void read_ranks(EnvLookup const& env, Names const& names, LaunchEnv& out) {
  auto const rank = env(names.rank), size = env(names.size), local_rank = env(names.local_rank);
  for (auto const& [name, value] :
       {std::pair{names.rank, &rank}, std::pair{names.size, &size}, std::pair{names.local_rank, &local_rank}})
    require(value->has_value(), Errc::kInvalidArgument, kFromEnv, name, "unset",
            fmt::format("set together with {}, {} and {} ({} sets all three)", names.rank, names.size, names.local_rank,
                        names.launcher));
  out.launcher = names.launcher;
  out.size = parse_env_int(names.size, *size, 1);
  out.rank = parse_env_int(names.rank, *rank, 0);
  out.local_rank = parse_env_int(names.local_rank, *local_rank, 0);
  require(out.rank < out.size, Errc::kInvalidArgument, kFromEnv, names.rank, out.rank,
          fmt::format("in [0, {} = {})", names.size, out.size));
  require(out.local_rank < out.size, Errc::kInvalidArgument, kFromEnv, names.local_rank, out.local_rank,
          fmt::format("in [0, {} = {})", names.size, out.size));
  if (auto const local_size = env(names.local_size)) {
    int const n = parse_env_int(names.local_size, *local_size, 1);
    require(out.local_rank < n, Errc::kInvalidArgument, kFromEnv, names.local_rank, out.local_rank,
            fmt::format("in [0, {} = {})", names.local_size, n));
  }
}

// A name for this job's id file that every rank derives alike and a later job does not reuse.
inline std::string job_key(EnvLookup const& env) {
  std::string key = "epx";
  if (auto v = env("EPX_NCCL_JOB_ID"))
    key = *v;  // the user's
  else if (auto r = env("TORCHELASTIC_RUN_ID"); r && *r != "none")
    key = *r;  // torchrun rdzv id
  else if (auto p = env("PMIX_NAMESPACE"))
    key = *p;  // Open MPI (PMIx)
  else if (auto j = env("OMPI_MCA_ess_base_jobid"))
    key = *j;  // Open MPI
  else if (auto m = env("MASTER_PORT"))
    key = "port" + *m;                                                                 // static torchrun
  if (auto restart = env("TORCHELASTIC_RESTART_COUNT")) key += ".restart" + *restart;  // torchrun restarts
  return file_name_safe(key);
}

}  // namespace launch_env_detail

//! Parses the launcher's variables and chooses the id exchange. Throws Errc::kInvalidArgument
//! naming the variable for: no launcher variables, a partial set, a value that is not an
//! integer, RANK >= WORLD_SIZE, a LOCAL_RANK out of range, a malformed NCCL_COMM_ID, an
//! NCCL_COMM_ID on torchrun's MASTER_PORT, and neither NCCL_COMM_ID nor EPX_NCCL_ID_DIR set.
//! torchrun's variables win when both torchrun's and Open MPI's are present.
[[nodiscard]] inline LaunchEnv parse_launch_env(EnvLookup const& env) {
  namespace d = launch_env_detail;
  LaunchEnv out;
  bool const torchrun = env(d::kTorchrun.rank) || env(d::kTorchrun.size) || env(d::kTorchrun.local_rank);
  bool const openmpi = env(d::kOpenMpi.rank) || env(d::kOpenMpi.size) || env(d::kOpenMpi.local_rank);
  if (torchrun) {
    d::read_ranks(env, d::kTorchrun, out);
  } else if (openmpi) {
    d::read_ranks(env, d::kOpenMpi, out);
  } else {
    throw_error(Errc::kInvalidArgument,
                fmt::format("{}: RANK, WORLD_SIZE, LOCAL_RANK and OMPI_COMM_WORLD_RANK, OMPI_COMM_WORLD_SIZE, "
                            "OMPI_COMM_WORLD_LOCAL_RANK = unset, expected one launcher's set: start the program "
                            "with torchrun or mpirun, or export RANK, WORLD_SIZE and LOCAL_RANK yourself",
                            kFromEnv));
  }

  if (auto comm_id = env("NCCL_COMM_ID")) {
    HostPort const address = parse_host_port("NCCL_COMM_ID", *comm_id);
    if (auto master_port = env("MASTER_PORT")) {
      // torchrun's agent hosts its TCP store on MASTER_PORT before the workers start, so NCCL's
      // root (rank 0) would fail to bind the same port.
      int const store_port = parse_env_int("MASTER_PORT", *master_port, 1);
      require(address.port != store_port, Errc::kInvalidArgument, kFromEnv, "NCCL_COMM_ID",
              fmt::format("\"{}\"", *comm_id),
              fmt::format("a port other than MASTER_PORT = {} (torchrun's TCP store listens there, so NCCL's root "
                          "cannot bind it); use another free port, e.g. NCCL_COMM_ID={}{}{}:{}",
                          store_port, address.host.find(':') != std::string::npos ? "[" : "", address.host,
                          address.host.find(':') != std::string::npos ? "]" : "",
                          store_port < 65535 ? store_port + 1 : store_port - 1));
    }
    out.exchange = IdExchange::kNcclCommId;
    out.nccl_comm_id = *comm_id;
  } else if (auto dir = env("EPX_NCCL_ID_DIR")) {
    out.exchange = IdExchange::kIdFile;
    out.id_dir = *dir;
    out.job_key = d::job_key(env);
  } else {
    throw_error(Errc::kInvalidArgument,
                fmt::format("{}: NCCL_COMM_ID and EPX_NCCL_ID_DIR = unset, expected one of them: "
                            "NCCL_COMM_ID=<rank 0's host>:<free port> (the same on every rank; under torchrun not "
                            "MASTER_PORT, e.g. MASTER_PORT+1), or EPX_NCCL_ID_DIR=<a directory every rank can read "
                            "and rank 0 can write>",
                            kFromEnv));
  }
  return out;
}

}  // namespace epx::detail
