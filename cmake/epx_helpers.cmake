# SPDX-FileCopyrightText: 2026 The epx authors
# SPDX-License-Identifier: MIT
# Helpers for epx's own tests, examples and benchmarks (not installed, not used by consumers).

include(CheckLanguage)
include(epx_bundle)

# Enables CUDA for epx's own targets per EPX_ENABLE_CUDA (AUTO|ON|OFF); sets EPX_HAVE_CUDA.
# A macro: enable_language must run at directory scope.
macro(epx_setup_cuda)
  epx_bundle_setup()  # before CUDA is enabled: a bundle build chooses the architectures
  set(_have OFF)
  if(NOT EPX_ENABLE_CUDA STREQUAL "OFF")
    if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES AND NOT DEFINED ENV{CUDAARCHS})
      # No GPU on build machines to detect: build for the H100 (sm_90) unless told otherwise.
      set(CMAKE_CUDA_ARCHITECTURES 90 CACHE STRING "CUDA architectures")
    endif()
    check_language(CUDA)
    if(CMAKE_CUDA_COMPILER AND CUDAToolkit_FOUND)
      enable_language(CUDA)
      set(_have ON)
    elseif(EPX_ENABLE_CUDA STREQUAL "ON")
      message(FATAL_ERROR "EPX_ENABLE_CUDA=ON but no CUDA compiler/toolkit was found (install the CUDA toolkit "
                          "or configure with -DEPX_ENABLE_CUDA=OFF)")
    endif()
  endif()
  set(EPX_HAVE_CUDA ${_have})
  message(STATUS "epx: CUDA tests and examples: ${_have}")
endmacro()

# Warnings and sanitizers for one of epx's own targets.
function(epx_target_options target)
  target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wpedantic -Werror>)
  # No silent a * b + c -> fma contraction in host code (GCC contracts by default wherever the target
  # has FMA: -march=native, aarch64): the host oracle's bits must not depend on the build machine.
  # Where host and device must agree bit for bit, epx's code says the rounding itself (std::fma /
  # __fmaf_rn); this keeps the rest of the host references stable across compilers and flags.
  target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:-ffp-contract=off>
                                           $<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=-ffp-contract=off>)
  # No kernel of epx may spill or use a local-memory stack (bench/NOTES.md): ptxas fails the build
  # when one does, so the rule holds for every kernel the tests instantiate, in CI, without a GPU.
  # (-Werror also makes ptxas's performance warnings errors, e.g. C7510: CUTLASS's wgmma serialised.)
  target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:-Xptxas=-warn-spills,-warn-lmem-usage,-Werror>)
  if(EPX_SANITIZE)
    target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:-fsanitize=${EPX_SANITIZE} -fno-omit-frame-pointer
                                             -fno-sanitize-recover=all>)
    target_link_options(${target} PRIVATE -fsanitize=${EPX_SANITIZE})
  endif()
endfunction()
