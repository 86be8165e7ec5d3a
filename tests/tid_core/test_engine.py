"""The training step loop: LR and distillation schedules, NaN stop, cooperative stop flag."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from tid_core.engine import (
    NonFiniteLossError,
    StepResult,
    StopFlag,
    distill_ramp,
    lr_factor,
    train_one_epoch,
)
from tid_core.events import EventWriter, PhaseEvent, read_events

# ---- schedules ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("iteration", "expected"),
    [
        (0, 0.001),
        (25, 0.001 * 0.75 + 0.25),
        (50, 0.5005),
        (99, 0.001 * 0.01 + 0.99),
        (100, 1.0),
        (199, 1.0),
        (200, 0.1),
        (299, 0.1),
        (300, 0.01),
        (10_000, 0.01),
    ],
)
def test_lr_factor_warms_up_linearly_then_steps_down_at_milestones(
    iteration: int, expected: float
) -> None:
    got = lr_factor(iteration, warmup_iters=100, milestones=[200, 300], gamma=0.1)
    assert got == pytest.approx(expected, rel=1e-12)


def test_lr_factor_without_warmup_is_one_until_first_milestone() -> None:
    assert lr_factor(0, warmup_iters=0, milestones=[5], gamma=0.5) == 1.0
    assert lr_factor(4, warmup_iters=0, milestones=[5], gamma=0.5) == 1.0
    assert lr_factor(5, warmup_iters=0, milestones=[5], gamma=0.5) == 0.5


def test_lr_factor_applies_milestone_inside_warmup() -> None:
    # iteration 5 of a 10-iteration warm-up, after a milestone at 3: 0.5005 * 0.1
    got = lr_factor(5, warmup_iters=10, milestones=[3], gamma=0.1)
    assert got == pytest.approx(0.05005)


@pytest.mark.parametrize(
    ("step", "expected"),
    [(0, 0.0), (25, 0.125), (50, 0.25), (100, 0.5), (101, 0.5), (5000, 0.5)],
)
def test_distill_ramp_grows_linearly_to_loss_weight(step: int, expected: float) -> None:
    assert distill_ramp(step, loss_weight=0.5, warmup_iters=100) == pytest.approx(expected)


@pytest.mark.parametrize("step", [0, 1, 1000])
def test_distill_ramp_without_warmup_is_loss_weight(step: int) -> None:
    assert distill_ramp(step, loss_weight=0.7, warmup_iters=0) == 0.7


# ---- train_one_epoch ----------------------------------------------------------------------------

Batch = tuple[list[Tensor], list[dict[str, Tensor]]]
Batches = list[Batch]


class ToyModel(nn.Module):
    """forward(images, targets, scale) -> ({"a": loss}, {"s": stat}); NaN from call `nan_at`."""

    def __init__(self, nan_at: int | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([1.0, -2.0]))
        self.nan_at = nan_at
        self.calls = 0
        self.scales: list[float] = []

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]], scale: float
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        self.calls += 1
        self.scales.append(scale)
        loss = (self.weight**2).sum() * images[0].mean()
        if self.calls == self.nan_at:
            loss = loss * float("nan")
        return {"a": loss}, {"s": torch.tensor(float(self.calls))}


def batches(count: int) -> Batches:
    target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    return [([torch.ones(3, 4, 4), torch.ones(3, 4, 4)], [target, target]) for _ in range(count)]


def run(
    model: ToyModel, loader: Iterable[Batch], stop: StopFlag, *, start_step: int = 0
) -> Iterator[StepResult]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 0.5**it)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return train_one_epoch(
        model,
        optimizer,
        scheduler,
        scaler,
        loader,
        device=torch.device("cpu"),
        start_step=start_step,
        distill_scale=lambda step: 0.25 * step,
        grad_clip=0.0,
        amp=False,
        stop=stop,
    )


def test_train_one_epoch_steps_and_reports_each_step() -> None:
    model = ToyModel()
    results: list[StepResult] = list(run(model, batches(3), StopFlag(), start_step=10))
    assert [r.step for r in results] == [11, 12, 13]
    assert model.scales == [2.75, 3.0, 3.25]
    # weight w: loss = |w|^2, grad 2w, SGD w <- w - lr * 2w with lr 0.1, 0.05, 0.025
    assert results[0].losses == pytest.approx({"loss": 5.0, "a": 5.0})
    assert results[1].losses["a"] == pytest.approx(5.0 * 0.8**2)
    assert results[2].losses["a"] == pytest.approx(5.0 * (0.8 * 0.9) ** 2)
    assert [r.lr for r in results] == pytest.approx([0.1, 0.05, 0.025])
    assert [r.stats["s"] for r in results] == [1.0, 2.0, 3.0]
    assert all(set(r.stats) == {"s", "data_wait"} for r in results)
    assert all(r.images == 2 for r in results)
    assert not any(r.stop for r in results)
    expected = torch.tensor([1.0, -2.0]) * 0.8 * 0.9 * 0.95
    torch.testing.assert_close(model.weight.detach(), expected)


def test_train_one_epoch_reports_time_waited_for_each_batch() -> None:
    def slow_second_batch() -> Iterator[Batch]:
        first, second = batches(2)
        yield first
        time.sleep(0.2)
        yield second

    results = list(run(ToyModel(), slow_second_batch(), StopFlag()))
    assert results[1].stats["data_wait"] >= 0.2 > results[0].stats["data_wait"]


def test_train_one_epoch_raises_on_nan_loss_without_stepping() -> None:
    model = ToyModel(nan_at=3)
    steps = run(model, batches(5), StopFlag())
    next(steps)
    next(steps)
    after_step_2 = model.weight.detach().clone()
    with pytest.raises(NonFiniteLossError) as info:
        next(steps)
    assert info.value.step == 3
    assert str(info.value).startswith("non-finite loss at step 3")
    assert "a=nan" in str(info.value)
    assert isinstance(info.value, FloatingPointError)
    assert torch.equal(model.weight.detach(), after_step_2)
    assert torch.isfinite(model.weight).all()
    assert model.calls == 3


def test_train_one_epoch_reports_stop_requested_before_a_step() -> None:
    stop = StopFlag()
    steps = run(ToyModel(), batches(3), stop)
    first = next(steps)
    assert first.stop is False
    stop.requested = True  # e.g. SIGTERM arrives during step 2
    second = next(steps)
    assert second.step == 2
    assert second.stop is True


def test_event_writer_ends_a_torn_line_before_appending(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text('{"type": "step", "step": 1}\n{"type": "eval", "ste')  # killed mid-write
    writer = EventWriter(path)
    writer.emit(PhaseEvent(step=1, phase="train", epoch=0))
    writer.close()
    events = read_events(path)
    assert [e["type"] for e in events] == ["step", "phase"]  # the new run's first event is whole
