# SPDX-FileCopyrightText: 2026 The epx authors
# SPDX-License-Identifier: MIT
# cmake -DEPX_BINARY_DIR=<epx build tree> -DEPX_PREFIX=<prefix> [-DEPX_CUTLASS_INCLUDE_DIR=<dir>] -P install.cmake
# Installs epx into a fresh prefix and checks the package files a consumer needs are there, and that
# none of them names the CUTLASS headers the build tree used (EPX_CUTLASS_INCLUDE_DIR): an installed
# epx finds CUTLASS on the consumer's machine.
foreach(_var EPX_BINARY_DIR EPX_PREFIX)
  if(NOT ${_var})
    message(FATAL_ERROR "install.cmake: pass -D${_var}=...")
  endif()
endforeach()

file(REMOVE_RECURSE "${EPX_PREFIX}")
execute_process(COMMAND "${CMAKE_COMMAND}" --install "${EPX_BINARY_DIR}" --prefix "${EPX_PREFIX}"
                RESULT_VARIABLE _result)
if(NOT _result EQUAL 0)
  message(FATAL_ERROR "cmake --install ${EPX_BINARY_DIR} --prefix ${EPX_PREFIX} failed: ${_result}")
endif()

foreach(_file include/epx/epx.hpp include/epx/version.hpp include/epx/cuda/error.hpp include/epx/nccl/error.hpp
              share/cmake/epx/epxConfig.cmake share/cmake/epx/epxConfigVersion.cmake
              share/cmake/epx/epx-targets.cmake share/cmake/epx/epx-cuda-targets.cmake
              share/cmake/epx/epx-nccl-targets.cmake share/cmake/epx/FindNCCL.cmake
              share/cmake/epx/epxFindCutlass.cmake)
  if(NOT EXISTS "${EPX_PREFIX}/${_file}")
    message(FATAL_ERROR "install.cmake: ${EPX_PREFIX}/${_file} was not installed")
  endif()
endforeach()
if(EPX_CUTLASS_INCLUDE_DIR)
  file(GLOB_RECURSE _package_files "${EPX_PREFIX}/share/cmake/*")
  foreach(_file IN LISTS _package_files)
    file(READ "${_file}" _text)
    string(FIND "${_text}" "${EPX_CUTLASS_INCLUDE_DIR}" _at)
    if(_at GREATER_EQUAL 0)
      message(FATAL_ERROR "install.cmake: ${_file} names the build machine's CUTLASS (${EPX_CUTLASS_INCLUDE_DIR})")
    endif()
  endforeach()
endif()
message(STATUS "epx installed to ${EPX_PREFIX}")
