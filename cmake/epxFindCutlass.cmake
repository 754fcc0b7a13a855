# SPDX-FileCopyrightText: 2026 The epx authors
# SPDX-License-Identifier: MIT
# Where CUTLASS's headers are, for epx::cutlass: ONE search, shared by epx's build tree
# (cmake/epx_cutlass.cmake) and an installed epx (epxConfig.cmake, `find_package(epx COMPONENTS cutlass)`),
# which runs it on the consumer's machine: no path of the machine that installed epx is stored.
#
# It reads (variables or cache entries of the caller; all optional):
#   EPX_WITH_CUTLASS       OFF: do not search (AUTO and ON search; what ON means is the caller's business)
#   CUTLASS_DIR            a CUTLASS checkout or install (its include/ holds cutlass/cutlass.h), or that
#                          include folder itself
#   EPX_CUTLASS_WHEEL_DIR  an unpacked `nvidia-cutlass` wheel (also read from the environment)
#   EPX_CUTLASS_FETCH      ON: FetchContent of the release EPX_CUTLASS_TAG when nothing else is found
#   EPX_CUTLASS_TAG        that release (default: EPX_CUTLASS_DEFAULT_TAG)
# and tries, first found wins: CUTLASS_DIR, find_package(NvidiaCutlass CONFIG), the wheel
# (EPX_CUTLASS_WHEEL_DIR, else `python3 -c "import cutlass_library"`), EPX_CUTLASS_FETCH.

# The CUTLASS release EPX_CUTLASS_FETCH downloads unless EPX_CUTLASS_TAG says otherwise.
set(EPX_CUTLASS_DEFAULT_TAG "v4.2.0")
# The oldest CUTLASS whose sm90 ptr-array grouped kernels epx uses.
set(EPX_CUTLASS_MIN_VERSION "3.9")
# How to provide CUTLASS, for the messages of both the build tree and an installed epx.
string(CONCAT EPX_CUTLASS_HINT
    "set CUTLASS_DIR to a CUTLASS checkout or its include folder, install NVIDIA's CUTLASS "
    "(find_package(NvidiaCutlass)), pip install nvidia-cutlass (or set EPX_CUTLASS_WHEEL_DIR to an unpacked "
    "wheel), or set EPX_CUTLASS_FETCH=ON to download ${EPX_CUTLASS_DEFAULT_TAG}")

# _epx_cutlass_version(<include dir> <out>): "major.minor.patch" from cutlass/version.h, or "".
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

