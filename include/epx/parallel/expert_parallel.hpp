// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! ExpertParallel<Experts, Dispatch, Space>: the composed MoE layer, one sequencer for every
//! execution space. It validates the configuration, lays out the workspace, and runs router ->
//! plan -> permute -> dispatch -> experts -> combine -> unpermute from three parts: the dispatch
//! part (parallel/dispatch.hpp), the expert part and the space's LayerExecution
//! (parallel/execution.hpp; host/expert_parallel.hpp, cuda/expert_parallel.cuh). So every line of
//! this file runs in the Host tests, whichever space a program uses.

#include <epx/comm/communicator.hpp>
#include <epx/core/error.hpp>
#include <epx/core/space.hpp>
#include <epx/core/status.hpp>
#include <epx/core/workspace.hpp>
#include <epx/parallel/dispatch.hpp>
#include <epx/parallel/execution.hpp>
#include <epx/parallel/forward_control.hpp>
#include <epx/parallel/moe_config.hpp>
#include <epx/parallel/tags.hpp>
#include <epx/router/router.hpp>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <span>
#include <string_view>
#include <type_traits>

namespace epx {
namespace detail {

//! True when this translation unit has the LayerExecution of `Space` (its backend's header).
template <class Space>
concept has_layer_execution = requires {
  typename LayerExecution<Space>::Stream;
};

//! A sub-workspace of `bytes` bytes carved as one part, handed to a stage as its own Workspace.
template <class Carver>
Workspace take_workspace(Carver& carver, std::size_t bytes) {
  auto const part = carver.template take<std::byte>(bytes);
  return {part.data(), part.size()};
}

}  // namespace detail

//! @brief The MoE layer with expert parallelism: router -> plan -> permute -> dispatch -> experts
//! -> combine -> unpermute, over a Communicator, on the execution space `Space`.
//! @tparam Experts   expert policy: Grouped or CublasGrouped (Cuda only)
//! @tparam Dispatch  dispatch policy: AllToAll or AllGather
//! @tparam Space     execution space: Cuda (default; include <epx/cuda.cuh>) or Host (<epx/epx.hpp>)
//!
//! One object per rank, used by one thread at a time. Collectives go through the given
//! Communicator, whose memory_space() must be the space's (Host: kHost, e.g. a LocalGroup rank;
//! Cuda: kDevice, an NcclCommunicator or a CudaLocalGroup rank), in the order of the forward's
//! `Context` (Host: `Host{}`, synchronous on the calling thread; Cuda: a StreamRef, stream-ordered).
//! All scratch is the caller's Workspace; the object holds the validated configuration and, on
//! Cuda, a few hundred bytes of pinned host memory (allocated in the constructor).
//!
//! @par Results and counters (the same contract on every space)
//! forward writes y and returns nothing; status(context) returns the routing counters of the last
//! forward. AllToAll brings them to the host at its count exchange (its one synchronisation on
//! Cuda), so its status() costs nothing and forward itself raises invalid ids (InvalidIds::kThrow)
//! after its collectives. AllGather never reads them during forward (on Cuda that would cost a
//! sync): its status() reads them from that forward's workspace and raises invalid ids there. Call
//! status() in the forward's order (its stream on Cuda) before the workspace is reused.
//!
//! @par CUDA graphs
//! AllToAll synchronises the host inside forward and cannot be captured. AllGather with Grouped
//! makes no host synchronisation and allocates nothing on Cuda, so it captures when the
//! communicator's all_reduce_sum does (NCCL: yes); with CublasGrouped it cannot (it reads offsets
//! on the host).
template <class Experts, class Dispatch, class Space = Cuda>
class ExpertParallel {
  static_assert(detail::has_layer_execution<Space>,
                "epx: ExpertParallel has no implementation for this execution space here: use epx::Host (include "
                "<epx/epx.hpp>) or epx::Cuda (include <epx/cuda.cuh> and compile with nvcc)");
  using Exec = detail::LayerExecution<Space>;
  using Stream = typename Exec::Stream;
  using DispatchPart = typename detail::DispatchSelector<Dispatch>::type;
  using ExpertPart = typename detail::ExpertKernelSelector<Experts, Space>::type;
  static_assert(detail::layer_execution<Exec>, "epx: this space's LayerExecution misses part of its protocol");
  static_assert(detail::expert_part<ExpertPart, Stream>,
                "epx: this expert policy's part misses part of its protocol (check, workspace_bytes, run)");
  template <detail::LayerStage kStage>
  using Range = typename Exec::template Range<kStage>;

