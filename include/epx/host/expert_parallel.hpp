// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! ExpertParallel on the Host execution space: what the shared sequencer
//! (parallel/expert_parallel.hpp) needs from this space. Plain loops over host memory, synchronous
//! on the calling thread: the reference every CUDA result is compared with.

#include <epx/core/dtype.hpp>
#include <epx/host/expert_mlp.hpp>
#include <epx/host/expert_mlp_backward.hpp>
#include <epx/host/permute.hpp>
#include <epx/host/permute_backward.hpp>
#include <epx/host/plan.hpp>
#include <epx/host/router.hpp>
#include <epx/host/router_backward.hpp>
#include <epx/parallel/exchange_layout.hpp>
#include <epx/parallel/execution.hpp>
#include <epx/parallel/expert_parallel.hpp>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <span>
#include <string_view>
#include <type_traits>
#include <utility>

namespace epx::detail {

//! Grouped on Host: the reference expert MLP.
struct HostGroupedExperts {
  //! The reference loops run every shape the configuration allows.
  static void check(MoeConfig const&) {}

  [[nodiscard]] static std::string_view kernel_name() noexcept { return "host"; }

  template <class T>
  [[nodiscard]] std::size_t workspace_bytes(ExpertMlpConfig const& mlp, std::int32_t /*num_groups*/,
                                            std::int64_t max_rows) const {
    return expert_mlp_workspace_bytes<T>(mlp, max_rows);
  }

  //! `rows_hint` picks nothing here: the loops visit exactly the rows of `offsets`.
  template <class T>
  void run(Host, ExpertMlpConfig const& mlp, ExpertWeights const& weights, MatrixView<T const> x,
           std::span<std::int32_t const> offsets, MatrixView<T> out, Workspace ws, std::int64_t rows_hint) const {
    run<T>(Host{}, mlp, weights, x, offsets, out, ws, rows_hint, MatrixView<float>{});
  }

  //! run that also keeps GEMM 1's output h (bias included) in `h` (empty: not kept), for
  //! backward(..., h, ...).
  template <class T>
  void run(Host, ExpertMlpConfig const& mlp, ExpertWeights const& weights, MatrixView<T const> x,
           std::span<std::int32_t const> offsets, MatrixView<T> out, Workspace ws, std::int64_t /*rows_hint*/,
           MatrixView<float> h) const {
    expert_mlp<T>(Host{}, mlp, weights, x, offsets, out, ws, h);
  }

  //! The backward's scratch: GEMM 1's output h (fp32, recomputed from the saved input rows), then
  //! expert_mlp_backward's own.
  //! `h_kept`: the forwards keep h (MoeConfig::save_gate_up_output), so no h here.
  template <class T>
  [[nodiscard]] std::size_t backward_workspace_bytes(ExpertMlpConfig const& mlp, std::int32_t /*num_groups*/,
                                                     std::int64_t max_rows, bool h_kept = false) const {
    return layout_bytes([&](auto& c) { return carve_expert_part_backward<T>(c, mlp, max_rows, h_kept); });
  }

  //! dx rows and the local experts' weight gradients from forward's input rows `x` and the output
  //! rows' gradient `dy`; h is recomputed (one GEMM: 2 * rows * gate_up_rows * hidden flops).
  template <class T, class G>
  void backward(Host, ExpertMlpConfig const& mlp, ExpertWeights const& weights, MatrixView<T const> x,
                std::span<std::int32_t const> offsets, MatrixView<G const> dy, MatrixView<G> dx,
                ExpertWeightGrads<G> const& grads, Workspace ws) const {
    auto const parts =
        carve_layout(ws, "backward (experts)", [&](auto& c) { return carve_expert_part_backward<T>(c, mlp, x.rows); });
    MatrixView<float> const h(parts.first.data(), x.rows, mlp.gate_up_rows());
    expert_mlp_gate_up(Host{}, mlp, weights, x, offsets, h);
    expert_mlp_backward(Host{}, mlp, weights, x, offsets, MatrixView<float const>(h), dy, dx, grads, parts.second);
  }

