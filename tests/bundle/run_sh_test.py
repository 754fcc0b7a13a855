#!/usr/bin/env python3
# SPDX-FileCopyrightText: 2026 The epx authors
# SPDX-License-Identifier: MIT
"""The GPU check bundle's runner (scripts/gpu-bundle/run.sh), tested without a GPU and without building
the bundle: a fake bundle of stand-in programs (shell scripts, plus two small ELF programs for the
library search), and stand-ins for nvidia-smi, compute-sanitizer and python3 that make run.sh believe
it is on a GPU machine. What it checks: every result run.sh can report (passed, failed, timed out,
skipped for no GPU, a missing library, the budget), that a library is found in a Python wheel's
nvidia/*/lib, that the programs get EPX_REQUIRE_GPU=1 and the sanitizer runs EPX_TEST_SMALL=1, that a
benchmark stopped midway keeps its finished rows as valid JSON, the 8-file limit, the exit status, and
that bench/tools/results.py turns the output into RESULTS.md tables.

    tests/bundle/run_sh_test.py --source <epx checkout>
"""

import argparse
import json
import os
import pathlib
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
import unittest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import check_out  # noqa: E402

SOURCE = pathlib.Path(__file__).resolve().parents[2]

# One stand-in for every CUDA program: behaves as its file name says, like tests/cuda/cuda_main.cpp
# without a GPU (FAKE_GPU unset), and checks what run.sh must give it with one.
PROGRAM = r"""#!/usr/bin/env bash
name=${0##*/}
if [ -z "${FAKE_GPU:-}" ]; then
  case "${EPX_REQUIRE_GPU:-}" in ''|0) echo "EPX_SKIP: no CUDA device (fake)"; exit 77 ;;
    *) echo "EPX_SKIP: no CUDA device (fake); EPX_REQUIRE_GPU is set, so this is a failure"; exit 1 ;; esac
fi
[ "${EPX_REQUIRE_GPU:-}" = 1 ] || { echo "run.sh did not set EPX_REQUIRE_GPU=1"; exit 3; }
if [ -n "${FAKE_SANITIZER:-}" ] && [ "${EPX_TEST_SMALL:-}" != 1 ]; then echo "run.sh did not set EPX_TEST_SMALL=1"; exit 3; fi
if [ -n "${FAKE_SANITIZER:-}" ] && [ -z "${EPX_UNDER_SANITIZER:-}" ]; then echo "run.sh did not set EPX_UNDER_SANITIZER"; exit 3; fi
case "$name" in
  cuda_smoke_test) echo "epx CUDA tests on NVIDIA FAKE (sm_90)"; echo "[doctest] test cases: 1 | 1 passed | 0 failed" ;;
  cuda_pass_test) echo "[doctest] test cases: 4 | 4 passed | 0 failed" ;;
  cuda_fail_test) echo "FAILED_MARKER: CHECK( 1 == 2 ) is NOT correct"; echo "[doctest] test cases: 2 | 1 passed | 1 failed"; exit 1 ;;
  cuda_hang_test) echo "hanging"; sleep 60 ;;
  cuda_skip_test) echo "EPX_SKIP: something"; exit 77 ;;
  cuda_racy_test) echo "[doctest] test cases: 1 | 1 passed | 0 failed" ;;
  nccl_ep) [ -d "${EPX_NCCL_ID_DIR:-/nonexistent}" ] || { echo "EPX_NCCL_ID_DIR is not a directory"; exit 4; }
           [ -z "${NCCL_COMM_ID:-}" ] || { echo "NCCL_COMM_ID was not removed"; exit 4; }
           [ "$*" = "--tokens 96" ] || { echo "arguments '$*'"; exit 4; }; echo "nccl ok" ;;
  moe_layer) echo "epx demo: Host backend (CPU)" ;;
  *_bench)
    for a in "$@"; do case "$a" in --benchmark_out=*) json=${a#--benchmark_out=} ;; --benchmark_filter=*) filter=${a#--benchmark_filter=} ;; esac; done
    shape=${filter//\//}
    [ "${EPX_BENCH_QUICK:-}" = 1 ] || { echo "EPX_BENCH_QUICK is not set"; exit 5; }
    row() { printf '    {\n      "name": "%s/%s/T=128/uniform/iterations:1/manual_time",\n      "run_type": "iteration",\n      "us": %s%s\n    }' "$1" "$shape" "$2" "$3"; }
    { printf '{\n  "context": {\n    "date": "fake",\n    "epx_repetitions": "5 calls per timing, median of 3 (EPX_BENCH_QUICK)"\n  },\n  "benchmarks": [\n'
      row "${name%_bench}" 12.5 ',
      "hbm_ratio": 0.5'
    } >"$json"
    case "$shape" in
      hang) printf ',\n    {\n      "name": "half-written' >>"$json"; sleep 60 ;;
      error) printf ',\n' >>"$json"; row "${name%_bench}" 0 ',
      "error_occurred": true,
      "error_message": "the GEMM refused its arguments"' >>"$json" ;;
    esac
    printf '\n  ]\n}\n' >>"$json" ;;
  *) echo "stand-in program with no behaviour: $name"; exit 9 ;;
esac
"""

