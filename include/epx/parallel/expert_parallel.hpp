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
#include <epx/gemm/expert_mlp.hpp>
#include <epx/parallel/dispatch.hpp>
#include <epx/parallel/execution.hpp>
#include <epx/parallel/forward_control.hpp>
#include <epx/parallel/moe_config.hpp>
#include <epx/parallel/tags.hpp>
#include <epx/router/router.hpp>

#include <algorithm>
#include <atomic>
#include <cstring>
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

//! An expert part that has a backward (Host's Grouped; Cuda's Grouped and CutlassGrouped). `run`
//! may change the part (Grouped on Cuda records the kernel it picked), as expert_part's does.
template <class Part, class Stream>
concept expert_part_backward = requires(Part& part, Part const& cpart, Stream stream, ExpertMlpConfig const& mlp,
                                        ExpertWeights const& weights, MatrixView<float const> x,
                                        std::span<std::int32_t const> offsets, MatrixView<float> dx,
                                        ExpertWeightGrads<float> const& grads, Workspace ws, std::int64_t rows) {
  { cpart.template backward_workspace_bytes<float>(mlp, 1, rows) } -> std::same_as<std::size_t>;
  { cpart.template backward_workspace_bytes<float>(mlp, 1, rows, true) } -> std::same_as<std::size_t>;
  cpart.template backward<float, float>(stream, mlp, weights, x, offsets, MatrixView<float const>(dx), dx, grads, ws);
  // MoeConfig::save_gate_up_output: a forward that keeps h, a backward from the h it kept
  part.template run<float>(stream, mlp, weights, x, offsets, dx, ws, rows, dx);
  cpart.template backward<float, float>(stream, mlp, weights, x, offsets, x, MatrixView<float const>(dx), dx, grads,
                                        ws);
};

//! The words a training forward writes at the start of its saved memory, checked by backward.
struct SavedHeader {  // five words: read back through the control block's host mirror (its size)
  static constexpr std::int64_t kMagic = 0x4445564153585045;  // "EPXSAVED", little-endian
  std::int64_t magic = 0;                                     // kMagic once the forward completed
  std::int64_t layer = 0;                                     // the ExpertParallel object's id
  std::int64_t num_tokens = 0;
  std::int64_t capacity = 0;  // the tokens the forward's layout was carved for
  std::int64_t dtype = 0;
};
static_assert(sizeof(SavedHeader) <= kControlWords * sizeof(std::int64_t) && std::is_trivially_copyable_v<SavedHeader>,
              "backward reads the header through the control block's host mirror");
inline constexpr std::size_t kSavedHeaderWords = sizeof(SavedHeader) / sizeof(std::int64_t);

//! A process-wide id for each ExpertParallel object: what ties saved memory to its layer.
inline std::int64_t next_layer_id() noexcept {
  static std::atomic<std::int64_t> next{1};
  return next.fetch_add(1, std::memory_order_relaxed);
}

}  // namespace detail

//! The routing a training forward kept: [num_tokens, top_k] ids and weights.
struct SavedRouting {
  MatrixView<std::int32_t const> topk_ids;
  MatrixView<float const> topk_weights;
};

//! @brief Caller-owned memory (the space's) in which a training forward keeps what its backward
//! reads: its routing, its count table and its rows. Sized by ExpertParallel::saved_bytes; one per
//! forward whose backward is still to come. A type of its own, so that it cannot be passed where
//! the workspace goes.
class SavedState {
 public:
  SavedState() = default;
  SavedState(void* data, std::size_t bytes) noexcept : data_(data), bytes_(bytes) {}
  [[nodiscard]] Workspace memory() const noexcept { return {data_, bytes_}; }

