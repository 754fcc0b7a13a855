// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
// Fault injection over LocalGroup: a Communicator decorator makes one rank fail in the middle of
// a forward, or send a different number of rows than its count table announced. Every other rank
// must get an Error well within the timeout (never hang), and a rebuilt group must work again.

#include "../common/test_util.hpp"

#include <atomic>
#include <chrono>

using namespace epx;
using namespace std::chrono_literals;

namespace {

enum class Fault { kNone, kThrowAtCall, kShortSend };

// Forwards to a real Communicator, injecting one fault at collective call number `at_call`.
class FaultyCommunicator final : public Communicator {
 public:
  FaultyCommunicator(Communicator& inner, Fault fault, int at_call) : inner_(inner), fault_(fault), at_call_(at_call) {}

  int rank() const noexcept override { return inner_.rank(); }
  int size() const noexcept override { return inner_.size(); }
  MemorySpace memory_space() const noexcept override { return inner_.memory_space(); }

  void all_to_all_v(void const* send, std::span<std::size_t const> send_bytes, void* recv,
                    std::span<std::size_t const> recv_bytes, StreamRef stream) override {
    if (inject()) {
      if (fault_ == Fault::kShortSend) {  // claim one row less to the last rank than announced
        std::vector<std::size_t> wrong(send_bytes.begin(), send_bytes.end());
        for (auto it = wrong.rbegin(); it != wrong.rend(); ++it)
          if (*it > 0) {
            *it -= 1;
            break;
          }
        return inner_.all_to_all_v(send, wrong, recv, recv_bytes, stream);
      }
    }
    inner_.all_to_all_v(send, send_bytes, recv, recv_bytes, stream);
  }
  void all_to_all(void const* send, void* recv, std::size_t bytes, StreamRef stream) override {
    inject();
    inner_.all_to_all(send, recv, bytes, stream);
  }
  void all_reduce_sum(void* data, std::size_t count, DType dtype, StreamRef stream) override {
    inject();
    inner_.all_reduce_sum(data, count, dtype, stream);
  }
  void all_gather(void const* send, void* recv, std::size_t bytes, StreamRef stream) override {
    inject();
    inner_.all_gather(send, recv, bytes, stream);
  }
  void barrier(StreamRef stream) override {
    inject();
    inner_.barrier(stream);
  }
  void wait(StreamRef stream) override { inner_.wait(stream); }

 private:
  // Counts calls; throws for kThrowAtCall, returns true when another fault is due now.
  bool inject() {
    if (++calls_ != at_call_ || fault_ == Fault::kNone) return false;
    if (fault_ == Fault::kThrowAtCall) throw std::runtime_error("injected failure in the middle of forward");
    return true;
  }

  Communicator& inner_;
  Fault fault_;
  int at_call_;
  int calls_ = 0;
};

struct Outcome {
  std::vector<Errc> codes;  // per rank; kUnsupported stands for "no epx::Error"
  std::vector<std::string> messages;
  std::chrono::steady_clock::duration elapsed{};
};

// One AllToAll or AllGather forward on `num_ranks` ranks, rank `faulty` carrying `fault`.
template <class Dispatch>
Outcome run_forward(int num_ranks, int faulty, Fault fault, int at_call, std::chrono::milliseconds timeout) {
  std::mt19937_64 rng(42);
  ExpertMlpConfig const mlp{.hidden = 16, .intermediate = 8};
  auto const gw = test::GlobalWeights<float>::random(8, mlp, false, rng);
  auto const placement = ExpertPlacement::contiguous(8, num_ranks);
  std::int64_t const t = 6;
  auto const x = test::random_vector<float>(static_cast<std::size_t>(t * mlp.hidden), rng);
  auto const ids = test::random_ids(t, 2, 8, rng, 0.0);
  auto const w = test::random_weights(ids.size(), rng);
  Outcome out{std::vector<Errc>(static_cast<std::size_t>(num_ranks), Errc::kUnsupported),
              std::vector<std::string>(static_cast<std::size_t>(num_ranks))};
  LocalGroup group(num_ranks, {.timeout = timeout});
  auto const start = std::chrono::steady_clock::now();
  try {
    group.run([&](int rank, Communicator& comm) {
      FaultyCommunicator faulty_comm(comm, rank == faulty ? fault : Fault::kNone, at_call);
      ExpertParallel<Grouped, Dispatch, Host> ep(
          MoeConfig{
              .router = {.num_experts = 8, .top_k = 2}, .mlp = mlp, .weights = gw.local(placement.local_range(rank))},
          faulty_comm);
      std::vector<float> y(x.size());
      std::vector<std::byte> ws(ep.workspace_bytes(t));
      try {
        ep.forward(Host{}, MatrixView<std::int32_t const>(ids.data(), t, 2), MatrixView<float const>(w.data(), t, 2),
                   MatrixView<float const>(x.data(), t, mlp.hidden), MatrixView<float>(y.data(), t, mlp.hidden),
                   Workspace(ws.data(), ws.size()));
      } catch (Error const& e) {
        out.codes[static_cast<std::size_t>(rank)] = e.code();
        out.messages[static_cast<std::size_t>(rank)] = e.what();
        throw;
      }
    });
  } catch (...) {}
  out.elapsed = std::chrono::steady_clock::now() - start;
  return out;
}

}  // namespace

