"""`make demo`'s program, end to end on its quick budget: real trainer processes, a real table."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tid_core.models import load_student

pytestmark = pytest.mark.slow


def test_quick_demo_prints_map_table_and_exports_student(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tid_core.demo", "--quick", "--out", str(tmp_path)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    table = proc.stdout.split("COCO mAP on the synthetic val split")[1].splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in table if line[:1].isalpha()}
    assert {"teacher", "none", "fitnet", "tid"} <= rows.keys()
    for cells in (rows[name] for name in ("teacher", "none", "fitnet", "tid")):
        assert 0.0 <= float(cells[0]) <= 100.0  # AP column holds a number
    model, meta = load_student(tmp_path / "tid" / "student.safetensors")
    assert meta.class_names == ["circle", "square", "triangle", "star", "cross"]
    assert not model.training

    again = subprocess.run(
        [sys.executable, "-m", "tid_core.demo", "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode == 0
    assert again.stdout.count("reusing finished run") == 4
