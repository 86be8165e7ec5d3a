"""`--protocol capacity --stage diagnose`: why a method helps the student or not.

Every trial of the tuning grid is probed (bench/distill_probe.py) at its student's initial
weights, on the tuning setting's data and seed, from the setting's teacher: how hard its loss
pulls against the detection loss, whether it pulls the same way, and what it compares per FPN
level. Beside each trial: its recorded AP above the student alone and how far its distillation
terms fell from the first epoch to the last (records of the trials run so far; the probe itself
trains nothing but the teacher, when the setting has none recorded yet).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from pathlib import Path
from typing import Any

from bench.accuracy_jobs import METHODS, TUNING_SEED, prepare_data, student_jobs, tuning_data
from bench.capacity import (
    TUNING_SETTING,
    recorded_teacher,
    setting_runs,
    sized,
    tuning_trials,
)
from bench.distill_probe import probe


def distill_fall(record: dict[str, Any], terms: list[str]) -> float | None:
    """The distillation terms' sum in the last epoch over the first (from a run's record)."""
    per_epoch = record.get("per_epoch", {})
    sums = [
        sum(values)
        for values in zip(*(per_epoch[t] for t in terms if t in per_epoch), strict=True)
        if None not in values
    ]
    return sums[-1] / sums[0] if len(sums) > 1 and sums[0] else None


def diagnosis(args: argparse.Namespace) -> dict[str, Any]:
    """Each trial's probe figures, recorded AP above the student alone and distillation fall."""
    base = sized(args)
    data = prepare_data(args, base)
    held_out = tuning_data(args, base, data)
    runs = setting_runs(args, TUNING_SETTING, data)
    trials = tuning_trials(args.quick)
    blocks = {"none": METHODS["none"], **{name: block for name, (_, block) in trials.items()}}
    tuning = {**runs.dataset, "path": str(held_out)}
    jobs = student_jobs(args, blocks, runs.recipe, tuning, runs.teacher, [TUNING_SEED])
    teacher = recorded_teacher(runs.cache, runs.teacher_spec, runs.teacher_dir)
    inputs = {"teacher": teacher["weights_digest"]}
    records = {
        job.row: runs.cache.load(job.label, job.spec, inputs if "teacher" in job.spec else {})
        for job in jobs
    }
    alone = records["none"]
    alone_ap = None if alone is None else float(alone["metrics"]["AP"])
    out = {}
    for job in jobs[1:]:
        figures = probe(job.spec, Path(job.spec["dataset"]["path"]), device=args.device)
        record = records[job.row]
        ap = None if record is None or alone_ap is None else record["metrics"]["AP"] - alone_ap
        out[job.row] = {
            "method": trials[job.row][0],
            "distill": trials[job.row][1],
            **dataclasses.asdict(figures),
            "AP_above_alone": ap,
            "distill_fall": distill_fall(record, list(figures.terms)) if record else None,
        }
    return {
        "protocol": "capacity",
        "stage": "diagnose",
        "setting": TUNING_SETTING,
        "teacher_AP": teacher["metrics"]["AP"],
        "alone_AP": alone_ap,
        "trials": out,
    }


def _cell(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_diagnosis(figures: dict[str, Any]) -> None:
    print(
        f"\nDiagnosis, setting {figures['setting']} (tuning split and seed): teacher "
        f"{figures['teacher_AP']:.1f} AP, student alone {_cell(figures['alone_AP'], '.1f')} AP"
    )
    head = (
        f"{'trial':<38}{'ratio':>8}{'cos':>7}{'ΔAP':>7}{'fall':>6}"
        f"  {'adapted/teacher rms per level':<32}{'teacher const %':>16}"
    )
    print(head + "\n" + "-" * len(head))
    for name, trial in figures["trials"].items():
        levels = trial["levels"]
        scale = " ".join(f"{lv['adapted_rms'] / lv['teacher_rms']:.2f}" for lv in levels)
        const = statistics.mean(lv["teacher_near_constant"] for lv in levels)
        print(
            f"{name:<38}{trial['grad_ratio']:>8.2f}{trial['grad_cosine']:>7.2f}"
            f"{_cell(trial['AP_above_alone'], '+.1f'):>7}{_cell(trial['distill_fall'], '.2f'):>6}"
            f"  {scale:<32}{100 * const:>16.0f}"
        )
    print(
        "ratio: ‖∇ distill‖ / ‖∇ detection‖ at initialisation; cos: the cosine of the two; ΔAP: "
        "recorded AP above the student alone; fall: distillation terms, last epoch over first"
    )
