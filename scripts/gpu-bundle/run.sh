#!/usr/bin/env bash
# SPDX-FileCopyrightText: 2026 The epx authors
# SPDX-License-Identifier: MIT
#
# The GPU check bundle's runner (docs/gpu-bundle.md): everything epx checks on a GPU, in one call, on a
# machine that has the NVIDIA driver but maybe no build tools. Copied to the bundle's top folder.
#
#   run.sh OUT_DIR [--budget SECONDS]      (default 480)
#
# Steps, in order, each with its own timeout, none started that the budget cannot hold:
#   0  libraries: the programs' shared libraries (cuBLAS, NCCL from the toolkit, the system or a Python
#      wheel's nvidia/*/lib); what is missing is named with the checks it skips
#   1  nvidia-smi facts (GPU, driver, clocks) and the smoke test
#   2  every CUDA test and example with EPX_REQUIRE_GPU=1 (a skip is a failure), cheapest first
#   3  compute-sanitizer (memcheck on each, racecheck and synccheck where the manifest says) at
#      EPX_TEST_SMALL=1 sizes, with EPX_UNDER_SANITIZER=<tool> set
#   4  the benchmarks, one process per model shape, EPX_BENCH_QUICK=1, JSON out
#   5  the PyTorch baseline (bench/torch_moe_block.py) when python3 imports torch and sees the GPU
# OUT_DIR receives at most 8 files (a GPU session brings back no more): summary.md (one row per
# check), run.log, failures.log (the full output of every check that failed or timed out),
# machine.txt, benchmarks.json. summary.md and benchmarks.json are rewritten after every check, so a
# run stopped from outside still leaves a readable summary and valid JSON.
# Exit status: 0 when nothing failed (also without a GPU: every GPU step then says "skipped: no GPU");
# 1 when a check failed or a test timed out; 2 for bad usage. EPX_REQUIRE_GPU=1 makes a missing GPU
# and every skipped test a failure.
set -uo pipefail

usage() {
  echo "usage: $0 OUT_DIR [--budget SECONDS]   (see docs/gpu-bundle.md)" >&2
  exit 2
}

bundle=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=""
budget_s=480
while [ $# -gt 0 ]; do
  case "$1" in
    --budget) [ $# -ge 2 ] || usage; budget_s=$2; shift 2 ;;
    --budget=*) budget_s=${1#--budget=}; shift ;;
    -h|--help) usage ;;
    -*) echo "run.sh: unknown option '$1'" >&2; usage ;;
    *) [ -z "$out" ] || { echo "run.sh: a second OUT_DIR '$1' (the first is '$out')" >&2; usage; }; out=$1; shift ;;
  esac
done
[ -n "$out" ] || usage
if ! [[ "$budget_s" =~ ^[0-9]+$ ]] || [ "$budget_s" -lt 10 ]; then
  echo "run.sh: --budget is '$budget_s', expected whole seconds >= 10" >&2
  exit 2
fi
for f in manifest.tsv bundle-info.txt bin; do
  [ -e "$bundle/$f" ] || { echo "run.sh: $bundle/$f is missing: is $bundle a GPU bundle (scripts/epx bundle)?" >&2; exit 2; }
done
command -v timeout >/dev/null 2>&1 || { echo "run.sh: needs 'timeout' (GNU coreutils)" >&2; exit 2; }

strict=0
case "${EPX_REQUIRE_GPU:-}" in ''|0) ;; *) strict=1 ;; esac

mkdir -p "$out" || exit 2
out=$(cd "$out" && pwd)
summary=$out/summary.md
runlog=$out/run.log
failures=$out/failures.log
machine=$out/machine.txt
benchjson=$out/benchmarks.json
our_files=(summary.md run.log failures.log machine.txt benchmarks.json)
for f in "${our_files[@]}"; do rm -f "$out/$f"; done
others=$(find "$out" -mindepth 1 -maxdepth 1 | wc -l)
work=$(mktemp -d "${TMPDIR:-/tmp}/epx-bundle.XXXXXX") || exit 2
trap 'rm -rf "$work"' EXIT

