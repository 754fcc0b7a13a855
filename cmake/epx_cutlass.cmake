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
# The search itself is cmake/epxFindCutlass.cmake, which an installed epx ships and runs on the
# consumer's machine for `find_package(epx COMPONENTS cutlass)`.
include("${CMAKE_CURRENT_LIST_DIR}/epxFindCutlass.cmake")

set(EPX_WITH_CUTLASS AUTO CACHE STRING "CUTLASS for the Hopper grouped GEMM (epx::cutlass): AUTO, ON or OFF")
set_property(CACHE EPX_WITH_CUTLASS PROPERTY STRINGS AUTO ON OFF)
set(CUTLASS_DIR "" CACHE PATH "A CUTLASS checkout/install or its include folder (EPX_WITH_CUTLASS)")
set(EPX_CUTLASS_WHEEL_DIR "" CACHE PATH "An unpacked nvidia-cutlass wheel (EPX_WITH_CUTLASS)")
option(EPX_CUTLASS_FETCH "FetchContent the pinned CUTLASS release when no headers are found" OFF)
set(EPX_CUTLASS_TAG "${EPX_CUTLASS_DEFAULT_TAG}" CACHE STRING "The CUTLASS release EPX_CUTLASS_FETCH downloads")

# EPX_CUTLASS_FOUND, EPX_CUTLASS_INCLUDE_DIR, EPX_CUTLASS_VERSION, EPX_CUTLASS_FROM, EPX_CUTLASS_REASON
epx_find_cutlass(EPX_CUTLASS)

if(EPX_CUTLASS_FOUND)
  add_library(epx_cutlass INTERFACE)
  add_library(epx::cutlass ALIAS epx_cutlass)
  epx_cutlass_usage(epx_cutlass epx_cuda "${EPX_CUTLASS_INCLUDE_DIR}")
  set(EPX_HAVE_CUTLASS ON)
  message(STATUS "epx: CUTLASS ${EPX_CUTLASS_VERSION} from ${EPX_CUTLASS_FROM}: ${EPX_CUTLASS_INCLUDE_DIR}")
else()
  set(EPX_HAVE_CUTLASS OFF)
  if(EPX_WITH_CUTLASS STREQUAL "ON")
    message(FATAL_ERROR "EPX_WITH_CUTLASS=ON but ${EPX_CUTLASS_REASON}. To provide CUTLASS: ${EPX_CUTLASS_HINT}")
  endif()
  if(EPX_CUTLASS_REASON MATCHES "is older than")
    message(WARNING "epx: ${EPX_CUTLASS_REASON}: not used")
  endif()
  message(STATUS "epx: CUTLASS not used (EPX_WITH_CUTLASS=${EPX_WITH_CUTLASS}): the Hopper path is epx's own kernel")
endif()
