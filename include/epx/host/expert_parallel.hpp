// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

#include <epx/host/expert_mlp.hpp>
#include <epx/host/permute.hpp>
#include <epx/host/plan.hpp>
#include <epx/host/router.hpp>
#include <epx/parallel/exchange_layout.hpp>
#include <epx/parallel/expert_parallel.hpp>

#include <algorithm>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace epx {
namespace detail {

//! Grouped on Host: the reference expert MLP.
struct HostGroupedExperts {
  template <class T>
  static std::size_t workspace_bytes(ExpertMlpConfig const& mlp, std::int64_t max_rows) {
    return expert_mlp_workspace_bytes<T>(mlp, max_rows);
  }
  template <class T>
  static void run(ExpertMlpConfig const& mlp, ExpertWeights const& weights, MatrixView<T const> x,
                  std::span<std::int32_t const> offsets, MatrixView<T> out, Workspace ws) {
    expert_mlp(Host{}, mlp, weights, x, offsets, out, ws);
  }
};

template <>
struct ExpertKernelSelector<Grouped, Host> {
  using type = HostGroupedExperts;
};

template <class Space>
  requires std::is_same_v<Space, Host>
struct ExpertKernelSelector<CublasGrouped, Space> {
  static_assert(dependent_false<Space>,
                "epx: CublasGrouped runs cuBLAS on a GPU and has no Host implementation; use "
                "ExpertParallel<epx::Grouped, Dispatch, epx::Host> for the host reference, or epx::Cuda");
};

//! A sub-workspace of `bytes` bytes carved as one part.
template <class Carver>
Workspace take_workspace(Carver& carver, std::size_t bytes) {
  auto const part = carver.template take<std::byte>(bytes);
  return {part.data(), part.size()};
}

//! Copies runs of rows between two [rows, cols] buffers; `inverse` copies dst -> src.
template <class T>
void copy_row_segments(std::span<RowSegment const> segments, MatrixView<T> from, MatrixView<T> to, bool inverse) {
  for (auto const& s : segments) {
    std::int64_t const src = inverse ? s.dst_row : s.src_row, dst = inverse ? s.src_row : s.dst_row;
    for (std::int64_t r = 0; r < s.num_rows; ++r) std::copy_n(from.row(src + r), from.cols, to.row(dst + r));
  }
}

//! The first (token, slot) in row-major order whose id is invalid, for messages.
inline InvalidIdSite first_invalid_id(MatrixView<std::int32_t const> ids, std::int32_t num_experts) {
  for (std::int64_t t = 0; t < ids.rows; ++t)
    for (std::int64_t j = 0; j < ids.cols; ++j)
      if (ids(t, j) != -1 && (ids(t, j) < 0 || ids(t, j) >= num_experts))
        return {.token = t, .slot = static_cast<std::int32_t>(j), .id = ids(t, j)};
  return {};
}

}  // namespace detail

//! @brief The MoE layer on the Host execution space: plain C++ loops over host memory, the
//! reference every CUDA result is compared with.
//!
//! One object per rank. Collectives go through the given Communicator (host memory, e.g. a
//! LocalGroup rank). Forward is synchronous; it takes its scratch from the caller's Workspace,
//! and small host vectors of O(ranks x experts) for the count exchange.
template <class Experts, class Dispatch>
class ExpertParallel<Experts, Dispatch, Host> {
  static_assert(detail::is_dispatch_tag<Dispatch>,
                "epx: ExpertParallel's second argument is the dispatch policy: epx::AllToAll or epx::AllGather");
  using ExpertKernel = typename detail::ExpertKernelSelector<Experts, Host>::type;
  static constexpr bool kAllToAll = std::is_same_v<Dispatch, AllToAll>;

 public:
  //! Validates `config` against `comm` (throws Error naming the first bad field). `comm` must
  //! outlive this object; the weights and bias it points to must stay valid and unchanged.
  ExpertParallel(MoeConfig const& config, Communicator& comm) : config_(detail::resolve(config, comm)), comm_(&comm) {
    detail::require(comm.memory_space() == MemorySpace::kHost, Errc::kInvalidArgument, "ExpertParallel<..., Host>",
                    "comm.memory_space()", to_string(comm.memory_space()), "host (a host-memory Communicator)");
  }

  [[nodiscard]] MoeConfig const& config() const noexcept { return config_; }
  [[nodiscard]] ExpertRange local_experts() const { return config_.placement.local_range(comm_->rank()); }

