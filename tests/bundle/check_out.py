#!/usr/bin/env python3
# SPDX-FileCopyrightText: 2026 The epx authors
# SPDX-License-Identifier: MIT
"""Checks what the GPU check bundle's run.sh wrote into OUT_DIR (docs/gpu-bundle.md):

    tests/bundle/check_out.py OUT_DIR --manifest build/gpu-bundle/manifest.tsv [--no-gpu]

- at most 8 files, none over 16 MiB, no folders (a GPU session brings back no more);
- summary.md has one row per step of the manifest: step 0 (libraries), nvidia-smi, every test and
  example, every compute-sanitizer run, every benchmark, the PyTorch baseline; each with a result
  (passed, failed, skipped, timed out) and seconds;
- benchmarks.json is valid JSON;
- the libraries the bundle ships load from its lib/ (machine.txt's loader trace), wherever it is;
- with --no-gpu: every GPU row is "skipped" and its note says "no GPU", the libraries row passed,
  and nothing failed.
Exits 1 and names each problem otherwise. tests/bundle/run_sh_test.py imports it.
"""

import argparse
import json
import pathlib
import sys

MAX_FILES = 8
MAX_BYTES = 16 * 1024 * 1024
RESULTS = {"passed", "failed", "skipped", "timed out"}


def read_manifest(path):
    """The manifest's rows as dicts (cmake/epx_bundle.cmake names the columns)."""
    columns = ["kind", "name", "binary", "timeout", "cost", "sanitize", "expect", "env", "args"]
    rows = []
    for line in pathlib.Path(path).read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) != len(columns):
            raise ValueError(f"{path}: {len(fields)} fields, expected {len(columns)}: {line!r}")
        row = dict(zip(columns, fields))
        for key in ("sanitize", "expect", "env", "args"):
            if row[key] == "-":
                row[key] = ""
        rows.append(row)
    return rows


def expected_checks(manifest):
    """(step, check name) of every row summary.md must have for this manifest."""
    expected = [(0, "libraries"), (1, "nvidia-smi")]
    for row in manifest:
        if row["kind"] in ("test", "example"):
            expected.append((1 if row["name"] == "cuda.smoke_test" else 2, row["name"]))
            for tool in filter(None, row["sanitize"].split(",")):
                expected.append((3, f"{tool} {row['name']}"))
        elif row["kind"] == "bench":
            expected.append((4, row["name"]))
    expected.append((5, "bench.torch_block"))
    return expected


def parse_summary(path):
    """summary.md's check rows: dicts with step, check, result, seconds, note."""
    rows = []
    for line in pathlib.Path(path).read_text().splitlines():
        if not line.startswith("| ") or line.startswith("| step |"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if len(cells) != 5 or not cells[0].isdigit():
            continue  # the header table
        rows.append({"step": int(cells[0]), "check": cells[1], "result": cells[2], "seconds": cells[3], "note": cells[4]})
    return rows


def check(out_dir, manifest_path, no_gpu=False):
    """Problems found in out_dir (an empty list when it is as it should be)."""
    out = pathlib.Path(out_dir)
    problems = []
    entries = sorted(out.iterdir())
    if len(entries) > MAX_FILES:
        problems.append(f"{len(entries)} entries in {out}, at most {MAX_FILES} come back from a GPU session: "
                        + ", ".join(e.name for e in entries))
    for e in entries:
        if not e.is_file():
            problems.append(f"{e} is not a plain file")
        elif e.stat().st_size > MAX_BYTES:
            problems.append(f"{e} is {e.stat().st_size} bytes, over the {MAX_BYTES} that come back")
    summary = out / "summary.md"
    if not summary.is_file():
        return problems + [f"{summary} is missing"]
    rows = parse_summary(summary)
    by_name = {}
    for row in rows:
        if row["result"] not in RESULTS:
            problems.append(f"summary.md: {row['check']}: result '{row['result']}', expected one of {sorted(RESULTS)}")
        if row["seconds"] != "-":
            try:
                float(row["seconds"])
            except ValueError:
                problems.append(f"summary.md: {row['check']}: seconds '{row['seconds']}' is not a number")
        by_name.setdefault(row["check"], []).append(row)
    for step, name in expected_checks(read_manifest(manifest_path)):
        found = by_name.get(name, [])
        if len(found) != 1:
            problems.append(f"summary.md: check '{name}' (step {step}) appears {len(found)} times, expected once")
        elif found[0]["step"] != step:
            problems.append(f"summary.md: check '{name}' is in step {found[0]['step']}, expected {step}")
    bench = out / "benchmarks.json"
    if bench.is_file():
        try:
            json.loads(bench.read_text())
        except json.JSONDecodeError as e:
            problems.append(f"benchmarks.json is not valid JSON: {e}")
    else:
        problems.append(f"{bench} is missing")
    # The libraries the bundle ships must load from its own lib/ (RUNPATH $ORIGIN/../lib), wherever it
    # was copied: machine.txt holds the dynamic loader's answer for every program.
    shipped = pathlib.Path(manifest_path).resolve().parent / "lib"
    machine = out / "machine.txt"
    if shipped.is_dir() and machine.is_file():
        for line in machine.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[1] == "=>" and (shipped / parts[0]).exists():
                if parts[2] == "not" or pathlib.Path(parts[2]).resolve() != (shipped / parts[0]).resolve():
                    problems.append(f"machine.txt: {parts[0]} resolves to {parts[2]}, not the bundle's {shipped / parts[0]}")
    if no_gpu:
        for row in rows:
            if row["step"] == 0:
                if row["result"] != "passed":
                    problems.append(f"summary.md: libraries: {row['result']} ({row['note']}), expected passed")
            elif row["result"] != "skipped" or not row["note"].startswith("no GPU"):
                problems.append(f"summary.md: {row['check']}: '{row['result']}: {row['note']}', expected 'skipped: no GPU ...'")
    return problems


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=pathlib.Path)
    parser.add_argument("--manifest", type=pathlib.Path, required=True)
    parser.add_argument("--no-gpu", action="store_true", help="the run was on a machine without a GPU")
    args = parser.parse_args()
    problems = check(args.out_dir, args.manifest, args.no_gpu)
    for p in problems:
        print(f"check_out: {p}", file=sys.stderr)
    if problems:
        sys.exit(1)
    print(f"check_out: {args.out_dir} is as expected ({len(parse_summary(args.out_dir / 'summary.md'))} checks)")


if __name__ == "__main__":
    main()
