# SPDX-FileCopyrightText: 2026 The epx authors
# SPDX-License-Identifier: MIT
# epx::cutlass: epx::cuda plus the CUTLASS headers and EPX_HAVE_CUTLASS, for the Hopper grouped GEMM
# (include/epx/cuda/gemm/cutlass_grouped.cuh, docs/cutlass.md). EPX_WITH_CUTLASS: AUTO (use CUTLASS
# when found), ON (fail when not found), OFF. Where the headers come from, first found wins:
#   1. CUTLASS_DIR: a CUTLASS checkout or install (its include/ holds cutlass/cutlass.h), or that
#      include folder itself;
#   2. find_package(NvidiaCutlass CONFIG): an installed CUTLASS;
#   3. the `nvidia-cutlass` Python wheel's headers (cutlass_library/source/include), found through
#      `python3 -c "import cutlass_library"` or EPX_CUTLASS_WHEEL_DIR (an unpacked wheel, e.g. the
#      one scripts/epx fetches for machines that reach only the package registries);
#   4. EPX_CUTLASS_FETCH=ON: FetchContent of the pinned release EPX_CUTLASS_TAG (needs the internet).
set(EPX_WITH_CUTLASS AUTO CACHE STRING "CUTLASS for the Hopper grouped GEMM (epx::cutlass): AUTO, ON or OFF")
set_property(CACHE EPX_WITH_CUTLASS PROPERTY STRINGS AUTO ON OFF)
set(CUTLASS_DIR "" CACHE PATH "A CUTLASS checkout/install or its include folder (EPX_WITH_CUTLASS)")
set(EPX_CUTLASS_WHEEL_DIR "" CACHE PATH "An unpacked nvidia-cutlass wheel (EPX_WITH_CUTLASS)")
option(EPX_CUTLASS_FETCH "FetchContent the pinned CUTLASS release when no headers are found" OFF)
set(EPX_CUTLASS_TAG "v4.2.0" CACHE STRING "The CUTLASS release EPX_CUTLASS_FETCH downloads")

# The oldest CUTLASS whose sm90 ptr-array grouped kernels epx uses.
set(_epx_cutlass_min_version 3.9)

function(_epx_cutlass_version include_dir out)
  set(${out} "" PARENT_SCOPE)
  set(_file "${include_dir}/cutlass/version.h")
  if(EXISTS "${_file}")
    file(STRINGS "${_file}" _lines REGEX "^#define CUTLASS_(MAJOR|MINOR|PATCH) [0-9]+")
    foreach(_part MAJOR MINOR PATCH)
      string(REGEX REPLACE ".*CUTLASS_${_part} ([0-9]+).*" "\\1" _${_part} "${_lines}")
    endforeach()
    set(${out} "${_MAJOR}.${_MINOR}.${_PATCH}" PARENT_SCOPE)
  endif()
endfunction()