  //! Workspace bytes for forward calls of up to `max_tokens` tokens on every rank of the group
  //! (pure host arithmetic). With AllToAll, `max_tokens` must bound every rank's num_tokens.
  [[nodiscard]] std::size_t workspace_bytes(std::int64_t max_tokens) const {
    detail::check_max_tokens(max_tokens, kAllToAll, comm_->size(), config_.router.top_k);
    return detail::dispatch_on_dtype(config_.weights.dtype, [&]<class T>(T*) {
      return detail::layout_bytes([&](auto& c) { return carve<T>(c, max_tokens); });
    });
  }

  //! @brief Forward from router logits: route, then as the other overload.
  //! @param[in]  router_logits  [num_tokens, num_experts], fp32 or bf16
  //! @param[in]  x              [num_tokens, hidden]
  //! @param[out] y              [num_tokens, hidden], every row written
  //! @param[in]  workspace      at least workspace_bytes(max_tokens) bytes of host memory
  //! @return the routing counters of this rank
  //! @throws Error on bad shapes, a workspace too small (on every rank, when another rank's is),
  //!         invalid ids (per on_invalid_ids, after the collectives), or a communicator failure
  template <class L, float_element T>
  Status forward(MatrixView<L> router_logits, std::type_identity_t<MatrixView<T const>> x, MatrixView<T> y,
                 Workspace workspace) {
    using Logit = std::remove_const_t<L>;
    static_assert(detail::router_logit<Logit>, "epx: router logits are float or epx::bfloat16");
    detail::check_matrix("forward", "router_logits", MatrixView<Logit const>(router_logits), x.rows,
                         config_.router.num_experts);
    return run<T>(x, y, workspace, [&](MatrixView<std::int32_t> ids, MatrixView<float> weights) {
      route(Host{}, config_.router, MatrixView<Logit const>(router_logits), config_.correction_bias, ids, weights);
    });
  }

  //! @brief Forward from caller-given routing.
  //! @param[in]  topk_ids      [num_tokens, top_k] global expert ids; -1 = no expert
  //! @param[in]  topk_weights  [num_tokens, top_k]
  //! Other parameters, result and errors as the router-logits overload.
  template <float_element T>
  Status forward(MatrixView<std::int32_t const> topk_ids, MatrixView<float const> topk_weights,
                 std::type_identity_t<MatrixView<T const>> x, MatrixView<T> y, Workspace workspace) {
    detail::check_matrix("forward", "topk_ids", topk_ids, x.rows, config_.router.top_k);
    detail::check_matrix("forward", "topk_weights", topk_weights, x.rows, config_.router.top_k);
    return run<T>(x, y, workspace, [&](MatrixView<std::int32_t> ids, MatrixView<float> weights) {
      for (std::int64_t t = 0; t < ids.rows; ++t) {
        std::copy_n(topk_ids.row(t), ids.cols, ids.row(t));
        std::copy_n(topk_weights.row(t), weights.cols, weights.row(t));
      }
    });
  }

 private:
  template <class T>
  struct Parts {
    std::span<std::int32_t> topk_ids;  // [M, k]
    std::span<float> topk_weights;     // [M, k]
    Workspace plan;
    std::span<std::int64_t> table_send, table;  // AllToAll: [E + 2], [R, E + 2]; AllGather: [2], [R, 2]
    std::span<T> x_perm;                        // [M * k, H] rows sent (AllToAll: and received back)
    std::span<T> recv, x_local;                 // AllToAll: [R * M * k, H] each; AllGather: x_local [M * k, H]
    std::span<float> partial;                   // AllGather: [M, H]
    Workspace experts;
  };

  // The one layout of the workspace, for `max_tokens` tokens (M) per rank.
  template <class T, class Carver>
  Parts<T> carve(Carver& c, std::int64_t max_tokens) const {
    auto const m = static_cast<std::size_t>(max_tokens);
    auto const k = static_cast<std::size_t>(config_.router.top_k);
    auto const h = static_cast<std::size_t>(config_.mlp.hidden);
    auto const num_ranks = static_cast<std::size_t>(comm_->size());
    auto const num_experts = static_cast<std::size_t>(config_.router.num_experts);
    auto const plan_experts = kAllToAll ? config_.router.num_experts : local_experts().count;
    std::size_t const row_width = kAllToAll ? detail::kCountTableHeader + num_experts : detail::kCountTableHeader;
    std::size_t const expert_rows = kAllToAll ? num_ranks * m * k : m * k;
    Parts<T> p;
    p.topk_ids = c.template take<std::int32_t>(m * k);
    p.topk_weights = c.template take<float>(m * k);
    p.plan = detail::take_workspace(c, plan_workspace_bytes(static_cast<std::int32_t>(max_tokens),
                                                            config_.router.top_k, plan_experts));
    p.table_send = c.template take<std::int64_t>(row_width);
    p.table = c.template take<std::int64_t>(num_ranks * row_width);
    p.x_perm = c.template take<T>(m * k * h);
    if constexpr (kAllToAll) p.recv = c.template take<T>(expert_rows * h);
    else p.partial = c.template take<float>(m * h);
    p.x_local = c.template take<T>(expert_rows * h);
    p.experts = detail::take_workspace(
        c, ExpertKernel::template workspace_bytes<T>(config_.mlp, static_cast<std::int64_t>(expert_rows)));
    return p;
  }


