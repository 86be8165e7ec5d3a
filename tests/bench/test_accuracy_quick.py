"""`bench/accuracy.py --quick` runs end to end and prints its table (numbers are not checked:
at this size they mean nothing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def test_accuracy_quick_prints_every_method_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    cmd = [sys.executable, "bench/accuracy.py", "--quick", "--jobs", "2"]
    proc = subprocess.run(
        [*cmd, "--json", str(out), "--out", str(tmp_path / "work")],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    methods = ["teacher", "none", "fitnet", "pkd", "tid", "tid-cls", "tid-reg", "tid-noweak"]
    methods += ["tid-point", "tid-cls-point"]
    table = proc.stdout[proc.stdout.index("COCO mAP on the val split") :]
    assert [line.split()[0] for line in table.splitlines()[4 : 4 + len(methods)]] == methods
    figures = json.loads(out.read_text())
    assert set(figures["methods"]) == set(methods)
    for name in methods[2:]:
        row = figures["methods"][name]
        assert {"AP", "AP_std", "AP50", "loss_weight", "grad_ratio", "gap_closed"} <= set(row)
        assert row["grad_ratio"] > 0
