// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

#include <epx/comm/communicator.hpp>
#include <epx/core/error.hpp>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

namespace epx {

namespace detail {

enum class CollectiveOp : std::uint8_t { kAllToAllV, kAllToAll, kAllReduceSum, kAllGather, kBarrier };

constexpr std::string_view to_string(CollectiveOp op) noexcept {
  switch (op) {
    case CollectiveOp::kAllToAllV: return "all_to_all_v";
    case CollectiveOp::kAllToAll: return "all_to_all";
    case CollectiveOp::kAllReduceSum: return "all_reduce_sum";
    case CollectiveOp::kAllGather: return "all_gather";
    case CollectiveOp::kBarrier: return "barrier";
  }
  return "?";
}

//! What one rank brings to a collective; read by the other ranks between the two phases.
struct CollectivePost {
  CollectiveOp op = CollectiveOp::kBarrier;
  std::uint64_t sequence = 0;  // the rank's collective count, for messages
  void const* send = nullptr;
  void* recv = nullptr;
  std::span<std::size_t const> send_bytes = {}, recv_bytes = {};  // all_to_all_v
  std::size_t bytes = 0;                                          // all_to_all, all_gather: bytes per rank
  std::size_t count = 0;                                          // all_reduce_sum
  DType dtype = DType::kF32;                                      // all_reduce_sum
};

//! The state the ranks of a LocalGroup (host memory) or CudaLocalGroup (device memory) share: a
//! generation-counted barrier with a deadline, the posts of the current collective, and the
//! failure that aborted the group, if any.
struct LocalGroupState {
  std::string_view name = "LocalGroup";  // the group's class, first word of its messages
  int num_ranks = 0;
  std::chrono::milliseconds timeout{};
  std::mutex mutex;
  std::condition_variable cv;
  std::vector<CollectivePost> posts;
  std::vector<char> arrived;
  int num_arrived = 0;
  std::uint64_t generation = 0;
  bool failed = false;
  Errc failure_code = Errc::kPeerFailed;
  std::string failure;
  int first_failed_rank = -1;

  // Marks the group failed (first failure wins) and wakes every waiting rank. Caller holds mutex.
  void fail_locked(int rank, Errc code, std::string message) {
    if (!failed) {
      failed = true;
      failure_code = code;
      failure = std::move(message);
      first_failed_rank = rank;
    }
    cv.notify_all();
  }

  [[noreturn]] void throw_failure_locked(int rank) const {
    throw_error(failure_code, fmt::format("{}: rank {} stopped: the group was aborted: {}", name, rank, failure));
  }

  //! Aborts the group with `message` and throws it as this rank's error. The other ranks see
  //! Errc::kPeerFailed, except for a collective mismatch, which is every rank's own verdict.
  [[noreturn]] void fail(int rank, Errc code, std::string const& message) {
    {
      std::unique_lock lock(mutex);
      fail_locked(rank, code == Errc::kCollectiveMismatch ? code : Errc::kPeerFailed, message);
    }
    throw_error(code, message);
  }

  //! Aborts the group on behalf of `rank`: every rank waiting in or later calling a collective
  //! throws Errc::kPeerFailed with `reason`.
  void abort(int rank, std::string_view reason) noexcept {
    try {
      std::unique_lock lock(mutex);
      fail_locked(rank, Errc::kPeerFailed, fmt::format("rank {} failed: {}", rank, reason));
    } catch (...) {  // formatting failed (out of memory): mark the group failed all the same
      std::unique_lock lock(mutex);
      failed = true;
      cv.notify_all();
    }
  }

  [[nodiscard]] bool aborted() {
    std::unique_lock lock(mutex);
    return failed;
  }