# epx_find_cutlass(<prefix>): sets, in the caller's scope,
#   <prefix>_FOUND        TRUE or FALSE
#   <prefix>_INCLUDE_DIR  the folder holding cutlass/cutlass.h (when found)
#   <prefix>_VERSION      its CUTLASS version, e.g. 4.2.0 (when found and known)
#   <prefix>_FROM         where it came from: CUTLASS_DIR, find_package(NvidiaCutlass), ...
#   <prefix>_REASON       why not (when not found): EPX_WITH_CUTLASS=OFF, or what was tried
function(epx_find_cutlass prefix)
  set(_include "")
  set(_from "")
  set(_tried "")
  if(EPX_WITH_CUTLASS STREQUAL "OFF")
    set(${prefix}_FOUND FALSE PARENT_SCOPE)
    set(${prefix}_INCLUDE_DIR "" PARENT_SCOPE)
    set(${prefix}_VERSION "" PARENT_SCOPE)
    set(${prefix}_FROM "" PARENT_SCOPE)
    set(${prefix}_REASON "EPX_WITH_CUTLASS=OFF" PARENT_SCOPE)
    return()
  endif()

  if(CUTLASS_DIR)
    foreach(_candidate "${CUTLASS_DIR}/include" "${CUTLASS_DIR}")
      if(NOT _include AND EXISTS "${_candidate}/cutlass/cutlass.h")
        set(_include "${_candidate}")
        set(_from "CUTLASS_DIR")
      endif()
    endforeach()
    list(APPEND _tried "CUTLASS_DIR=${CUTLASS_DIR} (no cutlass/cutlass.h)")
  else()
    list(APPEND _tried "CUTLASS_DIR (not set)")
  endif()

  if(NOT _include)
    find_package(NvidiaCutlass CONFIG QUIET)
    if(TARGET nvidia::cutlass::cutlass)
      get_target_property(_dirs nvidia::cutlass::cutlass INTERFACE_INCLUDE_DIRECTORIES)
      foreach(_candidate IN LISTS _dirs)
        if(NOT _include AND EXISTS "${_candidate}/cutlass/cutlass.h")
          set(_include "${_candidate}")
          set(_from "find_package(NvidiaCutlass)")
        endif()
      endforeach()
    endif()
    list(APPEND _tried "find_package(NvidiaCutlass)")
  endif()

  set(_wheel "${EPX_CUTLASS_WHEEL_DIR}")
  if(NOT _wheel AND DEFINED ENV{EPX_CUTLASS_WHEEL_DIR})
    set(_wheel "$ENV{EPX_CUTLASS_WHEEL_DIR}")
  endif()
  if(NOT _include AND NOT _wheel)
    find_package(Python3 COMPONENTS Interpreter QUIET)
    if(Python3_Interpreter_FOUND)
      execute_process(
        COMMAND "${Python3_EXECUTABLE}" -c
                "import os, cutlass_library; print(os.path.dirname(os.path.dirname(cutlass_library.__file__)))"
        OUTPUT_VARIABLE _python_wheel OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET RESULT_VARIABLE _rc)
      if(_rc EQUAL 0)
        set(_wheel "${_python_wheel}")
      endif()
    endif()
    if(NOT _wheel AND Python3_Interpreter_FOUND)
      list(APPEND _tried "EPX_CUTLASS_WHEEL_DIR (not set)" "${Python3_EXECUTABLE} -c 'import cutlass_library' (no such module)")
    elseif(NOT _wheel)
      list(APPEND _tried "EPX_CUTLASS_WHEEL_DIR (not set)" "python3 -c 'import cutlass_library' (no python3 found)")
    endif()
  endif()
  if(NOT _include AND _wheel)
    if(EXISTS "${_wheel}/cutlass_library/source/include/cutlass/cutlass.h")
      set(_include "${_wheel}/cutlass_library/source/include")
      set(_from "the nvidia-cutlass wheel")
    else()
      list(APPEND _tried "the wheel ${_wheel} (no cutlass_library/source/include/cutlass/cutlass.h)")
    endif()
  endif()

  if(NOT _include)
    if(EPX_CUTLASS_FETCH)
      set(_tag "${EPX_CUTLASS_TAG}")
      if(NOT _tag)
        set(_tag "${EPX_CUTLASS_DEFAULT_TAG}")
      endif()
      include(FetchContent)
      FetchContent_Declare(epx_cutlass GIT_REPOSITORY https://github.com/NVIDIA/cutlass.git GIT_TAG ${_tag}
                                       GIT_SHALLOW TRUE)
      FetchContent_GetProperties(epx_cutlass)
      if(NOT epx_cutlass_POPULATED)
        FetchContent_Populate(epx_cutlass)  # headers only: CUTLASS's own CMake project is not configured
      endif()
      set(_include "${epx_cutlass_SOURCE_DIR}/include")
      set(_from "FetchContent ${_tag}")
    else()
      list(APPEND _tried "EPX_CUTLASS_FETCH (OFF)")
    endif()
  endif()

  set(_version "")
  if(_include)
    _epx_cutlass_version("${_include}" _version)
    if(_version AND _version VERSION_LESS EPX_CUTLASS_MIN_VERSION)
      set(_tried "CUTLASS ${_version} at ${_include} (from ${_from}) is older than ${EPX_CUTLASS_MIN_VERSION}")
      set(_include "")
      set(_from "")
    endif()
  endif()

  if(_include)
    set(${prefix}_FOUND TRUE PARENT_SCOPE)
    set(${prefix}_REASON "" PARENT_SCOPE)
  else()
    list(JOIN _tried ", " _tried)
    set(${prefix}_FOUND FALSE PARENT_SCOPE)
    set(${prefix}_REASON "no CUTLASS >= ${EPX_CUTLASS_MIN_VERSION} headers found; tried ${_tried}" PARENT_SCOPE)
    set(_version "")
  endif()
  set(${prefix}_INCLUDE_DIR "${_include}" PARENT_SCOPE)
  set(${prefix}_VERSION "${_version}" PARENT_SCOPE)
  set(${prefix}_FROM "${_from}" PARENT_SCOPE)
endfunction()

# epx_cutlass_usage(<target> <epx cuda target> <include dir>): what epx::cutlass carries, the same in the
# build tree (target epx_cutlass) and an installed epx (imported target epx::cutlass): <epx cuda target>,
# the CUTLASS headers as SYSTEM, EPX_HAVE_CUTLASS, and --expt-relaxed-constexpr for nvcc.
function(epx_cutlass_usage target cuda_target include_dir)
  target_link_libraries(${target} INTERFACE ${cuda_target})
  target_include_directories(${target} SYSTEM INTERFACE "${include_dir}")
  target_compile_definitions(${target} INTERFACE EPX_HAVE_CUTLASS)
  target_compile_options(${target} INTERFACE $<$<COMPILE_LANGUAGE:CUDA>:--expt-relaxed-constexpr>)
endfunction()