 public:
  //! Where forward and status run: Host{} on Host, a StreamRef (never StreamRef::host()) on Cuda.
  using Context = typename Exec::Context;

  //! Validates `config` against `comm` and throws the Error can_implement would return. `comm`
  //! must outlive this object; the weights and bias `config` points to (in the space's memory)
  //! must stay valid and unchanged. On Cuda: allocates the pinned host memory of the control block
  //! (and, for CublasGrouped, creates a cuBLAS handle on the current device).
  ExpertParallel(MoeConfig const& config, Communicator& comm)
      : config_(implementable(config, comm)), comm_(&comm), exec_(control_words(), upload_bytes()) {}

  //! @brief Whether this layer runs `config` on `comm`, without building it: std::nullopt, or the
  //! Error the constructor would throw, which is the first failing part's: the configuration
  //! (router, MLP, weights, placement, bias), then the execution space (the communicator's
  //! memory), then the expert policy (what its kernel can run).
  [[nodiscard]] static std::optional<Error> can_implement(MoeConfig const& config, Communicator const& comm) {
    try {
      (void)implementable(config, comm);
    } catch (Error const& e) {
      return e;
    }
    return std::nullopt;
  }

  [[nodiscard]] MoeConfig const& config() const noexcept { return config_; }
  [[nodiscard]] ExpertRange local_experts() const { return config_.placement.local_range(comm_->rank()); }

  //! Workspace bytes (the space's memory) for forward calls of up to `max_tokens` tokens on every
  //! rank of the group: routing, plan, control block, permuted rows, the dispatch part's buffers
  //! (AllToAll: for the dropless worst case, every token of every rank on this rank's experts) and
  //! the experts' scratch. Host arithmetic, no allocation, no synchronisation; on Cuda it includes
  //! CUB's size query, which reads the current device's properties: call it with the device of
  //! forward current. With AllToAll, `max_tokens` must bound every rank's num_tokens.
  [[nodiscard]] std::size_t workspace_bytes(std::int64_t max_tokens) const {
    detail::require(max_tokens >= 0 && max_tokens <= max_tokens_limit(), Errc::kInvalidArgument, "workspace_bytes",
                    "max_tokens", max_tokens,
                    fmt::format(">= 0 with max_tokens * {} ({}) < 2^31 - 1 (the rows a rank may hold are indexed "
                                "with int32)",
                                DispatchPart::kRowsPerTokenText, rows_per_token()));
    return detail::dispatch_on_dtype(config_.weights.dtype, [&]<class T>(T*) { return layout_bytes<T>(max_tokens); });
  }

  //! @brief Forward from router logits: route, then as the other overload.
  //! @param[in]  context        Host{}, or the CUDA stream every kernel, copy and collective is
  //!                            ordered on (AllToAll synchronises it once, at the count exchange)
  //! @param[in]  router_logits  [num_tokens, num_experts], fp32 or bf16
  //! @param[in]  x              [num_tokens, hidden]
  //! @param[out] y              [num_tokens, hidden]; every row written once the forward's work is done
  //! @param[in]  workspace      at least workspace_bytes(max_tokens) bytes of the space's memory; in
  //!                            use until the forward's work is done (and status() has read it)
  //! @throws Error on bad shapes, a workspace too small (on every rank when another rank's is:
  //!         AllToAll, and AllGather on Host), a communicator or CUDA failure. Invalid ids cannot
  //!         come from the router.
  template <class L, float_element T>
  void forward(Context context, MatrixView<L> router_logits, std::type_identity_t<MatrixView<T const>> x,
               MatrixView<T> y, Workspace workspace) {
    Range<detail::LayerStage::kForward> const range;
    Stream const stream = Exec::stream(context, "forward");
    using Logit = std::remove_const_t<L>;
    static_assert(detail::router_logit<Logit>, "epx: router logits are float or epx::bfloat16");
    detail::check_matrix("forward", "router_logits", MatrixView<Logit const>(router_logits), x.rows,
                         config_.router.num_experts);
    run<T>(stream, x, y, workspace, [&](Parts<T> const& parts, std::int64_t num_tokens) {
      MatrixView<std::int32_t> ids(parts.topk_ids.data(), num_tokens, config_.router.top_k);
      MatrixView<float> weights(parts.topk_weights.data(), num_tokens, config_.router.top_k);
      route(stream, config_.router, MatrixView<Logit const>(router_logits), config_.correction_bias, ids, weights);
      return Routing{ids, weights};
    });
  }

