# SPDX-FileCopyrightText: 2026 The epx authors
# SPDX-License-Identifier: MIT
# The GPU check bundle (docs/gpu-bundle.md): every CUDA test, example and benchmark built on a machine
# without a GPU, gathered with what a GPU machine may lack into one relocatable folder that
# run.sh (scripts/gpu-bundle/run.sh) runs there in one call.
#
# Every CUDA test, example and benchmark says once, next to its add_test, how the bundle runs it
# (epx_bundle_add). Each CUDA configure writes the resulting manifest to
# <build>/gpu-bundle-manifest.tsv, so that a test can check it against ctest's list; with EPX_BUNDLE=ON
# the target gpu_bundle also builds those programs and assembles EPX_BUNDLE_DIR
# (cmake/epx_bundle_assemble.cmake).
include_guard(GLOBAL)

# The manifest's columns, in order; run.sh reads them by position. "-" marks an empty field: the
# runner splits lines on tabs with `read`, which merges empty fields.
#   kind      test | example | bench
#   name      the ctest name (cuda.routing_test, example.nccl_ep) or bench.<program>.<shape>
#   binary    the program's file name in bin/
#   timeout   the most seconds one run may take
#   cost      estimated seconds on an H200: the order (fastest first) and the budget's reservations
#   sanitize  compute-sanitizer tools to run it under, comma-separated (memcheck,racecheck,synccheck)
#   expect    an extended regular expression its output must match when it passed on a GPU
#   env       KEY=VALUE pairs, space-separated; @TMP@ is a fresh directory of the run's own;
#             -KEY removes KEY from the environment
#   args      arguments, space-separated
set(EPX_BUNDLE_MANIFEST_HEADER "# kind\tname\tbinary\ttimeout\tcost\tsanitize\texpect\tenv\targs\n")

# epx_bundle_add(<kind> <name> TARGET <target> COST <seconds> [TIMEOUT <seconds>] [SANITIZE <tool>...]
#                [EXPECT <regex>] [ENV <KEY=VALUE>...] [UNSET <KEY>...] [ARGS <arg>...])
function(epx_bundle_add kind name)
  cmake_parse_arguments(PARSE_ARGV 2 arg "" "TARGET;TIMEOUT;COST;EXPECT" "SANITIZE;ENV;UNSET;ARGS")
  set(_where "epx_bundle_add(${kind} ${name})")
  if(arg_UNPARSED_ARGUMENTS)
    message(FATAL_ERROR "${_where}: unexpected arguments '${arg_UNPARSED_ARGUMENTS}'")
  endif()
  if(NOT kind MATCHES "^(test|example|bench)$")
    message(FATAL_ERROR "${_where}: kind is '${kind}', expected test, example or bench")
  endif()
  if(NOT name MATCHES "^[A-Za-z0-9_.+-]+$")
    message(FATAL_ERROR "${_where}: name '${name}' may hold only letters, digits and . _ + -")
  endif()
  if(NOT arg_TARGET OR NOT TARGET ${arg_TARGET})
    message(FATAL_ERROR "${_where}: TARGET is '${arg_TARGET}', expected an executable target defined before this call")
  endif()
  if(NOT arg_TIMEOUT)
    set(arg_TIMEOUT 300)
  endif()
  foreach(_field TIMEOUT COST)
    if(NOT arg_${_field} MATCHES "^[0-9]+$" OR arg_${_field} EQUAL 0)
      message(FATAL_ERROR "${_where}: ${_field} is '${arg_${_field}}', expected a whole number of seconds > 0")
    endif()
  endforeach()
  foreach(_tool IN LISTS arg_SANITIZE)
    if(NOT _tool MATCHES "^(memcheck|racecheck|synccheck|initcheck)$")
      message(FATAL_ERROR "${_where}: SANITIZE names '${_tool}', expected memcheck, racecheck, synccheck or initcheck")
    endif()
  endforeach()
  # Fields are tab-separated and lists space-separated: neither may hold the other's separator.
  foreach(_item IN LISTS arg_ENV arg_UNSET arg_ARGS arg_EXPECT)
    if(_item MATCHES "[\t\n]")
      message(FATAL_ERROR "${_where}: '${_item}' holds a tab or newline, which the manifest cannot carry")
    endif()
  endforeach()
  foreach(_item IN LISTS arg_ENV arg_UNSET arg_ARGS)
    if(_item MATCHES " ")
      message(FATAL_ERROR "${_where}: '${_item}' holds a space; the manifest separates list items with spaces")
    endif()
  endforeach()
  foreach(_item IN LISTS arg_ENV)
    if(NOT _item MATCHES "^[A-Za-z_][A-Za-z0-9_]*=")
      message(FATAL_ERROR "${_where}: ENV item '${_item}' is not KEY=VALUE")
    endif()
  endforeach()
  set(_env ${arg_ENV})
  foreach(_key IN LISTS arg_UNSET)
    list(APPEND _env "-${_key}")
  endforeach()
  list(JOIN arg_SANITIZE "," _sanitize)
  list(JOIN _env " " _env)
  list(JOIN arg_ARGS " " _args)
  set(_expect "${arg_EXPECT}")
  foreach(_field _sanitize _expect _env _args)
    if("${${_field}}" STREQUAL "")
      set(${_field} "-")
    endif()
  endforeach()
  get_property(_names GLOBAL PROPERTY EPX_BUNDLE_NAMES)
  if(name IN_LIST _names)
    message(FATAL_ERROR "${_where}: a bundle check named '${name}' exists already")
  endif()
  set_property(GLOBAL APPEND PROPERTY EPX_BUNDLE_NAMES "${name}")
  set_property(GLOBAL APPEND PROPERTY EPX_BUNDLE_TARGETS "${arg_TARGET}")
  set_property(GLOBAL APPEND_STRING PROPERTY EPX_BUNDLE_MANIFEST
    "${kind}\t${name}\t$<TARGET_FILE_NAME:${arg_TARGET}>\t${arg_TIMEOUT}\t${arg_COST}\t${_sanitize}\t${_expect}\t${_env}\t${_args}\n")
