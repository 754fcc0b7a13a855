// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! Element conversions in device code, bit-identical to the host's (core/dtype.hpp), so CUDA
//! results can be compared with the Host backend bit for bit where the arithmetic is the same.

#include <epx/core/dtype.hpp>

#include <cuda_fp16.h>

#include <cstdint>

namespace epx::detail {

__device__ __forceinline__ float device_to_float(float v) { return v; }
__device__ __forceinline__ float device_to_float(bfloat16 v) { return __uint_as_float(std::uint32_t{v.bits} << 16); }
__device__ __forceinline__ float device_to_float(half v) {
  __half_raw raw;
  raw.x = v.bits;
  return __half2float(__half(raw));
}

template <class T>
__device__ __forceinline__ T device_from_float(float v);

template <>
__device__ __forceinline__ float device_from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ bfloat16 device_from_float<bfloat16>(float v) {
  std::uint32_t u = __float_as_uint(v);
  bfloat16 out;
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    out.bits = static_cast<std::uint16_t>((u >> 16) | 0x0040u);  // quiet NaN, as on the host
    return out;
  }
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  out.bits = static_cast<std::uint16_t>(u >> 16);
  return out;
}
template <>
__device__ __forceinline__ half device_from_float<half>(float v) {
  __half_raw const raw = __half_raw(__float2half_rn(v));  // IEEE round to nearest even, like the host
  half out;
  out.bits = raw.x;
  return out;
}

}  // namespace epx::detail
