"""The demo's recipe, shared by the local demo (`tid_core.demo`) and the service demo.

Torch-free, like `tid_core.spec`: plain spec fragments. A ResNet18-FPN256 teacher trained twice
as long as a ResNet18-FPN128 student, AdamW, 128 px synthetic shapes; sized to finish on two CPU
cores in about ten minutes.
"""

from __future__ import annotations

from typing import Any

TEACHER = {"arch": "fcos", "backbone": "resnet18", "fpn_channels": 256}
STUDENT = {"arch": "fcos", "backbone": "resnet18", "fpn_channels": 128}
RESOURCES = {"nproc_per_node": 1, "num_workers": 1}
IMAGE_SIZE = 128
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def dataset_size(*, quick: bool) -> tuple[int, int]:
    """(train, val) image counts."""
    return (64, 16) if quick else (1024, 200)


def epochs(*, quick: bool) -> tuple[int, int]:
    """(teacher, student) epochs."""
    return (1, 1) if quick else (6, 3)


def schedule(num_epochs: int) -> dict[str, Any]:
    return {
        "epochs": num_epochs,
        "batch_size": 8,
        "optimizer": "adamw",
        "lr": 0.002,
        "weight_decay": 0.05,
        "warmup_iters": 100,
        "lr_milestones": [num_epochs - 1] if num_epochs > 2 else [],
        "eval_every": 0,
        "log_every": 20,
        "seed": 0,
    }


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
