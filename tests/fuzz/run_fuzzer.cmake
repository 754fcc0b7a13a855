# SPDX-FileCopyrightText: 2026 The epx authors
# SPDX-License-Identifier: MIT
# Runs one libFuzzer target for SECONDS over the seed corpus SEEDS, writing new inputs to WORK.
# A crash or a failed invariant makes libFuzzer exit non-zero and save the input (crash-*).
file(MAKE_DIRECTORY "${WORK}")
execute_process(COMMAND "${FUZZER}" "${WORK}" "${SEEDS}" -max_total_time=${SECONDS} -timeout=20 -rss_limit_mb=4096
                        -print_final_stats=1
                WORKING_DIRECTORY "${WORK}/.."
                RESULT_VARIABLE result)
if(NOT result EQUAL 0)
  message(FATAL_ERROR "fuzzer ${FUZZER} failed (exit ${result}); the input is saved as crash-* in ${WORK}/..")
endif()
