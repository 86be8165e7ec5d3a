"""The gradient-ratio guard: does distillation pull on the student about as hard as it did where
the benchmark found that it helps?

Over a distillation job's first `GRAD_RATIO_STEPS` steps the trainer measures
‖∇ distillation‖ / ‖∇ detection‖ over the student's trainable parameters, as the benchmark's
`grad_ratio` (bench/accuracy_jobs.py) does: at the method's full loss weight (the warm-up ramp only
scales the distillation terms, so its factor is divided out) and near initialisation, so the answer
comes in the first seconds of a job rather than after its ramp. Every distillation job records the
ratio (a `grad_ratio` event); one far outside `HELPFUL_GRAD_RATIO` also gets a `warning` event and
a log line. Measuring leaves training as it was: the two norms come from `torch.autograd.grad` on
the step's retained graph, which writes no `.grad`, before the step's own backward; it costs two
extra partial backward passes on each measured step, on rank 0 only.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Callable, Sequence
from typing import Final

import torch
from torch import Tensor

from tid_core.distill.distiller import Distiller
from tid_core.events import EventWriter, GradRatioEvent, WarningEvent

log = logging.getLogger(__name__)

# The ratios at which the benchmarks saw distillation help the student (docs/BENCHMARKS.md): on
# the capacity-gap protocol's tuning grid FitNet at 1.3 and the standardised losses (PKD, TID) at
# 32-82, their best trials, while at 2-5 they did next to nothing; on synthetic shapes FitNet at
# 191 left the student worse than training alone. The ratio is not comparable across loss forms
# (FitNet at 1.3 gained more than TID at 75), so the range only flags the far-off.
HELPFUL_GRAD_RATIO: Final = (0.1, 100.0)
GRAD_RATIO_STEPS: Final = 4  # measured steps: enough to average out one batch's draw


def is_helpful(ratio: float, helpful: tuple[float, float] = HELPFUL_GRAD_RATIO) -> bool:
    """Whether `ratio` is inside the range where distillation helped (bounds included)."""
    low, high = helpful
    return low <= ratio <= high


def _grad_norm(loss: Tensor, params: Sequence[Tensor]) -> Tensor:
    """‖∇ loss‖ over `params`, keeping the graph for the step's own backward."""
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    norm: Tensor = torch.stack([g.float().norm() for g in grads if g is not None]).norm()
    return norm


class GradRatioProbe:
    """Measures the ratio on steps 1..`GRAD_RATIO_STEPS` (fewer in a shorter job): the engine
    calls it with each step's loss terms before the backward, the trainer has it `report` after
    each step. A run resumed past those steps measures nothing: its earlier attempt did."""

    def __init__(
        self,
        distiller: Distiller,
        *,
        method: str,
        distill_scale: Callable[[int], float],
        loss_weight: float,
        scaler: torch.amp.GradScaler,
        total_steps: int,
    ) -> None:
        self.distiller, self.method = distiller, method
        self.params = [p for p in distiller.student.parameters() if p.requires_grad]
        self.distill_scale, self.loss_weight = distill_scale, loss_weight
        self.scaler = scaler  # under AMP both losses are scaled alike: fp16 grads do not vanish
        self.last_step = min(GRAD_RATIO_STEPS, total_steps)
        self.ratios: list[float] = []

    def __call__(self, step: int, losses: dict[str, Tensor]) -> None:
        if step > self.last_step:
            return
        scale = self.distill_scale(step)
        if scale == 0:  # only when loss_weight is 0 (the ramp is positive from step 1)
            self.ratios.append(0.0)
            return
        terms = set(self.distiller.distill_terms)
        distill = torch.stack([v.float() for k, v in losses.items() if k in terms]).sum()
        detection = torch.stack([v.float() for k, v in losses.items() if k not in terms]).sum()
        ratio = float(
            _grad_norm(self.scaler.scale(distill), self.params)
            / _grad_norm(self.scaler.scale(detection), self.params)
            * (self.loss_weight / scale)
        )
        if math.isfinite(ratio):  # an AMP step that overflowed tells nothing
            self.ratios.append(ratio)

    def report(self, events: EventWriter, step: int) -> None:
        """At the step that closes the measured ones, report their mean ratio."""
        if step == self.last_step and self.ratios:
            report_grad_ratio(
                events,
                step=step,
                ratio=statistics.fmean(self.ratios),
                steps=len(self.ratios),
                method=self.method,
            )


def report_grad_ratio(
    events: EventWriter, *, step: int, ratio: float, steps: int, method: str
) -> None:
    """Record the measured ratio; warn (event and log) when it is far outside the helpful range."""
    low, high = HELPFUL_GRAD_RATIO
    events.emit(
        GradRatioEvent(
            step=step, method=method, ratio=ratio, steps=steps, helpful_range=HELPFUL_GRAD_RATIO
        )
    )
    log.info("%s: distillation/detection gradient ratio %.3g", method, ratio)
    if is_helpful(ratio):
        return
    pull = "dominates the detection loss" if ratio > high else "hardly moves the student"
    message = (
        f"{method}: the distillation/detection gradient ratio is {ratio:.3g}, outside "
        f"{low:g}-{high:g} where the benchmark saw distillation help: distillation {pull}; "
        "consider scaling distill.loss_weight (docs/BENCHMARKS.md)"
    )
    log.warning("%s", message)
    events.emit(
        WarningEvent(
            step=step, message=message, method=method, ratio=ratio, helpful_range=HELPFUL_GRAD_RATIO
        )
    )