# ---------------------------------------------------------------------------------------------- time
now_ms() {
  if [ -n "${EPOCHREALTIME:-}" ]; then
    local t=${EPOCHREALTIME/[.,]/}
    echo $((10#$t / 1000))
  else
    echo $(($(date +%s%N) / 1000000))
  fi
}
secs() { printf '%d.%d' $(($1 / 1000)) $((($1 % 1000) / 100)); }  # ms -> "12.3"
start_ms=$(now_ms)
end_ms=$((start_ms + budget_s * 1000))
started_utc=$(date -u +%Y-%m-%dT%H:%M:%SZ)

# ---------------------------------------------------------------------------------- logs and summary
cap_bytes=$((14 * 1024 * 1024))  # each file well under the 16 MiB that comes back
log() { printf '%s\n' "$*" >>"$runlog"; }
append_capped() {  # append_capped <file> <source> [title]: the source, its middle cut beyond 2 MiB
  local file=$1 src=$2 size
  size=$(stat -c %s "$file" 2>/dev/null || echo 0)
  if [ "$size" -ge "$cap_bytes" ]; then return; fi
  if [ "$(stat -c %s "$src")" -le $((2 * 1024 * 1024)) ]; then
    cat "$src" >>"$file"
  else
    head -c $((1024 * 1024)) "$src" >>"$file"
    printf '\n[... %s bytes cut: the first and the last MiB are kept ...]\n' "$(stat -c %s "$src")" >>"$file"
    tail -c $((1024 * 1024)) "$src" >>"$file"
  fi
}

rows_step=() rows_check=() rows_result=() rows_secs=() rows_note=()
header_lines=()
overall=""
write_summary() {
  local passed=0 failed=0 skipped=0 timed=0 i r tmp=$work/summary.tmp
  for r in ${rows_result[@]+"${rows_result[@]}"}; do
    case "$r" in
      passed) passed=$((passed + 1)) ;; failed) failed=$((failed + 1)) ;;
      skipped) skipped=$((skipped + 1)) ;; "timed out") timed=$((timed + 1)) ;;
    esac
  done
  {
    echo "# epx GPU check bundle: ${overall:-running}"
    echo
    echo "| | |"
    echo "|---|---|"
    for r in ${header_lines[@]+"${header_lines[@]}"}; do echo "$r"; done
    echo "| counts | $passed passed, $failed failed, $timed timed out, $skipped skipped |"
    echo "| elapsed | $(secs $(($(now_ms) - start_ms))) s of a $budget_s s budget |"
    echo
    echo "| step | check | result | seconds | note |"
    echo "|---|---|---|---|---|"
    for i in ${rows_check[@]+"${!rows_check[@]}"}; do
      echo "| ${rows_step[$i]} | ${rows_check[$i]} | ${rows_result[$i]} | ${rows_secs[$i]} | ${rows_note[$i]//|/\\|} |"
    done
    echo
    echo "Full output of every failed or timed-out check: failures.log. Every command, exit status and the"
    echo "last lines of each check's output: run.log. The machine, the libraries and tools found: machine.txt."
  } >"$tmp" && mv "$tmp" "$summary"
}
header() { header_lines+=("| $1 | ${2//|/\\|} |"); write_summary; }
# record <step> <check> <passed|failed|skipped|timed out> <ms or -> <note>
record() {
  rows_step+=("$1") rows_check+=("$2") rows_result+=("$3") rows_note+=("$5")
  if [ "$4" = - ]; then rows_secs+=("-"); else rows_secs+=("$(secs "$4")"); fi
  log "-> $2: $3${5:+ ($5)}"
  write_summary
}

# Runs one command with a timeout, output to a file; sets run_rc and run_ms.
# run_timed <seconds> <output file> <dir> <command...>
run_timed() {
  local limit=$1 output=$2 dir=$3 t0
  shift 3
  log "\$ (cd $dir && timeout $limit $*)"
  t0=$(now_ms)
  (cd "$dir" && exec timeout -k 10 "$limit" "$@") >"$output" 2>&1 </dev/null
  run_rc=$?
  run_ms=$(($(now_ms) - t0))
  log "   exit $run_rc after $(secs "$run_ms") s; last lines:"
  tail -n 12 "$output" | sed 's/^/   | /' >>"$runlog"
}
keep_failure() {  # keep_failure <check> <result> <output file> <command description>
  {
    echo "================================================================================"
    echo "$1: $2"
    echo "command: $4"
    echo "--------------------------------------------------------------------------------"
  } >>"$failures"
  append_capped "$failures" "$3"
  echo >>"$failures"
}

# ---------------------------------------------------------------------------------- bundle, machine
info() { sed -n "s/^$1=//p" "$bundle/bundle-info.txt" | head -n1; }
json_str() {
  local s=$1
  s=${s//\\/\\\\}; s=${s//\"/\\\"}; s=${s//$'\t'/\\t}; s=${s//$'\n'/\\n}; s=${s//$'\r'/}
  printf '"%s"' "$s"
}
machine_glibc=$(getconf GNU_LIBC_VERSION 2>/dev/null | awk '{print $2}')
os_name=$(sed -n 's/^PRETTY_NAME="\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' /etc/os-release 2>/dev/null | head -n1)
{
  echo "== epx GPU check bundle run, $started_utc"
  echo "command: $0 $out --budget $budget_s   (EPX_REQUIRE_GPU=${EPX_REQUIRE_GPU:-})"
  echo "bundle: $bundle"
  sed 's/^/  /' "$bundle/bundle-info.txt"
  echo "== machine"
  echo "host: $(hostname 2>/dev/null)   os: ${os_name:-unknown}   kernel: $(uname -r)   cpus: $(nproc 2>/dev/null)"
  echo "glibc: ${machine_glibc:-unknown}   libstdc++: $(ls /usr/lib/x86_64-linux-gnu/libstdc++.so.6.* /usr/lib64/libstdc++.so.6.* 2>/dev/null | head -n1)"
  grep -E '^(MemTotal|MemAvailable)' /proc/meminfo 2>/dev/null
} >"$machine"
: >"$runlog"
: >"$failures"
log "epx GPU check bundle run, $started_utc, budget $budget_s s, out $out"
header "started" "$started_utc; command: run.sh OUT_DIR --budget $budget_s${EPX_REQUIRE_GPU:+ (EPX_REQUIRE_GPU=$EPX_REQUIRE_GPU)}"
header "bundle" "commit $(info commit), built $(info built), $(info build_type), CUDA archs $(info cuda_archs), nvcc $(info nvcc), needs glibc >= $(info requires_glibc), GLIBCXX >= $(info requires_glibcxx)"
header "machine" "$(hostname 2>/dev/null), ${os_name:-unknown OS}, glibc ${machine_glibc:-unknown}, $(nproc 2>/dev/null) CPUs"
if [ "$others" -gt 0 ]; then
  header "note" "OUT_DIR held $others other file(s) before this run; they count against the 8 files a GPU session brings back"
fi
write_summary

# ------------------------------------------------------------------------------------------- manifest
# Columns (cmake/epx_bundle.cmake): kind name binary timeout cost sanitize expect env args; "-" is empty.
m_kind=() m_name=() m_bin=() m_timeout=() m_cost=() m_san=() m_expect=() m_env=() m_args=()
while IFS=$'\t' read -r kind name bin timeout_s cost san expect env args; do
  case "$kind" in ''|'#'*) continue ;; esac
  for field in san expect env args; do [ "${!field}" = - ] && printf -v "$field" '%s' ""; done
  m_kind+=("$kind") m_name+=("$name") m_bin+=("$bin") m_timeout+=("$timeout_s") m_cost+=("$cost")
  m_san+=("$san") m_expect+=("$expect") m_env+=("$env") m_args+=("$args")
