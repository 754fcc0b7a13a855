// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! The dispatch parts of ExpertParallel, AllToAll and AllGather. Each answers the same questions:
//! how many rows its buffers hold per token, which experts the plan sorts onto, which buffers it
//! takes from the workspace, and the three steps of a forward that are its own: `admit` (before
//! the routing), `dispatch` (rows to the experts; returns the handle that combine reuses) and
//! `combine` (expert rows back to their tokens). The same code on every execution space: what
//! differs is behind the space's LayerExecution (parallel/execution.hpp). The stage functions
//! (permute, unpermute, ...) are called unqualified: each space's overloads are found by
//! argument-dependent lookup where the layer is instantiated, whatever the include order.

#include <epx/core/math.hpp>
#include <epx/parallel/exchange_layout.hpp>
#include <epx/parallel/execution.hpp>
#include <epx/parallel/moe_config.hpp>
#include <epx/parallel/tags.hpp>
#include <epx/permute/permute.hpp>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <span>
#include <string_view>
#include <vector>

namespace epx::detail {

//! The sizes a layer's workspace is laid out from, for a capacity of max_tokens (M) tokens.
struct LayerShape {
  std::size_t max_tokens = 0;
  std::size_t top_k = 0;
  std::size_t hidden = 0;
  std::size_t num_ranks = 0;
  std::int32_t num_experts = 0;
  std::int32_t num_local_experts = 0;
  std::size_t expert_rows = 0;  //!< the rows held for the experts (the dispatch part's expert_rows)
  bool synchronous = false;     //!< the execution space's kSynchronous
};

//! The rows the experts run on: input rows grouped by local expert, their offsets (in the
//! execution's memory), the output rows, and the row count they are expected to hold in total.
template <class T>
struct ExpertRows {
  MatrixView<T const> in;
  std::span<std::int32_t const> offsets;  // [num_local_experts + 1]
  MatrixView<T> out;
  std::int64_t rows_hint = 0;
};

//! One forward, as its dispatch part sees it.
template <class E, class T, class Buffers>
struct ForwardStep {
  using Exec = E;
  using Element = T;

  E& exec;
  typename E::Stream stream;
  Communicator& comm;
  MoeConfig const& config;
  std::int64_t num_tokens = 0;
  std::int64_t capacity = 0;        //!< the tokens this rank's workspace holds
  std::int64_t capacity_rows = 0;   //!< the rows it holds for the experts (AllToAll: what it may receive)
  std::span<std::int64_t> control;  //!< ForwardControl, then the gathered count table
  Buffers const& buffers;           //!< the dispatch part's own parts of the workspace
  MatrixView<T> x_perm;             //!< [num_tokens * top_k, hidden] this rank's rows in plan order
  std::span<T> x_local;             //!< the experts' rows
  std::span<T> combine_rows;        //!< where AllToAll's combine regroups the experts' results: x_local,
                                    //!< or other rows when forward keeps x_local for a backward

  [[nodiscard]] StreamRef comm_stream() const { return E::comm_stream(stream); }
  [[nodiscard]] std::span<std::int64_t> table() const { return control.subspan(kControlWords); }
  [[nodiscard]] ExpertRange local_experts() const { return config.placement.local_range(comm.rank()); }
};

//! One backward, as its dispatch part sees it: what forward kept (its routing, the count table
//! read back to the host, its rows) and the part's own buffers in the backward's workspace.
template <class E, class T, class G, class Buffers>
struct BackwardStep {
  using Exec = E;
  using Element = T;
  using Grad = G;

  E& exec;
  typename E::Stream stream;
  Communicator& comm;
  MoeConfig const& config;
  std::int64_t num_tokens = 0;
  std::span<std::int64_t const> table;  //!< forward's gathered count table, host memory (AllToAll)
  Buffers const& buffers;               //!< the dispatch part's own parts of the backward's workspace
  std::span<T const> x_perm;            //!< forward's x_perm, as forward left it (kept)
  std::span<T const> x_local;           //!< forward's experts' rows, as forward left them (kept)
  std::span<G> d_perm;                  //!< [num_tokens * top_k, hidden] gradient rows in plan order

  [[nodiscard]] StreamRef comm_stream() const { return E::comm_stream(stream); }
  [[nodiscard]] ExpertRange local_experts() const { return config.placement.local_range(comm.rank()); }
};

//! Dispatch policy AllToAll: the count exchange, then all-to-all-v of the rows to their experts'
//! ranks and back (docs/design.md §7). Reads the control block at the count exchange, which is
//! the forward's one host synchronisation on a space that is not synchronous.
struct AllToAllPart {
  //! What max_tokens is multiplied by in messages about the row limit.
  static constexpr std::string_view kRowsPerTokenText = "ranks * top_k";

