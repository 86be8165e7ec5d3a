"""`tid watch`'s progress bar: its ETA follows the job's live pace, not a replay of its history."""

from __future__ import annotations

import io
from typing import Any

from rich.console import Console
from rich.progress import Progress

from api.terminal import Follower


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def step(n: int) -> dict[str, Any]:
    return {"step": n, "epoch": 0, "total_steps": 1000, "losses": {"loss": 1.0}}


def test_eta_ignores_the_replayed_history_and_restarts_with_a_resumed_attempt() -> None:
    clock = Clock()
    console = Console(file=io.StringIO(), width=200)
    progress = Progress(console=console, get_time=clock)
    job = {
        "id": "0123456789",
        "name": "j",
        "state": "running",
        "step": 900,
        "total_steps": 1000,
        "best_ap": None,
        "spec": {"schedule": {"epochs": 1}},
    }
    follower = Follower(progress, job)
    (task,) = progress.tasks

    follower.apply("start", {"step": 0, "total_steps": 1000})
    for n in range(100, 901, 100):  # the history, all at one instant
        follower.apply("step", step(n))
    follower.apply("eval", {"epoch": 0, "metrics": {"AP": 12.5}})
    assert task.completed == 900 and task.speed is None
    assert "epoch 0: AP 12.5" in console.file.getvalue()  # type: ignore[attr-defined]

    clock.now = 10.0
    follower.apply("step", step(920))
    clock.now = 30.0
    follower.apply("step", step(940))  # 1 step a second
    assert task.time_remaining == 60

    clock.now = 100.0  # the trainer was killed; its next attempt resumes at step 384
    follower.apply("start", {"step": 384, "total_steps": 1000})
    assert task.completed == 384 and task.speed is None
    clock.now = 110.0
    follower.apply("step", step(400))
    clock.now = 126.0
    follower.apply("step", step(408))  # half a step a second
    assert task.time_remaining == (1000 - 408) * 2