NVIDIA_SMI = r"""#!/usr/bin/env bash
case "$1" in
  -L) echo "GPU 0: NVIDIA FAKE H200 (UUID: GPU-00000000-fake)" ;;
  --query-gpu=*) echo "NVIDIA FAKE H200, 580.00.00, 9.0, 143771 MiB, 345 MHz, 1980 MHz, 3201 MHz, 3201 MHz, 700.00 W, 30, P0, Disabled" ;;
  -q) echo "==============NVSMI LOG=============="; echo "Product Name : NVIDIA FAKE H200" ;;
esac
"""

# compute-sanitizer --tool T --error-exitcode N --print-limit L program args...
SANITIZER = r"""#!/usr/bin/env bash
[ "$1" = --version ] && { echo "NVIDIA (R) Compute Sanitizer"; echo "Version 2099.1.0 (fake)"; exit 0; }
tool=""; code=1
while [ $# -gt 0 ]; do case "$1" in --tool) tool=$2; shift 2 ;; --error-exitcode) code=$2; shift 2 ;; --print-limit) shift 2 ;; *) break ;; esac; done
echo "========= COMPUTE-SANITIZER"
FAKE_SANITIZER=1 "$@"; rc=$?
if [ "$tool" = racecheck ] && [ "${1##*/}" = cuda_racy_test ]; then
  echo "========= Error: Race reported between Write access at fake_kernel+0x10"; echo "========= ERROR SUMMARY: 2 errors"; exit "$code"
fi
echo "========= ERROR SUMMARY: 0 errors"; exit $rc
"""

# python3: answers run.sh's site-packages query and its torch probe, and plays bench/torch_moe_block.py.
PYTHON = r"""#!/usr/bin/env bash
if [ "$1" = -c ]; then
  case "$2" in
    *getsitepackages*) echo "$FAKE_SITE" ;;
    *torch*) echo "python 3.12.3, torch 2.11.0+fake, CUDA 13.0, cuda available: True" ;;
  esac
  exit 0
fi
for a in "$@"; do [ "$prev" = --out ] && out=$a; prev=$a; done
[ -n "$out" ] || exit 6
printf '{"context": {"device": "NVIDIA FAKE H200"}, "benchmarks": [{"name": "torch_block/qwen3-30b-a3b/T=128", "run_type": "iteration", "ms": 0.7}]}\n' >"$out"
"""