endfunction()

# Bundle builds only: Release for EPX_BUNDLE_ARCHS (default sm_90a), the CUDA runtime linked
# statically, and every program looking for its shipped libraries in ../lib beside itself. Runs in
# the top-level directory before CUDA is enabled (epx_setup_cuda).
macro(epx_bundle_configure)
  if(NOT CMAKE_BUILD_TYPE STREQUAL "Release")
    message(FATAL_ERROR "EPX_BUNDLE=ON needs CMAKE_BUILD_TYPE=Release (optimised, NDEBUG: the bundle's benchmarks "
                        "measure what users run), not '${CMAKE_BUILD_TYPE}'; use the bundle preset (scripts/epx bundle)")
  endif()
  if(EPX_ENABLE_CUDA STREQUAL "OFF")
    message(FATAL_ERROR "EPX_BUNDLE=ON needs CUDA: EPX_ENABLE_CUDA is OFF")
  endif()
  # Hopper's own instructions (CUTLASS's wgmma and TMA) need the arch-specific target; '-real' keeps
  # nvcc 13 from adding a compute_90 PTX pass that a bundle for one known GPU does not need.
  set(_epx_bundle_archs "${EPX_BUNDLE_ARCHS}")
  if(_epx_bundle_archs STREQUAL "")
    set(_epx_bundle_archs "90a-real")
  endif()
  set(CMAKE_CUDA_ARCHITECTURES "${_epx_bundle_archs}" CACHE STRING "CUDA architectures" FORCE)
  set(CMAKE_CUDA_RUNTIME_LIBRARY Static)
  # epx::cuda names the shared runtime (what installed consumers want); the bundle takes the static
  # one, so a GPU machine needs only the driver. Bundle builds install nothing, so nothing exports this.
  get_target_property(_epx_cuda_links epx_cuda INTERFACE_LINK_LIBRARIES)
  list(TRANSFORM _epx_cuda_links REPLACE "^CUDA::cudart$" "CUDA::cudart_static")
  set_target_properties(epx_cuda PROPERTIES INTERFACE_LINK_LIBRARIES "${_epx_cuda_links}")
  # Device code compressed for size (zstd, about 6x smaller than nvcc's default): the fatbins are most
  # of the bundle. The CUDA 13 runtime and driver that the bundle needs anyway decompress it at load.
  set_property(TARGET epx_cuda APPEND PROPERTY INTERFACE_COMPILE_OPTIONS $<$<COMPILE_LANGUAGE:CUDA>:--compress-mode=size>)
  # bin/<program> finds lib/<shipped library>, wherever the bundle is copied; no build path is kept.
  set(CMAKE_SKIP_BUILD_RPATH OFF)
  set(CMAKE_BUILD_WITH_INSTALL_RPATH ON)
  set(CMAKE_INSTALL_RPATH "\$ORIGIN/../lib")
  set(CMAKE_INSTALL_RPATH_USE_LINK_PATH OFF)
  if(EPX_BUNDLE_DIR STREQUAL "")
    set(EPX_BUNDLE_DIR "${PROJECT_SOURCE_DIR}/build/gpu-bundle")
  endif()
  message(STATUS "epx: GPU bundle for CUDA architectures ${_epx_bundle_archs} into ${EPX_BUNDLE_DIR}")