done <"$bundle/manifest.tsv"
n_checks=${#m_name[@]}
if [ "$n_checks" -eq 0 ]; then
  echo "run.sh: $bundle/manifest.tsv lists no checks" >&2
  exit 2
fi
# Indices of the manifest sorted by cost (cheapest first), per kind.
sorted_indices() {  # sorted_indices <kind regex>
  local i
  for i in "${!m_name[@]}"; do
    [[ "${m_kind[$i]}" =~ ^($1)$ ]] && printf '%s %s\n' "${m_cost[$i]}" "$i"
  done | sort -n -s -k1,1 | awk '{print $2}'
}

# ------------------------------------------------------------------------------ step 0: libraries
python=${EPX_PYTHON:-}
if [ -z "$python" ]; then python=$(command -v python3 2>/dev/null || true); fi
site_dirs=()
if [ -n "$python" ]; then
  while IFS= read -r d; do [ -n "$d" ] && site_dirs+=("$d"); done < <(timeout 30 "$python" -c '
import site, sys
dirs = list(getattr(site, "getsitepackages", lambda: [])()) + [site.getusersitepackages()]
dirs += [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
print("\n".join(dict.fromkeys(dirs)))' 2>/dev/null)
fi
for d in ${VIRTUAL_ENV:+"$VIRTUAL_ENV"/lib/python3*/site-packages} /opt/*/.venv/lib/python3*/site-packages \
         /opt/conda/lib/python3*/site-packages /usr/local/lib/python3*/dist-packages /usr/lib/python3/dist-packages \
         "$HOME"/.local/lib/python3*/site-packages; do
  [ -d "$d" ] && site_dirs+=("$d")
done
# Where the CUDA libraries may be, in order of preference: the toolkit, the driver's folders, wheels.
lib_dirs=()
for d in ${CUDA_HOME:+"$CUDA_HOME"/lib64 "$CUDA_HOME"/lib} ${CUDA_PATH:+"$CUDA_PATH"/lib64 "$CUDA_PATH"/lib} \
         /usr/local/cuda/lib64 /usr/local/cuda/lib /usr/local/cuda/targets/x86_64-linux/lib \
         $(ls -d /usr/local/cuda-*/lib64 /usr/local/cuda-*/lib 2>/dev/null | sort -rV) \
         /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/wsl/lib; do
  [ -d "$d" ] && lib_dirs+=("$d")
done
for s in ${site_dirs[@]+"${site_dirs[@]}"}; do
  for d in "$s"/nvidia/*/lib; do [ -d "$d" ] && lib_dirs+=("$d"); done
done
dedupe() { awk '!seen[$0]++'; }
mapfile -t lib_dirs < <(printf '%s\n' ${lib_dirs[@]+"${lib_dirs[@]}"} | dedupe)

# missing_libs <binary> <LD_LIBRARY_PATH>: the libraries the dynamic loader cannot find, and the symbol
# versions (GLIBC_2.xx) that the machine's libraries are too old for.
missing_libs() {
  LD_LIBRARY_PATH=$2 LD_TRACE_LOADED_OBJECTS=1 "$1" 2>&1 </dev/null |
    sed -n -e 's/^[[:space:]]*\([^[:space:]]*\) => not found.*/\1/p' -e "s/.*version \`\([^']*\)' not found.*/\1/p" | dedupe
}
base_ldpath=${LD_LIBRARY_PATH:-}
extra_dirs=()
lib_notes=()
declare -A lib_where=()
t0=$(now_ms)
# Each folder found may bring libraries that need others (libcublas needs libcublasLt): ask the loader
# again until nothing new turns up.
ldpath=$base_ldpath
all_missing=""
for _ in 1 2 3; do
  missing_now=$(for b in "$bundle"/bin/*; do missing_libs "$b" "$ldpath"; done | dedupe)
  found_new=0
  for soname in $missing_now; do
    [ -n "${lib_where[$soname]:-}" ] && continue
    all_missing+="$soname"$'\n'
    case "$soname" in GLIBC*) lib_where[$soname]="the system's C/C++ runtime is older than the bundle needs"; continue ;; esac
    for d in ${lib_dirs[@]+"${lib_dirs[@]}"}; do
      if [ -e "$d/$soname" ]; then extra_dirs+=("$d"); lib_where[$soname]=$d; found_new=1; break; fi
    done
  done
  ldpath=$(printf '%s\n' ${extra_dirs[@]+"${extra_dirs[@]}"} | dedupe | paste -sd: -)
  [ -n "$base_ldpath" ] && ldpath=${ldpath:+$ldpath:}$base_ldpath
  [ "$found_new" = 1 ] || break
done
all_missing=$(printf '%s' "$all_missing" | dedupe)
# The driver (dlopened by the static CUDA runtime, so no program names it).
driver=""
if ldconfig -p 2>/dev/null | grep -q 'libcuda\.so\.1 ' || /sbin/ldconfig -p 2>/dev/null | grep -q 'libcuda\.so\.1 '; then
  driver="system"
else
  for d in ${base_ldpath//:/ } ${lib_dirs[@]+"${lib_dirs[@]}"}; do
    if [ -e "$d/libcuda.so.1" ]; then driver=$d; ldpath=${ldpath:+$ldpath:}$d; break; fi
  done
fi
declare -A bin_missing=()
{
  echo "== libraries (LD_LIBRARY_PATH for the programs: ${ldpath:-unchanged})"
  echo "searched: ${lib_dirs[*]:-nothing found}"
  echo "python site dirs: ${site_dirs[*]:-none}"
  echo "libcuda.so.1 (driver): ${driver:-not found}"
} >>"$machine"
for b in "$bundle"/bin/*; do
  name=${b##*/}
  bin_missing[$name]=$(missing_libs "$b" "$ldpath" | paste -sd' ' -)
  {
    echo "-- $name: ${bin_missing[$name]:+MISSING ${bin_missing[$name]}}"
    LD_LIBRARY_PATH=$ldpath LD_TRACE_LOADED_OBJECTS=1 "$b" 2>&1 </dev/null | sed 's/^\s*/   /'
  } >>"$machine"
