// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! Dequantising checkpoint weights on the device (nvcc only): kernels that decode an FP8 e4m3
//! block-scaled or an MXFP4 [rows, cols] sub-matrix from device buffers of the stored bytes and
//! scales into T (float, epx::half, epx::bfloat16) destination rows. Each element is computed by
//! the same EPX_HOST_DEVICE functions as on the host (Fp8Source::at and Mxfp4Source::at in
//! fp8_e4m3.hpp and mxfp4.hpp, which tests/io/dequantize_index_test.cpp checks on the host), in
//! fp32, then rounded once to T to nearest even as the host rounds (cuda/element.cuh, with the
//! host's half NaN bits), so the device's result is the host load's, bit for bit.
//!
//! load_layer_to_device (cuda_upload.hpp) uses these when its call is compiled by nvcc: quantised
//! tensors go over PCIe as stored (1 byte per FP8 element, half a byte per MXFP4 element, plus
//! scales) instead of as decoded bf16 (2 bytes).

#include <epx/core/error.hpp>
#include <epx/core/stream.hpp>
#include <epx/cuda/element.cuh>
#include <epx/cuda/launch.cuh>
#include <epx/io/fp8_e4m3.hpp>
#include <epx/io/mxfp4.hpp>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string_view>
#include <type_traits>

namespace epx::io {

//! Where decoded element (i, j) of a [rows, cols] sub-matrix goes: data[i * row_step + j * col_step]
//! (row_step = the leading dimension and col_step = 1 for row-major rows; swapped to transpose).
template <class T>
struct DequantizeOut {
  T* data = nullptr;  //!< device memory
  std::int64_t row_step = 0;
  std::int64_t col_step = 1;
};

namespace detail {

template <class T>
struct Fp8DequantizeArgs {
  Fp8Source src;
  std::int64_t rows, cols;
  DequantizeOut<T> dst;
};

template <class T>
struct Mxfp4DequantizeArgs {
  Mxfp4Source src;
  std::int64_t rows, cols;
  DequantizeOut<T> dst;
};

//! T from a dequantised fp32 value, rounded as the host rounds (core/dtype.hpp), NaN bits included:
//! device_from_float, except that a NaN becomes the host's half NaN (sign, 0x7E00, the top payload
//! bits) where __float2half_rn would give its canonical 0x7FFF.
template <class T>
__device__ __forceinline__ T dequantized_to(float v) {
  if constexpr (std::is_same_v<T, half>) {
    std::uint32_t const u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      half h;
      h.bits = static_cast<std::uint16_t>(((u >> 16) & 0x8000u) | 0x7e00u | ((u >> 13) & 0x3ffu));
      return h;
    }
  }
  return epx::detail::device_from_float<T>(v);
}

//! Element (i, j) of the [rows, cols] sub-matrix, k = i * cols + j, per grid-stride step.
template <class T>
__global__ void fp8_dequantize_kernel(Fp8DequantizeArgs<T> const a) {
  std::int64_t const n = a.rows * a.cols;
  for (std::int64_t k = epx::detail::grid_thread<std::int64_t>(); k < n;
       k += epx::detail::grid_threads<std::int64_t>()) {
    std::int64_t const i = k / a.cols, j = k - i * a.cols;
    a.dst.data[i * a.dst.row_step + j * a.dst.col_step] = dequantized_to<T>(a.src.at(i, j));
  }
}

template <class T>
__global__ void mxfp4_dequantize_kernel(Mxfp4DequantizeArgs<T> const a) {
  std::int64_t const n = a.rows * a.cols;
  for (std::int64_t k = epx::detail::grid_thread<std::int64_t>(); k < n;
       k += epx::detail::grid_threads<std::int64_t>()) {
    std::int64_t const i = k / a.cols, j = k - i * a.cols;
    a.dst.data[i * a.dst.row_step + j * a.dst.col_step] = dequantized_to<T>(a.src.at(i, j));
  }
}

inline constexpr int kDequantizeThreads = 256;

//! Blocks for `n` elements: one per kDequantizeThreads, at most 16 per SM (grid-stride beyond).
inline unsigned dequantize_grid(std::int64_t n) {
  std::int64_t const wanted = (n + kDequantizeThreads - 1) / kDequantizeThreads;
  std::int64_t const cap = std::max<std::int64_t>(1, std::int64_t{epx::detail::current_device_traits().sms} * 16);
  return static_cast<unsigned>(std::clamp<std::int64_t>(wanted, 1, cap));
}

//! Checks the shape and the destination shared by both formats.
template <class T>
void check_dequantize_common(std::int64_t rows, std::int64_t cols, DequantizeOut<T> const& dst,
                             std::string_view where) {
  using epx::detail::require;
  require(rows >= 0, Errc::kInvalidArgument, where, "rows", rows, ">= 0");
  require(cols >= 0, Errc::kInvalidArgument, where, "cols", cols, ">= 0");
  if (rows == 0 || cols == 0) return;
  require(rows <= std::numeric_limits<std::int64_t>::max() / cols, Errc::kInvalidArgument, where, "rows x cols",
          fmt::format("{} x {}", rows, cols), "a product that fits in int64");
  require(dst.data != nullptr, Errc::kInvalidArgument, where, "dst.data", "nullptr", "device memory");
  require(dst.row_step >= 1, Errc::kInvalidArgument, where, "dst.row_step", dst.row_step, ">= 1");
  require(dst.col_step >= 1, Errc::kInvalidArgument, where, "dst.col_step", dst.col_step, ">= 1");
  // Distinct elements: rows apart by more than a row spans (row-major), or columns apart by more
  // than a column spans (transposed).
  bool const distinct = dst.row_step > (cols - 1) * dst.col_step || dst.col_step > (rows - 1) * dst.row_step;
  require(distinct, Errc::kInvalidArgument, where, "dst (row_step, col_step)",
          fmt::format("({}, {}) for {} x {}", dst.row_step, dst.col_step, rows, cols),
          "steps that give every element its own place: row_step > (cols - 1) * col_step or col_step > (rows - 1) * "
          "row_step");
}

}  // namespace detail

