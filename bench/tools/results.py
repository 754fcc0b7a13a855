#!/usr/bin/env python3
# SPDX-FileCopyrightText: 2026 The epx authors
# SPDX-License-Identifier: MIT
"""Turns what epx's benchmarks wrote into the tables of bench/RESULTS.md and the plots of
docs/benchmarks.md.

    bench/tools/results.py record OUT_DIR                        # a RESULTS.md section on stdout
    bench/tools/results.py record OUT_DIR --write --plots docs/img  # ... appended to bench/RESULTS.md,
                                                                 # the JSON kept in bench/results/, plots
    bench/tools/results.py table bench/results/gemm-h100.json    # markdown tables on stdout
    bench/tools/results.py plot  bench/results/*.json --out docs/img  # one PNG per family and ratio

OUT_DIR is what the GPU check bundle's run.sh wrote (docs/gpu-bundle.md): summary.md and
benchmarks.json, which holds every benchmark process's Google Benchmark JSON and the PyTorch baseline.
`table` and `plot` take such a folder, its benchmarks.json, or plain Google Benchmark JSON files.
Benchmark names are family/shape/T=<tokens>[/<variant>] (see bench/*.cu); Google Benchmark's own
suffixes (iterations:1, manual_time) are dropped. `table` and `record` need only the standard library;
plots need matplotlib (apt-get install python3-matplotlib).
"""

import argparse
import json
import pathlib
import re
import shutil
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]

# The counters worth a column or a plot, in order, with how to print them.
COUNTERS = {
    "us": "{:.1f}",
    "ms": "{:.3f}",
    "plan_us": "{:.1f}",
    "tflops": "{:.0f}",
    "dense_tflops": "{:.0f}",
    "tc_ratio": "{:.2f}",
    "hbm_ratio": "{:.2f}",
    "speedup": "{:.2f}",
    "vs_cublas_grouped": "{:.2f}",
    "vs_cublas_loop": "{:.2f}",
    "route_ms": "{:.3f}",
    "plan_permute_ms": "{:.3f}",
    "experts_ms": "{:.3f}",
    "unpermute_ms": "{:.3f}",
    "dispatch_ms": "{:.3f}",
    "target_ms": "{:.2f}",
    "ep8_target_ms": "{:.2f}",
    "vs_target": "{:.2f}",
    "vs_ep1": "{:.2f}",
    "glue_fraction": "{:.2f}",
    "max_over_mean": "{:.1f}",
    "fwd_ms": "{:.3f}",
    "bwd_ms": "{:.3f}",
    "bwd_over_fwd": "{:.2f}",
    "saved_mb": "{:.0f}",
    "vs_recompute": "{:.2f}",
    "vs_epx_grouped": "{:.2f}",
    "tile": "{:.0f}",
    "rows_per_expert": "{:.0f}",
    "epx_us": "{:.1f}",
    "pingpong_us": "{:.1f}",
    "cooperative_us": "{:.1f}",
    "label": "{}",  # Google Benchmark's label: layer rows say their expert kernel ("kernel=epx") or why skipped
}
RATIOS = ["tc_ratio", "hbm_ratio", "speedup", "vs_cublas_grouped", "vs_cublas_loop", "vs_target", "vs_torch",
          "vs_epx_grouped", "vs_recompute"]
# Google Benchmark appends these to a benchmark's name; they are not part of epx's naming.
GBENCH_SUFFIX = re.compile(r"^(iterations|repeats|threads|min_time|min_warmup_time):|^(manual_time|real_time|process_time)$")


def documents(path):
    """(Google Benchmark document, run info or None) for a JSON file, a bundle's benchmarks.json, or an
    OUT_DIR holding one."""
    path = pathlib.Path(path)
    if path.is_dir():
        path = path / "benchmarks.json"
    data = json.loads(path.read_text())
    if "runs" in data:  # the bundle's benchmarks.json: one document per benchmark process
        return [(run["output"], run) for run in data["runs"] if run.get("output")]
    return [(data, None)]


def split_name(name):
    """family, case (shape/T=...), variant (routing or mode) of a benchmark name."""
    parts = [p for p in name.split("/") if not GBENCH_SUFFIX.search(p)]
    return parts[0], "/".join(parts[1:3]), "/".join(parts[3:])


