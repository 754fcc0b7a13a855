# SPDX-FileCopyrightText: 2026 The epx authors
# SPDX-License-Identifier: MIT
# Assembles the GPU check bundle (docs/gpu-bundle.md); run by the target gpu_bundle (cmake/epx_bundle.cmake):
#   cmake -DBUNDLE_DIR=... -DSOURCE_DIR=... -DPROGRAMS=<file listing the built programs> -DMANIFEST=...
#         -DSEARCH_DIRS=<dir|dir> -DSTRIP=... -DREADELF=... -DOBJDUMP=... -DCUDA_ARCHS=... -DNVCC_VERSION=...
#         -DCXX=... -DBUILD_TYPE=... -DMAX_MIB=40 -P epx_bundle_assemble.cmake
# Layout: run.sh, manifest.tsv, bundle-info.txt, README.txt, bin/<programs>, lib/<shipped libraries>,
# bench/torch_moe_block.py. The programs are stripped and find lib/ through RUNPATH $ORIGIN/../lib.
# The libraries a GPU machine has itself (the C and C++ runtimes, the driver, cuBLAS, NCCL) are not
# shipped: run.sh finds cuBLAS and NCCL there. Every check below fails the build, not the GPU run.
cmake_minimum_required(VERSION 3.24)

foreach(_var BUNDLE_DIR SOURCE_DIR PROGRAMS MANIFEST READELF OBJDUMP MAX_MIB)
  if("${${_var}}" STREQUAL "")
    message(FATAL_ERROR "epx_bundle_assemble: ${_var} is not set")
  endif()
endforeach()

# Provided by the machine that runs the bundle, never shipped. run.sh looks for the CUDA ones.
set(_system_libs "^(ld-linux-x86-64|ld-linux-aarch64|libc|libm|libdl|librt|libpthread|libresolv|libutil|libgcc_s|libstdc\\+\\+)\\.so")
set(_gpu_machine_libs "^lib(cuda|cudart|cublas|cublasLt|nccl|nvidia-ml|nvrtc|nvJitLink)\\.so")

# The folder is emptied first, so a program removed from the build does not linger; a folder that
# is not a bundle is left alone (EPX_BUNDLE_DIR pointing at the wrong place).
set(_marker "${BUNDLE_DIR}/.epx-gpu-bundle")
if(EXISTS "${BUNDLE_DIR}")
  file(GLOB _existing "${BUNDLE_DIR}/*" "${BUNDLE_DIR}/.*")
  if(_existing AND NOT EXISTS "${_marker}")
    message(FATAL_ERROR "epx_bundle_assemble: ${BUNDLE_DIR} exists, is not empty and holds no .epx-gpu-bundle "
                        "marker; expected an empty folder or an earlier bundle (set EPX_BUNDLE_DIR elsewhere)")
  endif()
  file(REMOVE_RECURSE "${BUNDLE_DIR}")
endif()
file(MAKE_DIRECTORY "${BUNDLE_DIR}/bin" "${BUNDLE_DIR}/lib" "${BUNDLE_DIR}/bench")
file(WRITE "${_marker}" "Made by cmake/epx_bundle_assemble.cmake; the folder is replaced on each build.\n")

# The programs, stripped.
file(STRINGS "${PROGRAMS}" _programs)
set(_shipped_programs "")
foreach(_program IN LISTS _programs)
  get_filename_component(_name "${_program}" NAME)
  set(_copy "${BUNDLE_DIR}/bin/${_name}")
  file(COPY_FILE "${_program}" "${_copy}")
  file(CHMOD "${_copy}" PERMISSIONS OWNER_READ OWNER_WRITE OWNER_EXECUTE GROUP_READ GROUP_EXECUTE WORLD_READ WORLD_EXECUTE)
  if(STRIP)
    execute_process(COMMAND "${STRIP}" "${_copy}" RESULT_VARIABLE _rc)
    if(NOT _rc EQUAL 0)
      message(FATAL_ERROR "epx_bundle_assemble: ${STRIP} ${_copy} failed (${_rc})")
    endif()
  endif()
  list(APPEND _shipped_programs "${_copy}")
endforeach()

# Every other library they need (fmt, Google Benchmark, and what those need), shipped under its soname.
string(REPLACE "|" ";" _search_dirs "${SEARCH_DIRS}")
set(CMAKE_OBJDUMP "${OBJDUMP}")
file(GET_RUNTIME_DEPENDENCIES
     EXECUTABLES ${_programs}
     RESOLVED_DEPENDENCIES_VAR _resolved
     UNRESOLVED_DEPENDENCIES_VAR _unresolved
     PRE_EXCLUDE_REGEXES "${_system_libs}" "${_gpu_machine_libs}"
     DIRECTORIES ${_search_dirs})
