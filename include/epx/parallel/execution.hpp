// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! What an execution space supplies to ExpertParallel: a LayerExecution (where the layer's work runs
//! and the few operations whose code differs between spaces) and its expert parts. Everything else
//! of the layer (parallel/expert_parallel.hpp, parallel/dispatch.hpp) is the same code on every
//! space, so the host tests run all of it.

#include <epx/comm/communicator.hpp>
#include <epx/core/placement.hpp>
#include <epx/core/space.hpp>
#include <epx/core/status.hpp>
#include <epx/core/views.hpp>
#include <epx/core/workspace.hpp>
#include <epx/gemm/expert_mlp.hpp>
#include <epx/parallel/exchange_layout.hpp>
#include <epx/parallel/forward_control.hpp>
#include <epx/parallel/tags.hpp>
#include <epx/permute/plan.hpp>

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>

namespace epx {

struct MoeConfig;

namespace detail {

//! The layer's own profiler ranges (NVTX on Cuda; nothing on Host).
enum class LayerStage : std::uint8_t { kForward, kDispatch, kCombine };

//! A range that marks nothing: what a space without a profiler hook uses.
struct NoRange {
  NoRange() noexcept {}  // user-provided: an unused range is no unused-variable warning
  void end() noexcept {}
};

//! @brief The part of ExpertParallel that differs between execution spaces. Each space specialises
//! it in its own folder (host/expert_parallel.hpp, cuda/expert_parallel.cuh); this primary template
//! is empty, which is how ExpertParallel tells a space that has none in this translation unit.
//!
//! A specialisation provides (layer_execution checks the shape of it):
//!  - `Context`: what forward and status take (Host, or a StreamRef); `Stream`: where work is
//!    ordered once `stream(context, where)` has checked the context (the one place that can fail);
//!    `comm_stream(stream)`: the StreamRef the Communicator's collectives take.
//!  - `kSynchronous`: whether work has finished when a call returns, so that the host reads results
//!    at no cost; `Range<LayerStage>`: a scope a profiler sees.
//!  - the stages whose signatures differ per space: plan_workspace_bytes, make_plan (counters into a
//!    Status in the execution's memory).
//!  - the layer's own small steps: reset_control, record_first_invalid, write_count_row, regroup
//!    (rank-major <-> expert-major rows) and round_to (the fp32 all-reduce result into y).
//!  - the host-visible control block: read_to_host(stream, comm, words), which on a space that is
//!    not synchronous copies and waits (Communicator::wait: bounded by the communicator's deadline),
//!    and write_to_device(stream, part, pack), which lets `pack` fill host memory that then reaches
//!    `part` in the order of the stream; write_header(stream, words, header), which writes a small
//!    trivially copyable value into the space's memory in stream order without that staging.
//!  - check_communicator(comm): the memory a Communicator moves must be the space's.
//!  - a constructor from (control words, upload bytes): the largest reads and writes a forward
//!    makes, for spaces that keep host mirrors of them (pinned memory on Cuda).
template <class Space>
class LayerExecution {};

//! A pack function that writes nothing (what layer_execution checks write_to_device with).
struct PackNothing {
  void operator()(std::span<std::byte>) const noexcept {}
};

template <class E>
concept layer_execution = std::constructible_from<E, std::size_t, std::size_t> &&
    requires(E& exec, typename E::Context context, typename E::Stream stream, Communicator& comm,
             MatrixView<std::int32_t const> ids, ExpertRange range, Workspace ws, Status* status,
             ForwardControl* control, std::uint64_t* key, std::span<std::int64_t> words,
             std::span<RowSegment const> segments, MatrixView<float> rows, MatrixView<float const> partial) {
  { E::kSynchronous } -> std::convertible_to<bool>;
  typename E::template Range<LayerStage::kForward>;
  { E::stream(context, std::string_view()) } -> std::same_as<typename E::Stream>;
  { E::comm_stream(stream) } -> std::same_as<StreamRef>;
  E::check_communicator(comm);
  { E::plan_workspace_bytes(std::int32_t{}, std::int32_t{}, std::int32_t{}) } -> std::same_as<std::size_t>;
  { E::make_plan(stream, ids, std::int32_t{}, range, ws, status) } -> std::same_as<RoutingPlan>;
  E::reset_control(stream, control);
  E::record_first_invalid(stream, ids, std::int32_t{}, key);
  E::write_count_row(stream, ids.data, std::int32_t{}, CountRowHead{}, words);
  {
    exec.read_to_host(stream, comm, std::span<std::int64_t const>(words))
    } -> std::same_as<std::span<std::int64_t const>>;
  exec.write_to_device(stream, std::span<std::byte>(), PackNothing{});
  E::write_header(stream, words, std::int64_t{});
  E::regroup(stream, segments, std::int64_t{}, rows, rows, bool{});
  E::round_to(stream, partial, rows);
};

//! Maps an expert policy and an execution space to the expert part that runs it. Each space
//! specialises it for the policies it has.
template <class Experts, class Space>
struct ExpertKernelSelector {
  static_assert(dependent_false<Experts, Space>,
                "epx: ExpertParallel's first argument is the expert policy: epx::Grouped or epx::CublasGrouped");
};

//! @brief An expert part: the expert MLP over rows grouped by local expert, with the same
//! signature on every space (only `Stream` differs). Default-constructible (the layer makes one);
//! `check(config)` throws the Error of a layer it cannot run (the layer's can_implement asks it);
//! `workspace_bytes<T>(mlp, num_groups, max_rows)` sizes its scratch (num_groups: the local experts); `run<T>(stream, mlp, weights, x,
//! offsets, out, workspace, rows_hint)` reads offsets in the space's memory, and rows_hint is the
//! row count the experts are expected to hold (it may pick tile shapes; a space may ignore it);
//! `kernel_name()` names the kernel the last run used (ExpertParallel::expert_kernel).
template <class Part, class Stream>
concept expert_part = std::default_initializable<Part> &&
    requires(Part& part, Part const& cpart, Stream stream, MoeConfig const& config, ExpertMlpConfig const& mlp,
             ExpertWeights const& weights, MatrixView<float const> x, std::span<std::int32_t const> offsets,
             MatrixView<float> out, Workspace ws, std::int64_t rows) {
  Part::check(config);
  { cpart.template workspace_bytes<float>(mlp, std::int32_t{}, rows) } -> std::same_as<std::size_t>;
  part.template run<float>(stream, mlp, weights, x, offsets, out, ws, rows);
  { cpart.kernel_name() } -> std::convertible_to<std::string_view>;
};

}  // namespace detail
}  // namespace epx
