// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! The Hopper grouped GEMM on CUTLASS: c[rows of g] = a[rows of g] · b[g]ᵀ for every group g of the
//! offsets, on CUTLASS's sm90 ptr-array grouped kernel (TMA loads, warp-specialised wgmma, a
//! persistent group scheduler), the kernel torch._grouped_mm runs on sm_90. Per-group shapes,
//! pointers and strides are written **on the device** from the offsets by one small kernel, so there
//! is no host synchronisation and nothing is allocated (scratch from the caller's Workspace): the
//! GEMM is CUDA-graph capturable.
//!
//! Needs the CUTLASS headers (>= 3.9; CMake: EPX_WITH_CUTLASS, docs/cutlass.md) and code for sm_90a
//! (`-gencode arch=compute_90a,code=sm_90a`); elsewhere the kernels compile to nothing and
//! `cutlass_grouped_gemm_available()` says false at run time. CUTLASS's device asserts serialise its
//! wgmma pipeline (ptxas warning C7510), so its headers are read here with NDEBUG defined whatever
//! the build type (include this header before any other CUTLASS header of the translation unit).
//!
//! Layouts, as epx stores them: a [rows, k] row-major with leading dimension lda (CUTLASS's A,
//! RowMajor), b [groups, n, k] K-major (CUTLASS's B, ColumnMajor), c [rows, n] row-major (D). bf16 or
//! fp16 in, fp32 accumulation, c in the input type or fp32. With shapes only on the device CUTLASS
//! cannot check each group: k, n and the leading dimensions must keep every row 16-byte aligned
//! (multiples of 8 elements for 16-bit types, 4 for fp32 output), checked on the host here.

#if !defined(EPX_HAVE_CUTLASS)
#error "epx/cuda/gemm/cutlass_grouped.cuh needs the CUTLASS headers: configure with EPX_WITH_CUTLASS (docs/cutlass.md)"
#endif

// An sm_90 (not sm_90a) device pass would compile CUTLASS's wgmma/TMA kernels to traps.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 900 && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error \
    "epx's CUTLASS path needs sm_90a code for sm_90 GPUs: compile with -gencode arch=compute_90a,code=sm_90a (CMake: CUDA_ARCHITECTURES 90a), not sm_90"
#endif

#if !defined(NDEBUG)
#define NDEBUG
#define EPX_CUTLASS_RESTORE_ASSERT
#endif
#include <cassert>

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/group_array_problem_shape.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>

#if defined(EPX_CUTLASS_RESTORE_ASSERT)
#undef NDEBUG
#undef EPX_CUTLASS_RESTORE_ASSERT
#include <cassert>  // the translation unit's own assert again
#endif

#include <epx/core/dtype.hpp>
#include <epx/core/error.hpp>
#include <epx/core/stream.hpp>
#include <epx/core/views.hpp>
#include <epx/core/workspace.hpp>
#include <epx/cuda/element.cuh>
#include <epx/cuda/error.hpp>
#include <epx/cuda/gemm/group_problem.hpp>
#include <epx/cuda/launch.cuh>
#include <epx/cuda/tuning.cuh>

#include <cstdint>
#include <map>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>