  //! Posts this rank's part (unless `post` is null) and waits until every rank has arrived.
  void arrive_and_wait(int rank, CollectivePost const* post, std::string_view what, std::uint64_t sequence) {
    std::unique_lock lock(mutex);
    if (failed) throw_failure_locked(rank);
    if (post != nullptr) posts[static_cast<std::size_t>(rank)] = *post;
    arrived[static_cast<std::size_t>(rank)] = 1;
    std::uint64_t const my_generation = generation;
    if (++num_arrived == num_ranks) {
      num_arrived = 0;
      std::fill(arrived.begin(), arrived.end(), 0);
      ++generation;
      cv.notify_all();
      return;
    }
    auto const deadline = std::chrono::steady_clock::now() + timeout;
    while (generation == my_generation && !failed) {
      if (cv.wait_until(lock, deadline) == std::cv_status::timeout && generation == my_generation && !failed) {
        std::string missing;
        for (int q = 0; q < num_ranks; ++q)
          if (!arrived[static_cast<std::size_t>(q)]) missing += fmt::format("{}{}", missing.empty() ? "" : ", ", q);
        fail_locked(rank, Errc::kTimeout,
                    fmt::format("{}: rank {} waited {} ms in {} (collective #{}) for rank(s) [{}], which "
                                "never arrived",
                                name, rank, timeout.count(), what, sequence, missing));
        std::string const message = failure;
        lock.unlock();
        throw_error(Errc::kTimeout, message);
      }
    }
    if (generation == my_generation) throw_failure_locked(rank);
  }
};

//! A LocalGroup's ranks and what they share: validates the construction arguments, owns the
//! state, and runs one thread per rank. Both LocalGroup and CudaLocalGroup are built on it.
class LocalGroupCore {
 public:
  LocalGroupCore(std::string_view name, int num_ranks, std::chrono::milliseconds timeout)
      : state_(std::make_unique<LocalGroupState>()) {
    require(num_ranks >= 1, Errc::kInvalidArgument, name, "num_ranks", num_ranks, ">= 1");
    require(timeout.count() > 0, Errc::kInvalidArgument, name, "options.timeout (ms)", timeout.count(), "> 0");
    state_->name = name;
    state_->num_ranks = num_ranks;
    state_->timeout = timeout;
    state_->posts.resize(static_cast<std::size_t>(num_ranks));
    state_->arrived.assign(static_cast<std::size_t>(num_ranks), 0);
  }

  [[nodiscard]] int size() const noexcept { return state_->num_ranks; }
  [[nodiscard]] LocalGroupState& state() const noexcept { return *state_; }

  void check_rank(int rank, std::string_view where) const {
    require(rank >= 0 && rank < size(), Errc::kInvalidArgument, where, "rank", rank, fmt::format("in [0, {})", size()));
  }

  //! Runs `body(rank)` on one thread per rank and joins them. A rank whose body throws aborts the
  //! group; once all threads end, the first failure's exception is rethrown.
  template <class Body>
  void run(Body&& body) {
    std::vector<std::exception_ptr> errors(static_cast<std::size_t>(size()));
    {
      std::vector<std::jthread> threads;
      for (int r = 0; r < size(); ++r) {
        threads.emplace_back([&, r] {
          try {
            body(r);
          } catch (...) {
            errors[static_cast<std::size_t>(r)] = std::current_exception();
            state_->abort(r, describe(errors[static_cast<std::size_t>(r)]));
          }
        });
      }
    }
    int root = -1;
    {
      std::unique_lock lock(state_->mutex);
      root = state_->first_failed_rank;
    }
    if (root >= 0 && errors[static_cast<std::size_t>(root)])
      std::rethrow_exception(errors[static_cast<std::size_t>(root)]);
    for (auto& e : errors)
      if (e) std::rethrow_exception(e);
  }

  static std::string describe(std::exception_ptr const& e) {
    try {
      std::rethrow_exception(e);
    } catch (std::exception const& ex) {
      return ex.what();
    } catch (...) {
      return "an exception not derived from std::exception";
    }
  }

