// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! Umbrella for the CUDA backend (compile with nvcc, link epx::cuda). Everything of
//! <epx/epx.hpp> plus the CUDA stage functions, which take a StreamRef as their execution context:
//! route, make_plan (CUB radix sort), permute, unpermute, grouped_gemm, expert_mlp (Grouped and
//! CublasGrouped), CudaLocalGroup and the Cuda space of ExpertParallel.

#include <epx/epx.hpp>

#include <epx/cuda/cublas_grouped.cuh>
#include <epx/cuda/element.cuh>
#include <epx/cuda/error.hpp>
#include <epx/cuda/expert_mlp.cuh>
#include <epx/cuda/grouped_gemm.cuh>
#include <epx/cuda/launch.cuh>
#include <epx/cuda/local_group.cuh>
#include <epx/cuda/permute.cuh>
#include <epx/cuda/permute_backward.cuh>
#include <epx/cuda/plan.cuh>
#include <epx/cuda/router.cuh>
#include <epx/cuda/tuning.cuh>
#include <epx/cuda/expert_parallel.cuh>
