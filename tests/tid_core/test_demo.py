"""`make demo`'s program, end to end on its quick budget: real trainer processes, a real table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tid_core.demo import _print_progress
from tid_core.models import load_student


def test_progress_eta_follows_the_attempt_each_step_belongs_to(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A resumed run (second `start` at step 384) gets its ETA from its own pace, not from
    the earlier attempt's steps or from when the printing process started."""
    step = {"type": "step", "total_steps": 1000, "losses": {"loss": 1.0}}
    events = [
        {"type": "start", "time": 0.0, "step": 0},
        {**step, "time": 100.0, "step": 100},  # 1 s a step: 900 s left
        {"type": "start", "time": 5000.0, "step": 384},
        {**step, "time": 5032.0, "step": 400},  # 2 s a step since the resume: 1200 s left
    ]
    events_file = tmp_path / "events.jsonl"
    events_file.write_text("".join(json.dumps(e) + "\n" for e in events))

    assert _print_progress("t", events_file, 0) == 4
    assert [line.split("eta ")[1] for line in capsys.readouterr().out.splitlines()] == [
        "900 s",
        "1200 s",
    ]
    assert _print_progress("t", events_file, 3) == 4  # only the new step is printed
    assert capsys.readouterr().out.count("step") == 1


@pytest.mark.slow
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
