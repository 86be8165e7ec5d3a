"""Every benchmark still runs: `bench/X.py --quick --json FILE` as a process exits 0, prints its
table and writes the figures it promises. Values are not checked (nothing asserts speed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
# One intra-op thread for the scripts themselves (tests/conftest.py says why). bench/ddp.py
# sets its trainers' thread counts; passive OpenMP waiting keeps its 2-thread run from
# stalling on shared cores (docs/BENCHMARKS.md), since no figure is checked here.
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "OMP_WAIT_POLICY": "PASSIVE",
    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
}
SUMMARY = ("AP", "AP50", "AP75", "APs", "APm", "APl")
ENDPOINTS = ("post_jobs", "post_bare", "get_jobs", "get_bare")
RUNS = ("nproc1", "nproc2", "nproc1_1thread")

CASES = {
    "overhead": (
        "teacher fwd",
        {"fitnet_ratio", "pkd_ratio", "tid_ratio", "tid_ratio_range"}
        | {"student_ms", "teacher_fwd_ms", "tid_ms", "student_ops", "teacher_fwd_ops", "tid_ops"},
    ),
    "coco_eval": (
        "max abs diff",
        {"faster_coco_eval_s", "pycocotools_s", "speedup", "max_abs_diff", "images", *SUMMARY},
    ),
    "api": (
        "GET /v1/jobs/{id}",
        {f"{e}_{k}" for e in ENDPOINTS for k in ("rps", "p50_ms", "p99_ms", "cpu_ms")}
        | {"post_rps_ratio", "get_rps_ratio", "submit_to_running_s", "submit_to_running_server_s"},
    ),
    "ddp": (
        "images/s",
        {f"{r}_{k}" for r in RUNS for k in ("step_s", "images_per_s", "data_frac", "threads")}
        | {"speedup", "efficiency", "speedup_vs_1thread"},
    ),
}


@pytest.mark.parametrize("script", CASES)
def test_bench_script_quick_run_prints_table_and_json(script: str, tmp_path: Path) -> None:
    header, keys = CASES[script]
    out = tmp_path / f"{script}.json"
    done = subprocess.run(
        [sys.executable, f"bench/{script}.py", "--quick", "--json", str(out)],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert header in done.stdout
    figures = json.loads(out.read_text())
    assert keys <= figures.keys(), keys - figures.keys()
    assert "config" in figures
