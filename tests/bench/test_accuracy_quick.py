"""`bench/accuracy.py --quick` runs end to end and prints its table (numbers are not checked:
at this size they mean nothing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torchvision.models import resnet18

from bench.accuracy_jobs import METHODS, job_spec
from bench.capacity import ALONE_AT_TEACHER_BUDGET, TUNED, tuning_trials, weights_digest
from tid_core import recipes

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def run_quick(
    tmp_path: Path, *args: str, header: str = "COCO mAP on the val split"
) -> tuple[str, dict[str, Any]]:
    """What `bench/accuracy.py --quick ARGS` prints from its table's `header` on (with
    --out under `tmp_path`), and its --json figures."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / "figures.json"
    cmd = [sys.executable, "bench/accuracy.py", "--quick", "--jobs", "2", *args]
    proc = subprocess.run(
        [*cmd, "--json", str(out), "--out", str(tmp_path / "work")],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout[proc.stdout.index(header) :]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return table, json.loads(out.read_text())


def row_names(table: str, count: int) -> list[str]:
    return [line.split()[0] for line in table.splitlines()[4 : 4 + count]]


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_is_a_valid_distill_block(name: str) -> None:
    teacher = {"backbone": "resnet18", "weights": {"path": "teacher.safetensors"}}
    spec = job_spec(
        "check",
        {},
        {"path": "data"},
        recipe=recipes.QUICK,
        epochs=3,
        seed=1,
        device="cpu",
        distill=METHODS[name],
        teacher=teacher if name != "none" else None,
    )  # validates
    assert spec["distill"] == METHODS[name]


# the script treats every distilled method alike (its gradient probe, its row): two losses
# exercise that path; each method's block is checked above, each loss in tests/tid_core
QUICK_METHODS = ["none", "pkd", "tid"]


def test_accuracy_quick_prints_its_methods_and_writes_json(tmp_path: Path) -> None:
    imagenet = tmp_path / "resnet18.pth"  # stands in for torchvision's ImageNet file
    torch.save(resnet18().state_dict(), imagenet)
    backbones = ["--teacher-weights-backbone", str(imagenet)]
    backbones += ["--student-weights-backbone", str(imagenet)]
    weight = ["--loss-weight", "0.3"]
    table, figures = run_quick(tmp_path, "--methods", ",".join(QUICK_METHODS), *weight, *backbones)
    # every run (the teacher, each student) started from that backbone; every distilled one
    # at the given loss weight
    specs = [json.loads(f.read_text()) for f in (tmp_path / "work").rglob("spec.json")]
    assert len(specs) == 1 + len(QUICK_METHODS)
    for spec in specs:
        assert spec["student"]["weights_backbone"] == {"path": str(imagenet)}
    weights = sorted(s["distill"].get("loss_weight", 0.0) for s in specs if "teacher" in s)
    assert weights == [0.3] * (len(QUICK_METHODS) - 1)
    methods = ["teacher", *QUICK_METHODS]
    assert row_names(table, len(methods)) == methods
    assert set(figures["methods"]) == set(methods)
    for name in methods[2:]:
        row = figures["methods"][name]
        assert {"AP", "AP_std", "AP50", "loss_weight", "grad_ratio", "gap_closed"} <= set(row)
        assert row["grad_ratio"] > 0 and row["loss_weight"] == 0.3

    # --tune with --methods: those methods (and `none`) on the held-out split, tuning seed
    table, figures = run_quick(tmp_path, "--tune", "--methods", "tid-key0.6", *backbones)
    assert "tuning grid" in table
    assert row_names(table, 2) == ["none", "tid-key0.6"]
    assert figures["tuning_seed"] == 0 and set(figures["methods"]) == {"none", "tid-key0.6"}


def test_capacity_protocol_quick_runs_across_sessions_from_its_records(tmp_path: Path) -> None:
    records = tmp_path / "records"
    protocol = ["--protocol", "capacity", "--settings", "main", "--cache", str(records)]
    protocol += ["--seeds", "1"]  # one reporting seed: the statistics have their unit tests
    header = "Capacity-gap protocol"
    # a first session tunes: the teacher, the student alone (at its budget and, the capacity
    # check, at the teacher's) and one trial per method (quick)
    table, figures = run_quick(tmp_path / "tune", *protocol, "--stage", "tune", header=header)
    assert figures["settings"] == {} and set(figures["tuning"]["locked"]) == set(TUNED)
    assert table.count("locked") == len(TUNED)
    assert len(list(records.rglob("*.json"))) == 3 + len(TUNED)

    # the diagnosis, from that session's teacher and records: every trial probed beside its AP
    table, figures = run_quick(
        tmp_path / "tune", *protocol, "--stage", "diagnose", header="Diagnosis"
    )
    assert set(figures["trials"]) == set(tuning_trials(quick=True))
    for trial in figures["trials"].values():
        assert trial["grad_ratio"] > 0 and trial["AP_above_alone"] is not None
        assert len(trial["levels"]) == 5 and trial["terms"]
    assert all(name in table for name in figures["trials"])
    assert len(list(records.rglob("*.json"))) == 3 + len(TUNED)  # nothing trained

    # a second session, with an empty --out, reports: the locked trials come from the records,
    # and its students distil from the teacher's weights kept beside them (not trained again)
    (kept,) = records.rglob("teacher-*.safetensors")
    table, figures = run_quick(tmp_path / "report", *protocol, "--stage", "report", header=header)
    assert not list((tmp_path / "report" / "work").glob("teacher-*"))
    assert figures["settings"]["main"]["teacher"]["weights_digest"] == weights_digest(kept)
    rows = figures["settings"]["main"]["rows"]
    names = ["none", ALONE_AT_TEACHER_BUDGET, *TUNED]
    assert set(rows) == set(names)
    assert all(len(row["AP_per_seed"]) == 1 for row in rows.values())
    listed = [
        line.split()[0] for line in table.splitlines() if line.split()[:1] in [[n] for n in names]
    ]
    assert listed == names
    assert {"vs_alone", "vs_best_baseline", "gap_closed", "gap_closed_teacher_budget"} <= set(
        rows["tid"]
    )
    files = list(records.rglob("*.json"))
    assert len(files) == 3 + len(TUNED) + len(names)
    assert max(f.stat().st_size for f in files) < 10_000  # small enough to commit

    # a third session prints everything from the records: nothing is trained
    again, figures = run_quick(tmp_path / "all", *protocol, header=header)
    assert figures["settings"]["main"]["rows"] == rows
    assert again.count("locked") == len(TUNED) and ALONE_AT_TEACHER_BUDGET in again
    assert not list((tmp_path / "all" / "work").glob("teacher-*"))