  //! @brief Forward from caller-given routing, read in place (any leading dimension).
  //! @param[in]  topk_ids      [num_tokens, top_k] global expert ids; -1 = no expert
  //! @param[in]  topk_weights  [num_tokens, top_k], used as given (not renormalised or scaled)
  //! Other parameters as the router-logits overload.
  //! @throws as the router-logits overload; and with AllToAll and InvalidIds::kThrow,
  //!         Errc::kInvalidExpertId after the collectives on the rank whose ids were invalid (the
  //!         output is written without those slots). AllGather counts them for status().
  template <float_element T>
  void forward(Context context, MatrixView<std::int32_t const> topk_ids, MatrixView<float const> topk_weights,
               std::type_identity_t<MatrixView<T const>> x, MatrixView<T> y, Workspace workspace) {
    Range<detail::LayerStage::kForward> const range;
    Stream const stream = Exec::stream(context, "forward");
    detail::check_matrix("forward", "topk_ids", topk_ids, x.rows, config_.router.top_k);
    detail::check_matrix("forward", "topk_weights", topk_weights, x.rows, config_.router.top_k);
    run<T>(stream, x, y, workspace, [&](Parts<T> const& parts, std::int64_t) {
      Exec::record_first_invalid(stream, topk_ids, config_.router.num_experts,
                                 &detail::forward_control(parts.control)->first_invalid);
      return Routing{topk_ids, topk_weights};
    });
  }

  //! @brief The routing counters of the last forward (all zeros before the first).
  //! AllToAll: read during forward; no work. AllGather: read from the last forward's workspace
  //! by the first call after it (on Cuda one device->host copy and a Communicator::wait(context),
  //! so call it on the forward's stream, or one ordered after it, before that workspace is reused).
  //! @throws Error(Errc::kInvalidExpertId) under InvalidIds::kThrow when the counters hold invalid
  //!         ids that no forward or status call has raised yet (AllGather: every rank that held them)
  [[nodiscard]] Status status(Context context) {
    Stream const stream = Exec::stream(context, "status");
    if (!unread_control_.empty()) {
      auto const host = exec_.read_to_host(stream, *comm_, unread_control_);
      last_ = detail::read_forward_control(host);
      unread_control_ = {};
    }
    raise_invalid_ids("status");
    return last_.status;
  }

 private:
  struct Routing {
    MatrixView<std::int32_t const> ids;
    MatrixView<float const> weights;
  };

  template <class T>
  using Buffers = typename DispatchPart::template Buffers<T>;

  // The one layout of the workspace, for a capacity of M tokens per rank.
  template <class T>
  struct Parts {
    std::span<std::int32_t> topk_ids;  // [M, k] routing from logits
    std::span<float> topk_weights;     // [M, k]
    Workspace plan;                    // the plan's own layout
    std::span<std::int64_t> control;   // ForwardControl, then the gathered count table [R, table width]
    std::span<T> x_perm;               // [M * k, H] this rank's rows in plan order
    Buffers<T> dispatch;               // the dispatch part's own
    std::span<T> x_local;              // [M * rows_per_token, H] the experts' rows
    Workspace experts;                 // the expert part's scratch
  };

  // Every part's checks, in can_implement's order; returns the configuration with its placement.
  static MoeConfig implementable(MoeConfig const& config, Communicator const& comm) {
    MoeConfig resolved = detail::resolve(config, comm);
    Exec::check_communicator(comm);
    ExpertPart::check(resolved);
    return resolved;
  }