 private:
  std::unique_ptr<LocalGroupState> state_;  // on the heap: the ranks keep a reference to it
};

//! A collective disagreement: empty `message` when the posts agree.
struct CollectiveVerdict {
  Errc code = Errc::kCollectiveMismatch;
  std::string message;
};

//! Checks every post against `mine` and each other. Every rank checks every post, so all ranks
//! reach the same verdict; `rank` is the caller, named first in an operation mismatch.
inline CollectiveVerdict check_posts(std::span<CollectivePost const> posts, CollectivePost const& mine, int rank) {
  auto const n = posts.size();
  auto const what = to_string(mine.op);
  for (std::size_t q = 0; q < n; ++q)
    if (posts[q].op != mine.op)
      return {Errc::kCollectiveMismatch, fmt::format("collective #{}: rank {} called {}, rank {} called {}",
                                                     mine.sequence, rank, what, q, to_string(posts[q].op))};
  switch (mine.op) {
    case CollectiveOp::kAllToAllV:
      for (std::size_t p = 0; p < n; ++p)
        for (std::size_t q = 0; q < n; ++q)
          if (posts[p].send_bytes[q] != posts[q].recv_bytes[p])
            return {Errc::kCollectiveMismatch,
                    fmt::format("all_to_all_v (collective #{}): rank {} sends {} bytes to rank {}, which expects {} "
                                "bytes",
                                mine.sequence, p, posts[p].send_bytes[q], q, posts[q].recv_bytes[p])};
      break;
    case CollectiveOp::kAllToAll:
    case CollectiveOp::kAllGather:
      for (std::size_t q = 0; q < n; ++q)
        if (posts[q].bytes != posts[0].bytes)
          return {Errc::kCollectiveMismatch,
                  fmt::format("{} (collective #{}): rank 0 passes {} bytes per rank, rank {} "
                              "passes {}",
                              what, mine.sequence, posts[0].bytes, q, posts[q].bytes)};
      break;
    case CollectiveOp::kAllReduceSum:
      for (std::size_t q = 0; q < n; ++q)
        if (posts[q].count != posts[0].count || posts[q].dtype != posts[0].dtype)
          return {Errc::kCollectiveMismatch,
                  fmt::format("all_reduce_sum (collective #{}): rank 0 reduces {} x {}, rank {} reduces {} x {}",
                              mine.sequence, posts[0].count, posts[0].dtype, q, posts[q].count, posts[q].dtype)};
      break;
    case CollectiveOp::kBarrier: break;
  }
  return {};
}

//! @brief One rank of a LocalGroup: the argument checks and the two-phase protocol both the host
//! and the CUDA group run; a subclass only moves the bytes (`exchange`, `complete`).
//!
//! Phase A: every rank posts. Then each rank checks the posts and, when they agree, moves what it
//! receives (`exchange`). Phase B: nobody leaves (freeing or reusing what it posted) until
//! everybody is done reading; only then does a disagreement abort the group, on every rank alike.
//! An exception from a hook aborts the group before it propagates, so peers stop at once instead
//! of waiting out the deadline.
class LocalRank : public Communicator {
 public:
  [[nodiscard]] int rank() const noexcept final { return rank_; }
  [[nodiscard]] int size() const noexcept final { return state_.num_ranks; }

  void all_to_all_v(void const* send, std::span<std::size_t const> send_bytes, void* recv,
                    std::span<std::size_t const> recv_bytes, StreamRef stream) final {
    auto const n = static_cast<std::size_t>(size());
    check_stream(stream, "all_to_all_v");
    if (send_bytes.size() != n || recv_bytes.size() != n)
      fail_local(Errc::kInvalidArgument, fmt::format("all_to_all_v: send_bytes.size() = {}, recv_bytes.size() = {}, "
                                                     "expected both = group size {}",
                                                     send_bytes.size(), recv_bytes.size(), n));
    check_buffer("all_to_all_v", "send", send, sum(send_bytes));
    check_buffer("all_to_all_v", "recv", recv, sum(recv_bytes));
    collective({.op = CollectiveOp::kAllToAllV,
                .send = send,
                .recv = recv,
                .send_bytes = send_bytes,
                .recv_bytes = recv_bytes},
               stream);
  }

  void all_to_all(void const* send, void* recv, std::size_t bytes_per_rank, StreamRef stream) final {
    check_stream(stream, "all_to_all");
    auto const all_bytes = bytes_per_rank * static_cast<std::size_t>(size());
    check_buffer("all_to_all", "send", send, all_bytes);
    check_buffer("all_to_all", "recv", recv, all_bytes);
    collective({.op = CollectiveOp::kAllToAll, .send = send, .recv = recv, .bytes = bytes_per_rank}, stream);
  }

  void all_reduce_sum(void* data, std::size_t count, DType dtype, StreamRef stream) final {
    check_stream(stream, "all_reduce_sum");
    check_buffer("all_reduce_sum", "data", data, count * size_of(dtype));
    collective({.op = CollectiveOp::kAllReduceSum, .send = data, .recv = data, .count = count, .dtype = dtype}, stream);
  }

  void all_gather(void const* send, void* recv, std::size_t bytes_per_rank, StreamRef stream) final {
    check_stream(stream, "all_gather");
    check_buffer("all_gather", "send", send, bytes_per_rank);
    check_buffer("all_gather", "recv", recv, bytes_per_rank * static_cast<std::size_t>(size()));
    collective({.op = CollectiveOp::kAllGather, .send = send, .recv = recv, .bytes = bytes_per_rank}, stream);
  }

  void barrier(StreamRef stream) final {
    check_stream(stream, "barrier");
    collective({.op = CollectiveOp::kBarrier}, stream);
  }

 protected:
  LocalRank(LocalGroupState& state, int rank) : state_(state), rank_(rank) {}

  //! Refuses a stream of the wrong kind (through fail_local).
  virtual void check_stream(StreamRef stream, std::string_view what) = 0;

