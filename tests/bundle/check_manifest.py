#!/usr/bin/env python3
# SPDX-FileCopyrightText: 2026 The epx authors
# SPDX-License-Identifier: MIT
"""The GPU check bundle's manifest (written by every CUDA configure, cmake/epx_bundle.cmake) against
what it must cover:

    tests/bundle/check_manifest.py --manifest <build>/gpu-bundle-manifest.tsv --build <build> \\
                                   --ctest <ctest> --source <epx checkout>

- every ctest labelled cuda (each CUDA test and example) has a manifest entry of the same name, so a
  new GPU test cannot be left out of the GPU run;
- the benchmarks run once per model shape of bench/bench_common.cuh's kShapes, each benchmark program
  every shape;
- every row is well formed (9 fields, whole seconds, known sanitizer tools, unique names).
"""

import argparse
import json
import pathlib
import re
import subprocess
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import check_out  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", type=pathlib.Path, required=True)
    parser.add_argument("--build", type=pathlib.Path, required=True)
    parser.add_argument("--ctest", required=True)
    parser.add_argument("--source", type=pathlib.Path, required=True)
    args = parser.parse_args()
    problems = []
    try:
        manifest = check_out.read_manifest(args.manifest)
    except ValueError as e:
        sys.exit(f"check_manifest: {e}")
    names = [row["name"] for row in manifest]
    for name in {n for n in names if names.count(n) > 1}:
        problems.append(f"manifest: '{name}' appears {names.count(name)} times")
    for row in manifest:
        for key in ("timeout", "cost"):
            if not row[key].isdigit() or int(row[key]) == 0:
                problems.append(f"manifest: {row['name']}: {key} '{row[key]}' is not whole seconds > 0")
        for tool in filter(None, row["sanitize"].split(",")):
            if tool not in ("memcheck", "racecheck", "synccheck", "initcheck"):
                problems.append(f"manifest: {row['name']}: unknown sanitizer tool '{tool}'")
        if row["kind"] in ("test", "example") and "memcheck" not in row["sanitize"].split(","):
            problems.append(f"manifest: {row['name']}: no memcheck run (every CUDA test runs under memcheck)")

    listed = subprocess.run([args.ctest, "--test-dir", str(args.build), "--show-only=json-v1", "-L", "^cuda$"],
                            capture_output=True, text=True, check=True)
    def labels(test):
        for prop in test.get("properties", []):
            if prop.get("name") == "LABELS":
                return prop.get("value", [])
        return []

    # ctest adds the fixtures the selected tests need (example.nccl_ep.id_dir): keep the labelled ones
    cuda_tests = [t["name"] for t in json.loads(listed.stdout).get("tests", []) if "cuda" in labels(t)]
    if not cuda_tests:
        problems.append("ctest lists no test labelled cuda: is this a CUDA build?")
    for name in cuda_tests:
        if name not in names:
            problems.append(f"ctest {name} (label cuda) has no entry in the bundle's manifest: call epx_bundle_add "
                            "next to its add_test (cmake/epx_bundle.cmake)")

    common = (args.source / "bench/bench_common.cuh").read_text()
    block = re.search(r"kShapes\[\]\s*=\s*\{(.*?)\};", common, re.S)
    shapes = re.findall(r'\{"([^"]+)"', block.group(1)) if block else []
    if not shapes:
        problems.append("bench/bench_common.cuh: found no kShapes names")
    programs = {row["binary"] for row in manifest if row["kind"] == "bench"}
    for program in sorted(programs):
        covered = sorted(re.sub(r"^--benchmark_filter=/(.*)/$", r"\1", row["args"])
                         for row in manifest if row["kind"] == "bench" and row["binary"] == program)
        if covered != sorted(shapes):
            problems.append(f"manifest: {program} runs for shapes {covered}, bench_common.cuh's kShapes are {sorted(shapes)}")

    for p in problems:
        print(f"check_manifest: {p}", file=sys.stderr)
    if problems:
        sys.exit(1)
    print(f"check_manifest: {len(manifest)} entries cover the {len(cuda_tests)} CUDA ctests and {len(shapes)} shapes")


if __name__ == "__main__":
    main()
