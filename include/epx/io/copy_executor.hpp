// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! Running one CopyJob: reading its slice of the checkpoint and decoding it into the destination,
//! through a bounded staging buffer. A sink says where decoded elements go (host memory directly,
//! or a pinned block that is then uploaded), so host and device loads share every line that
//! reads, converts, dequantises or transposes.
//!
//! A job whose bytes are the destination's (plain, same element type, not transposed, dense) is one
//! positioned read straight into host destination memory: no staging, no extra copy. Any other job
//! goes in chunks of whole stored rows, each chunk at most the staging buffer's size (but at least
//! one stored row): read the chunk's bytes, decode each element (element_conversion.hpp,
//! fp8_e4m3.hpp, mxfp4.hpp) and write it where the job says, transposing on the way when the
//! family stores [in, out]. FP8 block scales are read whole per expert matrix first (a few KB).

#include <epx/core/dtype.hpp>
#include <epx/io/checkpoint.hpp>
#include <epx/io/element_conversion.hpp>
#include <epx/io/fp8_e4m3.hpp>
#include <epx/io/layer_plan.hpp>
#include <epx/io/mxfp4.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <vector>

namespace epx::io::detail {

//! Where the decoded elements of a chunk go: element (i, j) of the chunk (stored row s0 + i,
//! stored column j) is written to base[i * row_step + j * col_step].
template <class U>
struct StridedOut {
  U* base = nullptr;
  std::int64_t row_step = 0;
  std::int64_t col_step = 0;
};

//! U (a float_element or float) from an fp32 value, rounded to nearest even.
template <class U>
inline U round_to(float value) noexcept {
  if constexpr (std::is_same_v<U, float>)
    return value;
  else
    return U(value);
}

//! Decodes `n` stored rows (rows s0 .. s0 + n - 1 of one matrix of the job) into `out`.
//! `values` holds their bytes, `mx_scales` their MXFP4 scales, `fp8_scales` the matrix's block
//! scales (decoded) for FP8.
template <class U>
void decode_rows(CopyJob const& job, std::byte const* values, std::byte const* mx_scales,
                 std::span<float const> fp8_scales, std::int64_t s0, std::int64_t n, StridedOut<U> out) {
  std::int64_t const cols = job.stored_cols;
  switch (job.encoding) {
    case WeightEncoding::kPlain: {
      auto const dtype = job.values_dtype();
      auto const esize = static_cast<std::int64_t>(bits_of(dtype) / 8);
      for (std::int64_t i = 0; i < n; ++i)
        convert_plain_row<U>(dtype, values + i * cols * esize, cols, out.base + i * out.row_step, out.col_step);
      return;
    }
    case WeightEncoding::kFp8BlockScaled: {
      std::int64_t const scale_cols = job.fp8_scale_cols();
      for (std::int64_t i = 0; i < n; ++i) {
        auto const* row = reinterpret_cast<std::uint8_t const*>(values) + i * cols;
        float const* scale_row = fp8_scales.data() + ((s0 + i) / job.fp8_block[0]) * scale_cols;
        U* o = out.base + i * out.row_step;
        for (std::int64_t j = 0; j < cols; ++j)
          o[j * out.col_step] = round_to<U>(dequantize_product(decode_e4m3(row[j]), scale_row[j / job.fp8_block[1]]));
      }
      return;
    }
    case WeightEncoding::kMxfp4: {
      std::int64_t const row_bytes = job.value_row_bytes(), row_scales = job.scale_row_bytes();
      for (std::int64_t i = 0; i < n; ++i) {
        auto const* row = reinterpret_cast<std::uint8_t const*>(values) + i * row_bytes;
        auto const* scale = reinterpret_cast<std::uint8_t const*>(mx_scales) + i * row_scales;
        U* o = out.base + i * out.row_step;
        for (std::int64_t j = 0; j < cols; ++j)
          o[j * out.col_step] = round_to<U>(mxfp4_element(row + (j / kMxfp4BlockElements) * kMxfp4BlockBytes,
                                                          j % kMxfp4BlockElements, scale[j / kMxfp4BlockElements]));
      }
      return;
    }
  }
}

//! The loader's staging memory: grown on demand up to a limit, reused by every job; remembers its
//! peak size (what the loader allocated beyond the caller's buffers).
class Staging {
 public:
  explicit Staging(std::size_t limit) : limit_(limit) {}
  //! The size a chunk may use: the limit, but never less than `at_least` (one stored row).
  [[nodiscard]] std::size_t budget(std::size_t at_least) const noexcept { return std::max(limit_, at_least); }
  [[nodiscard]] std::span<std::byte> take(std::size_t bytes) {
    if (bytes > buffer_.size()) {
      buffer_.clear();
      buffer_.shrink_to_fit();
      buffer_.resize(bytes);
      peak_ = std::max(peak_, bytes);
    }
    return {buffer_.data(), bytes};
  }
  [[nodiscard]] std::size_t peak_bytes() const noexcept { return peak_; }

