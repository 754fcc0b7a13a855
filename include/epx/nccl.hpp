// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! Umbrella for the NCCL communicator: everything of <epx/epx.hpp> plus NcclCommunicator and its
//! bootstrap. Host code (g++ or nvcc): needs the CUDA runtime's and NCCL's headers; link epx::nccl.

#include <epx/epx.hpp>

#include <epx/nccl/bootstrap.hpp>
#include <epx/nccl/communicator.hpp>
#include <epx/nccl/error.hpp>
#include <epx/nccl/options.hpp>
