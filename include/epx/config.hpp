// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

#include <epx/version.hpp>

#if __cplusplus < 202002L && !defined(_MSVC_LANG)
#error "epx needs C++20 (-std=c++20)"
#endif

//! Functions usable from host and device code when compiled by nvcc; plain functions otherwise.
#if defined(__CUDACC__)
#define EPX_HOST_DEVICE __host__ __device__
#else
#define EPX_HOST_DEVICE
#endif