  // The tokens this workspace holds: the largest M with workspace_bytes(M) <= workspace.size().
  template <class T>
  std::int64_t capacity_tokens(Workspace workspace) const {
    auto bytes = [&](std::int64_t m) { return detail::layout_bytes([&](auto& c) { return carve<T>(c, m); }); };
    if (bytes(0) > workspace.size())
      detail::throw_error(Errc::kWorkspaceTooSmall,
                          fmt::format("forward: workspace.size() = {} bytes, expected at least {} bytes "
                                      "(workspace_bytes(0); ask workspace_bytes(max_tokens))", workspace.size(), bytes(0)));
    std::int64_t lo = 0, hi = detail::max_tokens_limit(kAllToAll, comm_->size(), config_.router.top_k);
    while (lo < hi) {
      std::int64_t const mid = lo + (hi - lo + 1) / 2;
      if (bytes(mid) <= workspace.size()) lo = mid;
      else hi = mid - 1;
    }
    return lo;
  }

  // Shared by both forwards: `fill_routing(ids, weights)` writes this rank's routing.
  template <class T, class FillRouting>
  Status run(MatrixView<T const> x, MatrixView<T> y, Workspace workspace, FillRouting&& fill_routing) {
    detail::require(config_.weights.dtype == dtype_of_v<T>, Errc::kInvalidArgument, "forward", "x's element type",
                    dtype_of_v<T>, fmt::format("the weights' dtype {}", config_.weights.dtype));
    detail::check_matrix("forward", "x", x, -1, config_.mlp.hidden);
    detail::check_matrix("forward", "y", y, x.rows, config_.mlp.hidden);
    std::int64_t const num_tokens = x.rows, capacity = capacity_tokens<T>(workspace);
    Parts<T> parts = detail::carve_layout(workspace, "forward", [&](auto& c) { return carve<T>(c, capacity); });
    bool const fits = num_tokens <= capacity;
    auto const k = config_.router.top_k;
    MatrixView<std::int32_t> ids(parts.topk_ids.data(), fits ? num_tokens : 0, k);
    MatrixView<float> weights(parts.topk_weights.data(), fits ? num_tokens : 0, k);
    if (fits) fill_routing(ids, weights);
    Status status = kAllToAll ? all_to_all<T>(parts, fits, num_tokens, capacity, ids, weights, x, y)
                              : all_gather<T>(parts, num_tokens, capacity, ids, weights, x, y);
    if (status.invalid_ids > 0 && config_.on_invalid_ids == InvalidIds::kThrow)
      detail::throw_invalid_ids("forward", comm_->rank(), status.invalid_ids,
                                detail::first_invalid_id(ids, config_.router.num_experts), config_.router.num_experts);
    return status;
  }