  //! backward from the h a forward kept (run with h): no GEMM 1 here.
  template <class T, class G>
  void backward(Host, ExpertMlpConfig const& mlp, ExpertWeights const& weights, MatrixView<T const> x,
                std::span<std::int32_t const> offsets, MatrixView<float const> h, MatrixView<G const> dy,
                MatrixView<G> dx, ExpertWeightGrads<G> const& grads, Workspace ws) const {
    auto const parts = carve_layout(ws, "backward (experts)",
                                    [&](auto& c) { return carve_expert_part_backward<T>(c, mlp, x.rows, true); });
    expert_mlp_backward(Host{}, mlp, weights, x, offsets, h, dy, dx, grads, parts.second);
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

//! The Host space of the layer: every call has finished when it returns, and the workspace is
//! host memory, so the control block is read in place and "uploads" are plain copies.
template <>
class LayerExecution<Host> {
 public:
  using Context = Host;
  using Stream = Host;
  template <LayerStage>
  using Range = NoRange;
  static constexpr bool kSynchronous = true;

  //! Nothing to mirror: the control block and the uploads are host memory already.
  LayerExecution(std::size_t /*control_words*/, std::size_t /*upload_bytes*/) noexcept {}

  static Stream stream(Context, std::string_view) noexcept { return {}; }
  static StreamRef comm_stream(Stream) noexcept { return StreamRef::host(); }

  static void check_communicator(Communicator const& comm) {
    require(comm.memory_space() == MemorySpace::kHost, Errc::kInvalidArgument, "ExpertParallel<..., Host>",
            "comm.memory_space()", to_string(comm.memory_space()), "host (a host-memory Communicator)");
  }

  static std::size_t plan_workspace_bytes(std::int32_t num_tokens, std::int32_t top_k, std::int32_t num_experts) {
    return epx::plan_workspace_bytes(num_tokens, top_k, num_experts);
  }

  //! route_backward on the calling thread; ids that no forward wrote are an Error (`status` unused).
  template <class L>
  static void route_backward(Stream, RouterConfig const& config, MatrixView<L const> logits,
                             MatrixView<std::int32_t const> ids, MatrixView<float const> d_topk_weights,
                             MatrixView<float> d_logits, Status* /*status*/) {
    epx::route_backward(Host{}, config, logits, ids, d_topk_weights, d_logits);
  }

  static RoutingPlan make_plan(Stream, MatrixView<std::int32_t const> ids, std::int32_t num_experts, ExpertRange range,
                               Workspace workspace, Status* status) {
    return epx::make_plan(Host{}, ids, num_experts, range, workspace, *status);
  }

  static void reset_control(Stream, ForwardControl* control) noexcept { *control = ForwardControl{}; }

  //! The lowest slot whose id is invalid, as invalid_id_key; nothing when none is.
  static void record_first_invalid(Stream, MatrixView<std::int32_t const> ids, std::int32_t num_experts,
                                   std::uint64_t* key) noexcept {
    for (std::int64_t t = 0; t < ids.rows; ++t)
      for (std::int64_t j = 0; j < ids.cols; ++j)
        if (is_invalid_expert_id(ids(t, j), num_experts))
          *key = std::min(*key, invalid_id_key(static_cast<std::uint32_t>(t * ids.cols + j), ids(t, j)));
  }

  static void write_count_row(Stream, std::int32_t const* counts, std::int32_t num_counts, CountRowHead const& head,
                              std::span<std::int64_t> row) noexcept {
    for (std::size_t i = 0; i < row.size(); ++i)
      row[i] = count_table_entry(static_cast<std::int64_t>(i), counts, num_counts, head);
  }

  //! The words themselves: a Host forward has finished before anything reads them.
  std::span<std::int64_t const> read_to_host(Stream, Communicator&,
                                             std::span<std::int64_t const> words) const noexcept {
    return words;
  }

  //! The saved state's header, written in place.
  template <class Header>
  static void write_header(Stream, std::span<std::int64_t> words, Header const& header) {
    std::memcpy(static_cast<void*>(words.data()), &header, sizeof(header));
  }

  //! `part` is host memory: `pack` writes it directly.
  template <class Pack>
  void write_to_device(Stream, std::span<std::byte> part, Pack&& pack) const {
    pack(part);
  }

  //! Copies the rows of each segment from rank-major to expert-major order, or back (`inverse`).
  template <class T>
  static void regroup(Stream, std::span<RowSegment const> segments, std::int64_t /*num_rows*/, MatrixView<T> rank_major,
                      MatrixView<T> expert_major, bool inverse) {
    for (RowSegment const& s : segments)
      for (std::int64_t r = 0; r < s.num_rows; ++r) {
        T* const rank_row = rank_major.row(s.src_row + r);
        T* const expert_row = expert_major.row(expert_major_row(s, s.src_row + r));
        if (inverse)
          std::copy_n(expert_row, expert_major.cols, rank_row);
        else
          std::copy_n(rank_row, rank_major.cols, expert_row);
      }
  }

  //! dst = src, element by element (a training forward's copy of the given routing).
  template <class T>
  static void copy(Stream, MatrixView<T const> src, MatrixView<T> dst) {
    for (std::int64_t r = 0; r < src.rows; ++r) std::copy_n(src.row(r), src.cols, dst.row(r));
  }

  //! y = T(partial), rounded once.
  template <class T>
  static void round_to(Stream, MatrixView<float const> partial, MatrixView<T> y) {
    for (std::int64_t t = 0; t < y.rows; ++t)
      for (std::int64_t c = 0; c < y.cols; ++c) y(t, c) = from_float<T>(partial(t, c));
  }
};

}  // namespace epx::detail