if(_unresolved)
  message(FATAL_ERROR "epx_bundle_assemble: the programs need ${_unresolved}, found neither on this machine nor "
                      "among the libraries a GPU machine provides")
endif()
set(_shipped_libs "")
foreach(_lib IN LISTS _resolved)
  get_filename_component(_soname "${_lib}" NAME)  # the name a program asks for (a symlink here)
  file(REAL_PATH "${_lib}" _real)
  set(_copy "${BUNDLE_DIR}/lib/${_soname}")
  file(COPY_FILE "${_real}" "${_copy}")
  if(STRIP)
    execute_process(COMMAND "${STRIP}" --strip-unneeded "${_copy}" RESULT_VARIABLE _rc)
    if(NOT _rc EQUAL 0)
      message(FATAL_ERROR "epx_bundle_assemble: ${STRIP} --strip-unneeded ${_copy} failed (${_rc})")
    endif()
  endif()
  list(APPEND _shipped_libs "${_copy}")
endforeach()

# The runner and what it runs besides the programs.
file(COPY_FILE "${SOURCE_DIR}/scripts/gpu-bundle/run.sh" "${BUNDLE_DIR}/run.sh")
file(CHMOD "${BUNDLE_DIR}/run.sh" PERMISSIONS OWNER_READ OWNER_WRITE OWNER_EXECUTE GROUP_READ GROUP_EXECUTE WORLD_READ WORLD_EXECUTE)
file(COPY_FILE "${SOURCE_DIR}/bench/torch_moe_block.py" "${BUNDLE_DIR}/bench/torch_moe_block.py")
file(COPY_FILE "${MANIFEST}" "${BUNDLE_DIR}/manifest.tsv")
file(WRITE "${BUNDLE_DIR}/README.txt"
     "epx GPU check bundle. On a machine with an NVIDIA GPU and its driver:\n\n"
     "    ./run.sh OUT_DIR [--budget SECONDS]\n\n"
     "runs every CUDA test (a skip is a failure), compute-sanitizer, the benchmarks and the PyTorch baseline,\n"
     "and writes at most 8 files into OUT_DIR (summary.md first). bundle-info.txt says what was built, from\n"
     "which commit, and what the machine must provide. Documentation: docs/gpu-bundle.md in the epx sources.\n")

# Checks: what each ELF file needs is shipped or provided by the machine; no build path in RUNPATH.
set(_needed_from_machine "")
set(_shipped_names "")
foreach(_lib IN LISTS _shipped_libs)
  get_filename_component(_name "${_lib}" NAME)
  list(APPEND _shipped_names "${_name}")
endforeach()
foreach(_elf IN LISTS _shipped_programs _shipped_libs)
  execute_process(COMMAND "${READELF}" -d "${_elf}" OUTPUT_VARIABLE _dynamic RESULT_VARIABLE _rc)
  if(NOT _rc EQUAL 0)
    message(FATAL_ERROR "epx_bundle_assemble: ${READELF} -d ${_elf} failed (${_rc})")
  endif()
  string(REGEX MATCHALL "\\(NEEDED\\)[^\n]*\\[[^]\n]*\\]" _needed_lines "${_dynamic}")
  foreach(_line IN LISTS _needed_lines)
    string(REGEX REPLACE ".*\\[(.*)\\]" "\\1" _needed "${_line}")
    if(_needed IN_LIST _shipped_names)
      continue()
    endif()
    if(NOT _needed MATCHES "${_system_libs}" AND NOT _needed MATCHES "${_gpu_machine_libs}")
      message(FATAL_ERROR "epx_bundle_assemble: ${_elf} needs ${_needed}, which is neither shipped nor provided by a GPU machine")
    endif()
    list(APPEND _needed_from_machine "${_needed}")
  endforeach()
  string(REGEX MATCHALL "\\((RUNPATH|RPATH)\\)[^\n]*\\[[^]\n]*\\]" _paths "${_dynamic}")
  foreach(_line IN LISTS _paths)
    string(REGEX REPLACE ".*\\[(.*)\\]" "\\1" _path "${_line}")
    if(NOT _path STREQUAL "$ORIGIN/../lib")
      message(FATAL_ERROR "epx_bundle_assemble: ${_elf} has run path '${_path}', expected only $ORIGIN/../lib (no build path)")
    endif()
  endforeach()
  if(_elf IN_LIST _shipped_programs AND _shipped_libs AND NOT _paths)
    message(FATAL_ERROR "epx_bundle_assemble: ${_elf} has no RUNPATH: it would not find the libraries in ../lib")
  endif()