  template <class T>
  Status all_to_all(Parts<T> const& parts, bool fits, std::int64_t num_tokens, std::int64_t capacity,
                    MatrixView<std::int32_t const> ids, MatrixView<float const> weights, MatrixView<T const> x,
                    MatrixView<T> y) {
    auto const hidden = config_.mlp.hidden;
    auto const num_experts = config_.router.num_experts;
    Status status;
    RoutingPlan plan;
    MatrixView<T> x_perm(parts.x_perm.data(), static_cast<std::int64_t>(parts.x_perm.size()) / hidden, hidden);
    // 1. Sort this rank's slots by global expert: rows for each rank are then contiguous.
    std::fill(parts.table_send.begin(), parts.table_send.end(), 0);
    parts.table_send[0] = num_tokens;
    parts.table_send[1] = capacity;
    if (fits) {
      plan = make_plan(Host{}, ids, num_experts, ExpertRange{0, num_experts}, parts.plan, status);
      permute(Host{}, plan, x, x_perm);
      std::copy(plan.tokens_per_expert.begin(), plan.tokens_per_expert.end(),
                parts.table_send.begin() + detail::kCountTableHeader);
    }
    // 2. Count exchange: every rank learns every rank's counts (and capacity).
    comm_->all_gather(parts.table_send.data(), parts.table.data(), parts.table_send.size_bytes(), StreamRef::host());
    detail::check_count_table(parts.table, config_.placement, config_.router.top_k);
    auto const layout = detail::make_all_to_all_layout(parts.table, config_.placement, comm_->rank());
    // 3. Rows to the experts' ranks, regrouped expert-major.
    auto const row_bytes = static_cast<std::size_t>(hidden) * sizeof(T);
    std::vector<std::size_t> send_bytes(layout.send_rows.size()), recv_bytes(layout.recv_rows.size());
    for (std::size_t p = 0; p < send_bytes.size(); ++p) {
      send_bytes[p] = layout.send_rows[p] * row_bytes;
      recv_bytes[p] = layout.recv_rows[p] * row_bytes;
    }
    MatrixView<T> recv(parts.recv.data(), layout.num_recv_rows, hidden);
    MatrixView<T> x_local(parts.x_local.data(), layout.num_recv_rows, hidden);
    comm_->all_to_all_v(x_perm.data, send_bytes, recv.data, recv_bytes, StreamRef::host());
    detail::copy_row_segments<T>(layout.regroup, recv, x_local, false);
    // 4. Experts: x_local -> recv (expert-major), then back to rank-major in x_local.
    ExpertKernel::template run<T>(config_.mlp, config_.weights, x_local, layout.local_offsets, recv, parts.experts);
    detail::copy_row_segments<T>(layout.regroup, recv, x_local, true);
    // 5. Rows back to the ranks they came from, in the order they were sent, then the weighted sum.
    comm_->all_to_all_v(x_local.data, recv_bytes, x_perm.data, send_bytes, StreamRef::host());
    if (fits) unpermute(Host{}, plan, MatrixView<T const>(x_perm), weights, y);
    status.max_tokens_per_expert = layout.max_rows_per_local_expert;
    return status;
  }

  template <class T>
  // Every rank's tokens are checked against every rank's capacity first, so no `fits` flag is needed.
  Status all_gather(Parts<T> const& parts, std::int64_t num_tokens, std::int64_t capacity,
                    MatrixView<std::int32_t const> ids, MatrixView<float const> weights, MatrixView<T const> x,
                    MatrixView<T> y) {
    auto const hidden = config_.mlp.hidden;
    // 1. Every rank must hold the same tokens, and room for them: check on every rank alike.
    parts.table_send[0] = num_tokens;
    parts.table_send[1] = capacity;
    comm_->all_gather(parts.table_send.data(), parts.table.data(), parts.table_send.size_bytes(), StreamRef::host());
    for (int q = 0; q < comm_->size(); ++q) {
      auto const tokens_q = parts.table[static_cast<std::size_t>(q) * 2], capacity_q = parts.table[static_cast<std::size_t>(q) * 2 + 1];
      if (tokens_q != parts.table[0])
        detail::throw_error(Errc::kInvalidArgument,
                            fmt::format("forward: AllGather needs the same tokens on every rank: rank 0 has "
                                        "num_tokens = {}, rank {} has num_tokens = {}", parts.table[0], q, tokens_q));
      if (tokens_q > capacity_q)
        detail::throw_error(Errc::kWorkspaceTooSmall,
                            fmt::format("forward: rank {}: num_tokens = {}, expected <= {} (the tokens its workspace "
                                        "holds; ask workspace_bytes(max_tokens))", q, tokens_q, capacity_q));
    }
    // 2. This rank's experts only.
    Status status;
    ExpertRange const local = local_experts();
    RoutingPlan const plan = make_plan(Host{}, ids, config_.router.num_experts, local, parts.plan, status);
    std::int64_t const rows = plan.expert_offsets.back();
    MatrixView<T> x_perm(parts.x_perm.data(), rows, hidden);
    MatrixView<T> out(parts.x_local.data(), rows, hidden);
    permute(Host{}, plan, x, x_perm);
    ExpertKernel::template run<T>(config_.mlp, config_.weights, MatrixView<T const>(x_perm), plan.expert_offsets,
                                  out, parts.experts);
    // 3. This rank's share of every token, summed over the ranks in rank order.
    MatrixView<float> partial(parts.partial.data(), num_tokens, hidden);
    unpermute(Host{}, plan, MatrixView<T const>(out), weights, partial);
    comm_->all_reduce_sum(partial.data, static_cast<std::size_t>(partial.size()), DType::kF32, StreamRef::host());
    for (std::int64_t t = 0; t < num_tokens; ++t)
      for (std::int64_t c = 0; c < hidden; ++c) y(t, c) = from_float<T>(partial(t, c));
    return status;
  }

  MoeConfig config_;
  Communicator* comm_;
};

}  // namespace epx