 private:
  std::size_t limit_;
  std::vector<std::byte> buffer_;
  std::size_t peak_ = 0;
};

//! @brief Reads job `job`'s slice and writes it, decoded to U, through `sink`.
//! A sink has: `std::span<std::byte> verbatim(job, dtype)` (destination bytes when the job can be
//! read straight into them, else empty); `StridedOut<U> begin_chunk<U>(job, m, s0, n)`;
//! `void end_chunk<U>(job, m, s0, n)`; `std::int64_t max_chunk_rows<U>(job)`.
template <class U, class Sink>
void run_copy_job(Checkpoint& ckpt, CopyJob const& job, Sink& sink, Staging& staging) {
  std::uint64_t const row_bytes = static_cast<std::uint64_t>(job.value_row_bytes());
  std::uint64_t const matrix_bytes = row_bytes * static_cast<std::uint64_t>(job.stored_rows);
  if (auto const direct = sink.template verbatim<U>(job); !direct.empty()) {
    ckpt.read(job.values, static_cast<std::uint64_t>(job.first) * matrix_bytes, direct);
    return;
  }
  std::uint64_t const scale_row_bytes = static_cast<std::uint64_t>(job.scale_row_bytes());
  std::uint64_t const chunk_row_bytes = row_bytes + scale_row_bytes;
  std::int64_t rows_per_chunk = std::max<std::int64_t>(
      1, static_cast<std::int64_t>(staging.budget(chunk_row_bytes) / std::max<std::uint64_t>(chunk_row_bytes, 1)));
  rows_per_chunk = std::min({rows_per_chunk, job.stored_rows, sink.template max_chunk_rows<U>(job)});
  rows_per_chunk = std::max<std::int64_t>(rows_per_chunk, 1);
  std::vector<float> fp8_scales;
  std::vector<std::byte> fp8_scale_bytes;
  for (std::int64_t m = 0; m < job.count; ++m) {
    std::uint64_t const matrix = static_cast<std::uint64_t>(job.first + m);
    if (job.encoding == WeightEncoding::kFp8BlockScaled) {
      auto const scale_dtype = job.scales.info->dtype;
      auto const esize = bits_of(scale_dtype) / 8;
      auto const n = static_cast<std::size_t>(job.fp8_scale_rows() * job.fp8_scale_cols());
      fp8_scale_bytes.resize(n * esize);
      ckpt.read(job.scales, matrix * n * esize, fp8_scale_bytes);
      fp8_scales.resize(n);
      for (std::size_t k = 0; k < n; ++k) fp8_scales[k] = decode_plain(scale_dtype, fp8_scale_bytes.data() + k * esize);
    }
    for (std::int64_t s0 = 0; s0 < job.stored_rows; s0 += rows_per_chunk) {
      std::int64_t const n = std::min(rows_per_chunk, job.stored_rows - s0);
      auto const un = static_cast<std::uint64_t>(n), us0 = static_cast<std::uint64_t>(s0);
      auto const chunk = staging.take(static_cast<std::size_t>(un * chunk_row_bytes));
      auto const values = chunk.first(static_cast<std::size_t>(un * row_bytes));
      ckpt.read(job.values, matrix * matrix_bytes + us0 * row_bytes, values);
      std::byte const* mx_scales = nullptr;
      if (job.encoding == WeightEncoding::kMxfp4) {
        auto const scales = chunk.subspan(values.size(), static_cast<std::size_t>(un * scale_row_bytes));
        std::uint64_t const scale_matrix_bytes = scale_row_bytes * static_cast<std::uint64_t>(job.stored_rows);
        ckpt.read(job.scales, matrix * scale_matrix_bytes + us0 * scale_row_bytes, scales);
        mx_scales = scales.data();
      }
      decode_rows<U>(job, values.data(), mx_scales, fp8_scales, s0, n, sink.template begin_chunk<U>(job, m, s0, n));
      sink.template end_chunk<U>(job, m, s0, n);
    }
  }
}

}  // namespace epx::io::detail