endforeach()
list(REMOVE_DUPLICATES _needed_from_machine)
list(SORT _needed_from_machine)

# The newest glibc and libstdc++ symbol versions any file asks for: the oldest system that runs the bundle.
set(_glibc "")
set(_glibcxx "")
foreach(_elf IN LISTS _shipped_programs _shipped_libs)
  execute_process(COMMAND "${OBJDUMP}" -T "${_elf}" OUTPUT_VARIABLE _symbols RESULT_VARIABLE _rc)
  if(NOT _rc EQUAL 0)
    message(FATAL_ERROR "epx_bundle_assemble: ${OBJDUMP} -T ${_elf} failed (${_rc})")
  endif()
  foreach(_kind GLIBC GLIBCXX)
    string(REGEX MATCHALL "${_kind}_[0-9]+(\\.[0-9]+)*" _versions "${_symbols}")
    foreach(_v IN LISTS _versions)
      string(REPLACE "${_kind}_" "" _v "${_v}")
      if(_kind STREQUAL "GLIBC" AND (_glibc STREQUAL "" OR _v VERSION_GREATER _glibc))
        set(_glibc "${_v}")
      elseif(_kind STREQUAL "GLIBCXX" AND (_glibcxx STREQUAL "" OR _v VERSION_GREATER _glibcxx))
        set(_glibcxx "${_v}")
      endif()
    endforeach()
  endforeach()
endforeach()

# Size.
file(GLOB_RECURSE _files "${BUNDLE_DIR}/*")
set(_bytes 0)
foreach(_file IN LISTS _files)
  file(SIZE "${_file}" _size)
  math(EXPR _bytes "${_bytes} + ${_size}")
endforeach()
math(EXPR _limit "${MAX_MIB} * 1024 * 1024")
math(EXPR _kib "${_bytes} / 1024")
if(_bytes GREATER _limit)
  message(FATAL_ERROR "epx_bundle_assemble: the bundle is ${_kib} KiB, over its limit of ${MAX_MIB} MiB")
endif()

# What was built, from what, for what.
set(_commit "unknown (no git)")
find_program(_git git)
if(_git)
  execute_process(COMMAND "${_git}" -C "${SOURCE_DIR}" rev-parse HEAD OUTPUT_VARIABLE _commit
                  OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE _rc ERROR_QUIET)
  if(NOT _rc EQUAL 0)
    set(_commit "unknown (not a git checkout)")
  else()
    execute_process(COMMAND "${_git}" -C "${SOURCE_DIR}" status --porcelain --untracked-files=no
                    OUTPUT_VARIABLE _dirty ERROR_QUIET)
    if(NOT _dirty STREQUAL "")
      string(APPEND _commit "+uncommitted")
    endif()
  endif()
endif()
string(TIMESTAMP _built "%Y-%m-%dT%H:%M:%SZ" UTC)
set(_host_glibc "")
execute_process(COMMAND getconf GNU_LIBC_VERSION OUTPUT_VARIABLE _host_glibc OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
set(_program_names "")
foreach(_p IN LISTS _shipped_programs)
  get_filename_component(_name "${_p}" NAME)
  list(APPEND _program_names "${_name}")
endforeach()
list(JOIN _program_names " " _program_names)
list(JOIN _shipped_names " " _lib_names)
list(JOIN _needed_from_machine " " _machine_names)
file(WRITE "${BUNDLE_DIR}/bundle-info.txt"
     "commit=${_commit}\n"
     "built=${_built}\n"
     "build_type=${BUILD_TYPE}\n"
     "cuda_archs=${CUDA_ARCHS}\n"
     "nvcc=${NVCC_VERSION}\n"
     "cxx=${CXX}\n"
     "build_host_glibc=${_host_glibc}\n"
     "requires_glibc=${_glibc}\n"
     "requires_glibcxx=${_glibcxx}\n"
     "programs=${_program_names}\n"
     "shipped_libs=${_lib_names}\n"
     "needs_from_machine=${_machine_names}\n"
     "size_kib=${_kib}\n")
message(STATUS "epx GPU bundle: ${BUNDLE_DIR} (${_kib} KiB; needs glibc >= ${_glibc}, GLIBCXX >= ${_glibcxx}; "
               "ships ${_lib_names}; the machine provides ${_machine_names})")