 public:
  //! Host ranks have nothing in flight; device ranks wait for their stream (see Communicator::wait).
  void wait(StreamRef stream) override {
    check_stream(stream, "wait");
    wait_stream(stream);
  }

 protected:
  virtual void wait_stream(StreamRef /*stream*/) {}
  //! Before phase A, on this rank alone (e.g. ordering the rank's stream).
  virtual void prepare(CollectivePost const& /*mine*/, StreamRef /*stream*/) {}
  //! Between the phases, when all posts agree: receive this rank's part from the peers' posts,
  //! which stay valid until phase B.
  virtual void exchange(std::span<CollectivePost const> posts, CollectivePost const& mine, StreamRef stream) = 0;
  //! After phase B, when all posts agreed: nobody reads this rank's buffers any more.
  virtual void complete(CollectivePost const& /*mine*/, StreamRef /*stream*/) {}

  //! Aborts the group (peers: kPeerFailed) and throws `what` as this rank's `code`.
  [[noreturn]] void fail_local(Errc code, std::string const& what) {
    state_.fail(rank_, code, fmt::format("{}: rank {}: {}", state_.name, rank_, what));
  }

  [[nodiscard]] LocalGroupState& state() const noexcept { return state_; }

 private:
  static std::size_t sum(std::span<std::size_t const> v) {
    std::size_t s = 0;
    for (auto x : v) s += x;
    return s;
  }

  void check_buffer(std::string_view what, std::string_view name, void const* p, std::size_t bytes) {
    if (p == nullptr && bytes > 0)
      fail_local(Errc::kInvalidArgument, fmt::format("{}: {} = nullptr, expected {} bytes", what, name, bytes));
  }

  // Runs a hook; if it throws, aborts the group on this rank's behalf before rethrowing.
  template <class Hook>
  void guarded(Hook&& hook) {
    try {
      hook();
    } catch (...) {
      state_.abort(rank_, LocalGroupCore::describe(std::current_exception()));
      throw;
    }
  }

  void collective(CollectivePost post, StreamRef stream) {
    post.sequence = ++sequence_;
    auto const what = to_string(post.op);
    guarded([&] { prepare(post, stream); });
    state_.arrive_and_wait(rank_, &post, what, sequence_);
    std::span<CollectivePost const> const posts(state_.posts);
    CollectiveVerdict const verdict = check_posts(posts, post, rank_);
    if (verdict.message.empty()) guarded([&] { exchange(posts, post, stream); });
    state_.arrive_and_wait(rank_, nullptr, what, sequence_);
    if (!verdict.message.empty()) fail_local(verdict.code, verdict.message);
    guarded([&] { complete(post, stream); });
  }

  LocalGroupState& state_;
  int rank_;
  std::uint64_t sequence_ = 0;
};

}  // namespace detail

//! Options of a LocalGroup.
struct LocalGroupOptions {
  std::chrono::milliseconds timeout{std::chrono::seconds(60)};  //!< longest wait for a peer
};

//! @brief N ranks in one process, one thread per rank, exchanging host memory. Rank r's
//! Communicator is `communicator(r)`; drive it from one thread per rank, e.g. with `run`.
//!
//! A rank that never arrives makes the others throw Errc::kTimeout after `Options::timeout`; a
//! rank that throws inside `run` aborts the group at once, so the others throw Errc::kPeerFailed.
//! Mismatched collectives or sizes throw Errc::kCollectiveMismatch on every rank. After a
//! failure the group stays aborted: destroy it and build a new one.
class LocalGroup {
 public:
  using Options = LocalGroupOptions;

  explicit LocalGroup(int num_ranks, Options options = {}) : core_("LocalGroup", num_ranks, options.timeout) {
    for (int r = 0; r < num_ranks; ++r) ranks_.push_back(std::make_unique<Rank>(core_.state(), r));
  }
  LocalGroup(LocalGroup const&) = delete;
  LocalGroup& operator=(LocalGroup const&) = delete;

  [[nodiscard]] int size() const noexcept { return core_.size(); }

  [[nodiscard]] Communicator& communicator(int rank) {
    core_.check_rank(rank, "LocalGroup::communicator");
    return *ranks_[static_cast<std::size_t>(rank)];
  }

  //! Aborts the group on behalf of `rank`: every rank waiting in or later calling a collective
  //! throws Errc::kPeerFailed with `reason`.
  void abort(int rank, std::string_view reason) noexcept { core_.state().abort(rank, reason); }

  [[nodiscard]] bool aborted() const { return core_.state().aborted(); }

