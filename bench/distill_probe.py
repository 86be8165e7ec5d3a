"""What a distillation loss does to a student in its first steps, measured on a few batches
rather than guessed: how hard it pulls against the detection loss (the ratio of their gradient
norms over the student's parameters), whether it pulls the same way (the cosine of the two
gradients), and per FPN level what it compares (the features' scale and how many of their
channels are near-constant, for the student before and after its adapter and for the teacher).

The default protocol uses the ratio to match methods' strengths (--match-grad-ratio); the
capacity protocol's diagnosis prints all of it for every trial of its grid.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tid_core.data.coco import CocoDetection, build_loader
from tid_core.distill.distiller import Distiller, build_models
from tid_core.spec import JobSpec, PathDataset

PROBE_BATCHES = 4
# a channel whose spread over the batch and the map is below this share of the level's mean
# channel spread carries almost nothing; standardising it (PKD, TID) blows its noise up
NEAR_CONSTANT = 0.01


@dataclasses.dataclass(frozen=True)
class LevelFigures:
    """One FPN level, averaged over the probed batches: the root mean square of the student's
    features before and after the adapter and of the teacher's, and the share of near-constant
    channels of each."""

    student_rms: float
    adapted_rms: float
    teacher_rms: float
    student_near_constant: float
    teacher_near_constant: float


@dataclasses.dataclass(frozen=True)
class ProbeFigures:
    """‖∇ distillation‖ / ‖∇ detection‖ at the method's full loss weight, the cosine between
    the two gradients, each level's figures, and the method's logged statistics (TID's area
    fractions), all averaged over the probed batches; and the names of its loss terms."""

    terms: tuple[str, ...]
    grad_ratio: float
    grad_cosine: float
    levels: list[LevelFigures]
    stats: dict[str, float]


def _rms(f: Tensor) -> float:
    return float(f.detach().float().pow(2).mean().sqrt())


def _near_constant(f: Tensor) -> float:
    spread = f.detach().float().std(dim=(0, 2, 3))
    return float((spread < NEAR_CONSTANT * spread.mean()).float().mean())


@contextmanager
def _outputs(modules: dict[str, nn.Module]) -> Iterator[dict[str, Any]]:
    """Each module's latest forward output, by name, while the block runs."""
    seen: dict[str, Any] = {}
    handles = [
        module.register_forward_hook(lambda _m, _i, out, name=name: seen.__setitem__(name, out))
        for name, module in modules.items()
    ]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def _level_figures(seen: dict[str, Any], levels: list[int]) -> list[LevelFigures]:
    student = list(seen["student"].values())
    teacher = list(seen["teacher"].values())
    return [
        LevelFigures(
            student_rms=_rms(student[level]),
            adapted_rms=_rms(adapted),
            teacher_rms=_rms(teacher[level]),
            student_near_constant=_near_constant(student[level]),
            teacher_near_constant=_near_constant(teacher[level]),
        )
        for level, adapted in zip(levels, seen["adapted"], strict=True)
    ]


def _mean_levels(batches: list[list[LevelFigures]]) -> list[LevelFigures]:
    return [
        LevelFigures(
            **{
                field.name: statistics.mean(getattr(f, field.name) for f in per_batch)
                for field in dataclasses.fields(LevelFigures)
            }
        )
        for per_batch in zip(*batches, strict=True)
    ]


def _flat_grad(terms: list[Tensor], params: list[nn.Parameter]) -> Tensor:
    """The gradient of the terms' sum as one vector over `params` (zero where it does not
    reach, e.g. the head for a feature loss), keeping the graph."""
    grads = torch.autograd.grad(
        sum(terms[1:], terms[0]), params, retain_graph=True, allow_unused=True
    )
    return torch.cat(
        [
            (g if g is not None else torch.zeros_like(p)).flatten()
            for g, p in zip(grads, params, strict=True)
        ]
    )


def _distiller(parsed: JobSpec, data: Path, device: str) -> tuple[Distiller, CocoDetection]:
    assert isinstance(parsed.dataset, PathDataset)
    torch.manual_seed(parsed.schedule.seed)
    train_ds = CocoDetection(data, parsed.dataset.train_split, train=True)
    distiller = build_models(parsed, train_ds, parsed.dataset.input_size).to(device)
    if distiller.teacher is None:
        raise ValueError("the probe needs a distillation job (a teacher and a method)")
    distiller.teacher.to(device)
    return distiller.train(), train_ds


def probe(
    spec: dict[str, Any], data: Path, *, device: str, batches: int = PROBE_BATCHES
) -> ProbeFigures:
    """The job's student at its initial weights, on its first `batches` training batches."""
    parsed = JobSpec.model_validate(spec)
    distiller, train_ds = _distiller(parsed, data, device)
    assert distiller.teacher is not None and distiller.adapters is not None
    loader = build_loader(
        train_ds,
        batch_size=parsed.schedule.batch_size,
        train=True,
        seed=parsed.schedule.seed,
        num_workers=0,
    )
    params = [p for p in distiller.student.parameters() if p.requires_grad]
    watched = {
        "student": distiller.student.backbone,
        "adapted": distiller.adapters,
        "teacher": distiller.teacher.backbone,
    }
    ratios, cosines, levels, stats = [], [], [], []
    with _outputs(watched) as seen:
        for index, (images, targets) in enumerate(loader):
            if index == batches:
                break
            images = [img.to(device) for img in images]
            targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
            losses, batch_stats = distiller(images, targets, parsed.distill.loss_weight)
            terms = set(distiller.distill_terms)
            detection = _flat_grad([v for k, v in losses.items() if k not in terms], params)
            distill = _flat_grad([v for k, v in losses.items() if k in terms], params)
            ratios.append(float(distill.norm() / detection.norm()))
            cosines.append(float(torch.nn.functional.cosine_similarity(distill, detection, dim=0)))
            levels.append(_level_figures(seen, distiller.levels))
            stats.append({k: float(v) for k, v in batch_stats.items()})
    names = set().union(*stats) if stats else set()
    return ProbeFigures(
        terms=distiller.distill_terms,
        grad_ratio=statistics.mean(ratios),
        grad_cosine=statistics.mean(cosines),
        levels=_mean_levels(levels),
        stats={k: statistics.mean(s[k] for s in stats if k in s) for k in sorted(names)},
    )