def load(paths, required=True):
    """Every benchmark row of the given files: (family, case, variant, counters, context)."""
    rows = []
    for path in paths:
        for doc, _ in documents(path):
            context = doc.get("context", {})
            for bench in doc.get("benchmarks", []):
                if bench.get("run_type", "iteration") != "iteration":
                    continue
                family, case, variant = split_name(bench["name"])
                counters = {k: v for k, v in bench.items() if k in COUNTERS and (k != "label" or v)}
                if bench.get("error_occurred"):
                    counters["error"] = bench.get("error_message", "error")
                rows.append((family, case, variant, counters, context))
    if required and not rows:
        sys.exit(f"results.py: no benchmark rows in {', '.join(map(str, paths))}")
    return rows


def table(rows):
    lines = []
    for family in dict.fromkeys(r[0] for r in rows):
        mine = [r for r in rows if r[0] == family]
        columns = [c for c in COUNTERS if any(c in r[3] for r in mine)]
        errors = any("error" in r[3] for r in mine)
        lines.append(f"### {family}\n")
        lines.append("| case | variant | " + " | ".join(columns + (["error"] if errors else [])) + " |")
        lines.append("|---|---|" + "---|" * (len(columns) + errors))
        for _, case, variant, counters, _ in mine:
            cells = [COUNTERS[c].format(counters[c]).replace("|", "\\|") if c in counters else "" for c in columns]
            if errors:
                cells.append(str(counters.get("error", "")).replace("|", "\\|"))
            lines.append(f"| {case} | {variant} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def torch_comparison(rows):
    """The whole layer at ep = 1 (layer_bench and layer_bench_cutlass rows) against the PyTorch block of
    the same run, forward (ep1 rows against torch_block) and backward (ep1_backward rows against
    torch_block_backward): (markdown, plot rows)."""
    baselines = {"ep1": "torch_block", "ep1_backward": "torch_block_backward"}
    torch = {(r[0], r[1]): r[3]["ms"] for r in rows if r[0] in baselines.values() and "ms" in r[3]}
    lines, plot_rows = [], []
    for family, case, variant, counters, context in rows:
        if family not in ("layer", "layer_cutlass") or variant not in baselines or "ms" not in counters:
            continue
        base = torch.get((baselines[variant], case))
        if base is None:
            continue
        ratio = base / counters["ms"]
        target = counters.get("target_ms") if variant == "ep1" else None
        lines.append(f"| {family} | {case} | {variant} | {counters['ms']:.3f} | {base:.3f} | {ratio:.2f} | "
                     + (f"{target:.2f}" if target is not None else "") + " |")
        plot_rows.append((f"{family}_vs_torch", case, variant, {"vs_torch": ratio}, context))
    if not lines:
        return "", plot_rows
    head = ["### layer ep1 against the PyTorch block of the same run\n",
            "| program | case | pass | epx ms | PyTorch ms | PyTorch / epx | target ms (PERFORMANCE.md, H100) |",
            "|---|---|---|---|---|---|---|"]
    return "\n".join(head + lines) + "\n", plot_rows


def plot(rows, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for family in dict.fromkeys(r[0] for r in rows):
        mine = [r for r in rows if r[0] == family]
        cases = list(dict.fromkeys(r[1] for r in mine))
        variants = list(dict.fromkeys(r[2] for r in mine))
        for ratio in RATIOS:
            if not any(ratio in r[3] for r in mine):
                continue
            fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(cases) * len(variants)), 4))
            width = 0.8 / len(variants)
            for i, variant in enumerate(variants):
                values = []
                for case in cases:
                    hit = [r[3].get(ratio) for r in mine if r[1] == case and r[2] == variant]
                    values.append(hit[0] if hit and hit[0] is not None else 0.0)
                xs = [j + i * width for j in range(len(cases))]
                ax.bar(xs, values, width, label=variant or family)
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
            ax.set_xticklabels(cases, rotation=45, ha="right", fontsize=8)
            ax.set_ylabel(ratio)
            ax.set_title(f"{family}: {ratio}")
            if len(variants) > 1:
                ax.legend(fontsize=8)
            fig.tight_layout()
            path = out / f"{family.replace('+', '_')}-{ratio}.png"
            fig.savefig(path, dpi=120)
            plt.close(fig)
            written.append(path)
    return written


def summary_rows(out_dir):
    """summary.md's header (dict) and check rows (step, check, result, seconds, note)."""
    header, checks = {}, []
    path = pathlib.Path(out_dir) / "summary.md"
    if not path.is_file():
        return header, checks
    for line in path.read_text().splitlines():
        if not line.startswith("| ") or line.startswith(("| step |", "| |")):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if len(cells) == 2:
            header[cells[0]] = cells[1]
        elif len(cells) == 5 and cells[0].isdigit():
            checks.append(tuple(cells))
    return header, checks


