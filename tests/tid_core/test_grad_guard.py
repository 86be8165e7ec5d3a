"""The gradient-ratio guard: its decision, what it reports, and that measuring changes nothing
of training (a toy distiller: detection and distillation terms of one linear student)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from tid_core.engine import StepResult, StopFlag, distill_ramp, train_one_epoch
from tid_core.events import EventWriter, read_events
from tid_core.grad_guard import (
    GRAD_RATIO_STEPS,
    HELPFUL_GRAD_RATIO,
    GradRatioProbe,
    is_helpful,
    report_grad_ratio,
)


@pytest.mark.parametrize(
    ("ratio", "helpful"),
    [(0.0, False), (0.099, False), (0.1, True), (1.9, True), (100.0, True), (100.1, False)],
)
def test_the_guard_warns_outside_the_helpful_range(ratio: float, helpful: bool) -> None:
    assert HELPFUL_GRAD_RATIO == (0.1, 100.0)
    assert is_helpful(ratio) is helpful


@pytest.mark.parametrize(("ratio", "pull"), [(2.0, None), (191.0, "dominates"), (0.01, "hardly")])
def test_the_report_is_an_event_and_a_warning_only_when_far_off(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, ratio: float, pull: str | None
) -> None:
    writer = EventWriter(tmp_path / "events.jsonl")
    report_grad_ratio(writer, step=4, ratio=ratio, steps=4, method="fitnet")
    writer.close()
    events = read_events(tmp_path / "events.jsonl")
    assert events[0] | {"time": 0} == {
        "type": "grad_ratio",
        "time": 0,
        "step": 4,
        "method": "fitnet",
        "ratio": ratio,
        "steps": 4,
        "helpful_range": [0.1, 100.0],
    }
    warned = [r for r in caplog.records if r.levelname == "WARNING"]
    if pull is None:
        assert len(events) == 1 and not warned
        return
    warning = events[1]
    assert (warning["type"], warning["method"], warning["ratio"]) == ("warning", "fitnet", ratio)
    assert warning["helpful_range"] == [0.1, 100.0]
    assert pull in warning["message"] and f"{ratio:.3g}" in warning["message"]
    assert [r.getMessage() for r in warned] == [warning["message"]]


class ToyDistiller(nn.Module):
    """A linear student, a detection term and a distillation term scaled as the Distiller
    scales its terms; the adapter (not the student's) must not count in the ratio."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.student = nn.Linear(4, 3)
        self.adapter = nn.Linear(3, 3)
        self.distill_terms: tuple[str, ...] = ()

    def forward(
        self, images: list[Tensor], targets: Any, distill_scale: float
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        features = self.student(torch.stack(images))
        detection = (features - 1).pow(2).mean()
        distill = self.adapter(features).pow(2).mean()
        self.distill_terms = ("kd",)
        return {"det": detection, "kd": distill_scale * distill}, {}


def train(model: ToyDistiller, probe: GradRatioProbe | None, steps: int) -> list[StepResult]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return list(
        train_one_epoch(
            model,
            optimizer,
            scheduler,
            scaler,
            batches(steps),
            device=torch.device("cpu"),
            start_step=0,
            distill_scale=scale,
            grad_clip=1.0,
            amp=False,
            stop=StopFlag(),
            probe=probe,
        )
    )


def batches(count: int) -> list[tuple[list[Tensor], list[dict[str, Tensor]]]]:
    gen = torch.Generator().manual_seed(1)
    return [([torch.randn(4, generator=gen) for _ in range(2)], [{}, {}]) for _ in range(count)]


def scale(step: int) -> float:
    return distill_ramp(step, loss_weight=0.5, warmup_iters=10)


def test_the_probe_measures_at_full_weight_and_leaves_training_as_it_was() -> None:
    plain, probed = ToyDistiller(), ToyDistiller()
    probe = GradRatioProbe(
        probed,  # type: ignore[arg-type]
        method="toy",
        distill_scale=scale,
        loss_weight=0.5,
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        total_steps=6,
    )
    expected = train(plain, None, 6)
    got = train(probed, probe, 6)

    assert [r.losses for r in got] == [r.losses for r in expected]  # exactly, not approximately
    for a, b in zip(plain.parameters(), probed.parameters(), strict=True):
        assert torch.equal(a, b)
    assert len(probe.ratios) == GRAD_RATIO_STEPS  # steps 1-4 of 6

    # step 1, from the initial weights: the ratio of the unscaled terms' gradients x loss_weight
    first = ToyDistiller()
    [(images, _)] = batches(1)
    losses, _ = first(images, None, 1.0)
    params = list(first.student.parameters())
    norm = [
        math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
        for grads in (
            torch.autograd.grad(losses[k], params, retain_graph=True) for k in ("kd", "det")
        )
    ]
    assert probe.ratios[0] == pytest.approx(0.5 * norm[0] / norm[1], rel=1e-5)


def test_the_probe_reports_once_when_the_measured_steps_end(tmp_path: Path) -> None:
    model = ToyDistiller()
    probe = GradRatioProbe(
        model,  # type: ignore[arg-type]
        method="toy",
        distill_scale=scale,
        loss_weight=0.5,
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        total_steps=2,  # a job shorter than the measured steps
    )
    writer = EventWriter(tmp_path / "events.jsonl")
    for result in train(model, probe, 2):
        probe.report(writer, result.step)
    writer.close()
    [event] = [e for e in read_events(tmp_path / "events.jsonl") if e["type"] == "grad_ratio"]
    assert (event["step"], event["steps"]) == (2, 2)