namespace epx {

namespace detail::cutlass_path {

template <class T>
struct Element;
template <>
struct Element<bfloat16> {
  using type = cutlass::bfloat16_t;
};
template <>
struct Element<half> {
  using type = cutlass::half_t;
};
template <>
struct Element<float> {
  using type = float;
};

template <CutlassTile kTile>
struct TileConfig;
template <>
struct TileConfig<CutlassTile::kPingpong64x128> {
  using Tile = cute::Shape<cute::_64, cute::_128, cute::_128>;
  using Cluster = cute::Shape<cute::_2, cute::_1, cute::_1>;
  using Kernel = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong;
  using Epilogue = cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong;
};
template <>
struct TileConfig<CutlassTile::kCooperative128x256> {
  using Tile = cute::Shape<cute::_128, cute::_256, cute::_64>;
  using Cluster = cute::Shape<cute::_2, cute::_1, cute::_1>;
  using Kernel = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative;
  using Epilogue = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;
};

using ProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;  // (M, N, K) per group

//! The CUTLASS kernel of one (input, output, tile, operand layouts) choice: d = a · bᵀ in CUTLASS's
//! modes (a [M, K], b [N, K], d [M, N] row-major), no source operand. The forward reads a K-major
//! (RowMajor A) and b K-major (ColumnMajor B); the gradients read b or a N-major (RowMajor B) and
//! dc M-major (ColumnMajor A): group_problem.hpp says which problem uses which.
template <class T, class TOut, CutlassTile kTile, class LayoutA = cutlass::layout::RowMajor,
          class LayoutB = cutlass::layout::ColumnMajor>
struct GroupedKernel {
  using ElementA = typename Element<T>::type;
  using ElementD = typename Element<TOut>::type;
  using Config = TileConfig<kTile>;
  static constexpr int kAlignmentAB = 16 / sizeof(ElementA);
  static constexpr int kAlignmentD = 16 / sizeof(ElementD);

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, typename Config::Tile, typename Config::Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, cutlass::layout::RowMajor*, kAlignmentD,
      ElementD, cutlass::layout::RowMajor*, kAlignmentD, typename Config::Epilogue,
      cutlass::epilogue::fusion::LinearCombination<ElementD, float, void, float>>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementA, LayoutA*, kAlignmentAB, ElementA, LayoutB*,
      kAlignmentAB, float, typename Config::Tile, typename Config::Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      typename Config::Kernel>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;
};

//! CUTLASS's stride of one operand from its element strides in CUTLASS's modes: the kernel's layout
//! fixes one mode at unit stride (a cute::Int<1>), the other is the leading dimension. Throws (an
//! internal error: a problem read with the wrong layout) where `s` disagrees with the layout.
template <class Stride>
Stride cute_stride(OperandStrides s, std::string_view where) {
  Stride out{};
  auto set = [&]<int kMode>(std::int64_t value) {
    using Mode = cute::remove_cvref_t<decltype(cute::get<kMode>(out))>;
    if constexpr (cute::is_static<Mode>::value) {
      if (value != Mode::value)
        throw_error(Errc::kUnsupported, fmt::format("{}: operand stride {} in mode {}, the kernel's layout has {}",
                                                    where, value, kMode, Mode::value));
    } else {
      cute::get<kMode>(out) = value;
    }
  };
  set.template operator()<0>(s.mode0);
  set.template operator()<1>(s.mode1);
  return out;
}

//! What the per-group argument kernel writes, in the caller's Workspace.
template <class K>
struct GroupArgs {
  typename ProblemShape::UnderlyingProblemShape* shapes;  // [groups] (M, N, K)
  typename K::ElementA const** a;                         // [groups]
  typename K::ElementA const** b;                         // [groups]
  typename K::ElementD** d;                               // [groups]
  typename K::StrideA* stride_a;                          // [groups]
  typename K::StrideB* stride_b;                          // [groups]
  typename K::StrideD* stride_d;                          // [groups]
};

//! The operands' strides, the same for every group of a call.
template <class K>
struct CallStrides {
  typename K::StrideA a;
  typename K::StrideB b;
  typename K::StrideD d;
};

template <class K, class Problem>
CallStrides<K> call_strides(Problem const& problem, std::string_view where) {
  GroupStrides const s = problem.strides();
  return {cute_stride<typename K::StrideA>(s.a, where), cute_stride<typename K::StrideB>(s.b, where),
          cute_stride<typename K::StrideD>(s.d, where)};
}

//! Group g's problem (`problem(g)`: group_problem.hpp's ForwardProblem, DataGradientProblem or
//! WeightGradientProblem): its shape and where its operands start. A group without rows is a
//! problem with M = 0, which the scheduler gives no tile.
template <class K, class Problem>
__global__ void group_args_kernel(GroupArgs<K> const out, Problem const problem, typename K::ElementA const* a,
                                  typename K::ElementA const* b, typename K::ElementD* d, CallStrides<K> const strides,
                                  int groups) {
  for (int g = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x); g < groups;
       g += static_cast<int>(gridDim.x * blockDim.x)) {
    GroupProblem const p = problem(g);
    out.shapes[g] = cute::make_shape(p.m, p.n, p.k);
    out.a[g] = a + p.a_offset;
    out.b[g] = b + p.b_offset;
    out.d[g] = d + p.d_offset;
    out.stride_a[g] = strides.a;
    out.stride_b[g] = strides.b;
    out.stride_d[g] = strides.d;
  }
}

//! The Workspace parts of one grouped GEMM with `groups` groups.
template <class K, class Carver>
GroupArgs<K> carve_group_args(Carver& c, std::size_t groups) {
  GroupArgs<K> p;
  p.shapes = c.template take<typename ProblemShape::UnderlyingProblemShape>(groups).data();
  p.a = c.template take<typename K::ElementA const*>(groups).data();
  p.b = c.template take<typename K::ElementA const*>(groups).data();
  p.d = c.template take<typename K::ElementD*>(groups).data();
  p.stride_a = c.template take<typename K::StrideA>(groups).data();
  p.stride_b = c.template take<typename K::StrideB>(groups).data();
  p.stride_d = c.template take<typename K::StrideD>(groups).data();
  return p;
}

template <class K>
typename K::Gemm::Arguments make_arguments(GroupArgs<K> const& p, int groups, DeviceTraits const& dev) {
  cutlass::KernelHardwareInfo hw;
  hw.device_id = dev.device;
  hw.sm_count = dev.sms;
  typename K::Gemm::Arguments args{cutlass::gemm::GemmUniversalMode::kGrouped,
                                   {groups, p.shapes, nullptr},  // shapes on the device only
                                   {p.a, p.stride_a, p.b, p.stride_b},
                                   {{}, nullptr, nullptr, p.d, p.stride_d},
                                   hw};
  args.epilogue.thread.alpha = 1.0f;
  args.epilogue.thread.beta = 0.0f;
  return args;
}

//! CUTLASS's own scratch for `groups` groups on the current device (independent of the sizes,
//! which live on the device).
template <class K>
std::size_t cutlass_workspace_bytes(int groups, DeviceTraits const& dev) {
  GroupArgs<K> const none{};
  return K::Gemm::get_workspace_size(make_arguments<K>(none, groups, dev));
}

template <class K>
std::size_t grouped_workspace_bytes(std::int64_t groups, DeviceTraits const& dev) {
  auto const g = static_cast<std::size_t>(groups);
  return layout_bytes([&](auto& c) {
    (void)carve_group_args<K>(c, g);
    return c.template take<std::byte>(cutlass_workspace_bytes<K>(static_cast<int>(groups), dev));
  });
}

inline void check_cutlass(cutlass::Status status, std::string_view where, std::string_view step) {
  if (status != cutlass::Status::kSuccess)
    throw_error(Errc::kCuda, fmt::format("{}: CUTLASS {} failed: {}", where, step, cutlassGetStatusString(status)));
}

}  // namespace detail::cutlass_path