  //! Rows per token of the dropless worst case (every rank's slots on this rank's experts): what
  //! bounds max_tokens, whatever received_rows_factor is.
  static constexpr std::int64_t rows_per_token(std::int32_t num_ranks, std::int32_t top_k) noexcept {
    return std::int64_t{num_ranks} * top_k;
  }

  //! Rows a rank sized for `max_tokens` tokens holds for its experts: the worst case, or
  //! MoeConfig::received_rows_factor balanced shares (a forward that would receive more throws
  //! on every rank at the count exchange).
  static std::int64_t expert_rows(MoeConfig const& config, std::int32_t num_ranks, std::int64_t max_tokens) {
    return recv_capacity_rows(max_tokens, num_ranks, config.router.top_k, config.received_rows_factor);
  }

  //! The plan sorts onto every expert: placement ranges are contiguous and in rank order, so rows
  //! sorted by global id are grouped by destination rank.
  static ExpertRange plan_experts(MoeConfig const& config, ExpertRange) noexcept {
    return {0, config.router.num_experts};
  }

  //! One count-table row: CountRowHead, then tokens_per_expert[E].
  static std::size_t table_width(std::int32_t num_experts, bool) noexcept {
    return kCountTableHeader + static_cast<std::size_t>(num_experts);
  }

  //! The local experts' row offsets, padded to the segments' alignment.
  static std::size_t offsets_bytes(std::int32_t num_local) noexcept {
    return align_up<std::size_t>((static_cast<std::size_t>(num_local) + 1) * sizeof(std::int32_t), alignof(RowSegment));
  }

  //! What the host writes after the count exchange: the local offsets (what the experts read),
  //! then at most one regroup segment per (rank, local expert).
  static std::size_t upload_bytes(std::int32_t num_local, std::int32_t num_ranks) noexcept {
    return offsets_bytes(num_local) +
           static_cast<std::size_t>(num_local) * static_cast<std::size_t>(num_ranks) * sizeof(RowSegment);
  }

  template <class T>
  struct Buffers {
    std::span<std::int64_t> table_send;  // [E + 3] this rank's row of the count table
    std::span<std::byte> upload;         // local offsets + regroup segments
    std::span<T> recv;                   // [expert rows, H] rows received rank-major; then the experts' output
  };

  template <class T, class Carver>
  static Buffers<T> carve(Carver& c, LayerShape const& s) {
    Buffers<T> b;
    b.table_send = c.template take<std::int64_t>(table_width(s.num_experts, s.synchronous));
    b.upload = c.template take<std::byte>(upload_bytes(s.num_local_experts, static_cast<std::int32_t>(s.num_ranks)));
    b.recv = c.template take<T>(s.expert_rows * s.hidden);
    return b;
  }

  //! A layout's local offsets and regroup segments, written to `upload` (the execution's memory) in
  //! one write: what the experts and the regroups read, forward and backward alike.
  struct UploadedLayout {
    std::span<std::int32_t const> offsets;  // [local experts + 1]
    std::span<RowSegment const> segments;
  };

  template <class Step>
  static UploadedLayout upload_layout(Step const& step, std::span<std::byte> upload, AllToAllLayout const& layout) {
    std::size_t const offsets_bytes = AllToAllPart::offsets_bytes(step.local_experts().count);
    std::size_t const segments_bytes = layout.regroup.size() * sizeof(RowSegment);
    auto const part = upload.first(offsets_bytes + segments_bytes);
    step.exec.write_to_device(step.stream, part, [&](std::span<std::byte> staging) {
      std::memcpy(staging.data(), layout.local_offsets.data(), layout.local_offsets.size() * sizeof(std::int32_t));
      if (segments_bytes > 0) std::memcpy(staging.data() + offsets_bytes, layout.regroup.data(), segments_bytes);
    });
    return {.offsets = {reinterpret_cast<std::int32_t const*>(part.data()), layout.local_offsets.size()},
            .segments = {reinterpret_cast<RowSegment const*>(part.data() + offsets_bytes), layout.regroup.size()}};
  }

