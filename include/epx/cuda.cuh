// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! Umbrella for the CUDA backend (compile with nvcc, link epx::cuda). Everything of
//! <epx/epx.hpp> plus the CUDA stage functions, which take a StreamRef as their execution context:
//! route, make_plan (CUB radix sort), permute, unpermute, grouped_gemm, expert_mlp (Grouped and
//! CublasGrouped), their backwards (route_backward, permute_backward, unpermute_backward,
//! grouped_gemm_backward_data / _weight, expert_mlp_backward, expert_token_counts), CudaLocalGroup and the Cuda space of
//! ExpertParallel (forward and backward). With EPX_HAVE_CUTLASS (epx::cutlass) Grouped also runs
//! CUTLASS's Hopper grouped GEMM where it is faster (cuda/grouped_experts.cuh).

#include <epx/epx.hpp>

#include <epx/cuda/cublas_grouped.cuh>
#include <epx/cuda/element.cuh>
#include <epx/cuda/error.hpp>
#include <epx/cuda/expert_mlp.cuh>
#include <epx/cuda/expert_mlp_backward.cuh>
#include <epx/cuda/grouped_experts.cuh>
#include <epx/cuda/grouped_gemm.cuh>
#include <epx/cuda/grouped_gemm_backward.cuh>
#include <epx/cuda/launch.cuh>
#include <epx/cuda/local_group.cuh>
#include <epx/cuda/permute.cuh>
#include <epx/cuda/permute_backward.cuh>
#include <epx/cuda/plan.cuh>
#include <epx/cuda/router.cuh>
#include <epx/cuda/router_backward.cuh>
#include <epx/cuda/router_losses.cuh>
#include <epx/cuda/tuning.cuh>
#include <epx/cuda/expert_parallel.cuh>
