"""`tid watch`'s progress bar: its ETA follows the job's live pace, not a replay of its history."""

from __future__ import annotations

import io
from typing import Any

from rich.console import Console
from rich.progress import Progress, Task

from cli.terminal import Follower


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def step(n: int, attempt: int = 1) -> dict[str, Any]:
    return {"step": n, "epoch": 0, "total_steps": 1000, "losses": {"loss": 1.0}, "attempt": attempt}


def start(n: int, attempt: int) -> dict[str, Any]:
    return {"step": n, "total_steps": 1000, "attempt": attempt}


def following(job_step: int, attempt: int) -> tuple[Follower, Task, Console, Clock]:
    """A follower attached to a running job, with rich on a clock the test moves."""
    clock = Clock()
    console = Console(file=io.StringIO(), width=200)
    progress = Progress(console=console, get_time=clock)
    job = {
        "id": "0123456789",
        "name": "j",
        "state": "running",
        "attempt": attempt,
        "step": job_step,
        "total_steps": 1000,
        "best_ap": None,
        "spec": {"schedule": {"epochs": 1}},
    }
    follower = Follower(progress, job)
    (task,) = progress.tasks
    return follower, task, console, clock


def test_eta_ignores_the_replayed_history_and_restarts_with_a_resumed_attempt() -> None:
    follower, task, console, clock = following(job_step=900, attempt=1)

    follower.apply("start", start(0, attempt=1))
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
    follower.apply("start", start(384, attempt=2))
    assert task.completed == 384 and task.speed is None
    clock.now = 110.0
    follower.apply("step", step(400, attempt=2))
    clock.now = 126.0
    follower.apply("step", step(408, attempt=2))  # half a step a second
    assert task.time_remaining == (1000 - 408) * 2


def test_an_earlier_attempt_past_the_attach_step_is_history_too() -> None:
    """Attached to attempt 2 at step 400 (resumed from 384) after attempt 1 reached 940: none
    of attempt 1's steps, though past 400, is the job's pace."""
    follower, task, _, clock = following(job_step=400, attempt=2)

    follower.apply("start", start(0, attempt=1))
    for n in range(100, 1000, 40):  # attempt 1's history, up to step 940
        follower.apply("step", step(n))
    follower.apply("start", start(384, attempt=2))
    follower.apply("step", step(392, attempt=2))
    assert task.completed == 400 and task.speed is None

    clock.now = 10.0
    follower.apply("step", step(410, attempt=2))
    clock.now = 30.0
    follower.apply("step", step(430, attempt=2))  # a step a second, live
    assert task.completed == 430 and task.time_remaining == 570