//! @brief Decodes an FP8 e4m3 block-scaled [rows, cols] sub-matrix (`src`, device memory) into
//! `dst` (device memory) on `stream`: dst(i, j) = T(e4m3(value) x scale), the product in fp32 (NaN
//! as dequantize_product defines it), one rounding to nearest even. Asynchronous: `src` must stay
//! valid and unchanged until `stream` has passed the kernel.
//! @throws Error(kInvalidArgument) naming the parameter for a host stream, negative or overflowing
//!         sizes, null pointers, leading dimensions too small for col0 + cols, blocks < 1, negative
//!         row0/col0, or destination steps that make two elements share a place; Error(kCuda) for a
//!         failed launch.
template <float_element T>
void dequantize_fp8_on_device(Fp8Source const& src, std::int64_t rows, std::int64_t cols, DequantizeOut<T> const& dst,
                              StreamRef stream) {
  constexpr std::string_view where = "epx::io::dequantize_fp8_on_device";
  using epx::detail::require;
  epx::detail::CudaStream const s(stream, where);
  detail::check_dequantize_common(rows, cols, dst, where);
  if (rows == 0 || cols == 0) return;
  require(src.values != nullptr, Errc::kInvalidArgument, where, "src.values", "nullptr", "device memory");
  require(src.scales != nullptr, Errc::kInvalidArgument, where, "src.scales", "nullptr", "device memory");
  require(src.block_rows >= 1, Errc::kInvalidArgument, where, "src.block_rows", src.block_rows, ">= 1");
  require(src.block_cols >= 1, Errc::kInvalidArgument, where, "src.block_cols", src.block_cols, ">= 1");
  require(src.row0 >= 0, Errc::kInvalidArgument, where, "src.row0", src.row0, ">= 0");
  require(src.col0 >= 0, Errc::kInvalidArgument, where, "src.col0", src.col0, ">= 0");
  require(src.values_ld >= src.col0 + cols, Errc::kInvalidArgument, where, "src.values_ld", src.values_ld,
          fmt::format(">= col0 + cols = {}", src.col0 + cols));
  std::int64_t const scale_cols = num_scale_blocks(src.col0 + cols, src.block_cols);
  require(src.scale_ld >= scale_cols, Errc::kInvalidArgument, where, "src.scale_ld", src.scale_ld,
          fmt::format(">= ceil((col0 + cols) / block_cols) = {}", scale_cols));
  detail::Fp8DequantizeArgs<T> const args{src, rows, cols, dst};
  detail::fp8_dequantize_kernel<T>
      <<<detail::dequantize_grid(rows * cols), detail::kDequantizeThreads, 0, s.get()>>>(args);
  EPX_CUDA_CHECK_LAUNCH(fp8_dequantize_kernel);
}

//! @brief Decodes an MXFP4 [rows, cols] sub-matrix (`src`, device memory) into `dst` (device
//! memory) on `stream`: dst(i, j) = T(e2m1(code) x 2^(scale - 127)), exact in fp32, one rounding to
//! nearest even; scale 0xFF gives NaN. Asynchronous, as dequantize_fp8_on_device.
//! @throws Error(kInvalidArgument) naming the parameter, as dequantize_fp8_on_device; Error(kCuda).
template <float_element T>
void dequantize_mxfp4_on_device(Mxfp4Source const& src, std::int64_t rows, std::int64_t cols,
                                DequantizeOut<T> const& dst, StreamRef stream) {
  constexpr std::string_view where = "epx::io::dequantize_mxfp4_on_device";
  using epx::detail::require;
  epx::detail::CudaStream const s(stream, where);
  detail::check_dequantize_common(rows, cols, dst, where);
  if (rows == 0 || cols == 0) return;
  require(src.blocks != nullptr, Errc::kInvalidArgument, where, "src.blocks", "nullptr", "device memory");
  require(src.scales != nullptr, Errc::kInvalidArgument, where, "src.scales", "nullptr", "device memory");
  require(src.col0 >= 0, Errc::kInvalidArgument, where, "src.col0", src.col0, ">= 0");
  std::int64_t const end = src.col0 + cols;
  require(src.blocks_ld >= (end + 1) / 2, Errc::kInvalidArgument, where, "src.blocks_ld", src.blocks_ld,
          fmt::format(">= ceil((col0 + cols) / 2) = {}", (end + 1) / 2));
  std::int64_t const scale_cols = num_scale_blocks(end, kMxfp4BlockElements);
  require(src.scale_ld >= scale_cols, Errc::kInvalidArgument, where, "src.scale_ld", src.scale_ld,
          fmt::format(">= ceil((col0 + cols) / 32) = {}", scale_cols));
  detail::Mxfp4DequantizeArgs<T> const args{src, rows, cols, dst};
  detail::mxfp4_dequantize_kernel<T>
      <<<detail::dequantize_grid(rows * cols), detail::kDequantizeThreads, 0, s.get()>>>(args);
  EPX_CUDA_CHECK_LAUNCH(mxfp4_dequantize_kernel);
}

}  // namespace epx::io