set(_epx_cutlass_include "")
set(_epx_cutlass_from "")
if(NOT EPX_WITH_CUTLASS STREQUAL "OFF")
  if(CUTLASS_DIR)
    foreach(_candidate "${CUTLASS_DIR}/include" "${CUTLASS_DIR}")
      if(NOT _epx_cutlass_include AND EXISTS "${_candidate}/cutlass/cutlass.h")
        set(_epx_cutlass_include "${_candidate}")
        set(_epx_cutlass_from "CUTLASS_DIR")
      endif()
    endforeach()
  endif()
  if(NOT _epx_cutlass_include)
    find_package(NvidiaCutlass CONFIG QUIET)
    if(TARGET nvidia::cutlass::cutlass)
      get_target_property(_dirs nvidia::cutlass::cutlass INTERFACE_INCLUDE_DIRECTORIES)
      foreach(_candidate IN LISTS _dirs)
        if(NOT _epx_cutlass_include AND EXISTS "${_candidate}/cutlass/cutlass.h")
          set(_epx_cutlass_include "${_candidate}")
          set(_epx_cutlass_from "find_package(NvidiaCutlass)")
        endif()
      endforeach()
    endif()
  endif()
  if(NOT EPX_CUTLASS_WHEEL_DIR AND DEFINED ENV{EPX_CUTLASS_WHEEL_DIR})
    set(EPX_CUTLASS_WHEEL_DIR "$ENV{EPX_CUTLASS_WHEEL_DIR}")
  endif()
  if(NOT _epx_cutlass_include AND NOT EPX_CUTLASS_WHEEL_DIR)
    find_package(Python3 COMPONENTS Interpreter QUIET)
    if(Python3_Interpreter_FOUND)
      execute_process(COMMAND "${Python3_EXECUTABLE}" -c
                              "import os, cutlass_library; print(os.path.dirname(os.path.dirname(cutlass_library.__file__)))"
                      OUTPUT_VARIABLE _wheel OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET RESULT_VARIABLE _rc)
      if(_rc EQUAL 0)
        set(EPX_CUTLASS_WHEEL_DIR "${_wheel}")
      endif()
    endif()
  endif()
  if(NOT _epx_cutlass_include AND EPX_CUTLASS_WHEEL_DIR
     AND EXISTS "${EPX_CUTLASS_WHEEL_DIR}/cutlass_library/source/include/cutlass/cutlass.h")
    set(_epx_cutlass_include "${EPX_CUTLASS_WHEEL_DIR}/cutlass_library/source/include")
    set(_epx_cutlass_from "the nvidia-cutlass wheel")
  endif()
  if(NOT _epx_cutlass_include AND EPX_CUTLASS_FETCH)
    include(FetchContent)
    FetchContent_Declare(epx_cutlass GIT_REPOSITORY https://github.com/NVIDIA/cutlass.git GIT_TAG ${EPX_CUTLASS_TAG}
                                     GIT_SHALLOW TRUE)
    FetchContent_GetProperties(epx_cutlass)
    if(NOT epx_cutlass_POPULATED)
      FetchContent_Populate(epx_cutlass)  # headers only: CUTLASS's own CMake project is not configured
    endif()
    set(_epx_cutlass_include "${epx_cutlass_SOURCE_DIR}/include")
    set(_epx_cutlass_from "FetchContent ${EPX_CUTLASS_TAG}")
  endif()
endif()

if(_epx_cutlass_include)
  _epx_cutlass_version("${_epx_cutlass_include}" _epx_cutlass_version)
  if(_epx_cutlass_version AND _epx_cutlass_version VERSION_LESS _epx_cutlass_min_version)
    message(WARNING "epx: CUTLASS ${_epx_cutlass_version} at ${_epx_cutlass_include} is older than "
                    "${_epx_cutlass_min_version}: not used")
    set(_epx_cutlass_include "")
  endif()
endif()

if(_epx_cutlass_include)
  add_library(epx_cutlass INTERFACE)
  add_library(epx::cutlass ALIAS epx_cutlass)
  target_link_libraries(epx_cutlass INTERFACE epx_cuda)
  target_include_directories(epx_cutlass SYSTEM INTERFACE "${_epx_cutlass_include}")
  target_compile_definitions(epx_cutlass INTERFACE EPX_HAVE_CUTLASS)
  target_compile_options(epx_cutlass INTERFACE $<$<COMPILE_LANGUAGE:CUDA>:--expt-relaxed-constexpr>)
  set(EPX_HAVE_CUTLASS ON)
  message(STATUS "epx: CUTLASS ${_epx_cutlass_version} from ${_epx_cutlass_from}: ${_epx_cutlass_include}")
else()
  set(EPX_HAVE_CUTLASS OFF)
  if(EPX_WITH_CUTLASS STREQUAL "ON")
    message(FATAL_ERROR "EPX_WITH_CUTLASS=ON but no CUTLASS >= ${_epx_cutlass_min_version} headers were found: set "
                        "CUTLASS_DIR, install NVIDIA's CUTLASS (find_package(NvidiaCutlass)), pip install "
                        "nvidia-cutlass (or set EPX_CUTLASS_WHEEL_DIR to an unpacked wheel), or set EPX_CUTLASS_FETCH=ON")
  endif()
  message(STATUS "epx: CUTLASS not used (EPX_WITH_CUTLASS=${EPX_WITH_CUTLASS}): the Hopper path is epx's own kernel")
endif()
