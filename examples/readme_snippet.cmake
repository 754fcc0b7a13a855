# SPDX-FileCopyrightText: 2026 The epx authors
# SPDX-License-Identifier: MIT
# Fails unless the README's usage block equals the lines of SOURCE between its
# `// example-begin usage` and `// example-end usage` markers.
file(READ "${README}" readme)
file(READ "${SOURCE}" source)
string(REGEX MATCH "<!-- usage-begin -->\n```cpp\n(.*)```\n<!-- usage-end -->" _ "${readme}")
set(from_readme "${CMAKE_MATCH_1}")
string(REGEX MATCH "// example-begin usage\n(.*)// example-end usage" _ "${source}")
set(from_source "${CMAKE_MATCH_1}")
if(from_source STREQUAL "")
  message(FATAL_ERROR "no example-begin/end usage markers in ${SOURCE}")
endif()
if(NOT from_readme STREQUAL from_source)
  message(FATAL_ERROR "README.md's usage block differs from ${SOURCE}; copy the lines between the markers into "
                      "the block between <!-- usage-begin --> and <!-- usage-end -->")
endif()
message(STATUS "README usage block matches ${SOURCE}")
