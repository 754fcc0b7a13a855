#!/usr/bin/env python3
# SPDX-FileCopyrightText: 2026 The epx authors
# SPDX-License-Identifier: MIT
"""Registers, spills, stack and shared memory of every kernel a CUDA translation unit builds.

Compiles each given .cu file with nvcc -Xptxas=-v (no GPU needed) and prints one markdown row per
kernel instantiation: the demangled name (shortened), the target, registers, stack frame, spill
stores/loads and static shared memory. Exits 1 when any kernel spills or has a stack frame (the
rule bench/NOTES.md states: no kernel of epx uses local memory).

    bench/tools/ptxas_table.py tests/cuda/expert_parallel_test.cu tests/cuda/router_test.cu
    bench/tools/ptxas_table.py --arch 90a tests/cuda/cutlass_grouped_test.cu

Only kernels whose name mentions `epx::` are listed unless --all is given (CUB's own kernels are
instantiated too; they are checked for local memory all the same).
"""
import argparse
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers(?:, used \d+ barriers)?(?:, (\d+) bytes smem)?")


def nvcc():
    for candidate in (shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and os.path.exists(candidate):
            return candidate
    sys.exit("ptxas_table.py: nvcc not found (install the CUDA toolkit or put nvcc on PATH)")


def demangle(names):
    tool = shutil.which("c++filt")
    if not tool:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines()))


def shorten(name):
    name = re.sub(r"\(.*\)$", "", name)  # parameter list
    name = name.replace("epx::detail::", "").replace("epx::", "")
    name = re.sub(r"std::integral_constant<int, (\d+)>", r"\1", name)
    return name


def compile_report(source, arch, defines, extra):
    include = os.path.join(ROOT, "include")
    tests = os.path.join(ROOT, "tests")
    cmd = [nvcc(), "-std=c++20", "-O2", "-DNDEBUG", "-DFMT_USE_CONSTEXPR=1", "-I", include, "-I", tests,
           "--extended-lambda", f"--generate-code=arch=compute_{arch},code=sm_{arch}", "-Xptxas=-v", "-c", source,
           "-o", os.devnull]
    cmd += [f"-D{d}" for d in defines] + extra
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        sys.exit(f"ptxas_table.py: nvcc failed on {source}")
    rows, current = [], None
    for line in proc.stderr.splitlines():
        if m := ENTRY.search(line):
            current = {"mangled": m.group(1), "arch": m.group(2), "regs": 0, "stack": 0, "spill_st": 0,
                       "spill_ld": 0, "smem": 0}
            rows.append(current)
        elif current and (m := FRAME.search(line)):
            current["stack"], current["spill_st"], current["spill_ld"] = map(int, m.groups())
        elif current and (m := USED.search(line)):
            current["regs"] = int(m.group(1))
            current["smem"] = int(m.group(2) or 0)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="+")
    parser.add_argument("--arch", default="90", help="compute capability digits, e.g. 90 or 90a (default 90)")
    parser.add_argument("--define", action="append", default=[], help="extra -D for nvcc")
    parser.add_argument("--all", action="store_true", help="list every kernel, not only epx's")
    args = parser.parse_args()
    rows = []
    for source in args.sources:
        for row in compile_report(source, args.arch, args.define, []):
            row["source"] = os.path.relpath(source, ROOT)
            rows.append(row)
    names = demangle([r["mangled"] for r in rows])
    bad = [r for r in rows if r["stack"] or r["spill_st"] or r["spill_ld"]]
    seen = set()
    print("| kernel | target | registers | stack (B) | spill st/ld (B) | static smem (B) |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        name = names[r["mangled"]]
        if not args.all and "epx::" not in name and r not in bad:
            continue
        key = (name, r["arch"])
        if key in seen:
            continue
        seen.add(key)
        print(f"| `{shorten(name)}` | {r['arch']} | {r['regs']} | {r['stack']} | {r['spill_st']}/{r['spill_ld']} "
              f"| {r['smem']} |")
    if bad:
        print(f"\n{len(bad)} kernel(s) use local memory (stack or spills).", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
