"""The demo's recipe: the local demo (`tid_core.demo`), the service demo and bench/accuracy.py.

Torch-free, like `tid_core.spec`: plain spec fragments. A ResNet18-FPN256 teacher trained twice
as long as a ResNet18-FPN128 student, AdamW, 128 px synthetic shapes; sized to finish on two CPU
cores in about ten minutes. `--quick` (a smoke test) halves both FPNs, at 64 px, 4 steps a job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from tid_core.events import COCO_STATS
from tid_core.spec import BuiltinName

RESOURCES = {"nproc_per_node": 1, "num_workers": 1}
METRICS = COCO_STATS  # the columns of `format_table` and of bench/accuracy.py's table
Optimizer = Literal["adamw", "sgd"]
# the schedule's optimizer fields: AdamW as the demo has always trained, SGD at the spec's
# defaults (the schedule a user gets without choosing)
OPTIMIZERS: dict[Optimizer, dict[str, Any]] = {
    "adamw": {"optimizer": "adamw", "lr": 0.002, "weight_decay": 0.05},
    "sgd": {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4},
}


@dataclass(frozen=True)
class Recipe:
    """Data, models and budgets of a demo-sized comparison (the models are spec blocks)."""

    num_train: int
    num_val: int
    image_size: int
    teacher: dict[str, Any]
    student: dict[str, Any]
    teacher_epochs: int
    student_epochs: int
    warmup_iters: int
    optimizer: Optimizer = "adamw"
    dataset: BuiltinName = "shapes"  # the synthetic dataset a benchmark generates

    def job(self, model: dict[str, Any], dataset: dict[str, Any], epochs: int) -> dict[str, Any]:
        """The body of a job spec that trains `model` on `dataset` for `epochs` (the name,
        distillation and teacher are the caller's)."""
        return {
            "student": model,
            "dataset": dataset,
            "schedule": self.schedule(epochs),
            "resources": RESOURCES,
        }

    def teacher_spec(self, dataset: dict[str, Any]) -> dict[str, Any]:
        """The teacher's job: plain training of the larger model for the teacher's budget."""
        return {"name": "demo-teacher", **self.job(self.teacher, dataset, self.teacher_epochs)}

    def student_spec(
        self, dataset: dict[str, Any], method: str, teacher_weights: dict[str, str]
    ) -> dict[str, Any]:
        """A student's job under `method` (`none`: trained alone, no teacher), the teacher
        read from `teacher_weights` (a spec weights block: a path, or a service job id)."""
        spec: dict[str, Any] = {
            "name": f"demo-student-{method}",
            **self.job(self.student, dataset, self.student_epochs),
            "distill": {"method": method},
        }
        if method != "none":
            spec["teacher"] = {**self.teacher, "weights": teacher_weights}
        return spec

    def schedule(
        self, num_epochs: int, *, final_epochs: int = 1, eval_every: int = 0
    ) -> dict[str, Any]:
        """The learning rate drops 10x for the last `final_epochs` (when an epoch is left before
        them); an evaluation every `eval_every` epochs (0: only after the last)."""
        return {
            "epochs": num_epochs,
            "batch_size": 8,
            **OPTIMIZERS[self.optimizer],
            "warmup_iters": self.warmup_iters,
            "lr_milestones": [num_epochs - final_epochs] if num_epochs > final_epochs + 1 else [],
            "eval_every": eval_every,
            "log_every": 20,
            "seed": 0,
        }


FULL = Recipe(
    num_train=1024,
    num_val=200,
    image_size=128,
    teacher={"arch": "fcos", "backbone": "resnet18", "fpn_channels": 256},
    student={"arch": "fcos", "backbone": "resnet18", "fpn_channels": 128},
    teacher_epochs=6,
    student_epochs=3,
    warmup_iters=100,
)
# a smoke test of every path at the smallest sizes that still exercise them (4 steps a job)
QUICK = Recipe(
    num_train=32,
    num_val=8,
    image_size=64,
    teacher={"arch": "fcos", "backbone": "resnet18", "fpn_channels": 128},
    student={"arch": "fcos", "backbone": "resnet18", "fpn_channels": 64},
    teacher_epochs=1,
    student_epochs=1,
    warmup_iters=4,
)


def recipe(*, quick: bool) -> Recipe:
    return QUICK if quick else FULL


def format_table(rows: dict[str, dict[str, Any]], *, extra: str | None = None) -> str:
    """A mAP table: one row per job from its COCO metrics (keys of METRICS, percent).

    With `extra`, each row's metrics dict also holds that column (e.g. seconds).
    """
    header = f"{'job':<10}" + "".join(f"{m:>8}" for m in METRICS)
    header += f"{extra:>9}" if extra else ""
    lines = [header, "-" * len(header)]
    for name, m in rows.items():
        cells = "".join(f"{m[k]:>8.1f}" if m.get(k) is not None else f"{'-':>8}" for k in METRICS)
        if extra:
            cells += f"{m[extra]:>9.0f}" if m.get(extra) is not None else f"{'cached':>9}"
        lines.append(f"{name:<10}{cells}")
    return "\n".join(lines)
