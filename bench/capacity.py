"""The capacity-gap protocol of issue #22, run by `bench/accuracy.py --protocol capacity` (its
docstring has the commands); its design and budget: docs/BENCHMARKS.md, "Capacity-gap protocol:
design and budget".

It has sizes of its own: synthetic `scenes`, 2,000 training images of 128 px, the 1,000
validation images for the tables and 1,000 others (dataset seed 7) for the tuning; a
ResNet34-FPN256 teacher per setting, 16 epochs, evaluated after each (it must have plateaued: its
last epoch, at the final learning rate, gains at most 1 AP); students 3 epochs. Settings
(teacher -> student, optimizer of every run): `main` FCOS -> MobileNetV3-FPN128, SGD;
`r18-adamw` FCOS -> ResNet18-FPN128, AdamW; `retinanet` RetinaNet -> MobileNetV3-FPN128, SGD.
Every method (fitnet, pkd, pkd-gt, tid, tid-point, tid-key2.25-weak0.9) gets the same 4
trials (3 loss weights, and its own knob's other value) on the tuning split and seed of
`main`; its best trial is locked for every setting; each setting's table has the student
alone at its budget and at the teacher's, and every locked method, over seeds 1-5: AP per
seed, mean ± std, the paired difference to the student alone and to the best baseline
(bootstrap 95% interval) and the share of the gap closed against either lone student.
The stages run apart, across
sessions: each run leaves a small JSON record in docs/results/capacity/runs/ (keyed by its spec
and its teacher's weights) that a later session reuses; a teacher is trained once per setting
and its weights kept beside its record at half precision, what every student distils from.

Budget (docs/BENCHMARKS.md has the measured CPU seconds per image and the sums): `main`'s
locked table ~8.6 h of 2 cores beside its teacher's ~1.8 h, the tuning ~5.1 h; runs die with
a session, records do not, so a table is filled over several sessions. `--quick` runs every
stage at 8 images of 64 px, one trial per method.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import platform
import statistics
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes

from bench.accuracy_jobs import (
    METHODS,
    PLATEAU_EPOCHS,
    TUNING_SEED,
    Job,
    cell,
    cores,
    margin_problem,
    model_block,
    prepare_data,
    refuse,
    student_jobs,
    submit,
    summarise,
    teacher_job,
    tuning_data,
)
from tid_core import recipes
from tid_core.checkpoint import write_atomic
from tid_core.demo import run_job
from tid_core.events import read_events
from tid_core.models import read_weights
from tid_core.spec import DistillSpec, JobSpec


class Setting(NamedTuple):
    """A teacher -> student pair (ARCH:BACKBONE:FPN) and the optimizer of every run in it."""

    teacher: str
    student: str
    optimizer: recipes.Optimizer


SETTINGS = {
    "main": Setting("fcos:resnet34:256", "fcos:mobilenet_v3_large:128", "sgd"),
    "r18-adamw": Setting("fcos:resnet34:256", "fcos:resnet18:128", "adamw"),
    "retinanet": Setting("retinanet:resnet34:256", "retinanet:mobilenet_v3_large:128", "sgd"),
}


class Grid(NamedTuple):
    """A method's tuning trials: each loss weight at the knob's first value, then the knob's
    other values at the second loss weight; the method's defaults first (λ 0.5 and the knob's
    spec default)."""

    knob: str
    values: tuple[int | float, ...]
    loss_weights: tuple[float, ...] = (0.5, 8.0, 32.0)

    def trials(self) -> list[tuple[float, int | float]]:
        lead, *rest = self.values
        return [(w, lead) for w in self.loss_weights] + [(self.loss_weights[1], v) for v in rest]


# Every method gets 4 trials, its defaults among them, so the tuning table also says whether a
# default holds: three loss weights, and its knob's other value at the second one. With the
# first teacher (BENCHMARKS, "progress") every method's best trial sat at its grid's stronger
# edge: the standardised losses at λ 8 of (0.5, 8), FitNet at 0.5 of (1/32, 0.5), whose
# raw-feature loss starts far stronger (METHOD.md, deviation 7); so each grid reaches past it.
RAMP = (100, 500)  # distill_warmup_iters: the default, and over two of the students' 3 epochs
TUNED = {
    "fitnet": Grid("distill_warmup_iters", RAMP, (0.5, 2.0, 8.0)),
    "pkd": Grid("distill_warmup_iters", RAMP),
    "pkd-gt": Grid("gamma", (0.5, 1.0)),
    "tid": Grid("gamma", (0.5, 1.0)),
    "tid-point": Grid("gamma", (0.5, 1.0)),
    "tid-key2.25-weak0.9": Grid("gamma", (0.5, 1.0)),
}
KNOB_LABELS = {"distill_warmup_iters": "ramp", "gamma": "g"}
DEFAULTS = DistillSpec()
BASELINES = ("fitnet", "pkd", "pkd-gt")
ALONE_AT_TEACHER_BUDGET = "none-teacher-budget"
# the grid runs on this setting only; its locked choices are every setting's: whether they
# hold elsewhere is part of what the other settings measure (and it keeps to the budget)
TUNING_SETTING = "main"
PLATEAU_TOL_AP = 1.0  # a teacher whose last epoch (at the final rate) gained more still learns
BOOTSTRAP_RESAMPLES = 10_000
CAPACITY = recipes.Recipe(
    num_train=2000,
    num_val=1000,
    image_size=128,
    teacher=model_block(SETTINGS["main"].teacher),
    student=model_block(SETTINGS["main"].student),
    teacher_epochs=16,
    student_epochs=3,
    warmup_iters=100,
    optimizer="sgd",
    dataset="scenes",
)
# every path of the protocol at the smallest sizes (every FPN 64 wide, one step an epoch, one
# trial per method)
CAPACITY_QUICK = dataclasses.replace(
    CAPACITY,
    num_train=8,
    num_val=4,
    image_size=64,
    teacher_epochs=2,
    student_epochs=1,
    warmup_iters=1,
)
# a GPU's sizes (`--sizes gpu`, bench/device_check.sh): the same protocol at twice the input
# size, where an H100 trains the teacher in minutes
CAPACITY_GPU = dataclasses.replace(CAPACITY, image_size=256)


def sized(args: argparse.Namespace) -> recipes.Recipe:
    """The protocol's sizes for this run: quick, a GPU's, or the CPU tables'."""
    return base_recipe(quick=args.quick, gpu=args.sizes == "gpu")