done
missing_set=$(printf '%s\n' "${bin_missing[@]}" | tr ' ' '\n' | sed '/^$/d' | sort -u)
for soname in $all_missing; do
  lib_notes+=("$soname: ${lib_where[$soname]:-NOT FOUND}")
done
if [ -n "$missing_set" ]; then
  affected=""
  for i in "${!m_name[@]}"; do
    [ -n "${bin_missing[${m_bin[$i]}]:-}" ] && affected+="${affected:+, }${m_name[$i]}"
  done
  note="not found: $(echo "$missing_set" | paste -sd' ' -) (searched the bundle's lib/, the system, ${lib_dirs[*]:-no CUDA or wheel folder}); skips: $affected"
  if [ "$strict" = 1 ]; then record 0 libraries failed "$(($(now_ms) - t0))" "$note"
  else record 0 libraries skipped "$(($(now_ms) - t0))" "$note"; fi
else
  note="every program's libraries resolve"
  for l in ${lib_notes[@]+"${lib_notes[@]}"}; do note+="; $l"; done
  record 0 libraries passed "$(($(now_ms) - t0))" "$note"
fi
note=""
for l in ${lib_notes[@]+"${lib_notes[@]}"}; do note+="${note:+; }$l"; done
header "libraries" "${note:-all from the bundle and the system}; driver libcuda.so.1: ${driver:-not found}"

# ------------------------------------------------------------------------ helpers for the GPU steps
tmp_dir() { mktemp -d "$work/run.XXXXXX"; }
require_gpu=1  # every GPU check runs with EPX_REQUIRE_GPU=1; only the no-GPU smoke probe does not
# check_command <index> <dir>: fills the arrays cmd (env and its settings) and prog (the program and
# its arguments) for manifest entry <index>, run in <dir>
check_command() {
  local i=$1 dir=$2 item unsets=() sets=()
  for item in ${m_env[$i]}; do
    if [ "${item#-}" != "$item" ]; then unsets+=(-u "${item#-}"); else sets+=("${item//@TMP@/$dir}"); fi
  done
  if [ "$require_gpu" = 1 ]; then sets=(EPX_REQUIRE_GPU=1 ${sets[@]+"${sets[@]}"}); else unsets+=(-u EPX_REQUIRE_GPU); fi
  cmd=(env ${unsets[@]+"${unsets[@]}"} ${ldpath:+"LD_LIBRARY_PATH=$ldpath"} ${sets[@]+"${sets[@]}"})
  prog=("$bundle/bin/${m_bin[$i]}")
  read -r -a extra <<<"${m_args[$i]}"
  prog+=(${extra[@]+"${extra[@]}"})
}
# budget_for <step deadline ms> <estimated seconds of the checks after this one> <checks left incl. this>
# <check's own timeout>: whole seconds this check may take (0: too little left to start it). It may
# take what the later checks' estimates leave, and at least an equal share of what is left, so a hang
# early in the step cannot starve the rest.
budget_for() {
  local left_ms=$(($1 - $(now_ms))) later_ms=$(($2 * 1000)) n=$3 own=$4 allow_ms share_ms limit
  [ "$left_ms" -lt 3000 ] && { echo 0; return; }
  allow_ms=$((left_ms - later_ms))
  share_ms=$((left_ms / n))
  [ "$allow_ms" -lt "$share_ms" ] && allow_ms=$share_ms
  limit=$(((allow_ms + 999) / 1000))
  [ "$limit" -gt $((left_ms / 1000)) ] && limit=$((left_ms / 1000))
  [ "$limit" -gt "$own" ] && limit=$own
  echo "$limit"
}