namespace detail::cutlass_path {

//! Whether kernel K can run on the current device: an sm_90 device, and K's code there is sm_90a
//! machine code (binaryVersion 90 from PTX of at least 9.0: not PTX of an older target JIT-compiled,
//! whose wgmma/TMA paths are traps). Read once per device and kernel; no stream work.
template <class K>
bool kernel_runs_here() {
  auto const dev = current_device_traits();
  if (dev.major != 9 || dev.minor != 0) return false;
  static std::mutex mutex;
  static std::map<int, bool> known;
  std::lock_guard const lock(mutex);
  if (auto const it = known.find(dev.device); it != known.end()) return it->second;
  cudaFuncAttributes attributes{};
  bool const runs = cudaFuncGetAttributes(&attributes, cutlass::device_kernel<typename K::Kernel>) == cudaSuccess &&
                    attributes.binaryVersion == 90 && attributes.ptxVersion >= 90;
  (void)cudaGetLastError();  // a missing image is an answer here, not a sticky error for the caller
  known.emplace(dev.device, runs);
  return runs;
}

}  // namespace detail::cutlass_path

//! Whether the CUTLASS path runs on the current device: an sm_90 GPU (H100, H200) and sm_90a code
//! for it in this program. Answers once per device (no stream work: safe during graph capture).
inline bool cutlass_grouped_gemm_available() {
  return detail::cutlass_path::kernel_runs_here<
      detail::cutlass_path::GroupedKernel<bfloat16, bfloat16, CutlassTile::kPingpong64x128>>();
}