def base_recipe(*, quick: bool, gpu: bool = False) -> recipes.Recipe:
    return CAPACITY_QUICK if quick else CAPACITY_GPU if gpu else CAPACITY


def setting_recipe(setting: Setting, *, quick: bool, gpu: bool = False) -> recipes.Recipe:
    base = base_recipe(quick=quick, gpu=gpu)
    fpn = {"fpn_channels": 64} if quick else {}
    return dataclasses.replace(
        base,
        teacher={**model_block(setting.teacher), **fpn},
        student={**model_block(setting.student), **fpn},
        optimizer=setting.optimizer,
    )


def paired_difference(
    a: Sequence[float], b: Sequence[float], *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> dict[str, float]:
    """Mean of a - b over paired seeds, and its 95% bootstrap interval (percentile; the seeds
    resampled with replacement by a fixed generator, so a table reproduces exactly). With five
    seeds the interval is narrower than it should be: read it as a rough one."""
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    picks = np.random.default_rng(seed).integers(0, len(diff), size=(resamples, len(diff)))
    low, high = np.percentile(diff[picks].mean(axis=1), [2.5, 97.5])
    return {"mean": float(diff.mean()), "low": float(low), "high": float(high)}


def gap_closed(ap: float, alone: float, teacher: float) -> float | None:
    """The share of the teacher - alone gap that `ap` closes; None where there is no gap."""
    return (ap - alone) / (teacher - alone) if teacher > alone else None


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.machine()


def weights_digest(path: Path) -> str:
    """sha256 over a weight file's tensors by name: the file's own hash changes from one write
    of the same tensors to the next (safetensors writes its metadata in no fixed order)."""
    state, _ = read_weights(path)
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].contiguous().numpy().tobytes())
    return digest.hexdigest()


