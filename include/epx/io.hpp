// SPDX-FileCopyrightText: 2026 The epx authors
// SPDX-License-Identifier: MIT
#pragma once

//! Umbrella for epx::io, checkpoint loading (CMake target epx::io: epx + nlohmann/json): safetensors
//! files and indexes, model families as data, config.json, and load_layer, which reads one rank's
//! experts of a layer into host memory. Plain C++20; the device upload is <epx/io/cuda_upload.hpp>
//! (needs the CUDA toolkit's headers). See docs/loading.md.

#include <epx/io/checkpoint.hpp>
#include <epx/io/checkpoint_error.hpp>
#include <epx/io/copy_executor.hpp>
#include <epx/io/element_conversion.hpp>
#include <epx/io/file.hpp>
#include <epx/io/fp8_e4m3.hpp>
#include <epx/io/layer_plan.hpp>
#include <epx/io/load_layer.hpp>
#include <epx/io/model_family.hpp>
#include <epx/io/moe_model.hpp>
#include <epx/io/mxfp4.hpp>
#include <epx/io/safetensors.hpp>
#include <epx/io/safetensors_dtype.hpp>
#include <epx/io/safetensors_index.hpp>
