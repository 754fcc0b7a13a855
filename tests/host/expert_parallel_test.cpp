// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// ExpertParallel<Grouped, AllToAll | AllGather, Host> over LocalGroup ranks: the scenarios every
// execution space runs (../common/expert_parallel_cases.hpp, here on the Host backend), then what
// only the Host layer can show (bitwise equality over rank counts, the AllGather token check, the
// protocol of can_implement).

#include "../common/host_backend.hpp"
#include "../common/expert_parallel_scenarios.hpp"

#include <cstring>
#include <optional>

namespace epx::test {
using HostAllToAll = EpPolicy<HostBackend, Grouped, AllToAll>;
using HostAllGather = EpPolicy<HostBackend, Grouped, AllGather>;
}  // namespace epx::test

// The names the Host cases have always had (ctest lists them).
TYPE_TO_STRING_AS("epx::AllToAll", epx::test::HostAllToAll);
TYPE_TO_STRING_AS("epx::AllGather", epx::test::HostAllGather);

#define EPX_EP_POLICIES epx::test::HostAllToAll, epx::test::HostAllGather
#define EPX_EP_ALL_TO_ALL_POLICIES epx::test::HostAllToAll
#include "../common/expert_parallel_cases.hpp"

using namespace epx;
using test::GlobalWeights;
using test::HostAllToAll;
using test::RankInputs;
using test::Scenario;

TEST_CASE("ExpertParallel::forward: AllToAll gives the same bits for every rank count and every run") {
  EPX_TEST_SEEDED_RNG(rng);
  Scenario const s = test::with_backend_widths<test::HostBackend>({.num_experts = 12, .top_k = 3});
  std::int64_t const t = 16;
  auto const gw = GlobalWeights<bfloat16>::random(s.num_experts, s.mlp, true, rng);
  RankInputs<bfloat16> data{.x = test::random_vector<bfloat16>(static_cast<std::size_t>(t * s.mlp.hidden), rng),
                            .ids = test::random_ids(t, s.top_k, s.num_experts, rng)};
  data.weights = test::random_weights(data.ids.size(), rng);
  auto const single = test::run_layer<HostAllToAll, bfloat16>(1, s, gw, {data}, InvalidIds::kThrow)[0];
  CHECK(test::bitwise_equal(single.first, single.second));
  // Rank 0 holds the tokens; the other ranks hold none but own experts.
  for (int n : {2, 3, 4}) {
    std::vector<RankInputs<bfloat16>> in(static_cast<std::size_t>(n));
    in[0] = data;
    auto const out = test::run_layer<HostAllToAll, bfloat16>(n, s, gw, in, InvalidIds::kThrow);
    CAPTURE(n);
    CHECK(test::bitwise_equal(out[0].first, single.first));
  }
}

namespace {

struct SmallLayer {
  ExpertMlpConfig mlp{.hidden = 16, .intermediate = 8};
  std::mt19937_64 rng{1234};
  GlobalWeights<float> gw = GlobalWeights<float>::random(8, mlp, false, rng);

  [[nodiscard]] MoeConfig config(Communicator const& comm, InvalidIds policy = InvalidIds::kThrow) const {
    auto const placement = ExpertPlacement::contiguous(8, comm.size());
    return {.router = {.num_experts = 8, .top_k = 2},
            .mlp = mlp,
            .weights = gw.local(placement.local_range(comm.rank())),
            .on_invalid_ids = policy};
  }
};

}  // namespace