  //! Runs `fn(rank, communicator(rank))` on one thread per rank and joins them. A rank whose fn
  //! throws aborts the group; once all threads end, the first failure's exception is rethrown.
  template <class Fn>
  void run(Fn&& fn) {
    core_.run([&](int r) { fn(r, communicator(r)); });
  }

 private:
  class Rank final : public detail::LocalRank {
   public:
    Rank(detail::LocalGroupState& state, int rank) : LocalRank(state, rank) {}

    [[nodiscard]] MemorySpace memory_space() const noexcept override { return MemorySpace::kHost; }

   private:
    void check_stream(StreamRef stream, std::string_view what) override {
      if (!stream.is_host())
        fail_local(Errc::kInvalidArgument, fmt::format("{}: stream is a CUDA stream, expected StreamRef::host() "
                                                       "(this LocalGroup moves host memory)",
                                                       what));
    }

    void exchange(std::span<detail::CollectivePost const> posts, detail::CollectivePost const& post,
                  StreamRef) override {
      auto const n = posts.size();
      auto const me = static_cast<std::size_t>(rank());
      switch (post.op) {
        case detail::CollectiveOp::kAllToAllV: {
          std::size_t dst = 0;
          for (std::size_t q = 0; q < n; ++q) {
            std::size_t src = 0;
            for (std::size_t p = 0; p < me; ++p) src += posts[q].send_bytes[p];
            copy(static_cast<std::byte*>(post.recv) + dst, static_cast<std::byte const*>(posts[q].send) + src,
                 post.recv_bytes[q]);
            dst += post.recv_bytes[q];
          }
          break;
        }
        case detail::CollectiveOp::kAllToAll:
        case detail::CollectiveOp::kAllGather: {
          std::size_t const offset = post.op == detail::CollectiveOp::kAllToAll ? me * post.bytes : 0;
          for (std::size_t q = 0; q < n; ++q)
            copy(static_cast<std::byte*>(post.recv) + q * post.bytes,
                 static_cast<std::byte const*>(posts[q].send) + offset, post.bytes);
          break;
        }
        case detail::CollectiveOp::kAllReduceSum: reduce(posts, post); break;
        case detail::CollectiveOp::kBarrier: break;
      }
    }

    void complete(detail::CollectivePost const& post, StreamRef) override {
      if (post.op == detail::CollectiveOp::kAllReduceSum)
        copy(post.recv, scratch_.data(), post.count * size_of(post.dtype));
    }

    static void copy(void* dst, void const* src, std::size_t bytes) {
      if (bytes > 0) std::memcpy(dst, src, bytes);
    }

    // Sums every rank's buffer in rank order into scratch_ (written back after phase B, since the
    // buffers are read by every rank until then).
    void reduce(std::span<detail::CollectivePost const> posts, detail::CollectivePost const& post) {
      scratch_.resize(post.count * size_of(post.dtype));
      switch (post.dtype) {
        case DType::kF32: reduce_as<float, float>(posts, post); break;
        case DType::kF16: reduce_as<half, float>(posts, post); break;
        case DType::kBF16: reduce_as<bfloat16, float>(posts, post); break;
        // Integers are summed as unsigned: they wrap (two's complement) instead of overflowing
        // (undefined for signed types), giving the same bits as the CUDA backend's sum.
        case DType::kI32: reduce_as<std::int32_t, std::uint32_t>(posts, post); break;
        case DType::kI64: reduce_as<std::int64_t, std::uint64_t>(posts, post); break;
      }
    }

    template <class T, class Acc>
    void reduce_as(std::span<detail::CollectivePost const> posts, detail::CollectivePost const& post) {
      auto* out = reinterpret_cast<T*>(scratch_.data());
      for (std::size_t i = 0; i < post.count; ++i) {
        Acc acc = load<T, Acc>(posts[0].recv, i);
        for (std::size_t q = 1; q < posts.size(); ++q) acc += load<T, Acc>(posts[q].recv, i);
        if constexpr (std::is_same_v<T, Acc> || std::is_integral_v<T>)
          out[i] = static_cast<T>(acc);
        else
          out[i] = T(acc);
      }
    }

    template <class T, class Acc>
    static Acc load(void const* base, std::size_t i) {
      T value;
      std::memcpy(&value, static_cast<std::byte const*>(base) + i * sizeof(T), sizeof(T));
      if constexpr (std::is_same_v<T, Acc>)
        return value;
      else
        return static_cast<Acc>(value);
    }

    std::vector<std::byte> scratch_;
  };

  detail::LocalGroupCore core_;
  std::vector<std::unique_ptr<Rank>> ranks_;
};

}  // namespace epx