 private:
  void* data_ = nullptr;
  std::size_t bytes_ = 0;
};

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

  //! Whether this layer has a backward: Grouped (Host and Cuda) and CutlassGrouped; not CublasGrouped.
  static constexpr bool kHasBackward = detail::expert_part_backward<ExpertPart, Stream>;

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

  //! @brief The expert kernel the last forward ran: "host" (the reference loops), "epx" (epx's own
  //! grouped GEMM), "cutlass" (CUTLASS's Hopper grouped GEMM) or "cublas"; "none" for Grouped on
  //! Cuda before its first forward. Grouped picks per forward (cuda/grouped_experts.cuh).
  [[nodiscard]] std::string_view expert_kernel() const noexcept { return experts_.kernel_name(); }
  [[nodiscard]] ExpertRange local_experts() const { return config_.placement.local_range(comm_->rank()); }

  //! Workspace bytes (the space's memory) for forward calls of up to `max_tokens` tokens on every
  //! rank of the group: routing, plan, control block, permuted rows, the dispatch part's buffers
  //! (AllToAll: for the dropless worst case, every token of every rank on this rank's experts, or
  //! MoeConfig::received_rows_factor even shares of max_tokens * top_k rows) and
  //! the experts' scratch. Host arithmetic, no allocation, no synchronisation; on Cuda it includes
  //! CUB's size query, which reads the current device's properties: call it with the device of
  //! forward current. With AllToAll, `max_tokens` must bound every rank's num_tokens.
  [[nodiscard]] std::size_t workspace_bytes(std::int64_t max_tokens) const {
    check_max_tokens("workspace_bytes", max_tokens);
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
    forward_from_logits<L, T>(context, router_logits, x, y, workspace, nullptr);
  }

  //! @brief Forward from router logits, keeping in `saved` what backward needs (training).
  //! @param[out] saved  at least saved_bytes(num_tokens) bytes of the space's memory; holds this
  //!                    forward's routing, count table and rows until its backward has run
  //! Other parameters as the overload without `saved`. The tokens a forward takes are the fewer of
  //! what the workspace and what `saved` hold.
  template <class L, float_element T>
  requires kHasBackward void forward(Context context, MatrixView<L> router_logits,
                                     std::type_identity_t<MatrixView<T const>> x, MatrixView<T> y, Workspace workspace,
                                     SavedState saved) {
    forward_from_logits<L, T>(context, router_logits, x, y, workspace, &saved);
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
    forward_from_ids<T>(context, topk_ids, topk_weights, x, y, workspace, nullptr);
  }

  //! @brief Forward from caller-given routing, keeping in `saved` what backward needs (a copy of
  //! the routing among it). Parameters as the overloads above.
  template <float_element T>
  requires kHasBackward void forward(Context context, MatrixView<std::int32_t const> topk_ids,
                                     MatrixView<float const> topk_weights, std::type_identity_t<MatrixView<T const>> x,
                                     MatrixView<T> y, Workspace workspace, SavedState saved) {
    forward_from_ids<T>(context, topk_ids, topk_weights, x, y, workspace, &saved);
  }

  //! Bytes of SavedState for training forwards of up to `max_tokens` tokens on every rank: the
  //! routing (8 * top_k per token), the control block and count table, this rank's slot rows
  //! (top_k * hidden elements per token: each slot's expert result) and the experts' input rows
  //! (AllToAll: ranks * top_k * hidden elements per token, forward's dropless worst case, or
  //! received_rows_factor * top_k * hidden; AllGather: top_k * hidden). GEMM 1's output is kept
  //! only with MoeConfig::save_gate_up_output (then fp32 gate_up_rows per expert row more);
  //! otherwise backward recomputes it (one GEMM, two thirds of the experts' forward flops when gated). Host
  //! arithmetic.
  [[nodiscard]] std::size_t saved_bytes(std::int64_t max_tokens) const {
    check_max_tokens("saved_bytes", max_tokens);
    return detail::dispatch_on_dtype(config_.weights.dtype, [&]<class T>(T*) {
      return detail::layout_bytes([&](auto& c) { return carve_kept<T>(c, max_tokens, true); });
    });
  }

  //! Workspace bytes of backward for up to `max_tokens` tokens on every rank (sized for fp32
  //! gradients, so that either gradient type fits): the plan, the gradient rows of the slots and
  //! of the dispatch (AllToAll: two sets of forward's received rows), the experts' backward scratch
  //! (GEMM 1's output recomputed, fp32; not with save_gate_up_output, whose forward kept it). Host
  //! arithmetic.
  [[nodiscard]] std::size_t backward_workspace_bytes(std::int64_t max_tokens) const requires kHasBackward {
    check_max_tokens("backward_workspace_bytes", max_tokens);
    return detail::dispatch_on_dtype(config_.weights.dtype, [&]<class T>(T*) {
      std::size_t const plan = plan_bytes(max_tokens);
      return detail::layout_bytes([&](auto& c) { return carve_backward<T, float>(c, max_tokens, plan); });
    });
  }

  //! The routing a training forward kept in `saved`: views of its memory (the space's), valid while
  //! `saved` is — what router_losses and expert_token_counts take (a forward from logits returns
  //! no routing otherwise). @throws Error as backward for a `saved` without a completed forward.
  [[nodiscard]] SavedRouting saved_routing(Context context, SavedState saved) requires kHasBackward {
    Stream const stream = Exec::stream(context, "saved_routing");
    return detail::dispatch_on_dtype(config_.weights.dtype, [&]<class T>(T*) {
      auto const header = read_saved_header<T>(stream, saved.memory(), -1);
      Kept<T> const kept = detail::carve_layout(saved.memory(), "saved_routing",
                                                [&](auto& c) { return carve_kept<T>(c, header.capacity, true); });
      return SavedRouting{
          .topk_ids = MatrixView<std::int32_t const>(kept.topk_ids.data(), header.num_tokens, config_.router.top_k),
          .topk_weights = MatrixView<float const>(kept.topk_weights.data(), header.num_tokens, config_.router.top_k)};
    });
  }

  //! @brief Backward of a forward from router logits: dx, the logits' gradient and this rank's
  //! experts' weight gradients, from dy and what that forward kept in `saved`.
  //! @param[in]  context        as forward's
  //! @param[in]  router_logits  [num_tokens, num_experts] the forward's logits, unchanged
  //! @param[in]  dy             [num_tokens, hidden] dL/dy, of type G: fp32 or the weights' type
  //! @param[out] dx             [num_tokens, hidden] dL/dx, every row written
  //! @param[out] d_logits       [num_tokens, num_experts] fp32, **written** (route_backward's
  //!                            contract); router losses add into it afterwards (router_losses)
  //! @param[out] grads          this rank's experts' weight (and bias, where not null) gradients,
  //!                            written; zeros for an expert without rows
  //! @param[in]  saved          what the forward kept (SavedState of a forward of this layer)
  //! @param[in]  workspace      at least backward_workspace_bytes(max_tokens) bytes
  //! @throws Error on shapes, a `saved` no forward of this layer completed, a dy whose rows are not
  //!         that forward's tokens, a workspace too small; communicator failures. Collective: every
  //!         rank of the group calls it, in the order of its forwards' backwards.
  template <class L, float_element G>
  requires kHasBackward void backward(Context context, MatrixView<L> router_logits, MatrixView<G const> dy,
                                      MatrixView<G> dx, MatrixView<float> d_logits, ExpertWeightGrads<G> const& grads,
                                      SavedState saved, Workspace workspace) {
    Stream const stream = Exec::stream(context, "backward");
    using Logit = std::remove_const_t<L>;
    static_assert(detail::router_logit<Logit>, "epx: router logits are float or epx::bfloat16");
    detail::check_matrix("backward", "router_logits", MatrixView<Logit const>(router_logits), dy.rows,
                         config_.router.num_experts);
    detail::check_matrix("backward", "d_logits", MatrixView<float const>(d_logits), dy.rows,
                         config_.router.num_experts);
    run_backward<G>(stream, dy, dx, std::nullopt, grads, saved, workspace,
                    [&](MatrixView<std::int32_t const> ids, MatrixView<float const> d_topk_weights, Status* status) {
                      Exec::route_backward(stream, config_.router, MatrixView<Logit const>(router_logits), ids,
                                           d_topk_weights, d_logits, status);
                    });
  }

  //! @brief Backward of a forward from caller-given routing: dx, the gradient of topk_weights
  //! ([num_tokens, top_k] fp32, written; 0 for a slot without an expert or with an invalid id),
  //! and this rank's experts' weight gradients. Other parameters as the overload above.
  template <float_element G>
  requires kHasBackward void backward(Context context, MatrixView<G const> dy, MatrixView<G> dx,
                                      MatrixView<float> d_topk_weights, ExpertWeightGrads<G> const& grads,
                                      SavedState saved, Workspace workspace) {
    Stream const stream = Exec::stream(context, "backward");
    detail::check_matrix("backward", "d_topk_weights", MatrixView<float const>(d_topk_weights), dy.rows,
                         config_.router.top_k);
    run_backward<G>(stream, dy, dx, d_topk_weights, grads, saved, workspace,
                    [](MatrixView<std::int32_t const>, MatrixView<float const>, Status*) {});
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
  template <class L, float_element T>
  void forward_from_logits(Context context, MatrixView<L> router_logits, MatrixView<T const> x, MatrixView<T> y,
                           Workspace workspace, SavedState const* saved) {
    Range<detail::LayerStage::kForward> const range;
    Stream const stream = Exec::stream(context, "forward");
    using Logit = std::remove_const_t<L>;
    static_assert(detail::router_logit<Logit>, "epx: router logits are float or epx::bfloat16");
    detail::check_matrix("forward", "router_logits", MatrixView<Logit const>(router_logits), x.rows,
                         config_.router.num_experts);
    run<T>(stream, x, y, workspace, saved, [&](Parts<T> const& parts, std::int64_t num_tokens) {
      MatrixView<std::int32_t> ids(parts.kept.topk_ids.data(), num_tokens, config_.router.top_k);
      MatrixView<float> weights(parts.kept.topk_weights.data(), num_tokens, config_.router.top_k);
      route(stream, config_.router, MatrixView<Logit const>(router_logits), config_.correction_bias, ids, weights);
      return Routing{ids, weights};
    });
  }

  template <float_element T>
  void forward_from_ids(Context context, MatrixView<std::int32_t const> topk_ids, MatrixView<float const> topk_weights,
                        MatrixView<T const> x, MatrixView<T> y, Workspace workspace, SavedState const* saved) {
    Range<detail::LayerStage::kForward> const range;
    Stream const stream = Exec::stream(context, "forward");
    detail::check_matrix("forward", "topk_ids", topk_ids, x.rows, config_.router.top_k);
    detail::check_matrix("forward", "topk_weights", topk_weights, x.rows, config_.router.top_k);
    run<T>(stream, x, y, workspace, saved, [&](Parts<T> const& parts, std::int64_t num_tokens) {
      Exec::record_first_invalid(stream, topk_ids, config_.router.num_experts,
                                 &detail::forward_control(parts.kept.control)->first_invalid);
      if constexpr (kHasBackward) {
        if (saved != nullptr) {  // training: backward reads the routing from `saved`, not the caller's views
          MatrixView<std::int32_t> ids(parts.kept.topk_ids.data(), num_tokens, config_.router.top_k);
          MatrixView<float> weights(parts.kept.topk_weights.data(), num_tokens, config_.router.top_k);
          Exec::copy(stream, topk_ids, ids);
          Exec::copy(stream, topk_weights, weights);
          return Routing{ids, weights};
        }
      }
      return Routing{topk_ids, topk_weights};
    });
  }

  struct Routing {
    MatrixView<std::int32_t const> ids;
    MatrixView<float const> weights;
  };

  template <class T>
  using Buffers = typename DispatchPart::template Buffers<T>;

  // The parts of a forward that its backward reads: in the workspace, or in SavedState (training).
  template <class T>
  struct Kept {
    std::span<std::int64_t> header;    // SavedState only: detail::SavedHeader
    std::span<std::int32_t> topk_ids;  // [M, k] routing from logits (and, training, a copy of given routing)
    std::span<float> topk_weights;     // [M, k]
    std::span<std::int64_t> control;   // ForwardControl, then the gathered count table [R, table width]
    std::span<T> x_perm;               // [M * k, H] this rank's rows in plan order (AllToAll: then their results)
    std::span<T> x_local;  // [M * rows_per_token, H] the experts' rows (AllToAll: inputs; AllGather: results)
    std::span<float> h;    // SavedState with save_gate_up_output: [expert rows, gate_up_rows] GEMM 1's output
  };

  // The one layout of the workspace, for a capacity of M tokens per rank.
  template <class T>
  struct Parts {
    Kept<T> kept;               // in the workspace, or views of SavedState
    Workspace plan;             // the plan's own layout
    Buffers<T> dispatch;        // the dispatch part's own
    std::span<T> combine_rows;  // where AllToAll regroups results: kept.x_local, or its own rows (training)
    Workspace experts;          // the expert part's scratch
  };

  template <class G>
  using BackwardBuffers = typename DispatchPart::template BackwardBuffers<G>;

  // The layout of backward's workspace, for a capacity of M tokens per rank.
  template <class G>
  struct BackwardParts {
    Workspace plan;                   // the plan, made again from the saved routing
    std::span<std::int64_t> control;  // make_plan's counters (not reported)
    std::span<float> d_topk_weights;  // [M, k] the router-logits overload's
    std::span<G> d_perm;              // [M * k, H] gradient rows of this rank's slots
    BackwardBuffers<G> dispatch;      // the dispatch part's own
    Workspace experts;                // the expert part's backward scratch
  };

  // Every part's checks, in can_implement's order; returns the configuration with its placement.
  static MoeConfig implementable(MoeConfig const& config, Communicator const& comm) {
    MoeConfig resolved = detail::resolve(config, comm);
    Exec::check_communicator(comm);
    ExpertPart::check(resolved);
    return resolved;
  }

  void check_max_tokens(std::string_view where, std::int64_t max_tokens) const {
    detail::require(max_tokens >= 0 && max_tokens <= max_tokens_limit(), Errc::kInvalidArgument, where, "max_tokens",
                    max_tokens,
                    fmt::format(">= 0 with max_tokens * {} ({}) < 2^31 - 1 (the rows a rank may hold are indexed "
                                "with int32)",
                                DispatchPart::kRowsPerTokenText, rows_per_token()));
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

  [[nodiscard]] detail::LayerShape shape(std::int64_t max_tokens) const {
    return {.max_tokens = static_cast<std::size_t>(max_tokens),
            .top_k = static_cast<std::size_t>(config_.router.top_k),
            .hidden = static_cast<std::size_t>(config_.mlp.hidden),
            .num_ranks = static_cast<std::size_t>(comm_->size()),
            .num_experts = config_.router.num_experts,
            .num_local_experts = local_experts().count,
            .expert_rows = expert_rows(max_tokens),
            .synchronous = Exec::kSynchronous};
  }

  // Training forwards keep GEMM 1's output in SavedState (MoeConfig::save_gate_up_output).
  [[nodiscard]] bool saves_gate_up_output() const noexcept { return kHasBackward && config_.save_gate_up_output; }

  // The rows a capacity of max_tokens holds for the experts (AllToAll: received_rows_factor's).
  [[nodiscard]] std::size_t expert_rows(std::int64_t max_tokens) const {
    return static_cast<std::size_t>(DispatchPart::expert_rows(config_, comm_->size(), max_tokens));
  }

  template <class T, class Carver>
  Kept<T> carve_kept(Carver& c, std::int64_t max_tokens, bool with_header) const {
    auto const slots = static_cast<std::size_t>(max_tokens) * static_cast<std::size_t>(config_.router.top_k);
    auto const hidden = static_cast<std::size_t>(config_.mlp.hidden);
    Kept<T> k;
    if (with_header) k.header = c.template take<std::int64_t>(detail::kSavedHeaderWords);
    k.topk_ids = c.template take<std::int32_t>(slots);
    k.topk_weights = c.template take<float>(slots);
    k.control = c.template take<std::int64_t>(control_words());
    k.x_perm = c.template take<T>(slots * hidden);
    k.x_local = c.template take<T>(expert_rows(max_tokens) * hidden);
    if (with_header && saves_gate_up_output())
      k.h = c.template take<float>(expert_rows(max_tokens) * static_cast<std::size_t>(config_.mlp.gate_up_rows()));
    return k;
  }

  // `kept`: the views of SavedState (training), or nullptr to carve those parts here too.
  template <class T, class Carver>
  Parts<T> carve(Carver& c, std::int64_t max_tokens, std::size_t plan_bytes, Kept<T> const* kept) const {
    Parts<T> p;
    p.kept = kept != nullptr ? *kept : carve_kept<T>(c, max_tokens, false);
    p.plan = detail::take_workspace(c, plan_bytes);
    p.dispatch = DispatchPart::template carve<T>(c, shape(max_tokens));
    // Training keeps the experts' rows: AllToAll's combine regroups their results elsewhere.
    p.combine_rows = kept != nullptr && std::is_same_v<DispatchPart, detail::AllToAllPart>
                         ? c.template take<T>(expert_rows(max_tokens) * shape(max_tokens).hidden)
                         : p.kept.x_local;
    p.experts = detail::take_workspace(
        c, experts_.template workspace_bytes<T>(config_.mlp, config_.weights.num_local_experts,
                                                static_cast<std::int64_t>(expert_rows(max_tokens))));
    return p;
  }

  template <class T, class G, class Carver>
  BackwardParts<G> carve_backward(Carver& c, std::int64_t max_tokens, std::size_t plan_bytes) const {
    auto const slots = static_cast<std::size_t>(max_tokens) * static_cast<std::size_t>(config_.router.top_k);
    BackwardParts<G> p;
    p.plan = detail::take_workspace(c, plan_bytes);
    p.control = c.template take<std::int64_t>(detail::kControlWords);
    p.d_topk_weights = c.template take<float>(slots);
    p.d_perm = c.template take<G>(slots * static_cast<std::size_t>(config_.mlp.hidden));
    p.dispatch = DispatchPart::template carve_backward<G>(c, shape(max_tokens));
    p.experts =
        detail::take_workspace(c, experts_.template backward_workspace_bytes<T>(
                                      config_.mlp, config_.weights.num_local_experts,
                                      static_cast<std::int64_t>(expert_rows(max_tokens)), saves_gate_up_output()));
    return p;
  }

  template <class T>
  std::size_t layout_bytes(std::int64_t max_tokens) const {
    std::size_t const plan = plan_bytes(max_tokens);
    return detail::layout_bytes([&](auto& c) { return carve<T>(c, max_tokens, plan, nullptr); });
  }

  // The largest M in [0, max_tokens_limit()] with bytes_for(M) <= bytes (bytes_for is monotone).
  template <class BytesFor>
  std::int64_t largest_fitting(std::size_t bytes, BytesFor&& bytes_for) const {
    std::int64_t lo = 0, hi = max_tokens_limit();
    while (lo < hi) {
      std::int64_t const mid = lo + (hi - lo + 1) / 2;
      if (bytes_for(mid) <= bytes)
        lo = mid;
      else
        hi = mid - 1;
    }
    return lo;
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
    std::int64_t const tokens = largest_fitting(workspace.size(), [&](std::int64_t m) { return layout_bytes<T>(m); });
    capacity_ = {.bytes = workspace.size(), .tokens = tokens};
    return tokens;
  }

  // The tokens a SavedState holds (host arithmetic only: no cache needed).
  template <class T>
  std::int64_t saved_capacity(Workspace saved) const {
    auto const bytes_for = [&](std::int64_t m) {
      return detail::layout_bytes([&](auto& c) { return carve_kept<T>(c, m, true); });
    };
    if (bytes_for(0) > saved.size())
      detail::throw_error(Errc::kWorkspaceTooSmall,
                          fmt::format("forward: saved.size() = {} bytes, expected at least {} bytes (saved_bytes(0); "
                                      "ask saved_bytes(max_tokens))",
                                      saved.size(), bytes_for(0)));
    return largest_fitting(saved.size(), bytes_for);
  }

  // Both forwards: `make_routing(parts, num_tokens)` produces this rank's routing (when its tokens
  // fit its workspace) and returns the views the plan and unpermute read.
  template <class T, class MakeRouting>
  void run(Stream stream, MatrixView<T const> x, MatrixView<T> y, Workspace workspace, SavedState const* saved,
           MakeRouting&& make_routing) {
    detail::require(config_.weights.dtype == dtype_of_v<T>, Errc::kInvalidArgument, "forward", "x's element type",
                    dtype_of_v<T>, fmt::format("the weights' dtype {}", config_.weights.dtype));
    detail::check_matrix("forward", "x", x, -1, config_.mlp.hidden);
    detail::check_matrix("forward", "y", y, x.rows, config_.mlp.hidden);
    std::int64_t const num_tokens = x.rows;
    // Training: `saved` is marked incomplete first, so that a forward that throws leaves none behind.
    if (saved != nullptr) {
      auto const header = saved_header_words<T>(saved->memory());
      if (!header.empty()) write_saved_header(stream, header, {});
    }
    std::int64_t capacity = capacity_tokens<T>(workspace);
    // Training: the kept parts in `saved`, marked incomplete until this forward has finished.
    std::optional<Kept<T>> kept;
    if (saved != nullptr) {
      capacity = std::min(capacity, saved_capacity<T>(saved->memory()));
      kept =
          detail::carve_layout(saved->memory(), "forward", [&](auto& c) { return carve_kept<T>(c, capacity, true); });
    }
    std::size_t const plan_workspace = plan_bytes(capacity);
    Parts<T> const parts = detail::carve_layout(
        workspace, "forward", [&](auto& c) { return carve<T>(c, capacity, plan_workspace, kept ? &*kept : nullptr); });
    // Fresh counters: whatever an earlier forward left unread is gone with its workspace's reuse.
    detail::ForwardControl* const control = detail::forward_control(parts.kept.control);
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
        .capacity_rows = static_cast<std::int64_t>(expert_rows(capacity)),
        .control = parts.kept.control,
        .buffers = parts.dispatch,
        .x_perm =
            MatrixView<T>(parts.kept.x_perm.data(), fits ? num_tokens * config_.router.top_k : 0, config_.mlp.hidden),
        .x_local = parts.kept.x_local,
        .combine_rows = parts.combine_rows};
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
    if (config_.weights.num_local_experts > 0) run_experts<T>(stream, handle.rows, parts.kept.h, parts.experts);
    DispatchPart::combine(step, handle, plan, routing.weights, y);
    // 5. Training: `saved` now holds a complete forward.
    if (kept)
      write_saved_header(stream, kept->header,
                         {.magic = detail::SavedHeader::kMagic,
                          .layer = layer_id_,
                          .num_tokens = num_tokens,
                          .capacity = capacity,
                          .dtype = static_cast<std::int64_t>(dtype_of_v<T>)});
    // 6. The counters: raised now if the dispatch read them (every collective is behind us),
    //    else left where the work ran, for status().
    if (handle.counters) {
      last_ = *handle.counters;
      raise_invalid_ids("forward");
    } else {
      unread_control_ = parts.kept.control.first(detail::kControlWords);
    }
  }

  // The local experts on `rows`; `h`: where a training forward keeps GEMM 1's output
  // (SavedState's part with save_gate_up_output), empty otherwise.
  template <class T>
  void run_experts(Stream stream, detail::ExpertRows<T> const& rows, std::span<float> h, Workspace ws) {
    if constexpr (kHasBackward) {
      if (!h.empty()) {
        experts_.template run<T>(stream, config_.mlp, config_.weights, rows.in, rows.offsets, rows.out, ws,
                                 rows.rows_hint, MatrixView<float>(h.data(), rows.in.rows, config_.mlp.gate_up_rows()));
        return;
      }
    }
    experts_.template run<T>(stream, config_.mlp, config_.weights, rows.in, rows.offsets, rows.out, ws, rows.rows_hint);
  }

  // Where the header of `saved` is (its first part, whatever the capacity), or empty when
  // `saved` cannot hold the smallest layout.
  template <class T>
  std::span<std::int64_t> saved_header_words(Workspace saved) const {
    auto const bytes = detail::layout_bytes([&](auto& c) { return carve_kept<T>(c, 0, true); });
    if (saved.data() == nullptr || saved.size() < bytes) return {};
    return detail::carve_layout(saved, "saved", [&](auto& c) { return carve_kept<T>(c, 0, true); }).header;
  }

  // In the order of the stream, without the execution's upload staging (whose one buffer a forward's
  // layout upload may still be reading from): the header's words travel by value.
  void write_saved_header(Stream stream, std::span<std::int64_t> words, detail::SavedHeader const& header) {
    Exec::write_header(stream, words, header);
  }

  // The header of `saved`, checked against this layer and dy: written by a completed forward of
  // this layer over dy.rows tokens (num_tokens < 0: any).
  template <class T>
  detail::SavedHeader read_saved_header(Stream stream, Workspace saved, std::int64_t num_tokens) {
    auto const header = saved_header_words<T>(saved);
    detail::require(!header.empty(), Errc::kInvalidArgument, "backward", "saved.size()", saved.size(),
                    fmt::format(">= {} bytes: the SavedState a forward of this layer wrote (saved_bytes)",
                                detail::layout_bytes([&](auto& c) { return carve_kept<T>(c, 0, true); })));
    auto const words = exec_.read_to_host(stream, *comm_, std::span<std::int64_t const>(header));
    detail::SavedHeader h;
    std::memcpy(static_cast<void*>(&h), words.data(), sizeof(h));  // trivially copyable
    if (h.magic != detail::SavedHeader::kMagic)
      detail::throw_error(Errc::kInvalidArgument,
                          "backward: saved holds no completed forward (a backward without a forward, a forward "
                          "that threw, or memory reused since): run forward(..., saved) first");
    if (h.layer != layer_id_)
      detail::throw_error(Errc::kInvalidArgument,
                          fmt::format("backward: saved was written by the forward of another layer (layer id {}, this "
                                      "layer's is {}): pass this layer's SavedState",
                                      h.layer, layer_id_));
    detail::require(num_tokens < 0 || h.num_tokens == num_tokens, Errc::kInvalidArgument, "backward", "dy.rows",
                    num_tokens, fmt::format("{} (the num_tokens of the forward that wrote saved)", h.num_tokens));
    return h;
  }

  // Both backwards: `router_backward(ids, d_topk_weights, status)` turns the weights' gradient into the
  // logits' (or nothing, when forward took the routing as given).
  template <class G, class RouterBackward>
  void run_backward(Stream stream, MatrixView<G const> dy, MatrixView<G> dx,
                    std::optional<MatrixView<float>> given_d_topk_weights, ExpertWeightGrads<G> const& grads,
                    SavedState saved, Workspace workspace, RouterBackward&& router_backward) {
    detail::check_matrix("backward", "dy", dy, -1, config_.mlp.hidden);
    detail::check_matrix("backward", "dx", MatrixView<G const>(dx), dy.rows, config_.mlp.hidden);
    detail::dispatch_on_dtype(config_.weights.dtype, [&]<class T>(T*) {
      if constexpr (!std::is_same_v<G, float> && !std::is_same_v<G, T>) {
        detail::throw_error(Errc::kInvalidArgument,
                            fmt::format("backward: dy's element type is {}, expected float or the weights' dtype {}",
                                        dtype_of_v<G>, config_.weights.dtype));
      } else {
        run_backward_typed<T, G>(stream, dy, dx, given_d_topk_weights, grads, saved, workspace, router_backward);
      }
    });
  }

  template <class T, class G, class RouterBackward>
  void run_backward_typed(Stream stream, MatrixView<G const> dy, MatrixView<G> dx,
                          std::optional<MatrixView<float>> given_d_topk_weights, ExpertWeightGrads<G> const& grads,
                          SavedState saved, Workspace workspace, RouterBackward& router_backward) {
    std::int64_t const num_tokens = dy.rows;
    auto const header = read_saved_header<T>(stream, saved.memory(), num_tokens);
    std::int64_t const capacity = header.capacity;
    Kept<T> const kept =
        detail::carve_layout(saved.memory(), "backward", [&](auto& c) { return carve_kept<T>(c, capacity, true); });
    std::size_t const plan_workspace = plan_bytes(capacity);
    BackwardParts<G> const parts = detail::carve_layout(
        workspace, "backward", [&](auto& c) { return carve_backward<T, G>(c, capacity, plan_workspace); });
    std::int32_t const top_k = config_.router.top_k;
    MatrixView<std::int32_t const> const ids(kept.topk_ids.data(), num_tokens, top_k);
    MatrixView<float const> const weights(kept.topk_weights.data(), num_tokens, top_k);
    MatrixView<float> const d_topk_weights = given_d_topk_weights
                                                 ? *given_d_topk_weights
                                                 : MatrixView<float>(parts.d_topk_weights.data(), num_tokens, top_k);
    // Forward's count table, on the host (AllToAll; a synchronous space reads it in place).
    auto const table =
        exec_.read_to_host(stream, *comm_, std::span<std::int64_t const>(kept.control)).subspan(detail::kControlWords);
    // The backward's own counters (the plan's and route_backward's; ids a forward wrote count none).
    Exec::reset_control(stream, detail::forward_control(parts.control));
    RoutingPlan const plan = Exec::make_plan(stream, ids, config_.router.num_experts, plan_experts(), parts.plan,
                                             &detail::forward_control(parts.control)->status);
    detail::BackwardStep<Exec, T, G, BackwardBuffers<G>> const step{.exec = exec_,
                                                                    .stream = stream,
                                                                    .comm = *comm_,
                                                                    .config = config_,
                                                                    .num_tokens = num_tokens,
                                                                    .table = table,
                                                                    .buffers = parts.dispatch,
                                                                    .x_perm = kept.x_perm,
                                                                    .x_local = kept.x_local,
                                                                    .d_perm = parts.d_perm};
    DispatchPart::backward(step, plan, weights, dy, dx, d_topk_weights,
                           [&](MatrixView<T const> rows, std::span<std::int32_t const> offsets,
                               MatrixView<G const> d_out, MatrixView<G> d_in) {
                             if (!kept.h.empty())  // forward kept GEMM 1's output: no recomputation
                               experts_.template backward<T, G>(
                                   stream, config_.mlp, config_.weights, rows, offsets,
                                   MatrixView<float const>(kept.h.data(), rows.rows, config_.mlp.gate_up_rows()), d_out,
                                   d_in, grads, parts.experts);
                             else
                               experts_.template backward<T, G>(stream, config_.mlp, config_.weights, rows, offsets,
                                                                d_out, d_in, grads, parts.experts);
                           });
    router_backward(ids, MatrixView<float const>(d_topk_weights), &detail::forward_control(parts.control)->status);
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
  std::int64_t layer_id_ = detail::next_layer_id();  // what ties a SavedState to this layer
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
