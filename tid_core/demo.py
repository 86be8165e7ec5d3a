"""`python -m tid_core.demo`: a local end-to-end distillation, no service needed.

Synthetic dataset -> teacher (plain training) -> students trained alone and with FitNet and TID
from that teacher (same budget and seed) -> a COCO mAP table. Each job is a real
`python -m tid_core.train` process with its own run dir; a finished job is reused when the
demo runs again with the same spec.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tid_core import recipes
from tid_core.checkpoint import sha256_file
from tid_core.data.synthetic import generate_shapes
from tid_core.events import read_events


def job_specs(
    data: Path, teacher_weights: Path, recipe: recipes.Recipe
) -> dict[str, dict[str, Any]]:
    """The demo's jobs, by name: the teacher first, then one student per method."""
    dataset = {"path": str(data), "input_size": recipe.image_size}
    weights = {"path": str(teacher_weights)}
    students = {m: recipe.student_spec(dataset, m, weights) for m in ("none", "fitnet", "tid")}
    return {"teacher": recipe.teacher_spec(dataset), **students}


def run_job(
    name: str,
    spec: dict[str, Any],
    run_dir: Path,
    *,
    inputs: dict[str, str],
    threads: int | None = None,
) -> dict[str, Any]:
    """Train one job (or reuse its finished run) while printing its progress.

    A run is reused only for the same spec and the same input files (`inputs`: name -> sha256,
    e.g. the teacher's weights); any other run in `run_dir` is removed so the trainer does not
    try to resume a different job. `threads` overrides the inherited OMP_NUM_THREADS.
    """
    key = json.dumps({"spec": spec, "inputs": inputs}, indent=2, sort_keys=True)
    key_file = run_dir / "demo-key.json"
    if run_dir.exists() and (not key_file.exists() or key_file.read_text() != key):
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics_file = run_dir / "metrics.json"
    if metrics_file.exists():
        print(f"{name:>8}: reusing finished run {run_dir}", flush=True)
        return {"metrics": json.loads(metrics_file.read_text()), "seconds": None}
    key_file.write_text(key)
    spec_file = run_dir / "spec.json"
    spec_file.write_text(json.dumps(spec, indent=2))
    cmd = [
        sys.executable,
        "-m",
        "tid_core.train",
        "--spec",
        str(spec_file),
        "--run-dir",
        str(run_dir),
    ]
    log_file = run_dir / "train.log"
    started = time.monotonic()
    with log_file.open("w") as log:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        seen = 0
        while proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1.0)  # ends as the trainer does: no second lost per job
            seen = _print_progress(name, run_dir / "events.jsonl", seen)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed (exit {proc.returncode}); see {log_file}")
    seconds = time.monotonic() - started
    print(f"{name:>8}: done in {seconds:.0f} s", flush=True)
    return {"metrics": json.loads(metrics_file.read_text()), "seconds": seconds}


def _print_progress(name: str, events_file: Path, seen: int) -> int:
    """Print the events after the first `seen`; returns how many there are now.

    The ETA is the pace of the attempt a step belongs to (since its `start` event), so a
    resumed run neither counts the steps of an earlier attempt as its own nor the time since
    this process started as theirs.
    """
    events = read_events(events_file)
    start: dict[str, Any] | None = None
    for index, event in enumerate(events):
        if event["type"] == "start":
            start = event
        if index < seen:
            continue
        if event["type"] == "step":
            done, total = event["step"], event["total_steps"]
            eta = "?"
            if start is not None and done > start["step"]:
                pace = (event["time"] - start["time"]) / (done - start["step"])
                eta = f"{pace * (total - done):.0f} s"
            print(
                f"{name:>8}: step {done:>5}/{total}  loss {event['losses']['loss']:.3f}  eta {eta}",
                flush=True,
            )
        elif event["type"] == "eval":
            print(f"{name:>8}: epoch {event['epoch']} AP {event['metrics']['AP']:.1f}", flush=True)
    return len(events)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=Path("var/demo"), help="work folder")
    parser.add_argument("--quick", action="store_true", help="tiny budget (a smoke test)")
    args = parser.parse_args(argv)
    recipe = recipes.recipe(quick=args.quick)
    data = args.out / f"data-{recipe.num_train}"
    generate_shapes(
        data,
        num_train=recipe.num_train,
        num_val=recipe.num_val,
        image_size=recipe.image_size,
        seed=0,
    )
    teacher_weights = args.out / "teacher" / "student.safetensors"
    specs = job_specs(data, teacher_weights, recipe)
    results: dict[str, dict[str, Any]] = {}
    for name, spec in specs.items():
        inputs = {"teacher": sha256_file(teacher_weights)} if "teacher" in spec else {}
        results[name] = run_job(name, spec, args.out / name, inputs=inputs)
    print("\nCOCO mAP on the synthetic val split (percent):\n")
    rows = {name: {**r["metrics"], "time s": r["seconds"]} for name, r in results.items()}
    print(recipes.format_table(rows, extra="time s"))
    print(f"\nStudent weights: {args.out}/tid/student.safetensors (tid_core.models.load_student)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