  //! Bytes per rank of rows `row_bytes` wide (all_to_all_v's sizes).
  static std::vector<std::size_t> bytes_per_rank(std::vector<std::size_t> const& rows, std::size_t row_bytes) {
    std::vector<std::size_t> bytes(rows.size());
    for (std::size_t p = 0; p < rows.size(); ++p) bytes[p] = rows[p] * row_bytes;
    return bytes;
  }

  //! What dispatch leaves for the experts and for combine (backward will reuse it too).
  template <class T>
  struct Handle {
    ExpertRows<T> rows;
    std::optional<ForwardControl> counters;           // read at the count exchange
    std::vector<std::size_t> send_bytes, recv_bytes;  // [R] per rank, this forward's
    std::span<RowSegment const> segments;             // regroup segments, in the execution's memory
    MatrixView<T> received;   // [received rows, H] in recv: rank-major rows in, expert-major results out
    MatrixView<T> regrouped;  // [received rows, H] in x_local: expert-major rows in, rank-major results out
  };

  //! Nothing before the routing: a rank whose tokens exceed its workspace still joins the count
  //! exchange, where every rank finds out and throws.
  template <class Step>
  static void admit(Step const&) {}

  template <class Step>
  static Handle<typename Step::Element> dispatch(Step const& step, RoutingPlan const& plan, bool fits) {
    using T = typename Step::Element;
    using Exec = typename Step::Exec;
    MoeConfig const& config = step.config;
    auto const hidden = config.mlp.hidden;
    typename Exec::template Range<LayerStage::kDispatch> range;
    // 1. This rank's row of the count table (no counts when it made no plan), then every rank's.
    auto const& send = step.buffers.table_send;
    Exec::write_count_row(
        step.stream, fits ? plan.tokens_per_expert.data() : nullptr, config.router.num_experts,
        {.num_tokens = step.num_tokens, .capacity = step.capacity, .capacity_rows = step.capacity_rows}, send);
    step.comm.all_gather(send.data(), step.table().data(), send.size_bytes(), step.comm_stream());
    // 2. The control block and the table on the host, in one read: all_to_all_v takes its sizes on
    //    the host. Every rank checks every rank's capacity, so all throw alike or none does.
    auto const host = step.exec.read_to_host(step.stream, step.comm, std::span<std::int64_t const>(step.control));
    Handle<T> h;
    h.counters = read_forward_control(host);
    auto const table = host.subspan(kControlWords);
    check_count_table(table, config.placement, config.router.top_k);
    auto const layout = make_all_to_all_layout(table, config.placement, step.comm.rank());
    h.counters->status.max_tokens_per_expert = layout.max_rows_per_local_expert;
    // 3. The local offsets and the regroup segments to the execution's memory, in one write.
    auto const uploaded = upload_layout(step, step.buffers.upload, layout);
    h.segments = uploaded.segments;
    // 4. Rows to the experts' ranks: received rank-major, regrouped expert-major.
    auto const row_bytes = static_cast<std::size_t>(hidden) * sizeof(T);
    h.send_bytes = bytes_per_rank(layout.send_rows, row_bytes);
    h.recv_bytes = bytes_per_rank(layout.recv_rows, row_bytes);
    h.received = MatrixView<T>(step.buffers.recv.data(), layout.num_recv_rows, hidden);
    h.regrouped = MatrixView<T>(step.x_local.data(), layout.num_recv_rows, hidden);
    step.comm.all_to_all_v(step.x_perm.data, h.send_bytes, h.received.data, h.recv_bytes, step.comm_stream());
    Exec::regroup(step.stream, h.segments, layout.num_recv_rows, h.received, h.regrouped, false);
    range.end();
    // The experts read the regrouped rows and write into recv, whose received rows are spent.
    h.rows = {.in = MatrixView<T const>(h.regrouped),
              .offsets = uploaded.offsets,
              .out = h.received,
              .rows_hint = layout.num_recv_rows};
    return h;
  }

  template <class Step, class T>
  static void combine(Step const& step, Handle<T> const& h, RoutingPlan const& plan,
                      MatrixView<float const> topk_weights, MatrixView<T> y) {
    using Exec = typename Step::Exec;
    {
      typename Exec::template Range<LayerStage::kCombine> const range;
      // The experts' rows back in rank-major order, then to the ranks they came from, into the
      // x_perm rows they left.
      MatrixView<T> const rank_major(step.combine_rows.data(), h.received.rows, h.received.cols);
      Exec::regroup(step.stream, h.segments, h.received.rows, rank_major, h.received, true);
      step.comm.all_to_all_v(rank_major.data, h.recv_bytes, step.x_perm.data, h.send_bytes, step.comm_stream());
    }
    unpermute(step.stream, plan, MatrixView<T const>(step.x_perm), topk_weights, y);
  }