def epoch_means(steps: Sequence[dict[str, Any]]) -> dict[str, list[float | None]]:
    """Each loss term and statistic of the logged steps (`step` events), averaged per epoch in
    epoch order (None for an epoch that never logged it): a run's trajectory in a few numbers."""
    by_epoch: dict[int, list[dict[str, float]]] = {}
    for step in steps:
        by_epoch.setdefault(step["epoch"], []).append({**step["losses"], **step["stats"]})
    names = sorted({name for rows in by_epoch.values() for row in rows for name in row})
    means: dict[str, list[float | None]] = {}
    for name in names:
        values = [[row[name] for row in by_epoch[e] if name in row] for e in sorted(by_epoch)]
        means[name] = [statistics.mean(v) if v else None for v in values]
    return means


class RunCache:
    """Finished runs as small JSON records in a committed folder, so that a later session, whose
    --out starts empty, reuses them. A record is keyed by its job's spec hash with the data
    folder by its name (which says everything it was generated from) and the teacher by its
    weights' digest: the same job distilled from the same weights, wherever the files lie."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def file(self, name: str, spec: dict[str, Any], inputs: dict[str, str]) -> Path:
        canonical = {**spec, "name": "run"}
        canonical["dataset"] = {**spec["dataset"], "path": Path(spec["dataset"]["path"]).name}
        if "teacher" in spec:
            weights = {"path": f"tensors-sha256:{inputs['teacher']}"}
            canonical["teacher"] = {**spec["teacher"], "weights": weights}
        key = JobSpec.model_validate(canonical).spec_hash()[:16]
        return self.folder / f"{name}-{key}.json"

    def load(
        self, name: str, spec: dict[str, Any], inputs: dict[str, str]
    ) -> dict[str, Any] | None:
        """The job's record, if it has one."""
        file = self.file(name, spec, inputs)
        return json.loads(file.read_text()) if file.exists() else None

    def has(self, jobs: Sequence[Job], teacher_digest: str) -> bool:
        inputs = {"teacher": teacher_digest}
        return all(self.file(j.label, j.spec, inputs).exists() for j in jobs)

    def run(
        self,
        name: str,
        spec: dict[str, Any],
        run_dir: Path,
        *,
        inputs: dict[str, str],
        threads: int | None = None,
    ) -> dict[str, Any]:
        """The job's record, or `run_job` and a new record."""
        recorded = self.load(name, spec, inputs)
        if recorded is not None:
            print(f"{name:>8}: recorded in {self.folder}", flush=True)
            return recorded
        record = self.record(run_job(name, spec, run_dir, inputs=inputs, threads=threads), run_dir)
        self.put(self.file(name, spec, inputs), record)
        return record

    def kept(self, spec: dict[str, Any]) -> Path:
        """Where the teacher of `spec` keeps its weights, beside its record."""
        return self.file("teacher", spec, {}).with_suffix(".safetensors")

    @staticmethod
    def record(
        result: dict[str, Any], run_dir: Path, weights: Path | None = None
    ) -> dict[str, Any]:
        """What a finished run leaves in the cache: its metrics, the AP after each evaluated
        epoch, what the diagnosis reads (each loss term and logged statistic averaged per epoch,
        the initial gradient ratio), the digest of its weights (`weights`, else the run's
        student) and where it ran (training is bitwise reproducible on one machine, not
        across CPUs)."""
        events = read_events(run_dir / "events.jsonl")
        curve = {e["epoch"]: e["metrics"]["AP"] for e in events if e["type"] == "eval"}
        ratios = [e["ratio"] for e in events if e["type"] == "grad_ratio"]
        return {
            **result,
            "curve": [curve[epoch] for epoch in sorted(curve)],
            "per_epoch": epoch_means([e for e in events if e["type"] == "step"]),
            "grad_ratio": ratios[0] if ratios else None,
            "weights_digest": weights_digest(weights or run_dir / "student.safetensors"),
            "machine": {"cpu": cpu_name(), "torch": torch.__version__},
        }

    def put(self, file: Path, record: dict[str, Any]) -> None:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(file.name + ".tmp")
        tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        tmp.replace(file)