# Reservations: what each later step keeps of the budget (per mille), so that no step eats the next's.
reserve_permille=(0 50 300 250 300 100)
reserve_ms() { echo $((budget_s * ${reserve_permille[$1]})); }

# ---------------------------------------------------------------------------- step 1: GPU and smoke
gpu=0
gpu_note="no GPU"
smi=$(command -v nvidia-smi 2>/dev/null || true)
[ -z "$smi" ] && [ -x /usr/local/nvidia/bin/nvidia-smi ] && smi=/usr/local/nvidia/bin/nvidia-smi
t0=$(now_ms)
if [ -n "$smi" ]; then
  gpus=$(timeout 30 "$smi" -L 2>&1)
  if grep -q '^GPU [0-9]' <<<"$gpus"; then
    gpu=1
    query=$(timeout 30 "$smi" --query-gpu=name,driver_version,compute_cap,memory.total,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit,temperature.gpu,pstate,mig.mode.current --format=csv,noheader 2>&1 | head -n1)
    IFS=',' read -r g_name g_driver g_cc g_mem g_sm g_smmax g_memclk g_memclkmax g_power g_temp g_pstate g_mig <<<"$query"
    if [ -n "${g_mig:-}" ]; then
      gpu_note="${g_name# }, driver ${g_driver# }, cc ${g_cc# }, ${g_mem# }, SM clock ${g_sm# } (max ${g_smmax# }), memory clock ${g_memclk# } (max ${g_memclkmax# }), power limit ${g_power# }, ${g_temp# } C, ${g_pstate# }, MIG ${g_mig# }"
    else  # an older nvidia-smi that lacks a field: the first line of -L says enough
      gpu_note="$(grep -m1 '^GPU [0-9]' <<<"$gpus" | sed 's/^GPU [0-9]*: //; s/ (UUID.*//') (nvidia-smi --query-gpu: ${query:0:120})"
    fi
    {
      echo "== nvidia-smi -L"; echo "$gpus"
      echo "== nvidia-smi --query-gpu (name, driver, cc, memory, SM clock, max, memory clock, max, power limit, temperature, pstate, MIG)"
      echo "$query"
      echo "== nvidia-smi -q"; timeout 60 "$smi" -q 2>&1
    } >>"$machine"
    record 1 nvidia-smi passed "$(($(now_ms) - t0))" "$gpu_note"
    [ "$(grep -c '^GPU [0-9]' <<<"$gpus")" -gt 1 ] && header "note" "$(grep -c '^GPU [0-9]' <<<"$gpus") GPUs visible; the checks use GPU 0 (CUDA_VISIBLE_DEVICES selects another)"
  else
    echo "== nvidia-smi -L"$'\n'"$gpus" >>"$machine"
    gpu_note="nvidia-smi lists no GPU: $(head -n1 <<<"$gpus")"
  fi
else
  gpu_note="nvidia-smi not found"
fi
smoke=""
for i in "${!m_name[@]}"; do [ "${m_name[$i]}" = cuda.smoke_test ] && smoke=$i; done
if [ "$gpu" = 0 ]; then
  record 1 nvidia-smi skipped "$(($(now_ms) - t0))" "no GPU ($gpu_note)"
fi
header "GPU" "$gpu_note"

# The smoke test also decides when nvidia-smi is missing: it passes only where CUDA sees a device.
if [ -n "$smoke" ]; then
  i=$smoke
  if [ -n "${bin_missing[${m_bin[$i]}]:-}" ]; then
    record 1 "${m_name[$i]}" "$([ "$strict" = 1 ] && echo failed || echo skipped)" - "not started: ${bin_missing[${m_bin[$i]}]} not found"
  else
    dir=$(tmp_dir)
    [ "$gpu" = 0 ] && [ "$strict" = 0 ] && require_gpu=0  # a probe: does the program start, and does it see a GPU?
    check_command "$i" "$dir"
    require_gpu=1
    run_timed 60 "$work/smoke.out" "$dir" "${cmd[@]}" "${prog[@]}"
    if [ "$run_rc" = 0 ]; then
      [ "$gpu" = 0 ] && { gpu=1; gpu_note="a CUDA device (nvidia-smi not found: $gpu_note)"; }
      record 1 "${m_name[$i]}" passed "$run_ms" "$(grep -m1 '^epx CUDA tests on' "$work/smoke.out")"
    elif [ "$gpu" = 0 ] && [ "$run_rc" = 77 ]; then
      record 1 "${m_name[$i]}" skipped "$run_ms" "no GPU; the program started and says: $(grep -m1 EPX_SKIP "$work/smoke.out")"
    else
      result=failed; [ "$run_rc" = 124 ] || [ "$run_rc" = 137 ] && result="timed out"
      note="exit $run_rc: $(grep -m1 -E 'EPX_SKIP|error|Error' "$work/smoke.out" | cut -c1-200)"
      [ "$gpu" = 0 ] && note="no GPU and EPX_REQUIRE_GPU=1 ($note)"
      record 1 "${m_name[$i]}" "$result" "$run_ms" "$note"
      keep_failure "${m_name[$i]}" "$result" "$work/smoke.out" "${cmd[*]} ${prog[*]}"
    fi
  fi
fi