  //! The backward's buffers: the uploaded offsets and segments, and two sets of received rows.
  template <class G>
  struct BackwardBuffers {
    std::span<std::byte> upload;  // local offsets + regroup segments, as forward's
    std::span<G> recv;            // [expert rows, H] gradient rows received rank-major; then the experts' dx
    std::span<G> rows;            // [expert rows, H] the same rows expert-major; then dx rank-major
  };

  template <class G, class Carver>
  static BackwardBuffers<G> carve_backward(Carver& c, LayerShape const& s) {
    std::size_t const rows = s.expert_rows * s.hidden;
    BackwardBuffers<G> b;
    b.upload = c.template take<std::byte>(upload_bytes(s.num_local_experts, static_cast<std::int32_t>(s.num_ranks)));
    b.recv = c.template take<G>(rows);
    b.rows = c.template take<G>(rows);
    return b;
  }

  //! The gradient takes forward's route in reverse, with forward's count table (no count
  //! exchange): dy through unpermute's backward into this rank's slot rows, to the experts' ranks
  //! (combine's all-to-all reversed), through the experts' backward, back to the tokens' ranks
  //! (dispatch's all-to-all reversed), and through permute's backward into dx.
  //! `experts_backward(x, offsets, dy_rows, dx_rows)` runs the local experts' backward.
  template <class Step, class ExpertsBackward>
  static void backward(Step const& step, RoutingPlan const& plan, MatrixView<float const> topk_weights,
                       MatrixView<typename Step::Grad const> dy, MatrixView<typename Step::Grad> dx,
                       MatrixView<float> d_topk_weights, ExpertsBackward&& experts_backward) {
    using T = typename Step::Element;
    using G = typename Step::Grad;
    using Exec = typename Step::Exec;
    MoeConfig const& config = step.config;
    auto const hidden = config.mlp.hidden;
    std::int64_t const slots = step.num_tokens * config.router.top_k;
    ExpertRange const local = step.local_experts();
    // 1. Each slot's gradient row and its weight's gradient; forward left each slot's result in x_perm.
    MatrixView<G> const d_perm(step.d_perm.data(), slots, hidden);
    unpermute_backward(step.stream, plan, MatrixView<T const>(step.x_perm.data(), slots, hidden), topk_weights, dy,
                       d_perm, d_topk_weights);
    // 2. Forward's layout again, from its count table; its offsets and segments to the execution's memory.
    auto const layout = make_all_to_all_layout(step.table, config.placement, step.comm.rank());
    auto const [offsets, segments] = upload_layout(step, step.buffers.upload, layout);
    // 3. Gradient rows to the experts' ranks, expert-major; the experts' backward; dx rows back.
    auto const row_bytes = static_cast<std::size_t>(hidden) * sizeof(G);
    auto const send_bytes = bytes_per_rank(layout.send_rows, row_bytes);
    auto const recv_bytes = bytes_per_rank(layout.recv_rows, row_bytes);
    std::int64_t const n = layout.num_recv_rows;
    MatrixView<G> const received(step.buffers.recv.data(), n, hidden), regrouped(step.buffers.rows.data(), n, hidden);
    step.comm.all_to_all_v(d_perm.data, send_bytes, received.data, recv_bytes, step.comm_stream());
    Exec::regroup(step.stream, segments, n, received, regrouped, false);
    if (local.count > 0)  // the experts' dx rows into `received`, whose gradient rows are spent
      experts_backward(MatrixView<T const>(step.x_local.data(), n, hidden), offsets, MatrixView<G const>(regrouped),
                       received);
    Exec::regroup(step.stream, segments, n, regrouped, received, true);
    step.comm.all_to_all_v(regrouped.data, recv_bytes, d_perm.data, send_bytes, step.comm_stream());
    // 4. Each token's dx: the sum of its slots' rows.
    permute_backward(step.stream, plan, MatrixView<G const>(d_perm), dx);
  }
};

//! Dispatch policy AllGather: every rank holds the same tokens; each computes its local experts'
//! share, and an all-reduce adds the shares (docs/design.md §8). Never reads the control block
//! during forward: status() does.
struct AllGatherPart {
  static constexpr std::string_view kRowsPerTokenText = "top_k";

