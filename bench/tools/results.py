#!/usr/bin/env python3
# SPDX-FileCopyrightText: 2026 The epx authors
# SPDX-License-Identifier: MIT
"""Turns the Google Benchmark JSON of epx's benchmarks into the tables of bench/RESULTS.md and the
plots of docs/benchmarks.md.

    bench/tools/results.py table bench/results/gemm-h100.json          # markdown table on stdout
    bench/tools/results.py plot  bench/results/*.json --out docs/img    # one PNG per family and ratio

Benchmark names are family/shape/T=<tokens>[/<routing>] (see bench/*.cu). `table` needs only the
standard library; `plot` needs matplotlib (apt-get install python3-matplotlib).
"""

import argparse
import json
import pathlib
import sys

# The counters worth a column or a plot, in order, with how to print them.
COUNTERS = {
    "us": "{:.1f}",
    "ms": "{:.3f}",
    "tflops": "{:.0f}",
    "tc_ratio": "{:.2f}",
    "hbm_ratio": "{:.2f}",
    "speedup": "{:.2f}",
    "vs_cublas_grouped": "{:.2f}",
    "vs_cublas_loop": "{:.2f}",
    "vs_target": "{:.2f}",
    "glue_fraction": "{:.2f}",
    "max_over_mean": "{:.1f}",
}
RATIOS = ["tc_ratio", "hbm_ratio", "speedup", "vs_cublas_grouped", "vs_cublas_loop", "vs_target"]


def load(paths):
    """Every benchmark row of the given JSON files: (family, case, routing, counters, context)."""
    rows = []
    for path in paths:
        data = json.loads(pathlib.Path(path).read_text())
        context = data.get("context", {})
        for bench in data.get("benchmarks", []):
            if bench.get("run_type", "iteration") != "iteration":
                continue
            parts = bench["name"].split("/")
            family = parts[0]
            routing = parts[3] if len(parts) > 3 else ""
            case = "/".join(parts[1:3])
            counters = {k: v for k, v in bench.items() if k in COUNTERS}
            rows.append((family, case, routing, counters, context))
    if not rows:
        sys.exit(f"results.py: no benchmark rows in {', '.join(map(str, paths))}")
    return rows


def table(rows):
    lines = []
    for family in dict.fromkeys(r[0] for r in rows):
        mine = [r for r in rows if r[0] == family]
        columns = [c for c in COUNTERS if any(c in r[3] for r in mine)]
        lines.append(f"### {family}\n")
        lines.append("| case | routing | " + " | ".join(columns) + " |")
        lines.append("|---|---|" + "---|" * len(columns))
        for _, case, routing, counters, _ in mine:
            cells = [COUNTERS[c].format(counters[c]) if c in counters else "" for c in columns]
            lines.append(f"| {case} | {routing} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(rows, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for family in dict.fromkeys(r[0] for r in rows):
        mine = [r for r in rows if r[0] == family]
        cases = list(dict.fromkeys(r[1] for r in mine))
        routings = list(dict.fromkeys(r[2] for r in mine))
        for ratio in RATIOS:
            if not any(ratio in r[3] for r in mine):
                continue
            fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(cases) * len(routings)), 4))
            width = 0.8 / len(routings)
            for i, routing in enumerate(routings):
                values = []
                for case in cases:
                    hit = [r[3].get(ratio) for r in mine if r[1] == case and r[2] == routing]
                    values.append(hit[0] if hit and hit[0] is not None else 0.0)
                xs = [j + i * width for j in range(len(cases))]
                ax.bar(xs, values, width, label=routing or family)
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
            ax.set_xticklabels(cases, rotation=45, ha="right", fontsize=8)
            ax.set_ylabel(ratio)
            ax.set_title(f"{family}: {ratio}")
            if len(routings) > 1:
                ax.legend(fontsize=8)
            fig.tight_layout()
            path = out / f"{family.replace('+', '_')}-{ratio}.png"
            fig.savefig(path, dpi=120)
            plt.close(fig)
            written.append(path)
    return written


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["table", "plot"])
    parser.add_argument("json", nargs="+", type=pathlib.Path)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("docs/img"))
    args = parser.parse_args()
    rows = load(args.json)
    if args.mode == "table":
        print(table(rows))
    else:
        for path in plot(rows, args.out):
            print(path)


if __name__ == "__main__":
    main()
