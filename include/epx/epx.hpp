// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! Umbrella for everything that builds with a plain C++20 compiler: the core vocabulary, the
//! stage protocols, LocalGroup and the Host (reference) backend.

#include <epx/version.hpp>
#include <epx/config.hpp>

#include <epx/core/dtype.hpp>
#include <epx/core/error.hpp>
#include <epx/core/math.hpp>
#include <epx/core/placement.hpp>
#include <epx/core/router_config.hpp>
#include <epx/core/space.hpp>
#include <epx/core/status.hpp>
#include <epx/core/stream.hpp>
#include <epx/core/tensor_view.hpp>
#include <epx/core/views.hpp>
#include <epx/core/workspace.hpp>

#include <epx/comm/communicator.hpp>
#include <epx/comm/local_group.hpp>
#include <epx/parallel/tags.hpp>
#include <epx/parallel/expert_parallel.hpp>

#include <epx/host/router.hpp>
#include <epx/host/plan.hpp>
#include <epx/host/permute.hpp>
#include <epx/host/grouped_gemm.hpp>
#include <epx/host/expert_mlp.hpp>
#include <epx/host/expert_parallel.hpp>

// Backward (training), Host: every stage's gradient and the router losses
#include <epx/router/losses.hpp>
#include <epx/host/router_backward.hpp>
#include <epx/host/router_losses.hpp>
#include <epx/host/permute_backward.hpp>
#include <epx/host/grouped_gemm_backward.hpp>
#include <epx/host/expert_mlp_backward.hpp>