TEST_CASE_TEMPLATE("FaultInjection::forward: a rank that throws mid-forward fails the others at once", Dispatch,
                   AllToAll, AllGather) {
  // Call 1 is the count/token exchange; call 2 is inside the dispatch (AllToAll) or the combine.
  auto const out = run_forward<Dispatch>(4, 2, Fault::kThrowAtCall, 2, 30s);
  CHECK(out.elapsed < 10s);  // well before the 30 s timeout
  for (int r = 0; r < 4; ++r) {
    CAPTURE(r);
    if (r == 2) continue;  // the faulty rank threw a std::runtime_error, not an epx::Error
    CHECK(out.codes[static_cast<std::size_t>(r)] == Errc::kPeerFailed);
    CHECK(out.messages[static_cast<std::size_t>(r)].find("injected failure in the middle of forward") !=
          std::string::npos);
  }
  // The aborted group is gone; a new one in the same process runs the same forward cleanly.
  auto const again = run_forward<Dispatch>(4, -1, Fault::kNone, 0, 30s);
  for (auto code : again.codes) CHECK(code == Errc::kUnsupported);  // no Error at all
}

TEST_CASE_TEMPLATE("FaultInjection::forward: a rank that never reaches the combine makes the others time out", Dispatch,
                   AllToAll, AllGather) {
  // Without LocalGroup::run's abort (the rank just disappears), the deadline is what saves the others.
  std::mt19937_64 rng(3);
  ExpertMlpConfig const mlp{.hidden = 16, .intermediate = 8};
  auto const gw = test::GlobalWeights<float>::random(8, mlp, false, rng);
  auto const placement = ExpertPlacement::contiguous(8, 3);
  LocalGroup group(3, {.timeout = 300ms});
  std::vector<Errc> codes(3, Errc::kUnsupported);
  auto const start = std::chrono::steady_clock::now();
  {
    std::vector<std::jthread> threads;
    for (int rank = 0; rank < 2; ++rank)  // rank 2 never calls forward
      threads.emplace_back([&, rank] {
        ExpertParallel<Grouped, Dispatch, Host> ep(
            MoeConfig{
                .router = {.num_experts = 8, .top_k = 2}, .mlp = mlp, .weights = gw.local(placement.local_range(rank))},
            group.communicator(rank));
        std::int64_t const t = 4;
        std::mt19937_64 r2(7);
        auto const x = test::random_vector<float>(static_cast<std::size_t>(t * 16), r2);
        auto const ids = test::random_ids(t, 2, 8, r2);
        auto const w = test::random_weights(ids.size(), r2);
        std::vector<float> y(x.size());
        std::vector<std::byte> ws(ep.workspace_bytes(t));
        try {
          ep.forward(Host{}, MatrixView<std::int32_t const>(ids.data(), t, 2), MatrixView<float const>(w.data(), t, 2),
                     MatrixView<float const>(x.data(), t, 16), MatrixView<float>(y.data(), t, 16),
                     Workspace(ws.data(), ws.size()));
        } catch (Error const& e) {
          codes[static_cast<std::size_t>(rank)] = e.code();
        }
      });
  }
  CHECK(std::chrono::steady_clock::now() - start < 5s);
  CHECK(codes[0] == Errc::kTimeout);
  CHECK(codes[1] == Errc::kTimeout);
}

TEST_CASE("FaultInjection::forward: a rank that sends fewer rows than it announced fails on every rank") {
  // Call 2 is the first all_to_all_v; the faulty rank shrinks one of its send sizes.
  auto const out = run_forward<AllToAll>(3, 1, Fault::kShortSend, 2, 30s);
  CHECK(out.elapsed < 10s);
  for (int r = 0; r < 3; ++r) {
    CAPTURE(r);
    CHECK(out.codes[static_cast<std::size_t>(r)] == Errc::kCollectiveMismatch);
    CHECK(out.messages[static_cast<std::size_t>(r)].find("which expects") != std::string::npos);
  }
}

TEST_CASE_TEMPLATE("Determinism::forward: the same inputs give the same bits on every run", Dispatch, AllToAll,
                   AllGather) {
  EPX_TEST_SEEDED_RNG(rng);
  ExpertMlpConfig const mlp{.hidden = 24, .intermediate = 16};
  auto const gw = test::GlobalWeights<bfloat16>::random(12, mlp, true, rng);
  auto const placement = ExpertPlacement::contiguous(12, 3);
  std::int64_t const t = 9;
  auto const x = test::random_vector<bfloat16>(static_cast<std::size_t>(t * mlp.hidden), rng);
  auto const logits = test::random_vector<float>(static_cast<std::size_t>(t * 12), rng);
  std::vector<std::vector<bfloat16>> first(3), second(3);
  for (auto* ys : {&first, &second}) {
    LocalGroup group(3, {.timeout = 30s});
    group.run([&](int rank, Communicator& comm) {
      ExpertParallel<Grouped, Dispatch, Host> ep(
          MoeConfig{.router = {.num_experts = 12, .top_k = 3, .renormalize = true},
                    .mlp = mlp,
                    .weights = gw.local(placement.local_range(rank))},
          comm);
      auto& y = (*ys)[static_cast<std::size_t>(rank)];
      y.resize(x.size());
      std::vector<std::byte> ws(ep.workspace_bytes(t));
      ep.forward(Host{}, MatrixView<float const>(logits.data(), t, 12),
                 MatrixView<bfloat16 const>(x.data(), t, mlp.hidden), MatrixView<bfloat16>(y.data(), t, mlp.hidden),
                 Workspace(ws.data(), ws.size()));
    });
  }
  for (int r = 0; r < 3; ++r)
    CHECK(std::memcmp(first[static_cast<std::size_t>(r)].data(), second[static_cast<std::size_t>(r)].data(),
                      x.size() * sizeof(bfloat16)) == 0);
}
