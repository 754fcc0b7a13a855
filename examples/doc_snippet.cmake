# SPDX-FileCopyrightText: 2026 The epx authors
# SPDX-License-Identifier: MIT
# Fails unless the block of DOC between `<!-- NAME-begin -->` and `<!-- NAME-end -->` equals the
# lines of SOURCE between its `// example-begin NAME` and `// example-end NAME` markers, with
# INDENT leading spaces removed from each source line (INDENT defaults to 0).
file(READ "${DOC}" doc)
file(READ "${SOURCE}" source)
string(REGEX MATCH "<!-- ${NAME}-begin -->\n```cpp\n(.*)```\n<!-- ${NAME}-end -->" _ "${doc}")
set(from_doc "${CMAKE_MATCH_1}")
string(REGEX MATCH "// example-begin ${NAME}\n(.*)// example-end ${NAME}" _ "${source}")
set(from_source "${CMAKE_MATCH_1}")
if(from_source STREQUAL "")
  message(FATAL_ERROR "no example-begin/end ${NAME} markers in ${SOURCE}")
endif()
if(INDENT)
  string(REPEAT " " ${INDENT} _pad)
  # Line by line (a "^" in CMake's REGEX REPLACE also matches where a previous match ended).
  string(REPLACE "\n${_pad}" "\n" from_source "\n${from_source}")
  string(SUBSTRING "${from_source}" 1 -1 from_source)
endif()
if(NOT from_doc STREQUAL from_source)
  message(FATAL_ERROR "${DOC}'s ${NAME} block differs from ${SOURCE}; copy the lines between the markers "
                      "(less ${INDENT} spaces of indent) into the block between <!-- ${NAME}-begin --> and "
                      "<!-- ${NAME}-end -->")
endif()
message(STATUS "${DOC}: the ${NAME} block matches ${SOURCE}")