endmacro()

# Writes the manifest and, for bundle builds, defines gpu_bundle. Deferred to the end of the top-level
# directory (epx_setup_cuda schedules it), when every test, example and benchmark has registered.
function(epx_bundle_finalize)
  get_property(_manifest GLOBAL PROPERTY EPX_BUNDLE_MANIFEST)
  get_property(_targets GLOBAL PROPERTY EPX_BUNDLE_TARGETS)
  set(_manifest_file "${PROJECT_BINARY_DIR}/gpu-bundle-manifest.tsv")
  file(GENERATE OUTPUT "${_manifest_file}" CONTENT "${EPX_BUNDLE_MANIFEST_HEADER}${_manifest}")
  if(NOT EPX_BUNDLE)
    return()
  endif()
  if(NOT EPX_HAVE_CUDA OR _targets STREQUAL "")
    message(FATAL_ERROR "EPX_BUNDLE=ON, but no CUDA test, example or benchmark is configured (EPX_HAVE_CUDA is "
                        "'${EPX_HAVE_CUDA}'): the bundle needs nvcc and the CUDA toolkit")
  endif()
  list(REMOVE_DUPLICATES _targets)
  set(_programs "")
  foreach(_target IN LISTS _targets)
    string(APPEND _programs "$<TARGET_FILE:${_target}>\n")
  endforeach()
  file(GENERATE OUTPUT "${PROJECT_BINARY_DIR}/gpu-bundle-programs.txt" CONTENT "${_programs}")
  # Libraries the GPU machine provides itself (or run.sh finds there): never shipped.
  set(_search_dirs "${CUDAToolkit_LIBRARY_DIR}")
  if(TARGET NCCL::NCCL)
    get_filename_component(_nccl_dir "${NCCL_LIBRARY}" DIRECTORY)
    list(APPEND _search_dirs "${_nccl_dir}")
  endif()
  string(REPLACE ";" "|" _search_dirs "${_search_dirs}")
  add_custom_target(gpu_bundle
    COMMAND "${CMAKE_COMMAND}"
            "-DBUNDLE_DIR=${EPX_BUNDLE_DIR}"
            "-DSOURCE_DIR=${PROJECT_SOURCE_DIR}"
            "-DPROGRAMS=${PROJECT_BINARY_DIR}/gpu-bundle-programs.txt"
            "-DMANIFEST=${_manifest_file}"
            "-DSEARCH_DIRS=${_search_dirs}"
            "-DSTRIP=${CMAKE_STRIP}"
            "-DREADELF=${CMAKE_READELF}"
            "-DOBJDUMP=${CMAKE_OBJDUMP}"
            "-DCUDA_ARCHS=${CMAKE_CUDA_ARCHITECTURES}"
            "-DNVCC_VERSION=${CMAKE_CUDA_COMPILER_VERSION}"
            "-DCXX=${CMAKE_CXX_COMPILER_ID} ${CMAKE_CXX_COMPILER_VERSION}"
            "-DBUILD_TYPE=${CMAKE_BUILD_TYPE}"
            "-DMAX_MIB=40"
            -P "${PROJECT_SOURCE_DIR}/cmake/epx_bundle_assemble.cmake"
    COMMENT "Assembling the GPU check bundle in ${EPX_BUNDLE_DIR}"
    VERBATIM)
  add_dependencies(gpu_bundle ${_targets})
endfunction()

# Called once from epx_setup_cuda, in the top-level directory.
macro(epx_bundle_setup)
  if(EPX_BUNDLE)
    epx_bundle_configure()
  endif()
  get_property(_epx_bundle_scheduled GLOBAL PROPERTY EPX_BUNDLE_SCHEDULED)
  if(NOT _epx_bundle_scheduled)
    set_property(GLOBAL PROPERTY EPX_BUNDLE_SCHEDULED ON)
    cmake_language(DEFER CALL epx_bundle_finalize)
  endif()
endmacro()