//! Workspace bytes of cutlass_grouped_gemm for `groups` groups (the per-group arguments and CUTLASS's
//! scratch; no dependence on the rows). Reads the current device's SM count.
template <float_element T, float_element TOut>
[[nodiscard]] std::size_t cutlass_grouped_gemm_workspace_bytes(std::int64_t groups, CutlassTile tile) {
  auto const dev = detail::current_device_traits();
  return tile == CutlassTile::kPingpong64x128
             ? detail::cutlass_path::grouped_workspace_bytes<
                   detail::cutlass_path::GroupedKernel<T, TOut, CutlassTile::kPingpong64x128>>(groups, dev)
             : detail::cutlass_path::grouped_workspace_bytes<
                   detail::cutlass_path::GroupedKernel<T, TOut, CutlassTile::kCooperative128x256>>(groups, dev);
}

namespace detail::cutlass_path {

//! What every CUTLASS grouped GEMM requires of its element types (a compile error otherwise).
template <class T, class TOut>
constexpr void check_element_types() {
  static_assert(!std::is_same_v<T, float>, "epx: the CUTLASS grouped GEMM takes bf16 or fp16 inputs");
  static_assert(std::is_same_v<TOut, T> || std::is_same_v<TOut, float>,
                "epx: the CUTLASS grouped GEMM writes the input type or fp32");
}

//! Throws, naming `where`, unless the CUTLASS path runs on the current device.
inline void require_runs_here(std::string_view where) {
  require(cutlass_grouped_gemm_available(), Errc::kInvalidArgument, where, "device",
          fmt::format("sm_{}{}", current_device_traits().major, current_device_traits().minor),
          "an sm_90 device and code compiled for sm_90a (-gencode arch=compute_90a,code=sm_90a)");
}

//! One grouped GEMM of kernel K over `groups` problems: the argument kernel, then CUTLASS's.
template <class K, class Problem>
void run_problem(detail::CudaStream stream, Problem const& problem, void const* a, void const* b, void* d, int groups,
                 Workspace workspace, std::string_view where) {
  auto const dev = current_device_traits();
  if (groups == 0) return;
  auto const strides = call_strides<K>(problem, where);
  auto const parts = carve_layout(workspace, where, [&](auto& carver) {
    auto const args = carve_group_args<K>(carver, static_cast<std::size_t>(groups));
    auto const scratch = carver.template take<std::byte>(cutlass_workspace_bytes<K>(groups, dev));
    return std::pair{args, scratch};
  });
  cudaStream_t const s = stream.get();
  int const threads = 128, blocks = (groups + threads - 1) / threads;
  group_args_kernel<K, Problem><<<static_cast<unsigned>(blocks), threads, 0, s>>>(
      parts.first, problem, static_cast<typename K::ElementA const*>(a), static_cast<typename K::ElementA const*>(b),
      static_cast<typename K::ElementD*>(d), strides, groups);
  EPX_CUDA_CHECK_LAUNCH(group_args_kernel);
  typename K::Gemm gemm;
  auto const args = make_arguments<K>(parts.first, groups, dev);
  check_cutlass(gemm.initialize(args, parts.second.data(), s), where, "initialize");
  check_cutlass(gemm.run(s), where, "run");
}

template <class T, class TOut, CutlassTile kTile>
void run(detail::CudaStream stream, MatrixView<T const> a, BatchedMatrixView<T const> b,
         std::span<std::int32_t const> offsets, MatrixView<TOut> c, Workspace workspace, std::string_view where) {
  ForwardProblem const problem{.offsets = offsets.data(),
                               .num_rows = a.rows,
                               .lda = a.ld,
                               .ldd = c.ld,
                               .n = static_cast<std::int32_t>(b.rows),
                               .k = static_cast<std::int32_t>(b.cols)};
  run_problem<GroupedKernel<T, TOut, kTile>>(stream, problem, a.data, b.data, c.data, static_cast<int>(b.batch),
                                             workspace, where);
}

}  // namespace detail::cutlass_path