TEST_CASE("ExpertParallel::ExpertParallel: bad configurations are named") {
  SmallLayer layer;
  LocalGroup group(2, {.timeout = std::chrono::seconds(5)});
  auto& comm = group.communicator(0);
  auto config = [&] {
    return MoeConfig{.router = {.num_experts = 8, .top_k = 2}, .mlp = layer.mlp, .weights = layer.gw.local({0, 4})};
  };
  using EP = ExpertParallel<Grouped, AllToAll, Host>;
  CHECK_NOTHROW(EP(config(), comm));
  auto c = config();
  c.router.top_k = 9;
  CHECK_THROWS_WITH_AS(EP(c, comm), doctest::Contains("top_k = 9"), Error);
  c = config();
  c.weights = layer.gw.local({0, 3});
  CHECK_THROWS_WITH_AS(
      EP(c, comm), doctest::Contains("weights.num_local_experts = 3, expected placement.num_local_experts(rank 0) = 4"),
      Error);
  c = config();
  c.placement = ExpertPlacement::contiguous(8, 3);
  CHECK_THROWS_WITH_AS(EP(c, comm),
                       doctest::Contains("placement.num_ranks() = 3, expected the communicator's size = 2"), Error);
  c = config();
  c.router.num_groups = 3;
  CHECK_THROWS_WITH_AS(EP(c, comm), doctest::Contains("num_groups = 3, expected >= 1 and dividing num_experts = 8"),
                       Error);
  c = config();
  c.weights.down = nullptr;
  CHECK_THROWS_WITH_AS(EP(c, comm), doctest::Contains("weights.down = nullptr, expected the [4, 16, 8] down weights"),
                       Error);
  c = config();
  c.mlp.hidden = 0;
  CHECK_THROWS_WITH_AS(EP(c, comm), doctest::Contains("hidden = 0"), Error);
}

TEST_CASE("ExpertParallel::can_implement: the first failing part's Error, the one the constructor throws") {
  SmallLayer layer;
  LocalGroup group(2, {.timeout = std::chrono::seconds(5)});
  auto& comm = group.communicator(0);
  using EP = ExpertParallel<Grouped, AllGather, Host>;
  CHECK_FALSE(EP::can_implement(layer.config(comm), comm).has_value());
  // Each part's verdict, and the order: the configuration before the communicator.
  auto bad = layer.config(comm);
  bad.router.top_k = 9;
  test::UnusedCommunicator device_comm(MemorySpace::kDevice);
  for (Communicator const* c :
       {static_cast<Communicator const*>(&comm), static_cast<Communicator const*>(&device_comm)}) {
    std::optional<Error> const why = EP::can_implement(bad, *c);
    REQUIRE(why.has_value());
    CHECK(why->code() == Errc::kInvalidArgument);
    CHECK(std::string(why->what()).find("ExpertParallel: top_k = 9") != std::string::npos);
  }
  auto on_device = layer.config(comm);
  on_device.weights = layer.gw.local({0, 8});  // one rank of device memory owns all 8
  std::optional<Error> const why = EP::can_implement(on_device, device_comm);
  REQUIRE(why.has_value());
  CHECK(std::string(why->what()).find("comm.memory_space() = device, expected host") != std::string::npos);
  // The constructor throws exactly that Error.
  test::check_throws(Errc::kInvalidArgument, why->what(), [&] { EP(on_device, device_comm); });
}

TEST_CASE("ExpertParallel::status: the record of an invalid id is named as every space names it") {
  // The control block keeps (slot << 32) | uint32(id) of the first invalid slot (a loop on Host, an
  // atomicMin on Cuda); the message decodes it to the rank's token and slot, negative ids included.
  std::uint64_t const key = detail::invalid_id_key(5, -3);  // slot 5, id -3
  CHECK(key < detail::invalid_id_key(6, 0));                // the lower slot wins a min, whatever the ids
  CHECK(detail::invalid_id_key(6, -1) > key);
  detail::InvalidIdSite const site = detail::invalid_id_site(key, 2);
  CHECK(site.token == 2);
  CHECK(site.slot == 1);
  CHECK(site.id == -3);
  CHECK(detail::invalid_id_site(detail::kNoInvalidId, 2).token == -1);
  test::check_throws(Errc::kInvalidExpertId,
                     "status: rank 1: topk_ids held 2 invalid expert id(s) (first: token 2 of rank 1, slot 1: "
                     "topk_ids[2, 1] = -3), expected -1 or an id in [0, 8); those slots were dropped and the output "
                     "written without them",
                     [&] { detail::throw_invalid_ids("status", 1, 2, site, 8); });
  test::check_throws(
      Errc::kInvalidExpertId, "forward: rank 0: topk_ids held 1 invalid expert id(s) (first: not recorded)",
      [&] { detail::throw_invalid_ids("forward", 0, 1, detail::invalid_id_site(detail::kNoInvalidId, 4), 8); });
}