# Python with PyTorch (step 5), looked at now: machine facts, and whether step 5 keeps a reservation.
torch_ok=0
torch_note="python3 not found"
if [ -n "$python" ]; then
  torch_probe=$(timeout 120 "$python" -c 'import sys, torch
print("python %s, torch %s, CUDA %s, cuda available: %s" % (sys.version.split()[0], torch.__version__, torch.version.cuda, torch.cuda.is_available()))' 2>&1 | tail -n1)
  if [[ "$torch_probe" == *"cuda available: True"* ]]; then torch_ok=1; torch_note=$torch_probe
  elif [[ "$torch_probe" == *"cuda available: False"* ]]; then torch_note="$torch_probe (torch sees no GPU)"
  else torch_note="$python cannot import torch: ${torch_probe:0:200}"; fi
fi
echo "== python: ${python:-not found}: $torch_note" >>"$machine"

# compute-sanitizer (step 3)
sanitizer=${EPX_COMPUTE_SANITIZER:-}
if [ -z "$sanitizer" ]; then
  sanitizer=$(command -v compute-sanitizer 2>/dev/null || true)
  for c in ${CUDA_HOME:+"$CUDA_HOME"/bin/compute-sanitizer} /usr/local/cuda/bin/compute-sanitizer \
           $(ls /usr/local/cuda-*/bin/compute-sanitizer 2>/dev/null | sort -rV) /opt/nvidia/compute-sanitizer/compute-sanitizer \
           /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
    [ -z "$sanitizer" ] && [ -x "$c" ] && sanitizer=$c
  done
fi
sanitizer_note="not found (searched PATH, \$CUDA_HOME/bin, /usr/local/cuda*/bin; set EPX_COMPUTE_SANITIZER)"
if [ -n "$sanitizer" ]; then
  sanitizer_note="$sanitizer ($("$sanitizer" --version 2>/dev/null | grep -m1 -i version | sed 's/^ *//'))"
fi
echo "== compute-sanitizer: $sanitizer_note" >>"$machine"
header "tools" "compute-sanitizer: $sanitizer_note; python: ${python:-not found}, $torch_note"

# Step deadlines: the budget's end less what the later steps that will run keep.
bench_count=$(sorted_indices bench | wc -l)
step_deadline() {
  local k=$1 j d=$end_ms
  for ((j = k + 1; j <= 5; j++)); do
    case $j in
      3) [ -n "$sanitizer" ] || continue ;;
      4) [ "$bench_count" -gt 0 ] || continue ;;
      5) [ "$torch_ok" = 1 ] || continue ;;
    esac
    d=$((d - $(reserve_ms "$j")))
  done
  echo "$d"
}