//! @brief c[rows of g] = a[rows of g] · b[g]ᵀ on CUTLASS's Hopper grouped GEMM (see the file's
//! comment), rows of group g in [offsets[g], offsets[g+1]) (offsets in device memory, never read on
//! the host). Rows outside every group are left untouched.
//! @param[in]  stream     where the argument kernel and the GEMM run
//! @param[in]  a          [rows, k] bf16/fp16, lda a multiple of 8, 16-byte aligned
//! @param[in]  b          [groups, n, k] K-major, the same type; n and k multiples of 8
//! @param[in]  offsets    [groups + 1] device
//! @param[out] c          [rows, n] of T or fp32, ldc keeping rows 16-byte aligned
//! @param[in]  workspace  at least cutlass_grouped_gemm_workspace_bytes<T, TOut>(groups, tile)
//! @param[in]  tile       the tile configuration (cutlass_tile_for picks one from the rows per group)
//! @throws Error naming a shape or alignment CUTLASS cannot take, a device that is not sm_90 or a
//!         build without sm_90a code, a workspace too small, a CUDA or CUTLASS failure.
template <float_element T, float_element TOut>
void cutlass_grouped_gemm(StreamRef stream_ref, MatrixView<T const> a, BatchedMatrixView<T const> b,
                          std::span<std::int32_t const> offsets, MatrixView<TOut> c, Workspace workspace,
                          CutlassTile tile) {
  constexpr std::string_view where = "cutlass_grouped_gemm";
  detail::CudaStream const stream(stream_ref, where);
  detail::cutlass_path::check_element_types<T, TOut>();
  detail::cutlass_path::require_runs_here(where);
  detail::check_matrix(where, "a", a, -1, b.cols);
  detail::check_matrix(where, "c", MatrixView<TOut const>(c), a.rows, b.rows);
  detail::require(offsets.size() == static_cast<std::size_t>(b.batch) + 1, Errc::kShapeMismatch, where,
                  "offsets.size()", offsets.size(), fmt::format("b.batch + 1 = {}", b.batch + 1));
  constexpr std::int64_t kElemsAB = 8, kElemsD = 16 / static_cast<std::int64_t>(sizeof(TOut));
  detail::require(b.cols % kElemsAB == 0 && a.ld % kElemsAB == 0, Errc::kInvalidArgument, where, "k (and lda)",
                  fmt::format("{} ({})", b.cols, a.ld), "multiples of 8 (16-byte rows for TMA)");
  detail::require(b.rows % kElemsAB == 0 && c.ld % kElemsD == 0, Errc::kInvalidArgument, where, "n (and ldc)",
                  fmt::format("{} ({})", b.rows, c.ld), fmt::format("n a multiple of 8, ldc of {}", kElemsD));
  auto const aligned = [](void const* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; };
  detail::require(aligned(a.data) && aligned(b.data) && aligned(c.data), Errc::kInvalidArgument, where,
                  "a.data, b.data, c.data", "a pointer not 16-byte aligned", "16-byte aligned pointers");
  if (tile == CutlassTile::kPingpong64x128)
    detail::cutlass_path::run<T, TOut, CutlassTile::kPingpong64x128>(stream, a, b, offsets, c, workspace, where);
  else
    detail::cutlass_path::run<T, TOut, CutlassTile::kCooperative128x256>(stream, a, b, offsets, c, workspace, where);
}

}  // namespace epx