# kind name binary timeout cost sanitize expect env args
MANIFEST = [
    ("test", "cuda.smoke_test", "cuda_smoke_test", 60, 1, "memcheck", "-", "-", "-"),
    ("test", "cuda.pass_test", "cuda_pass_test", 60, 1, "memcheck,synccheck", "-", "-", "-"),
    ("test", "cuda.fail_test", "cuda_fail_test", 60, 2, "memcheck", "-", "-", "-"),
    ("test", "cuda.hang_test", "cuda_hang_test", 2, 2, "-", "-", "-", "-"),
    ("test", "cuda.skip_test", "cuda_skip_test", 60, 2, "-", "-", "-", "-"),
    ("test", "cuda.racy_test", "cuda_racy_test", 60, 3, "racecheck", "-", "-", "-"),
    ("test", "cuda.wheel_lib_test", "cuda_wheel_lib_test", 60, 3, "-", "-", "-", "-"),
    ("test", "cuda.gone_lib_test", "cuda_gone_lib_test", 60, 3, "memcheck", "-", "-", "-"),
    ("example", "example.moe_layer", "moe_layer", 60, 3, "-", "Cuda backend", "-", "-"),
    ("example", "example.nccl_ep", "nccl_ep", 60, 3, "-", "-",
     "WORLD_SIZE=1 EPX_NCCL_ID_DIR=@TMP@ -NCCL_COMM_ID", "--tokens 96"),
    ("bench", "bench.routing.fine", "routing_bench", 20, 1, "-", "-", "EPX_BENCH_QUICK=1", "--benchmark_filter=/fine/"),
    ("bench", "bench.gemm.hang", "gemm_bench", 2, 1, "-", "-", "EPX_BENCH_QUICK=1", "--benchmark_filter=/hang/"),
    ("bench", "bench.layer.error", "layer_bench", 20, 1, "-", "-", "EPX_BENCH_QUICK=1", "--benchmark_filter=/error/"),
]

ELF = r"""
#include <stdio.h>
#include <stdlib.h>
int fake_library_call(void);
int main(void) {
  if (!getenv("FAKE_GPU")) { puts("EPX_SKIP: no CUDA device (fake ELF)"); return 77; }
  printf("[doctest] test cases: %d | %d passed | 0 failed\n", fake_library_call(), fake_library_call());
  return 0;
}
"""


