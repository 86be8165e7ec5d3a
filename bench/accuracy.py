"""Accuracy: what each distillation method buys a student, measured side by side.

One teacher is trained once (cached by its spec and dataset, at a seed no student uses); then
the same student is trained with the same budget under every method and seed: `none`, `fitnet`,
`pkd`, `pkd-gt` (PKD with TID's weights on the ground-truth foreground), `tid` and TID's
ablations (classification only, regression only, no weak areas). The table gives, per method,
the mean and std over seeds of COCO AP, AP50, AP75, APs/m/l, the share of the teacher-student
gap it closes, the wall time of a run, and the ratio of the distillation to the detection
gradient norm at the start of training (a distillation term that swamps the detection loss is
the first thing to check when a method hurts). The script refuses to compare anything when the
teacher is not clearly stronger than the student trained alone.

Every run is a real `python -m tid_core.train` process (reused when run again with the same spec
and teacher). The same command serves real COCO on a GPU:

    python bench/accuracy.py [--quick] [--json FILE] [--dataset COCO_DIR] [--splits train,val]
        [--device cuda] [--seeds 1,2,3] [--methods none,tid,...] [--jobs N]
        [--match-grad-ratio R | --loss-weight W]
        [--teacher fcos:resnet50:256] [--student fcos:resnet18:128] [--image-size N]
        [--teacher-weights-backbone FILE] [--student-weights-backbone FILE]
        [--teacher-epochs N] [--student-epochs N]

`--tune` runs the TID loss-weight/gamma grid on the tuning dataset and seed (disjoint from the
reporting ones) instead of the comparison.

`--protocol capacity` runs issue #22's capacity-gap protocol instead (bench/capacity.py: its
sizes, settings, stages and budget), a stage at a time, across sessions:

    python bench/accuracy.py --protocol capacity --stage tune --jobs 2 --json FILE
    python bench/accuracy.py --protocol capacity --stage report --settings main --jobs 2 \
        --json FILE

The parts both protocols build and run their jobs with: bench/accuracy_jobs.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from bench import harness
from bench.accuracy_jobs import (
    METHODS,
    METRICS,
    TEACHER_SEED,
    TUNING_SEED,
    cell,
    digests,
    distilled,
    initialised,
    job_spec,
    margin_problem,
    model_block,
    prepare_data,
    refuse,
    student_jobs,
    submit,
    summarise,
    train_teacher,
    tuning_data,
)
from bench.capacity import SETTINGS, capacity, print_capacity
from bench.capacity_diagnosis import diagnosis, print_diagnosis
from bench.distill_probe import probe
from tid_core import recipes
from tid_core.spec import JobSpec

TUNE_GRID = {"loss_weight": (0.25, 0.5, 1.0), "gamma": (0.5, 1.0)}


def compare(args: argparse.Namespace) -> dict[str, Any]:
    recipe = recipes.recipe(quick=args.quick)
    recipe = dataclasses.replace(
        recipe,
        teacher_epochs=args.teacher_epochs or recipe.teacher_epochs,
        student_epochs=args.student_epochs or recipe.student_epochs,
        image_size=args.image_size or recipe.image_size,
        teacher=args.teacher or recipe.teacher,
        student=args.student or recipe.student,
    )
    seeds = [TUNING_SEED] if args.tune else args.seeds
    data = prepare_data(args, recipe)
    # a COCO folder's own split names (the synthetic folders use the defaults)
    splits = (
        dict(zip(("train_split", "val_split"), args.splits, strict=True)) if args.dataset else {}
    )
    dataset = {"path": str(data), "input_size": recipe.image_size, **splits}
    started = time.monotonic()
    teacher_run, teacher_weights = train_teacher(args, recipe, data, dataset)
    teacher = {**recipe.teacher, "weights": {"path": str(teacher_weights)}}
    teacher_ap = float(teacher_run["metrics"]["AP"])
    if args.tune:
        held_out = {
            "path": str(tuning_data(args, recipe, data)),
            "input_size": recipe.image_size,
            **splits,
        }
        return tune(args, recipe, held_out, teacher, teacher_ap, teacher_weights)

    unit = {}  # the gradient ratio at loss weight 1: it scales linearly with the weight
    others = [m for m in args.methods if m != "none"]
    for name in others:
        spec = job_spec(
            "probe",
            initialised(recipe.student, args.student_weights_backbone),
            dataset,
            recipe=recipe,
            epochs=1,
            seed=seeds[0],
            device=args.device,
            distill={**METHODS[name], "loss_weight": 1.0},
            teacher=teacher,
        )
        unit[name] = probe(spec, data, device=args.device).grad_ratio
    weight = (
        args.loss_weight
        if args.loss_weight is not None
        else float(JobSpec.model_fields["distill"].default.loss_weight)
    )
    weights = {
        name: args.match_grad_ratio / ratio if args.match_grad_ratio else weight
        for name, ratio in unit.items()
    }
    inputs = digests(teacher=teacher_weights, backbone=args.student_weights_backbone)
    methods = distilled(["none", *others], weights)
    # one queue for every run, the lone student's first: no core waits for a method's last seed
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        jobs = student_jobs(args, methods, recipe, dataset, teacher, seeds)
        futures = submit(pool, jobs, inputs)
        base = summarise([f.result() for f in futures["none"]])["AP"]
        problem = margin_problem(teacher_ap, base)
        margin_ok = problem is None
        if problem is not None:
            if not args.quick:
                pool.shutdown(cancel_futures=True)  # the runs already started still finish
            refuse(args, problem)
        results = {name: [f.result() for f in runs] for name, runs in futures.items()}

    table: dict[str, dict[str, Any]] = {"teacher": summarise([teacher_run])}
    for name, runs in results.items():
        row = summarise(runs)
        if name in unit:
            row["loss_weight"] = weights[name]
            row["grad_ratio"] = unit[name] * weights[name]
            if row["AP"] is not None:
                row["gap_closed"] = (row["AP"] - base) / (teacher_ap - base)
        table[name] = row
    return {
        "teacher_AP": teacher_ap,
        "student_alone_AP": base,
        "teacher_margin_ok": margin_ok,
        "seeds": seeds,
        "wall_seconds": time.monotonic() - started,
        "methods": table,
    }


def tune(
    args: argparse.Namespace,
    recipe: recipes.Recipe,
    dataset: dict[str, Any],
    teacher: dict[str, Any],
    teacher_ap: float,
    teacher_weights: Path,
) -> dict[str, Any]:
    """The given methods (default: TID's loss weight x gamma grid) on the held-out split and
    the tuning seed, with `none`."""
    if args.methods:
        given = [] if args.loss_weight is None else [m for m in args.methods if m != "none"]
        methods = distilled(args.methods, dict.fromkeys(given, args.loss_weight))
    else:
        methods = {"none": METHODS["none"]}
        for lw in TUNE_GRID["loss_weight"]:
            for gamma in TUNE_GRID["gamma"]:
                block = {"method": "tid", "loss_weight": lw, "gamma": gamma}
                methods[f"tid-lw{lw}-g{gamma}"] = block
    inputs = digests(teacher=teacher_weights, backbone=args.student_weights_backbone)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        jobs = student_jobs(args, methods, recipe, dataset, teacher, [TUNING_SEED])
        futures = submit(pool, jobs, inputs)
        table = {name: summarise([f.result() for f in runs]) for name, runs in futures.items()}
    return {"teacher_AP": teacher_ap, "tuning_seed": TUNING_SEED, "methods": table}


def format_rows(table: dict[str, dict[str, Any]]) -> str:
    head = f"{'method':<16}{'λ':>6}{'grad':>7}{'AP':>13}"
    head += "".join(f"{m:>7}" for m in METRICS[1:]) + f"{'gap':>7}{'time s':>8}"
    lines = [head, "-" * len(head)]
    for name, row in table.items():
        ap = f"{row['AP']:.1f} ± {row['AP_std']:.1f}" if row.get("AP") is not None else "-"
        gap = row.get("gap_closed")
        lines.append(
            f"{name:<16}"
            + cell(row.get("loss_weight"), 6, spec=".2f")
            + cell(row.get("grad_ratio"), 7, spec=".2f")
            + f"{ap:>13}"
            + "".join(cell(row.get(m), 7) for m in METRICS[1:])
            + cell(None if gap is None else 100 * gap, 7, spec=".0f", unit="%")
            + cell(row.get("seconds"), 8, spec=".0f")
        )
    return "\n".join(lines)


def print_table(figures: dict[str, Any]) -> None:
    if figures.get("protocol") == "capacity":
        print_capacity(figures)
        return
    mode = "tuning grid" if "tuning_seed" in figures else f"seeds {figures['seeds']}"
    print(
        f"\nCOCO mAP on the val split (percent), {mode}; teacher {figures['teacher_AP']:.1f} AP\n"
    )
    print(format_rows(figures["methods"]))
    print(
        "\nλ: loss weight; grad: ‖∇ distill‖ / ‖∇ detection‖ at the start (at λ); "
        "gap: share of the teacher - student gap closed; time: mean wall seconds of a run"
    )


def main(argv: list[str] | None = None) -> int:
    parser = harness.parser(__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--dataset", help="a COCO folder (annotations/instances_<split>.json)")
    parser.add_argument(
        "--splits",
        default="train,val",
        help="--dataset's training and validation splits (COCO 2017: train2017,val2017)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--protocol",
        choices=("default", "capacity"),
        default="default",
        help="capacity: the capacity-gap protocol (its own sizes; see bench/capacity.py)",
    )
    parser.add_argument(
        "--stage",
        choices=("tune", "report", "all", "diagnose"),
        default="all",
        help="capacity: the tuning grid, the locked table (from recorded tuning runs), both, or "
        "the diagnosis (each trial probed at its initial weights, beside its recorded AP)",
    )
    parser.add_argument(
        "--settings",
        default=",".join(SETTINGS),
        help=f"capacity: comma-separated, of {', '.join(SETTINGS)}",
    )
    parser.add_argument(
        "--sizes",
        choices=("cpu", "gpu"),
        default="cpu",
        help="capacity: the CPU tables' sizes (128 px) or a GPU's (256 px; device_check.sh)",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        help="capacity: the run records (default docs/results/capacity/runs, with --sizes gpu "
        "runs-gpu; quick: under --out)",
    )
    parser.add_argument(
        "--seeds", help="comma-separated reporting seeds (default 1,2,3; capacity 1,2,3,4,5)"
    )
    parser.add_argument(
        "--methods",
        help="comma-separated (default: every method; with --tune, TID's loss weight x gamma grid)",
    )
    strength = parser.add_mutually_exclusive_group()
    strength.add_argument(
        "--match-grad-ratio",
        type=float,
        help="set each method's loss weight so its initial distill/detection gradient ratio is R",
    )
    strength.add_argument(
        "--loss-weight", type=float, help="every method's loss weight (default: the spec's)"
    )
    parser.add_argument(
        "--teacher", type=model_block, help="ARCH:BACKBONE:FPN, default fcos:resnet18:256"
    )
    parser.add_argument(
        "--student", type=model_block, help="ARCH:BACKBONE:FPN, default fcos:resnet18:128"
    )
    for role in ("teacher", "student"):
        parser.add_argument(
            f"--{role}-weights-backbone",
            type=Path,
            metavar="FILE",
            help=f"initialise the {role}'s backbone (a torchvision ImageNet state dict)",
        )
    parser.add_argument(
        "--image-size", type=int, help="input size (and synthetic image size); default 128"
    )
    parser.add_argument("--teacher-epochs", type=int, help="default: the demo's 6")
    parser.add_argument("--student-epochs", type=int, help="every student's; default: the demo's 3")
    parser.add_argument("--tune", action="store_true", help="run TID's tuning grid instead")
    parser.add_argument("--tune-dataset", help="held-out COCO folder for --tune with --dataset")
    parser.add_argument("--jobs", type=int, default=1, help="training runs at a time")
    parser.add_argument("--out", type=Path, default=Path("var/bench/accuracy"))
    args = parser.parse_args(argv)
    # absolute, so a run is reused whatever directory the script is started from: the paths
    # in a job's spec are part of what makes a finished run the same run
    args.out = args.out.resolve()
    capacity_protocol = args.protocol == "capacity"
    if capacity_protocol:
        # the protocol fixes its data, models, budgets and loss weights
        fixed = ["dataset", "tune", "methods", "match_grad_ratio", "loss_weight", "teacher"]
        fixed += ["student", "image_size", "teacher_epochs", "student_epochs"]
        fixed += ["teacher_weights_backbone", "student_weights_backbone"]
        given = [f"--{name.replace('_', '-')}" for name in fixed if getattr(args, name)]
        if given:
            parser.error(f"{', '.join(given)}: not with --protocol capacity")
        args.settings = args.settings.split(",")
        unknown = [s for s in args.settings if s not in SETTINGS]
        if unknown:
            parser.error(f"unknown settings {unknown}; expected some of {list(SETTINGS)}")
        # a GPU's records (other sizes, another machine) apart from the CPU tables'
        folder = "runs-gpu" if args.sizes == "gpu" else "runs"
        records = args.out / "records" if args.quick else harness.ROOT / "docs/results/capacity"
        args.cache = (args.cache or records / folder).resolve()
    elif args.sizes != "cpu":
        parser.error("--sizes: only with --protocol capacity")
    if args.seeds:
        args.seeds = [int(s) for s in args.seeds.split(",")]
    elif capacity_protocol:
        args.seeds = [1, 2] if args.quick else [1, 2, 3, 4, 5]
    else:
        args.seeds = [1] if args.quick else [1, 2, 3]
    reserved = {TUNING_SEED: "the tuning seed", TEACHER_SEED: "the teachers' seed"}
    clash = [f"{seed} is {reserved[seed]}" for seed in args.seeds if seed in reserved]
    if clash and not args.quick:
        parser.error(f"--seeds: {'; '.join(clash)}: report on other seeds")
    if args.tune and args.match_grad_ratio:
        parser.error("--match-grad-ratio: not with --tune (the grid sets its own loss weights)")
    args.splits = args.splits.split(",")
    if len(args.splits) != 2:
        parser.error(f"--splits {','.join(args.splits)}: expected TRAIN,VAL")
    if args.methods:
        args.methods = args.methods.split(",")
        unknown = [m for m in args.methods if m not in METHODS]
        if unknown:
            parser.error(f"unknown methods {unknown}; expected some of {list(METHODS)}")
    elif not args.tune:
        args.methods = list(METHODS)
    if args.methods and "none" not in args.methods:
        args.methods.insert(0, "none")  # the gap and the teacher check need the lone student
    cores = len(os.sched_getaffinity(0))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // args.jobs)))
    # as the worker starts trainers: spinning OpenMP threads collapse on shared cores
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

    if capacity_protocol and args.stage == "diagnose":
        harness.report(diagnosis(args), print_diagnosis, args.json)
    else:
        harness.report(
            capacity(args) if capacity_protocol else compare(args), print_table, args.json
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