# ---------------------------------------------------------------------- step 2: tests and examples
step2=()
for i in $(sorted_indices 'test|example'); do [ "$i" = "$smoke" ] || step2+=("$i"); done
deadline=$(step_deadline 2)
for ((n = 0; n < ${#step2[@]}; n++)); do
  i=${step2[$n]}
  name=${m_name[$i]}
  if [ "$gpu" = 0 ]; then record 2 "$name" skipped - "no GPU"; continue; fi
  if [ -n "${bin_missing[${m_bin[$i]}]:-}" ]; then
    record 2 "$name" "$([ "$strict" = 1 ] && echo failed || echo skipped)" - "not started: ${bin_missing[${m_bin[$i]}]} not found"
    continue
  fi
  later=0
  for ((k = n + 1; k < ${#step2[@]}; k++)); do later=$((later + ${m_cost[${step2[$k]}]})); done
  limit=$(budget_for "$deadline" "$later" $((${#step2[@]} - n)) "${m_timeout[$i]}")
  if [ "$limit" -lt 1 ]; then
    record 2 "$name" "$([ "$strict" = 1 ] && echo failed || echo skipped)" - "budget: $(( (deadline - $(now_ms)) / 1000 )) s left in this step"
    continue
  fi
  dir=$(tmp_dir)
  check_command "$i" "$dir"
  run_timed "$limit" "$dir.out" "$dir" "${cmd[@]}" "${prog[@]}"
  note=$(grep -m1 -E '^\[doctest\] test cases:' "$dir.out")
  if [ "$run_rc" = 0 ] && [ -n "${m_expect[$i]}" ] && ! grep -Eq -- "${m_expect[$i]}" "$dir.out"; then
    result=failed note="exit 0, but the output lacks /${m_expect[$i]}/"
  elif [ "$run_rc" = 0 ]; then
    result=passed
  elif [ "$run_rc" = 124 ] || [ "$run_rc" = 137 ]; then
    result="timed out" note="stopped after $limit s"
  elif [ "$run_rc" = 77 ]; then
    result=failed note="the program skipped itself (exit 77): a skip is a failure on a GPU machine"
  else
    result=failed note="exit $run_rc${note:+; $note}"
  fi
  record 2 "$name" "$result" "$run_ms" "$note"
  [ "$result" = passed ] || keep_failure "$name" "$result" "$dir.out" "${cmd[*]} ${prog[*]}"
done

# ----------------------------------------------------------------------- step 3: compute-sanitizer
san_runs=()  # "<estimate> <index> <tool>", cheapest first
for i in $(sorted_indices 'test|example'); do
  for tool in ${m_san[$i]//,/ }; do
    case $tool in racecheck) f=6 ;; *) f=3 ;; esac
    san_runs+=("$((m_cost[$i] * f)) $i $tool")
  done
done
mapfile -t san_runs < <(printf '%s\n' ${san_runs[@]+"${san_runs[@]}"} | sed '/^$/d' | sort -n -s -k1,1)
deadline=$(step_deadline 3)
san_unusable=""
for ((n = 0; n < ${#san_runs[@]}; n++)); do
  read -r _ i tool <<<"${san_runs[$n]}"
  name="$tool ${m_name[$i]}"
  if [ "$gpu" = 0 ]; then record 3 "$name" skipped - "no GPU"; continue; fi
  if [ -z "$sanitizer" ]; then record 3 "$name" skipped - "compute-sanitizer $sanitizer_note"; continue; fi
  if [ -n "$san_unusable" ]; then record 3 "$name" skipped - "compute-sanitizer cannot run here: $san_unusable"; continue; fi
  if [ -n "${bin_missing[${m_bin[$i]}]:-}" ]; then record 3 "$name" skipped - "${bin_missing[${m_bin[$i]}]} not found"; continue; fi
  later=0
  for ((k = n + 1; k < ${#san_runs[@]}; k++)); do later=$((later + ${san_runs[$k]%% *})); done
  limit=$(budget_for "$deadline" "$later" $((${#san_runs[@]} - n)) $((m_timeout[$i] * 2)))
  if [ "$limit" -lt 1 ]; then
    record 3 "$name" skipped - "budget: $(( (deadline - $(now_ms)) / 1000 )) s left in this step"
    continue
  fi
  dir=$(tmp_dir)
  check_command "$i" "$dir"
  cmd+=(EPX_TEST_SMALL=1 "EPX_UNDER_SANITIZER=$tool")  # tests skip what a tool reports by design (smoke_test)
  run_timed "$limit" "$dir.out" "$dir" "${cmd[@]}" "$sanitizer" --tool "$tool" --error-exitcode 86 --print-limit 50 "${prog[@]}"
  errors=$(grep -m1 -E 'ERROR SUMMARY: [0-9]+ error' "$dir.out" | sed 's/^.*ERROR SUMMARY: //')
  if [ "$run_rc" = 0 ]; then
    result=passed note=${errors:-}
  elif [ "$run_rc" = 124 ] || [ "$run_rc" = 137 ]; then
    result="timed out" note="stopped after $limit s (EPX_TEST_SMALL=1)"
  elif grep -Eq 'Device not supported|not supported on this (platform|device)|Unable to (find|load) injection|Target application terminated before first instrumented API call' "$dir.out"; then
    san_unusable=$(grep -m1 -E 'Device not supported|not supported|Unable to|Target application terminated' "$dir.out" | sed 's/^=* *//' | cut -c1-160)
    result=skipped note="compute-sanitizer cannot run here: $san_unusable"
  elif [ "$run_rc" = 86 ]; then
    result=failed note="$tool found ${errors:-errors}"
  else
    result=failed note="the program failed under $tool (exit $run_rc)${errors:+; $errors}"
  fi
  record 3 "$name" "$result" "$run_ms" "$note"
  case "$result" in failed|"timed out") keep_failure "$name" "$result" "$dir.out" "${cmd[*]} $sanitizer --tool $tool ${prog[*]}" ;; esac
done

# ---------------------------------------------------------------------------- step 4: benchmarks
bench_entries=()
write_bench_json() {
  local tmp=$work/benchmarks.tmp e first=1
  {
    printf '{\n"epx_bundle": {"started": %s, "command": %s, "budget_s": %s, "commit": %s, "built": %s, "cuda_archs": %s, "nvcc": %s, "gpu": %s, "machine": %s, "quick": true},\n"runs": [\n' \
      "$(json_str "$started_utc")" "$(json_str "run.sh OUT_DIR --budget $budget_s")" "$budget_s" "$(json_str "$(info commit)")" \
      "$(json_str "$(info built)")" "$(json_str "$(info cuda_archs)")" "$(json_str "$(info nvcc)")" "$(json_str "$gpu_note")" \
      "$(json_str "$(hostname 2>/dev/null), ${os_name:-unknown}, glibc ${machine_glibc:-unknown}")"
    for e in ${bench_entries[@]+"${bench_entries[@]}"}; do
      [ "$first" = 1 ] || printf ',\n'
      first=0
      cat "$e"
    done
    printf '\n]\n}\n'
  } >"$tmp" && mv "$tmp" "$benchjson"
}
# A benchmark killed midway leaves Google Benchmark's JSON open after its last finished row (it flushes
# each row): keep the rows, close the document. Prints nothing when not even the header was written.
close_gbench_json() {
  local file=$1
  grep -q '"benchmarks": \[' "$file" 2>/dev/null || return 0
  if [ "$(sed '/^[[:space:]]*$/d' "$file" | tail -n1)" = "}" ]; then cat "$file"; return 0; fi
  # a finished row ends in a line "    }", or "    }," once the next row has begun
  awk '{ line[NR] = $0 } /^  "benchmarks": \[$/ { start = NR } /^    },?$/ { last = NR }
       END { stop = (last > start) ? last : start; if (stop == last) sub(/,$/, "", line[stop])
             for (i = 1; i <= stop; ++i) print line[i]; print "  ]"; print "}" }' "$file"
}
# bench_entry <check> <program> <args> <result> <ms> <complete: true|false> <JSON file or "">
bench_entry() {
  local e=$work/entry.${#bench_entries[@]}.json
  {
    printf '{"check": %s, "program": %s, "args": %s, "result": %s, "seconds": %s, "complete": %s, "output": ' \
      "$(json_str "$1")" "$(json_str "$2")" "$(json_str "$3")" "$(json_str "$4")" "$(secs "$5")" "$6"
    if [ -n "$7" ] && [ -s "$7" ]; then cat "$7"; else printf 'null'; fi
    printf '}'
  } >"$e"
  bench_entries+=("$e")
  write_bench_json
}
write_bench_json
mapfile -t step4 < <(sorted_indices bench)
deadline=$(step_deadline 4)
for ((n = 0; n < ${#step4[@]}; n++)); do
  i=${step4[$n]}
  name=${m_name[$i]}
  if [ "$gpu" = 0 ]; then record 4 "$name" skipped - "no GPU"; continue; fi
  if [ -n "${bin_missing[${m_bin[$i]}]:-}" ]; then record 4 "$name" skipped - "${bin_missing[${m_bin[$i]}]} not found"; continue; fi
  later=0
  for ((k = n + 1; k < ${#step4[@]}; k++)); do later=$((later + ${m_cost[${step4[$k]}]})); done
  limit=$(budget_for "$deadline" "$later" $((${#step4[@]} - n)) "${m_timeout[$i]}")
  if [ "$limit" -lt 1 ]; then record 4 "$name" skipped - "budget: $(( (deadline - $(now_ms)) / 1000 )) s left in this step"; continue; fi
  dir=$(tmp_dir)
  check_command "$i" "$dir"
  run_timed "$limit" "$dir.out" "$dir" "${cmd[@]}" "${prog[@]}" --benchmark_out="$dir/out.json" --benchmark_out_format=json
  close_gbench_json "$dir/out.json" >"$dir/closed.json"
  rows=$(grep -c '"run_type": "iteration"' "$dir/closed.json")
  errs=$(grep -c '"error_occurred": true' "$dir/closed.json")
  complete=true
  if [ "$run_rc" = 0 ] && [ "$errs" -gt 0 ]; then
    result=failed note="$errs of $rows cases reported an error: $(grep -m1 '"error_message"' "$dir/closed.json" | sed 's/^ *"error_message": //' | cut -c1-200)"
  elif [ "$run_rc" = 0 ]; then
    result=passed note="$rows cases"
  elif [ "$run_rc" = 124 ] || [ "$run_rc" = 137 ]; then
    result="timed out" note="stopped after $limit s; $rows cases kept" complete=false
  else
    result=failed note="exit $run_rc; $rows cases kept" complete=false
  fi
  record 4 "$name" "$result" "$run_ms" "$note"
  case "$result" in failed|"timed out") keep_failure "$name" "$result" "$dir.out" "${cmd[*]} ${prog[*]}" ;; esac
  bench_entry "$name" "${m_bin[$i]}" "${m_args[$i]}" "$result" "$run_ms" "$complete" "$dir/closed.json"
done

# ---------------------------------------------------------------------- step 5: PyTorch baseline
torch_script=$bundle/bench/torch_moe_block.py
if [ "$gpu" = 0 ]; then
  record 5 bench.torch_block skipped - "no GPU"
elif [ "$torch_ok" = 0 ]; then
  record 5 bench.torch_block skipped - "$torch_note"
elif [ ! -f "$torch_script" ]; then
  record 5 bench.torch_block skipped - "$torch_script is missing"
else
  left=$(((end_ms - $(now_ms)) / 1000))
  limit=$((left < 600 ? left : 600))
  if [ "$limit" -lt 10 ]; then
    record 5 bench.torch_block skipped - "budget: $left s left"
  else
    dir=$(tmp_dir)
    run_timed "$limit" "$dir.out" "$dir" env PYTHONUNBUFFERED=1 "$python" "$torch_script" --quick --out "$dir/torch.json"
    rows=$(grep -c '"run_type": "iteration"' "$dir/torch.json" 2>/dev/null)
    if [ "$run_rc" = 0 ]; then result=passed note="${rows:-0} cases; $torch_note" complete=true
    elif [ "$run_rc" = 124 ] || [ "$run_rc" = 137 ]; then result="timed out" note="stopped after $limit s; ${rows:-0} cases kept" complete=false
    else result=failed note="exit $run_rc; ${rows:-0} cases kept" complete=false; fi
    record 5 bench.torch_block "$result" "$run_ms" "$note"
    case "$result" in failed|"timed out") keep_failure bench.torch_block "$result" "$dir.out" "$python $torch_script --quick" ;; esac
    bench_entry bench.torch_block torch_moe_block.py --quick "$result" "$run_ms" "$complete" "$dir/torch.json"
  fi
fi

# --------------------------------------------------------------------------------------- verdict
# Failures: any failed check; a timed-out test (steps 1-2: a hang). Timeouts of the sanitizer, benchmark
# and PyTorch steps are the budget's doing and are reported, not failed.
status=0
failed_names=""
for i in "${!rows_check[@]}"; do
  r=${rows_result[$i]}
  if [ "$r" = failed ] || { [ "$r" = "timed out" ] && [ "${rows_step[$i]}" -le 2 ]; }; then
    status=1
    failed_names+="${failed_names:+, }${rows_check[$i]}"
  fi
done
if [ "$status" = 1 ]; then overall="FAILED ($failed_names)"
elif [ "$gpu" = 0 ]; then overall="no GPU: every GPU check skipped"
else overall="passed"; fi
header "result" "$overall"
[ -s "$failures" ] || echo "No check failed or timed out." >"$failures"
log "result: $overall (exit $status)"
printf '%s\n' "epx GPU check bundle: $overall; summary: $summary"
exit "$status"
