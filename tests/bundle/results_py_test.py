#!/usr/bin/env python3
# SPDX-FileCopyrightText: 2026 The epx authors
# SPDX-License-Identifier: MIT
"""bench/tools/results.py on what the GPU check bundle brings back (a SYNTHETIC OUT_DIR written here,
not a measurement): names with Google Benchmark's suffixes, the bundle's benchmarks.json, the layer
against the PyTorch block of the same run, and `record --write` appending a RESULTS.md section and
keeping the JSON beside it.

    tests/bundle/results_py_test.py --source <epx checkout>
"""

import argparse
import json
import pathlib
import shutil
import subprocess
import sys
import tempfile
import unittest

SOURCE = pathlib.Path(__file__).resolve().parents[2]

SUMMARY = """# epx GPU check bundle: FAILED (cuda.grouped_gemm_test)

| | |
|---|---|
| started | 2026-12-05T09:00:00Z; command: run.sh OUT_DIR --budget 480 |
| GPU | NVIDIA H200, driver 580.159.04 |
| counts | 2 passed, 1 failed, 0 timed out, 0 skipped |
| result | FAILED (cuda.grouped_gemm_test) |

| step | check | result | seconds | note |
|---|---|---|---|---|
| 0 | libraries | passed | 0.2 | every program's libraries resolve |
| 2 | cuda.grouped_gemm_test | failed | 3.1 | exit 1; [doctest] test cases: 9 \\| 8 passed \\| 1 failed |
| 4 | bench.layer.qwen3-30b-a3b | passed | 20.0 | 2 cases |
"""


def gbench(rows, quick=True):
    context = {"date": "synthetic"}
    if quick:
        context["epx_repetitions"] = "5 calls per timing, median of 3 (EPX_BENCH_QUICK)"
    return {"context": context, "benchmarks": rows}


BENCHMARKS = {
    "epx_bundle": {"started": "2026-12-05T09:00:00Z", "budget_s": 480, "commit": "fedcba9876543210", "built": "2026-12-04T20:00:00Z",
                   "cuda_archs": "90a-real", "nvcc": "13.0.88", "gpu": "NVIDIA H200, driver 580.159.04", "machine": "synthetic",
                   "quick": True},
    "runs": [
        {"check": "bench.layer.qwen3-30b-a3b", "program": "layer_bench", "result": "passed", "seconds": 20.0, "complete": True,
         "output": gbench([
             {"name": "layer/qwen3-30b-a3b/T=4096/ep1/iterations:1/manual_time", "run_type": "iteration", "ms": 1.25,
              "glue_fraction": 0.1, "target_ms": 1.09, "vs_target": 0.872},
             {"name": "layer/qwen3-30b-a3b/T=4096/ep8_localgroup/iterations:1/manual_time", "run_type": "iteration", "ms": 1.5,
              "vs_ep1": 0.833},
             {"name": "layer/qwen3-30b-a3b/T=4096/ep1_mean", "run_type": "aggregate", "ms": 1.25},
         ])},
        {"check": "bench.gemm.qwen3-30b-a3b", "program": "gemm_bench", "result": "timed out", "seconds": 30.0, "complete": False,
         "output": gbench([
             {"name": "gemm1/qwen3-30b-a3b/T=128/uniform/iterations:1/manual_time", "run_type": "iteration", "us": 20.0,
              "tflops": 3.0, "error_occurred": True, "error_message": "launch failed | bad"},
         ])},
        {"check": "bench.routing.qwen3-30b-a3b", "program": "routing_bench", "result": "failed", "seconds": 1.0, "complete": False,
         "output": None},
        {"check": "bench.torch_block", "program": "torch_moe_block.py", "result": "passed", "seconds": 9.0, "complete": True,
         "output": gbench([{"name": "torch_block/qwen3-30b-a3b/T=4096", "run_type": "iteration", "ms": 2.5}], quick=False)},
    ],
}


class ResultsPyTest(unittest.TestCase):
    def setUp(self):
        self.tmp = pathlib.Path(tempfile.mkdtemp(prefix="epx-results-py-test."))
        self.out = self.tmp / "out"
        self.out.mkdir()
        (self.out / "summary.md").write_text(SUMMARY)
        (self.out / "benchmarks.json").write_text(json.dumps(BENCHMARKS, indent=1))

    def tearDown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def results(self, *args):
        proc = subprocess.run([sys.executable, SOURCE / "bench/tools/results.py", *map(str, args)], capture_output=True, text=True)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        return proc.stdout

    def test_record(self):
        text = self.results("record", self.out)
        for expected in (
                "## 2026-12-05: NVIDIA H200, commit fedcba987654",
                "- Commit: fedcba9876543210 (bundle built 2026-12-04T20:00:00Z, CUDA archs 90a-real, nvcc 13.0.88)",
                "timings: 5 calls per timing, median of 3 (EPX_BENCH_QUICK)",
                "- Checks: 2 passed, 1 failed, 0 timed out, 0 skipped; result: FAILED (cuda.grouped_gemm_test)",
                "| 2 | cuda.grouped_gemm_test | failed | 3.1 |",
                # the layer against the PyTorch block measured in the same run: 2.5 / 1.25
                "| layer | qwen3-30b-a3b/T=4096 | ep1 | 1.250 | 2.500 | 2.00 | 1.09 |",
                "| qwen3-30b-a3b/T=4096 | ep1 | 1.250 |",
                "| qwen3-30b-a3b/T=4096 | ep8_localgroup | 1.500 |",
                "launch failed \\| bad"):
            self.assertIn(expected, text)
        self.assertNotIn("ep1_mean", text)       # aggregate rows are left out
        self.assertNotIn("manual_time", text)    # Google Benchmark's suffixes are dropped
        self.assertNotIn("| 0 | libraries |", text)  # only the checks that did not pass are listed

    def test_record_write_appends_and_keeps_the_json(self):
        results_md = self.tmp / "RESULTS.md"
        results_md.write_text("# Results\n")
        self.results("record", self.out, "--write", "--results", results_md)
        text = results_md.read_text()
        self.assertTrue(text.startswith("# Results\n"))
        self.assertIn("## 2026-12-05: NVIDIA H200", text)
        kept = self.tmp / "results/2026-12-05-nvidia-h200.json"
        self.assertEqual(json.loads(kept.read_text()), BENCHMARKS)
        self.assertIn("JSON: `bench/results/2026-12-05-nvidia-h200.json`", text)

    def test_table_reads_out_dir_and_its_json(self):
        for source in (self.out, self.out / "benchmarks.json"):
            text = self.results("table", source)
            self.assertIn("### layer", text)
            self.assertIn("### torch_block", text)
            self.assertIn("| layer | qwen3-30b-a3b/T=4096 | ep1 | 1.250 | 2.500 | 2.00 |", text)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--source", type=pathlib.Path, default=SOURCE)
    args, rest = parser.parse_known_args()
    SOURCE = args.source.resolve()
    unittest.main(argv=[sys.argv[0], *rest], verbosity=2)