  [[nodiscard]] std::int64_t rows_per_token() const {
    return DispatchPart::rows_per_token(comm_->size(), config_.router.top_k);
  }

  // The largest max_tokens whose rows (max_tokens * rows_per_token) fit an int32 index.
  [[nodiscard]] std::int64_t max_tokens_limit() const {
    return (std::int64_t{std::numeric_limits<std::int32_t>::max()} - 1) / std::max<std::int64_t>(1, rows_per_token());
  }

  [[nodiscard]] std::size_t control_words() const {
    return detail::kControlWords + static_cast<std::size_t>(comm_->size()) *
                                       DispatchPart::table_width(config_.router.num_experts, Exec::kSynchronous);
  }

  [[nodiscard]] std::size_t upload_bytes() const {
    return DispatchPart::upload_bytes(local_experts().count, comm_->size());
  }

  [[nodiscard]] ExpertRange plan_experts() const { return DispatchPart::plan_experts(config_, local_experts()); }

  [[nodiscard]] std::size_t plan_bytes(std::int64_t max_tokens) const {
    return Exec::plan_workspace_bytes(static_cast<std::int32_t>(max_tokens), config_.router.top_k,
                                      plan_experts().count);
  }

  template <class T, class Carver>
  Parts<T> carve(Carver& c, std::int64_t max_tokens, std::size_t plan_bytes) const {
    detail::LayerShape const shape{.max_tokens = static_cast<std::size_t>(max_tokens),
                                   .top_k = static_cast<std::size_t>(config_.router.top_k),
                                   .hidden = static_cast<std::size_t>(config_.mlp.hidden),
                                   .num_ranks = static_cast<std::size_t>(comm_->size()),
                                   .num_experts = config_.router.num_experts,
                                   .num_local_experts = local_experts().count,
                                   .synchronous = Exec::kSynchronous};
    std::size_t const slots = shape.max_tokens * shape.top_k;
    std::size_t const expert_rows = shape.max_tokens * static_cast<std::size_t>(rows_per_token());
    Parts<T> p;
    p.topk_ids = c.template take<std::int32_t>(slots);
    p.topk_weights = c.template take<float>(slots);
    p.plan = detail::take_workspace(c, plan_bytes);
    p.control = c.template take<std::int64_t>(control_words());
    p.x_perm = c.template take<T>(slots * shape.hidden);
    p.dispatch = DispatchPart::template carve<T>(c, shape);
    p.x_local = c.template take<T>(expert_rows * shape.hidden);
    p.experts = detail::take_workspace(
        c, experts_.template workspace_bytes<T>(config_.mlp, static_cast<std::int64_t>(expert_rows)));
    return p;
  }

  template <class T>
  std::size_t layout_bytes(std::int64_t max_tokens) const {
    std::size_t const plan = plan_bytes(max_tokens);
    return detail::layout_bytes([&](auto& c) { return carve<T>(c, max_tokens, plan); });
  }

  // The tokens this workspace holds: the largest M with layout_bytes(M) <= workspace.size(), by
  // binary search (sizing is monotone in M). Cached per size: on Cuda each probe asks CUB.
  template <class T>
  std::int64_t capacity_tokens(Workspace workspace) {
    if (workspace.size() == capacity_.bytes && capacity_.tokens >= 0) return capacity_.tokens;
    if (layout_bytes<T>(0) > workspace.size())
      detail::throw_error(Errc::kWorkspaceTooSmall,
                          fmt::format("forward: workspace.size() = {} bytes, expected at least {} bytes "
                                      "(workspace_bytes(0); ask workspace_bytes(max_tokens))",
                                      workspace.size(), layout_bytes<T>(0)));
    std::int64_t lo = 0, hi = max_tokens_limit();
    while (lo < hi) {
      std::int64_t const mid = lo + (hi - lo + 1) / 2;
      if (layout_bytes<T>(mid) <= workspace.size())
        lo = mid;
      else
        hi = mid - 1;
    }
    capacity_ = {.bytes = workspace.size(), .tokens = lo};
    return lo;
  }

