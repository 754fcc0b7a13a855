# SPDX-FileCopyrightText: 2026 The epx authors
# SPDX-License-Identifier: MIT
# Fails unless every C++/CUDA source under include/, tests/, examples/ and bench/ of ROOT is formatted
# as ROOT/.clang-format says (CLANG_FORMAT: a clang-format 14; other versions format differently).
# To fix: clang-format-14 -i <the files named below>. MIN_SOURCES (default 100) guards against an empty
# glob; tests/format/fixture (excluded here) is the unformatted tree the check must refuse.
file(GLOB_RECURSE sources LIST_DIRECTORIES false
     "${ROOT}/include/*.hpp" "${ROOT}/include/*.cuh" "${ROOT}/include/*.h"
     "${ROOT}/tests/*.hpp" "${ROOT}/tests/*.cpp" "${ROOT}/tests/*.cu" "${ROOT}/tests/*.cuh"
     "${ROOT}/examples/*.hpp" "${ROOT}/examples/*.cpp" "${ROOT}/examples/*.cu" "${ROOT}/examples/*.cuh"
     "${ROOT}/bench/*.hpp" "${ROOT}/bench/*.cpp" "${ROOT}/bench/*.cu" "${ROOT}/bench/*.cuh")
set(kept "")
foreach(source IN LISTS sources)
  file(RELATIVE_PATH rel "${ROOT}" "${source}")
  if(NOT rel MATCHES "^tests/(fuzz/corpus|format/fixture)/")
    list(APPEND kept "${source}")
  endif()
endforeach()
set(sources "${kept}")
list(LENGTH sources count)
if(NOT DEFINED MIN_SOURCES)
  set(MIN_SOURCES 100)
endif()
if(count LESS MIN_SOURCES)
  message(FATAL_ERROR "found only ${count} sources under ${ROOT}; expected the whole tree")
endif()
set(unformatted "")
foreach(source IN LISTS sources)
  execute_process(COMMAND "${CLANG_FORMAT}" --style=file --dry-run -Werror "${source}"
                  RESULT_VARIABLE rc OUTPUT_QUIET ERROR_QUIET)
  if(NOT rc EQUAL 0)
    file(RELATIVE_PATH rel "${ROOT}" "${source}")
    list(APPEND unformatted "${rel}")
  endif()
endforeach()
if(unformatted)
  list(JOIN unformatted " " files)
  message(FATAL_ERROR "not formatted as .clang-format says (run: ${CLANG_FORMAT} -i ${files})")
endif()
message(STATUS "${count} sources follow .clang-format")