  //! Each rank routes only its own (the group's) tokens' slots.
  static constexpr std::int64_t rows_per_token(std::int32_t, std::int32_t top_k) noexcept { return top_k; }

  //! Its experts run on this rank's own slots: max_tokens * top_k rows (received_rows_factor is AllToAll's).
  static std::int64_t expert_rows(MoeConfig const& config, std::int32_t, std::int64_t max_tokens) {
    return max_tokens * config.router.top_k;
  }

  //! The plan sorts onto this rank's experts; slots of other ranks' experts get no row here.
  static ExpertRange plan_experts(MoeConfig const&, ExpertRange local) noexcept { return local; }

  //! A CountRowHead per rank where reading them back is free (a synchronous space), so
  //! that every rank can check every rank; none where it would cost a host synchronisation.
  static std::size_t table_width(std::int32_t, bool synchronous) noexcept {
    return synchronous ? kCountTableHeader : 0;
  }

  static std::size_t upload_bytes(std::int32_t, std::int32_t) noexcept { return 0; }

  template <class T>
  struct Buffers {
    std::span<std::int64_t> table_send;  // [kCountTableHeader] or empty (table_width)
    std::span<float> partial;            // [M, H] this rank's share of every token, then the sum
  };

  template <class T, class Carver>
  static Buffers<T> carve(Carver& c, LayerShape const& s) {
    Buffers<T> b;
    b.table_send = c.template take<std::int64_t>(table_width(s.num_experts, s.synchronous));
    b.partial = c.template take<float>(s.max_tokens * s.hidden);
    return b;
  }

  template <class T>
  struct Handle {
    ExpertRows<T> rows;
    std::optional<ForwardControl> counters;  // never read during forward
  };

  //! Every rank must hold the same tokens, and room for them. A synchronous space checks every
  //! rank on every rank (one small all_gather), so all throw alike. Elsewhere that check would
  //! cost a sync: this rank checks its own room, before any collective, and equal token counts are
  //! a precondition (unequal ones give all_reduce_sum calls of different sizes, which a
  //! CudaLocalGroup reports as kCollectiveMismatch and NCCL cannot detect).
  template <class Step>
  static void admit(Step const& step) {
    using Exec = typename Step::Exec;
    if constexpr (Exec::kSynchronous) {
      auto const& send = step.buffers.table_send;
      Exec::write_count_row(
          step.stream, nullptr, 0,
          {.num_tokens = step.num_tokens, .capacity = step.capacity, .capacity_rows = step.capacity_rows}, send);
      step.comm.all_gather(send.data(), step.table().data(), send.size_bytes(), step.comm_stream());
      auto const table = step.exec.read_to_host(step.stream, step.comm, std::span<std::int64_t const>(step.table()));
      for (int q = 0; q < step.comm.size(); ++q) {
        auto const row = table_row(table, 0, q);
        if (row[0] != table[0])
          throw_error(Errc::kInvalidArgument,
                      fmt::format("forward: AllGather needs the same tokens on every rank: rank 0 has "
                                  "num_tokens = {}, rank {} has num_tokens = {}",
                                  table[0], q, row[0]));
        if (row[0] > row[1])
          throw_error(Errc::kWorkspaceTooSmall,
                      fmt::format("forward: rank {}: num_tokens = {}, expected <= {} (the tokens its workspace "
                                  "holds; ask workspace_bytes(max_tokens))",
                                  q, row[0], row[1]));
      }
    } else if (step.num_tokens > step.capacity) {
      throw_error(Errc::kWorkspaceTooSmall,
                  fmt::format("forward: rank {}: num_tokens = {}, expected <= {} (the tokens its workspace holds; "
                              "ask workspace_bytes(max_tokens)); the other ranks' collectives of this forward then "
                              "fail by the communicator's deadline",
                              step.comm.rank(), step.num_tokens, step.capacity));
    }
  }

  //! Nothing moves: the experts run on this rank's permuted rows. The routed-row count stays in
  //! the execution's memory, so the rows expected are those uniform routing would give.
  template <class Step>
  static Handle<typename Step::Element> dispatch(Step const& step, RoutingPlan const& plan, bool) {
    using T = typename Step::Element;
    std::int64_t const slots = step.num_tokens * step.config.router.top_k;
    std::int64_t const num_local = step.local_experts().count;
    return {.rows = {.in = MatrixView<T const>(step.x_perm),
                     .offsets = plan.expert_offsets,
                     .out = MatrixView<T>(step.x_local.data(), slots, step.config.mlp.hidden),
                     .rows_hint = ceil_div<std::int64_t>(slots * num_local, step.config.router.num_experts)},
            .counters = std::nullopt};
  }