  // Both forwards: `make_routing(parts, num_tokens)` produces this rank's routing (when its tokens
  // fit its workspace) and returns the views the plan and unpermute read.
  template <class T, class MakeRouting>
  void run(Stream stream, MatrixView<T const> x, MatrixView<T> y, Workspace workspace, MakeRouting&& make_routing) {
    detail::require(config_.weights.dtype == dtype_of_v<T>, Errc::kInvalidArgument, "forward", "x's element type",
                    dtype_of_v<T>, fmt::format("the weights' dtype {}", config_.weights.dtype));
    detail::check_matrix("forward", "x", x, -1, config_.mlp.hidden);
    detail::check_matrix("forward", "y", y, x.rows, config_.mlp.hidden);
    std::int64_t const num_tokens = x.rows, capacity = capacity_tokens<T>(workspace);
    std::size_t const plan_workspace = plan_bytes(capacity);
    Parts<T> const parts =
        detail::carve_layout(workspace, "forward", [&](auto& c) { return carve<T>(c, capacity, plan_workspace); });
    // Fresh counters: whatever an earlier forward left unread is gone with its workspace's reuse.
    detail::ForwardControl* const control = detail::forward_control(parts.control);
    Exec::reset_control(stream, control);
    last_ = {};
    unread_control_ = {};
    reported_ = false;
    bool const fits = num_tokens <= capacity;
    detail::ForwardStep<Exec, T, Buffers<T>> const step{
        .exec = exec_,
        .stream = stream,
        .comm = *comm_,
        .config = config_,
        .num_tokens = num_tokens,
        .capacity = capacity,
        .control = parts.control,
        .buffers = parts.dispatch,
        .x_perm = MatrixView<T>(parts.x_perm.data(), fits ? num_tokens * config_.router.top_k : 0, config_.mlp.hidden),
        .x_local = parts.x_local};
    DispatchPart::admit(step);
    // 1. This rank's routing, its slots sorted by expert, its rows gathered in that order. A rank
    //    whose tokens do not fit does none of it: its dispatch part makes every rank throw.
    RoutingPlan plan;
    Routing routing;
    if (fits) {
      routing = make_routing(parts, num_tokens);
      plan = Exec::make_plan(stream, routing.ids, config_.router.num_experts, plan_experts(), parts.plan,
                             &control->status);
      permute(stream, plan, x, step.x_perm);
    }
    // 2. Rows to the experts; 3. the experts; 4. rows back to their tokens, weighted and summed.
    auto const handle = DispatchPart::dispatch(step, plan, fits);
    if (config_.weights.num_local_experts > 0)
      experts_.template run<T>(stream, config_.mlp, config_.weights, handle.rows.in, handle.rows.offsets,
                               handle.rows.out, parts.experts, handle.rows.rows_hint);
    DispatchPart::combine(step, handle, plan, routing.weights, y);
    // 5. The counters: raised now if the dispatch read them (every collective is behind us),
    //    else left where the work ran, for status().
    if (handle.counters) {
      last_ = *handle.counters;
      raise_invalid_ids("forward");
    } else {
      unread_control_ = parts.control.first(detail::kControlWords);
    }
  }

  // InvalidIds::kThrow: the Error, once per forward, by whichever of forward and status reads the
  // counters first.
  void raise_invalid_ids(std::string_view where) {
    if (reported_ || last_.status.invalid_ids == 0 || config_.on_invalid_ids != InvalidIds::kThrow) return;
    reported_ = true;
    detail::throw_invalid_ids(where, comm_->rank(), last_.status.invalid_ids,
                              detail::invalid_id_site(last_.first_invalid, config_.router.top_k),
                              config_.router.num_experts);
  }

  MoeConfig config_;
  Communicator* comm_;
  Exec exec_;
  ExpertPart experts_{};
  struct Capacity {
    std::size_t bytes = 0;     // of the workspace last sized
    std::int64_t tokens = -1;  // what it holds; -1: none sized yet
  } capacity_;
  detail::ForwardControl last_{};                 // the last forward's counters, once read
  std::span<std::int64_t const> unread_control_;  // AllGather: where they are until status() reads them
  bool reported_ = false;                         // their invalid ids have been raised
};

}  // namespace epx