def bundle_info(out_dir):
    path = pathlib.Path(out_dir) / "benchmarks.json"
    if path.is_file():
        return json.loads(path.read_text()).get("epx_bundle", {})
    return {}


def record(out_dir):
    """A bench/RESULTS.md section for one run of the bundle: (markdown, rows, info)."""
    info = bundle_info(out_dir)
    header, checks = summary_rows(out_dir)
    rows = load([out_dir], required=False) if (pathlib.Path(out_dir) / "benchmarks.json").is_file() else []
    started = info.get("started") or header.get("started", "?").split(";")[0]
    gpu = info.get("gpu") or header.get("GPU", "unknown GPU")
    commit = info.get("commit", "unknown commit")
    repetitions = sorted({r[4].get("epx_repetitions") for r in rows if r[4].get("epx_repetitions")})
    lines = [f"## {started[:10]}: {gpu.split(',')[0]}, commit {commit[:12]}\n",
             f"- Date: {started} (UTC, run start)",
             f"- GPU: {gpu}",
             f"- Machine: {info.get('machine') or header.get('machine', '?')}",
             f"- Commit: {commit} (bundle built {info.get('built', '?')}, CUDA archs {info.get('cuda_archs', '?')}, "
             f"nvcc {info.get('nvcc', '?')})",
             f"- Command: `build/gpu-bundle/run.sh OUT_DIR --budget {info.get('budget_s', '?')}`"
             + (f"; timings: {'; '.join(repetitions)}" if repetitions else ""),
             f"- Checks: {header.get('counts', '?')}; result: {header.get('result', '?')}",
             ""]
    problems = [c for c in checks if c[2] != "passed"]
    if problems:
        lines += ["| step | check | result | seconds | note |", "|---|---|---|---|---|"]
        lines += ["| " + " | ".join(c) + " |" for c in problems]
        lines.append("")
    comparison, extra = torch_comparison(rows)
    if comparison:
        lines.append(comparison)
    lines.append(table(rows) if rows else "No benchmark rows in this run.\n")
    return "\n".join(lines), rows + extra, info


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["table", "plot", "record"])
    parser.add_argument("inputs", nargs="+", type=pathlib.Path, help="JSON files, or (record) one OUT_DIR")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("docs/img"), help="plot: where the PNGs go")
    parser.add_argument("--write", action="store_true",
                        help="record: append the section to --results and keep the JSON in results/ beside it")
    parser.add_argument("--results", type=pathlib.Path, default=REPO / "bench/RESULTS.md")
    parser.add_argument("--plots", type=pathlib.Path, help="record: also write the plots into this folder")
    args = parser.parse_args()
    if args.mode == "table":
        rows = load(args.inputs)
        text, _ = torch_comparison(rows)
        print(text + table(rows))
    elif args.mode == "plot":
        for path in plot(load(args.inputs), args.out):
            print(path)
    else:
        if len(args.inputs) != 1 or not args.inputs[0].is_dir():
            sys.exit("results.py: record takes one OUT_DIR (the folder run.sh wrote)")
        out_dir = args.inputs[0]
        text, rows, info = record(out_dir)
        print(text)
        if args.write:
            stamp = (info.get("started") or "undated")[:10]
            gpu = re.sub(r"[^a-z0-9]+", "-", (info.get("gpu") or "gpu").split(",")[0].lower()).strip("-")
            kept = args.results.parent / "results" / f"{stamp}-{gpu}.json"  # bench/results/ beside RESULTS.md
            if kept.exists():  # a second run on one day keeps its own file: name it by its start time too
                clock = re.sub(r"[^0-9]", "", (info.get("started") or "")[11:19]) or "later"
                kept = kept.with_name(f"{stamp}-{clock}-{gpu}.json")
            if kept.exists():
                sys.exit(f"results.py: {kept} exists already; this run seems recorded")
            kept.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(out_dir / "benchmarks.json", kept)
            with open(args.results, "a") as f:
                f.write("\n" + text + f"\nJSON: `bench/results/{kept.name}`.\n")
            print(f"results.py: appended to {args.results}; JSON kept as {kept}", file=sys.stderr)
        if args.plots and rows:
            try:
                for path in plot(rows, args.plots):
                    print(f"results.py: plot {path}", file=sys.stderr)
            except ImportError:
                print("results.py: no plots: matplotlib is missing (apt-get install python3-matplotlib)", file=sys.stderr)


if __name__ == "__main__":
    main()