def write(path, text, executable=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    if executable:
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def build_elf(root, name, lib):
    """An ELF program that needs lib<lib>.so.1, which needs lib<lib>dep.so.1 (as libcublas needs
    libcublasLt); returns (program, library, its dependency) or None without a C compiler."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    work = root / "elf" / name
    work.mkdir(parents=True)
    (work / "dep.c").write_text("int fake_dependency_call(void) { return 1; }\n")
    (work / "lib.c").write_text("int fake_dependency_call(void);\nint fake_library_call(void) { return fake_dependency_call(); }\n")
    (work / "main.c").write_text(ELF)
    dep = work / f"lib{lib}dep.so.1"
    subprocess.run([cc, "-shared", "-fPIC", f"-Wl,-soname,{dep.name}", "-o", dep, work / "dep.c"], check=True)
    (work / f"lib{lib}dep.so").symlink_to(dep.name)
    so = work / f"lib{lib}.so.1"
    subprocess.run([cc, "-shared", "-fPIC", f"-Wl,-soname,{so.name}", "-o", so, work / "lib.c", f"-L{work}", f"-l{lib}dep"],
                   check=True)
    (work / f"lib{lib}.so").symlink_to(so.name)
    program = work / name
    subprocess.run([cc, "-o", program, work / "main.c", f"-L{work}", f"-l{lib}", f"-Wl,-rpath-link,{work}"], check=True)
    return program, so, dep


class FakeMachine:
    """A fake bundle, fake tools on PATH, a fake Python site with nvidia/fake/lib."""

    def __init__(self, root, gpu):
        self.root = root
        self.bundle = root / "bundle"
        self.tools = root / "tools"
        self.site = root / "site"
        write(self.bundle / "run.sh", (SOURCE / "scripts/gpu-bundle/run.sh").read_text(), executable=True)
        write(self.bundle / "bundle-info.txt", "commit=0123456789abcdef+uncommitted\nbuilt=2026-12-04T00:00:00Z\n"
              "build_type=Release\ncuda_archs=90a-real\nnvcc=13.0.88\nrequires_glibc=2.34\nrequires_glibcxx=3.4.30\n")
        write(self.bundle / "bench/torch_moe_block.py", "# stand-in; the fake python3 plays it\n")
        lines = ["# kind\tname\tbinary\ttimeout\tcost\tsanitize\texpect\tenv\targs"]
        lines += ["\t".join(str(f) for f in row) for row in MANIFEST]
        self.manifest = self.bundle / "manifest.tsv"
        write(self.manifest, "\n".join(lines) + "\n")
        for row in MANIFEST:
            if not row[2].endswith("_lib_test"):
                write(self.bundle / "bin" / row[2], PROGRAM, executable=True)
        self.elf = True
        for name, lib, where in (("cuda_wheel_lib_test", "epxfakewheel", "wheel"), ("cuda_gone_lib_test", "epxfakegone", None)):
            built = build_elf(root, name, lib)
            if built is None:  # no C compiler: stand-ins that pass, and no library search is tested
                self.elf = False
                write(self.bundle / "bin" / name, PROGRAM.replace("cuda_pass_test)", f"cuda_pass_test|{name})"), executable=True)
                continue
            program, so, dep = built
            shutil.copy(program, self.bundle / "bin" / name)
            if where == "wheel":  # two wheels: the library in one, what it needs in another
                for wheel, lib in (("fake", so), ("fakedep", dep)):
                    (self.site / "nvidia" / wheel / "lib").mkdir(parents=True, exist_ok=True)
                    shutil.copy(lib, self.site / "nvidia" / wheel / "lib" / lib.name)
        write(self.tools / "python3", PYTHON, executable=True)
        write(self.tools / "compute-sanitizer", SANITIZER, executable=True)
        if gpu:
            write(self.tools / "nvidia-smi", NVIDIA_SMI, executable=True)
        self.gpu = gpu

    def run(self, out, *args, env=None):
        e = {k: v for k, v in os.environ.items() if k not in ("EPX_REQUIRE_GPU", "LD_LIBRARY_PATH", "CUDA_HOME",
                                                            "CUDA_PATH", "VIRTUAL_ENV", "EPX_PYTHON")}
        # Only the fake tools: the system's PATH minus any folder holding a real nvidia-smi or sanitizer.
        system_path = [p for p in os.environ.get("PATH", "").split(":")
                       if p and not (pathlib.Path(p, "nvidia-smi").exists() or pathlib.Path(p, "compute-sanitizer").exists())]
        e.update(PATH=":".join([str(self.tools)] + system_path), FAKE_SITE=str(self.site), HOME=str(self.root),
                 EPX_COMPUTE_SANITIZER=str(self.tools / "compute-sanitizer"))
        if self.gpu:
            e["FAKE_GPU"] = "1"
        e.update(env or {})
        start = time.monotonic()
        proc = subprocess.run([self.bundle / "run.sh", out, *args], env=e, capture_output=True, text=True, timeout=240)
        return proc, time.monotonic() - start


def rows_by_check(out):
    return {r["check"]: r for r in check_out.parse_summary(out / "summary.md")}


class RunShTest(unittest.TestCase):
    def setUp(self):
        self.tmp = pathlib.Path(tempfile.mkdtemp(prefix="epx-run-sh-test."))

    def tearDown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def assertOutOk(self, out, manifest, no_gpu=False):
        problems = check_out.check(out, manifest, no_gpu)
        self.assertEqual(problems, [], "\n".join(problems) + "\n" + (out / "summary.md").read_text())

    def test_no_gpu_skips_every_gpu_step_and_exits_0(self):
        m = FakeMachine(self.tmp, gpu=False)
        out = self.tmp / "out"
        proc, _ = m.run(out)
        summary = (out / "summary.md").read_text()
        self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr + summary)
        rows = rows_by_check(out)
        # The ELF that needs a vanished library: a missing library, named, with the checks it skips.
        if m.elf:
            self.assertEqual(rows["libraries"]["result"], "skipped", summary)
            self.assertIn("libepxfakegone.so.1", rows["libraries"]["note"])
            self.assertIn("cuda.gone_lib_test", rows["libraries"]["note"])
            self.assertNotIn("libepxfakewheel.so.1", rows["libraries"]["note"].split("skips:")[0].split("searched")[0])
            machine = (out / "machine.txt").read_text()
            self.assertIn(f"libepxfakewheel.so.1 => {m.site}/nvidia/fake/lib/libepxfakewheel.so.1", machine)
            self.assertIn(f"libepxfakewheeldep.so.1 => {m.site}/nvidia/fakedep/lib/libepxfakewheeldep.so.1", machine)
            (m.bundle / "bin/cuda_gone_lib_test").unlink()  # the rest of this test wants a clean step 0
            m.manifest.write_text("".join(l for l in m.manifest.read_text().splitlines(True) if "gone_lib" not in l))
            proc, _ = m.run(out)
            self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
        self.assertOutOk(out, m.manifest, no_gpu=True)
        self.assertIn("no GPU: every GPU check skipped", (out / "summary.md").read_text())
        self.assertIn("EPX_SKIP: no CUDA device (fake)", rows_by_check(out)["cuda.smoke_test"]["note"])

    def test_no_gpu_with_epx_require_gpu_fails(self):
        m = FakeMachine(self.tmp, gpu=False)
        out = self.tmp / "out"
        proc, _ = m.run(out, env={"EPX_REQUIRE_GPU": "1"})
        self.assertNotEqual(proc.returncode, 0, proc.stdout)
        rows = rows_by_check(out)
        self.assertEqual(rows["cuda.smoke_test"]["result"], "failed")
        self.assertIn("EPX_REQUIRE_GPU=1", rows["cuda.smoke_test"]["note"])

    def test_gpu_run_reports_each_result(self):
        m = FakeMachine(self.tmp, gpu=True)
        out = self.tmp / "out"
        (out).mkdir()
        (out / "summary.md").write_text("left over from an earlier run\n")
        proc, seconds = m.run(out, "--budget", "120")
        summary = (out / "summary.md").read_text()
        self.assertEqual(proc.returncode, 1, proc.stdout + proc.stderr + summary)
        self.assertOutOk(out, m.manifest)
        rows = rows_by_check(out)

        def result(name, expected, note=""):
            self.assertIn(name, rows, summary)
            self.assertEqual(rows[name]["result"], expected, f"{name}: {rows[name]}\n{summary}")
            self.assertIn(note, rows[name]["note"], f"{name}: {rows[name]}")

        result("nvidia-smi", "passed", "NVIDIA FAKE H200, driver 580.00.00")
        result("cuda.smoke_test", "passed", "NVIDIA FAKE")
        result("cuda.pass_test", "passed", "4 passed")
        result("cuda.fail_test", "failed", "exit 1")
        result("cuda.hang_test", "timed out", "stopped after 2 s")
        result("cuda.skip_test", "failed", "a skip is a failure")
        result("example.moe_layer", "failed", "lacks /Cuda backend/")
        result("example.nccl_ep", "passed")
        result("memcheck cuda.pass_test", "passed", "0 errors")
        result("synccheck cuda.pass_test", "passed")
        result("memcheck cuda.fail_test", "failed", "the program failed under memcheck")
        result("racecheck cuda.racy_test", "failed", "racecheck found 2 errors")
        result("bench.routing.fine", "passed", "1 cases")
        result("bench.gemm.hang", "timed out", "1 cases kept")
        result("bench.layer.error", "failed", "the GEMM refused its arguments")
        result("bench.torch_block", "passed", "1 cases")
        if m.elf:
            result("cuda.wheel_lib_test", "passed", "1 passed")  # its library came from the fake wheel
            result("cuda.gone_lib_test", "skipped", "libepxfakegone.so.1 not found")
            result("memcheck cuda.gone_lib_test", "skipped", "libepxfakegone.so.1 not found")
        # The full output of what failed; nothing of what passed.
        failures = (out / "failures.log").read_text()
        self.assertIn("FAILED_MARKER: CHECK( 1 == 2 ) is NOT correct", failures)
        self.assertIn("cuda.hang_test: timed out", failures)
        self.assertIn("Race reported between Write access", failures)
        self.assertNotIn("cuda.pass_test", failures)
        self.assertIn("FAILED (", summary.splitlines()[0])
        # The benchmarks, the half-written one closed after its last whole row.
        data = json.loads((out / "benchmarks.json").read_text())
        self.assertEqual(data["epx_bundle"]["commit"], "0123456789abcdef+uncommitted")
        runs = {r["check"]: r for r in data["runs"]}
        self.assertEqual(set(runs), {"bench.routing.fine", "bench.gemm.hang", "bench.layer.error", "bench.torch_block"})
        self.assertFalse(runs["bench.gemm.hang"]["complete"])
        self.assertEqual(len(runs["bench.gemm.hang"]["output"]["benchmarks"]), 1)
        self.assertEqual(runs["bench.torch_block"]["output"]["benchmarks"][0]["ms"], 0.7)
        # bench/tools/results.py records the run.
        record = subprocess.run([sys.executable, SOURCE / "bench/tools/results.py", "record", out],
                                capture_output=True, text=True)
        self.assertEqual(record.returncode, 0, record.stderr)
        for expected in ("NVIDIA FAKE H200", "0123456789abcdef+uncommitted", "### gemm", "| hang/T=128 | uniform | 12.5 |",
                         "| error/T=128 | uniform | 0.0 |", "the GEMM refused its arguments", "| 4 | bench.gemm.hang | timed out |",
                         "cuda.fail_test", "5 calls per timing, median of 3 (EPX_BENCH_QUICK)"):
            self.assertIn(expected, record.stdout)
        self.assertNotIn("iterations:1", record.stdout)
        self.assertNotIn("| 2 | cuda.pass_test |", record.stdout)  # only what did not pass is listed

    def test_budget_stops_starting_checks(self):
        m = FakeMachine(self.tmp, gpu=True)
        manifest = m.manifest.read_text().splitlines(True)
        # Every test now hangs until its 30 s timeout: a 20 s budget must skip some instead of running
        # past its end.
        m.manifest.write_text("".join(l.replace("\t60\t", "\t30\t") for l in manifest))
        for name in ("cuda_pass_test", "cuda_fail_test", "cuda_skip_test", "cuda_racy_test", "moe_layer", "nccl_ep"):
            write(m.bundle / "bin" / name, "#!/usr/bin/env bash\nsleep 60\n", executable=True)
        out = self.tmp / "out"
        proc, seconds = m.run(out, "--budget", "20")
        summary = (out / "summary.md").read_text()
        self.assertOutOk(out, m.manifest)
        self.assertLess(seconds, 20 + 12, summary)  # the last timeout's kill grace is 10 s
        self.assertIn("budget:", summary)

    def test_bad_usage(self):
        m = FakeMachine(self.tmp, gpu=False)
        for args in ([], ["--budget", "x", str(self.tmp / "o")], [str(self.tmp / "o"), "--frobnicate"]):
            proc = subprocess.run([m.bundle / "run.sh", *args], capture_output=True, text=True)
            self.assertEqual(proc.returncode, 2, f"{args}: {proc.stderr}")
            self.assertIn("run.sh", proc.stderr)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--source", type=pathlib.Path, default=SOURCE)
    args, rest = parser.parse_known_args()
    SOURCE = args.source.resolve()
    unittest.main(argv=[sys.argv[0], *rest], verbosity=2)