  //! This rank's share of every token in fp32 (every row written: zeros where it has none),
  //! summed over the ranks, then rounded once to T.
  template <class Step, class T>
  static void combine(Step const& step, Handle<T> const& h, RoutingPlan const& plan,
                      MatrixView<float const> topk_weights, MatrixView<T> y) {
    using Exec = typename Step::Exec;
    MatrixView<float> partial(step.buffers.partial.data(), step.num_tokens, step.config.mlp.hidden);
    unpermute(step.stream, plan, MatrixView<T const>(h.rows.out), topk_weights, partial);
    typename Exec::template Range<LayerStage::kCombine> const range;  // the sum over ranks and the rounding
    step.comm.all_reduce_sum(partial.data, static_cast<std::size_t>(partial.size()), DType::kF32, step.comm_stream());
    Exec::round_to(step.stream, MatrixView<float const>(partial), y);
  }

  template <class G>
  struct BackwardBuffers {
    std::span<G> rows;         // [M * k, H] the experts' dx rows, in plan order
    std::span<float> partial;  // [M, H] this rank's share of dx, then the sum
  };

  template <class G, class Carver>
  static BackwardBuffers<G> carve_backward(Carver& c, LayerShape const& s) {
    BackwardBuffers<G> b;
    b.rows = c.template take<G>(s.max_tokens * s.top_k * s.hidden);
    b.partial = c.template take<float>(s.max_tokens * s.hidden);
    return b;
  }

  //! Each rank's local experts' share of dx and of the weights' gradient, summed over the group
  //! (forward's all-reduce, reversed: every rank holds the same dy). Forward kept the experts'
  //! input rows in x_perm and their results in x_local, both in plan order.
  template <class Step, class ExpertsBackward>
  static void backward(Step const& step, RoutingPlan const& plan, MatrixView<float const> topk_weights,
                       MatrixView<typename Step::Grad const> dy, MatrixView<typename Step::Grad> dx,
                       MatrixView<float> d_topk_weights, ExpertsBackward&& experts_backward) {
    using T = typename Step::Element;
    using G = typename Step::Grad;
    using Exec = typename Step::Exec;
    auto const hidden = step.config.mlp.hidden;
    std::int64_t const slots = step.num_tokens * step.config.router.top_k;
    require(d_topk_weights.ld == d_topk_weights.cols || d_topk_weights.rows <= 1, Errc::kInvalidArgument, "backward",
            "d_topk_weights.ld", d_topk_weights.ld,
            fmt::format("{} (contiguous rows: AllGather all-reduces them)", d_topk_weights.cols));
    MatrixView<G> const d_perm(step.d_perm.data(), slots, hidden), d_in(step.buffers.rows.data(), slots, hidden);
    unpermute_backward(step.stream, plan, MatrixView<T const>(step.x_local.data(), slots, hidden), topk_weights, dy,
                       d_perm, d_topk_weights);
    if (step.local_experts().count > 0)
      experts_backward(MatrixView<T const>(step.x_perm.data(), slots, hidden), plan.expert_offsets,
                       MatrixView<G const>(d_perm), d_in);
    MatrixView<float> partial(step.buffers.partial.data(), step.num_tokens, hidden);
    permute_backward(step.stream, plan, MatrixView<G const>(d_in), partial);
    typename Exec::template Range<LayerStage::kCombine> const range;
    step.comm.all_reduce_sum(partial.data, static_cast<std::size_t>(partial.size()), DType::kF32, step.comm_stream());
    Exec::round_to(step.stream, MatrixView<float const>(partial), dx);
    // Each rank's weights' gradient holds only its experts' slots (0 elsewhere): the sum is the whole.
    if (d_topk_weights.size() > 0)
      step.comm.all_reduce_sum(d_topk_weights.data, static_cast<std::size_t>(d_topk_weights.size()), DType::kF32,
                               step.comm_stream());
  }
};

//! Maps a dispatch tag to its part.
template <class Dispatch>
struct DispatchSelector {
  static_assert(dependent_false<Dispatch>,
                "epx: ExpertParallel's second argument is the dispatch policy: epx::AllToAll or epx::AllGather");
};
template <>
struct DispatchSelector<AllToAll> {
  using type = AllToAllPart;
};
template <>
struct DispatchSelector<AllGather> {
  using type = AllGatherPart;
};

}  // namespace epx::detail