TEST_CASE("ExpertParallel::forward: invalid ids throw after the collectives, on the rank that had them") {
  SmallLayer layer;
  LocalGroup group(2, {.timeout = std::chrono::seconds(20)});
  std::vector<std::string> errors(2);
  std::vector<std::vector<float>> ys(2);
  group.run([&](int rank, Communicator& comm) {
    ExpertParallel<Grouped, AllToAll, Host> ep(layer.config(comm), comm);
    std::mt19937_64 rng(static_cast<std::uint64_t>(rank) + 99);
    std::int64_t const t = 5;
    auto x = test::random_vector<float>(t * 16, rng);
    auto ids = test::random_ids(t, 2, 8, rng, 0.0);
    if (rank == 1) ids[3] = 42;
    auto w = test::random_weights(ids.size(), rng);
    ys[static_cast<std::size_t>(rank)].assign(x.size(), NAN);
    std::vector<std::byte> ws(ep.workspace_bytes(t));
    try {
      ep.forward(Host{}, MatrixView<std::int32_t const>(ids.data(), t, 2), MatrixView<float const>(w.data(), t, 2),
                 MatrixView<float const>(x.data(), t, 16),
                 MatrixView<float>(ys[static_cast<std::size_t>(rank)].data(), t, 16), Workspace(ws.data(), ws.size()));
    } catch (Error const& e) {
      CHECK(e.code() == Errc::kInvalidExpertId);
      errors[static_cast<std::size_t>(rank)] = e.what();
    }
    comm.barrier(StreamRef::host());  // the group is still healthy: both ranks got through forward
    // Raised once: the counters stay readable, and status() does not raise them again.
    CHECK(ep.status(Host{}).invalid_ids == (rank == 1 ? 1u : 0u));
  });
  CHECK(errors[0].empty());
  // The message names the rank and that rank's token and slot (ids[3] of [5, 2] ids: token 1, slot 1).
  CHECK(errors[1].find("forward: rank 1: topk_ids held 1 invalid expert id(s) (first: token 1 of rank 1, slot 1: "
                       "topk_ids[1, 1] = 42), expected -1 or an id in [0, 8); those slots were dropped") !=
        std::string::npos);
  for (auto const& y : ys)
    for (float v : y) CHECK(std::isfinite(v));  // written, the invalid slot contributing nothing
}

TEST_CASE("ExpertParallel::forward: AllGather refuses ranks that hold different tokens") {
  SmallLayer layer;
  LocalGroup group(2, {.timeout = std::chrono::seconds(20)});
  std::vector<std::string> errors(2);
  group.run([&](int rank, Communicator& comm) {
    ExpertParallel<Grouped, AllGather, Host> ep(layer.config(comm), comm);
    std::int64_t const t = 3 + rank;
    std::mt19937_64 rng(7);
    auto x = test::random_vector<float>(static_cast<std::size_t>(t * 16), rng);
    std::vector<float> y(x.size());
    auto ids = test::random_ids(t, 2, 8, rng);
    auto w = test::random_weights(ids.size(), rng);
    std::vector<std::byte> ws(ep.workspace_bytes(8));
    try {
      ep.forward(Host{}, MatrixView<std::int32_t const>(ids.data(), t, 2), MatrixView<float const>(w.data(), t, 2),
                 MatrixView<float const>(x.data(), t, 16), MatrixView<float>(y.data(), t, 16),
                 Workspace(ws.data(), ws.size()));
    } catch (Error const& e) {
      errors[static_cast<std::size_t>(rank)] = e.what();
    }
  });
  for (auto const& e : errors)
    CHECK(
        e.find("AllGather needs the same tokens on every rank: rank 0 has num_tokens = 3, rank 1 has num_tokens = 4") !=
        std::string::npos);
}