def keep_half(trained: Path, kept: Path) -> None:
    """A half-precision copy of a teacher's weights, its metadata kept: ~58 MB for the
    ResNet34-FPN256 teacher, small enough to commit (the trained file is twice that); a weight
    of magnitude 6e-5 or more moves by at most a relative 2^-11, a smaller one by at most 3e-8.
    Every student distils from this copy (the model loads it back into single precision),
    whichever session trained the teacher."""
    state, meta = read_weights(trained)
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    overflowed = [k for k, v in half.items() if v.is_floating_point() and not v.isfinite().all()]
    if overflowed:  # beyond half precision's 65504
        raise SystemExit(f"refused: {trained} has weights half precision cannot hold: {overflowed}")
    encoded = safetensors_bytes(half, metadata=meta.to_strings() if meta else None)
    write_atomic(kept, lambda f: f.write(encoded))


def recorded_teacher(cache: RunCache, spec: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """The teacher's record, its weights kept beside it (`keep_half`). It is trained (or
    reused from --out) only where it has no record; a record whose kept weights are missing
    or other is refused, since its recorded runs were distilled from those weights."""
    file, kept = cache.file("teacher", spec, {}), cache.kept(spec)
    if file.exists():
        record: dict[str, Any] = json.loads(file.read_text())
        if not kept.exists() or weights_digest(kept) != record["weights_digest"]:
            raise SystemExit(
                f"refused: {kept}, the weights the teacher recorded in {file} taught its runs "
                "with, is missing or other: restore it from git, or move "
                f"{cache.folder} away to start the setting over"
            )
        return record
    result = run_job("teacher", spec, run_dir, inputs={}, threads=cores())
    keep_half(run_dir / "student.safetensors", kept)
    record = cache.record(result, run_dir, kept)
    cache.put(file, record)
    return record


def results(
    pool: ThreadPoolExecutor, cache: RunCache, jobs: list[Job], teacher: dict[str, Any]
) -> dict[str, list[dict[str, Any]]]:
    """Every job's result by row: recorded, or run on `pool` from the recorded teacher."""
    futures = submit(pool, jobs, {"teacher": teacher["weights_digest"]}, cache.run)
    return {row: [f.result() for f in runs] for row, runs in futures.items()}


def check_margin(args: argparse.Namespace, name: str, teacher_ap: float, alone: float) -> None:
    problem = margin_problem(teacher_ap, alone)
    if problem is not None:
        refuse(args, f"{name}: {problem}")


def alone_at_teacher_budget(
    args: argparse.Namespace, runs: SettingRuns, dataset: dict[str, Any], seeds: Sequence[int]
) -> list[Job]:
    """The student alone for the teacher's epochs, its last at the final rate as the teacher's."""
    return student_jobs(
        args,
        {ALONE_AT_TEACHER_BUDGET: METHODS["none"]},
        runs.recipe,
        dataset,
        runs.teacher,
        seeds,
        epochs=runs.recipe.teacher_epochs,
        final_epochs=PLATEAU_EPOCHS,
    )


def check_capacity(
    pool: ThreadPoolExecutor,
    args: argparse.Namespace,
    runs: SettingRuns,
    record: dict[str, Any],
    teacher_ap: float,
    longer: list[Job],
) -> None:
    """Refuse before any other run is spent unless the teacher beats the student alone at the
    teacher's own budget (`longer`): else the teacher is under-trained for its size, and a
    table would measure training length, not capacity."""
    found = results(pool, runs.cache, longer, record)[ALONE_AT_TEACHER_BUDGET]
    alone = statistics.mean(float(r["metrics"]["AP"]) for r in found)
    check_margin(
        args, f"{runs.name} (the student alone at the teacher's budget)", teacher_ap, alone
    )


def tuning_trials(quick: bool) -> dict[str, tuple[str, dict[str, Any]]]:
    """Every trial of the tuning grid by name: its method and distill block, in rounds of one
    trial per method, every method's defaults first (so that an interrupted tuning has compared
    the defaults before anything else; quick: the defaults only)."""
    trials = {}
    grids = [grid.trials() for grid in TUNED.values()]
    for trial in list(zip(*grids, strict=True))[: 1 if quick else None]:
        for (method, grid), (weight, value) in zip(TUNED.items(), trial, strict=True):
            name = f"{method}-lw{weight:g}-{KNOB_LABELS[grid.knob]}{value:g}"
            block = {**METHODS[method], "loss_weight": weight, grid.knob: value}
            trials[name] = (method, block)
    return trials


def tuning_table(
    results: dict[str, list[dict[str, Any]]], trials: dict[str, tuple[str, dict[str, Any]]]
) -> dict[str, Any]:
    """Each trial's AP, the best trial of each method (locked for the report) and, for each
    method at its defaults, the AP above the student alone."""
    alone = float(results["none"][0]["metrics"]["AP"])
    ap = {name: float(results[name][0]["metrics"]["AP"]) for name in trials}
    locked = {m: max((t for t in trials if trials[t][0] == m), key=ap.__getitem__) for m in TUNED}
    defaults = {}
    for name, (method, block) in trials.items():
        knob = TUNED[method].knob
        if block["loss_weight"] == DEFAULTS.loss_weight and block[knob] == getattr(DEFAULTS, knob):
            defaults[method] = ap[name] - alone
    return {"none_AP": alone, "trials": ap, "locked": locked, "defaults_vs_alone": defaults}


def report_table(
    results: dict[str, list[dict[str, Any]]], teacher_ap: float, blocks: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Per row: AP per seed, mean ± std (and the other metrics), the paired difference to the
    student alone and to the best baseline with its bootstrap interval, and the share of the
    teacher's gap closed against either lone student."""
    ap = {row: [float(r["metrics"]["AP"]) for r in runs] for row, runs in results.items()}
    rows = {row: {**summarise(runs), "AP_per_seed": ap[row]} for row, runs in results.items()}
    best = max(BASELINES, key=lambda m: rows[m]["AP"])
    for name, row in rows.items():
        row["distill"] = blocks.get(name, METHODS["none"])
        row["vs_alone"] = paired_difference(ap[name], ap["none"]) if name != "none" else None
        row["vs_best_baseline"] = (
            paired_difference(ap[name], ap[best]) if name in TUNED and name != best else None
        )
        row["gap_closed"] = gap_closed(row["AP"], rows["none"]["AP"], teacher_ap)
        alone_long = rows[ALONE_AT_TEACHER_BUDGET]["AP"]
        row["gap_closed_teacher_budget"] = gap_closed(row["AP"], alone_long, teacher_ap)
    return {"best_baseline": best, "rows": rows}


class SettingRuns(NamedTuple):
    """What every stage needs of a setting: its recipe, its run records, the reporting dataset,
    and its teacher's job, run folder and block (as the students' spec names it)."""

    name: str
    recipe: recipes.Recipe
    cache: RunCache
    dataset: dict[str, Any]
    teacher_spec: dict[str, Any]
    teacher_dir: Path
    teacher: dict[str, Any]


def setting_runs(args: argparse.Namespace, name: str, data: Path) -> SettingRuns:
    recipe = setting_recipe(SETTINGS[name], quick=args.quick, gpu=args.sizes == "gpu")
    dataset = {"path": str(data), "input_size": recipe.image_size}
    spec, run_dir = teacher_job(args, recipe, dataset, plateau=True)
    cache = RunCache(args.cache / name)
    teacher = {**recipe.teacher, "weights": {"path": str(cache.kept(spec))}}
    return SettingRuns(name, recipe, cache, dataset, spec, run_dir, teacher)


def setting_teacher(
    args: argparse.Namespace, runs: SettingRuns
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The teacher's record (`recorded_teacher`) and its figures; refused unless its AP has
    plateaued."""
    record = recorded_teacher(runs.cache, runs.teacher_spec, runs.teacher_dir)
    curve = record["curve"]
    gain = curve[-1] - curve[-2] if len(curve) > 1 else math.inf
    if gain > PLATEAU_TOL_AP:
        refuse(
            args,
            f"{runs.name}: the teacher has not plateaued (its last epoch gained {gain:.1f} AP, "
            f"over the tolerance {PLATEAU_TOL_AP}): train it longer (teacher_epochs)",
        )
    figures = {
        "AP": float(record["metrics"]["AP"]),
        "curve": curve,
        "last_epoch_gain": gain,
        "plateaued": gain <= PLATEAU_TOL_AP,
        "weights_digest": record["weights_digest"],
        "machine": record["machine"],
    }
    return record, figures


def capacity_tuning(
    pool: ThreadPoolExecutor, args: argparse.Namespace, data: Path, held_out: Path
) -> dict[str, Any]:
    """Every method's trials on the tuning setting's held-out split and seed (stage report:
    from the records only, which must all be there)."""
    runs = setting_runs(args, TUNING_SETTING, data)
    trials = tuning_trials(args.quick)
    methods = {"none": METHODS["none"], **{t: block for t, (_, block) in trials.items()}}
    tuning = {**runs.dataset, "path": str(held_out)}
    jobs = student_jobs(args, methods, runs.recipe, tuning, runs.teacher, [TUNING_SEED])
    if args.stage == "report":
        file = runs.cache.file("teacher", runs.teacher_spec, {})
        digest = json.loads(file.read_text())["weights_digest"] if file.exists() else ""
        if not runs.cache.has(jobs, digest):
            raise SystemExit(f"no complete tuning in {runs.cache.folder}: run --stage tune")
    longer = alone_at_teacher_budget(args, runs, tuning, [TUNING_SEED])
    record, teacher = setting_teacher(args, runs)
    check_capacity(pool, args, runs, record, teacher["AP"], longer)
    table = tuning_table(results(pool, runs.cache, jobs, record), trials)
    # the tuning split's lone student: a check before any reporting run is spent
    check_margin(args, runs.name, teacher["AP"], table["none_AP"])
    return {"setting": TUNING_SETTING, "teacher": teacher, **table}


def capacity_report(
    pool: ThreadPoolExecutor,
    args: argparse.Namespace,
    name: str,
    data: Path,
    blocks: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """A setting's table: the student alone at its budget and at the teacher's, and every
    method at its locked setting (`blocks`), on the reporting split and seeds."""
    runs = setting_runs(args, name, data)
    # the longest runs first, so that no core waits for them at the end
    longer = alone_at_teacher_budget(args, runs, runs.dataset, args.seeds)
    rows = {"none": METHODS["none"], **blocks}
    jobs = longer + student_jobs(args, rows, runs.recipe, runs.dataset, runs.teacher, args.seeds)
    record, teacher = setting_teacher(args, runs)
    check_capacity(pool, args, runs, record, teacher["AP"], longer)
    report = report_table(results(pool, runs.cache, jobs, record), teacher["AP"], blocks)
    check_margin(args, name, teacher["AP"], report["rows"]["none"]["AP"])
    return {"setting": SETTINGS[name]._asdict(), "teacher": teacher, **report}


def capacity(args: argparse.Namespace) -> dict[str, Any]:
    """The capacity-gap protocol's stage: the tuning grid, and (report, all) each setting's
    table from the methods locked by it."""
    base = sized(args)
    data = prepare_data(args, base)
    held_out = tuning_data(args, base, data)
    started = time.monotonic()
    settings = {}
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        tuning = capacity_tuning(pool, args, data, held_out)
        trials = tuning_trials(args.quick)
        blocks = {method: trials[trial][1] for method, trial in tuning["locked"].items()}
        if args.stage != "tune":
            for name in args.settings:
                settings[name] = capacity_report(pool, args, name, data, blocks)
    sizes = {
        "dataset": base.dataset,
        **{key: getattr(base, key) for key in ("num_train", "num_val", "image_size")},
        **{key: getattr(base, key) for key in ("teacher_epochs", "student_epochs")},
        "trials_per_method": len(trials) // len(TUNED),
    }
    return {
        "protocol": "capacity",
        "stage": args.stage,
        "sizes": sizes,
        "seeds": args.seeds,
        "tuning_seed": TUNING_SEED,
        "wall_seconds": time.monotonic() - started,
        "tuning": tuning,
        "settings": settings,
    }


def _difference(diff: dict[str, float] | None) -> str:
    if diff is None:
        return "-"
    return f"{diff['mean']:+.1f} [{diff['low']:+.1f}, {diff['high']:+.1f}]"


def format_report(report: dict[str, Any]) -> str:
    head = f"{'row':<21}{'λ':>8}{'knob':>11}  {'AP per seed':<31}{'AP':>12}"
    head += f"{'Δ alone [95% CI]':>22}{'Δ best baseline':>22}{'gap':>7}{'gap@T':>7}"
    lines = [head, "-" * len(head)]
    for name in ["none", ALONE_AT_TEACHER_BUDGET, *TUNED]:
        row = report["rows"][name]
        block = row["distill"]
        weight, knob = "", ""
        if name in TUNED:
            weight = f"{block['loss_weight']:g}"
            option = TUNED[name].knob
            knob = f"{KNOB_LABELS[option]} {block[option]:g}"
        per_seed = " ".join(f"{ap:.1f}" for ap in row["AP_per_seed"])
        mean = f"{row['AP']:.1f} ± {row['AP_std']:.1f}"
        gaps = (row["gap_closed"], row["gap_closed_teacher_budget"])
        gap, gap_t = (cell(None if g is None else 100 * g, 7, spec=".0f", unit="%") for g in gaps)
        lines.append(
            f"{name:<21}{weight:>8}{knob:>11}  {per_seed:<31}{mean:>12}"
            f"{_difference(row['vs_alone']):>22}{_difference(row['vs_best_baseline']):>22}"
            f"{gap}{gap_t}"
        )
    return "\n".join(lines)


def teacher_line(teacher: dict[str, Any]) -> str:
    curve = " ".join(f"{ap:.1f}" for ap in teacher["curve"])
    state = "plateaued" if teacher["plateaued"] else "NOT plateaued"
    return (
        f"teacher {teacher['AP']:.1f} AP; after each epoch {curve}; the last epoch "
        f"{teacher['last_epoch_gain']:+.1f} AP: {state} (tolerance {PLATEAU_TOL_AP})"
    )


def print_capacity(figures: dict[str, Any]) -> None:
    sizes, tuning = figures["sizes"], figures["tuning"]
    print(
        f"\nCapacity-gap protocol, stage {figures['stage']}: {sizes['dataset']}, "
        f"{sizes['num_train']} training and {sizes['num_val']} validation images of "
        f"{sizes['image_size']} px; teachers {sizes['teacher_epochs']} epochs, students "
        f"{sizes['student_epochs']}; COCO AP in percent"
    )
    print(
        f"\n== tuning: setting {tuning['setting']}, held-out split, seed "
        f"{figures['tuning_seed']}, {sizes['trials_per_method']} trials per method"
    )
    print(teacher_line(tuning["teacher"]))
    print(f"student alone {tuning['none_AP']:.1f} AP\n")
    locked = set(tuning["locked"].values())
    for trial, ap in tuning["trials"].items():
        print(f"  {trial:<40}{ap:>6.1f}{'  locked' if trial in locked else ''}")
    defaults = ", ".join(f"{m} {d:+.1f}" for m, d in tuning["defaults_vs_alone"].items())
    print(f"each method at its defaults, AP above the student alone: {defaults}")
    for name, out in figures["settings"].items():
        setting, teacher = out["setting"], out["teacher"]
        print(
            f"\n== {name}: {setting['teacher']} -> {setting['student']}, "
            f"{setting['optimizer']}; val split, seeds {figures['seeds']}"
        )
        print(teacher_line(teacher) + "\n")
        print(format_report(out))
        longer = out["rows"][ALONE_AT_TEACHER_BUDGET]["AP"]
        if longer >= teacher["AP"]:
            print(
                f"note: the student alone at the teacher's budget ({longer:.1f} AP) is no worse "
                f"than the teacher ({teacher['AP']:.1f}): no capacity gap at that budget"
            )
        print(
            f"Δ: paired difference over seeds, bootstrap 95% interval "
            f"({BOOTSTRAP_RESAMPLES} resamples); best baseline: {out['best_baseline']}; "
            "gap, gap@T: share of the teacher - alone gap closed, alone at the student's and at "
            "the teacher's budget"
        )
