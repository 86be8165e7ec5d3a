"""What the CLI shows of jobs in a terminal: live progress (`tid watch`, `tid submit --wait`)
and mAP tables (`tid compare`, the demo).

The progress bar (step of total, ETA, latest loss, last AP, state and phase) follows the
Server-Sent Events the API streams; a line per state change and per evaluation stays above it,
so the output also reads well when it is not a terminal (a log, CI).
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from cli.client import Client
from tid_core.events import COCO_STATS
from tid_core.recipes import format_table


def _bar(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        TextColumn("{task.fields[state]:<9} epoch {task.fields[epoch]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("loss {task.fields[loss]}  AP {task.fields[ap]}"),
        console=console,
    )


def watch(client: Client, job_id: str, *, console: Console) -> dict[str, Any]:
    """Follow `job_id` until it is final; returns the job as the API has it then."""
    job = client.job(job_id)
    with _bar(console) as progress:
        follower = Follower(progress, job)
        for kind, data in client.events(job_id):
            follower.apply(kind, data)
    final: dict[str, Any] = client.job(job_id)
    return final


class Follower:
    """Moves one job's progress bar with its events.

    The stream opens with the job's history, sent in a burst: its state changes and
    evaluations are printed, but the bar moves only with what happens after the watch began
    (the attempt running then, from the step it was at; any later attempt), since rich would
    take the burst for the job's pace and show an ETA of seconds. A later attempt's `start`
    (maybe resumed from an earlier checkpoint) resets the bar, so the ETA is that attempt's
    own pace.
    """

    def __init__(self, progress: Progress, job: dict[str, Any]) -> None:
        self.progress = progress
        self.epochs = job["spec"]["schedule"]["epochs"]
        self.attempt = job.get("attempt") or 0
        self.attached_at = job.get("step") or 0
        self.task = progress.add_task(
            f"{job['name']} ({job['id'][:8]})",
            total=job.get("total_steps"),
            completed=self.attached_at,
            state=job["state"],
            epoch=f"-/{self.epochs}",
            loss="-",
            ap="-" if job.get("best_ap") is None else f"{job['best_ap']:.1f}",
        )

    def _live(self, data: dict[str, Any]) -> bool:
        """Whether a `start` or `step` event is new rather than replayed history (an older
        server sends no attempt: its events count as the attached attempt's)."""
        attempt = data.get("attempt", self.attempt)
        if attempt != self.attempt:
            return bool(attempt > self.attempt)
        return bool(data["step"] >= self.attached_at)

    def apply(self, kind: str, data: dict[str, Any]) -> None:
        progress, task = self.progress, self.task
        if kind == "state":
            reason = data.get("error") or data.get("reason")
            progress.console.print(f"state {data['state']}" + (f": {reason}" if reason else ""))
            progress.update(task, state=data["state"])
        elif kind == "start" and self._live(data):
            progress.reset(task, total=data.get("total_steps"), completed=data["step"])
        elif kind == "phase":
            progress.update(task, state=data["phase"])
        elif kind == "step" and self._live(data):
            loss = data.get("losses", {}).get("loss")
            progress.update(
                task, completed=data["step"], epoch=f"{data['epoch'] + 1}/{self.epochs}"
            )
            if isinstance(loss, int | float):
                progress.update(task, loss=f"{loss:.3f}")
        elif kind == "eval":
            metrics = data.get("metrics", {})
            progress.console.print(
                f"epoch {data.get('epoch')}: AP {metrics.get('AP', 0):.1f}  "
                f"AP50 {metrics.get('AP50', 0):.1f}  AP75 {metrics.get('AP75', 0):.1f}"
            )
            progress.update(task, ap=f"{metrics.get('AP', 0):.1f}")


def evaluation_table(client: Client, jobs: dict[str, str]) -> str:
    """A mAP table (label -> job id) from each job's last evaluation, as the API reports it."""
    rows = {}
    for label, job_id in jobs.items():
        evaluations = client.metrics(job_id)["evaluations"]
        last = evaluations[-1] if evaluations else {}
        rows[label] = {name: last.get(name.lower()) for name in COCO_STATS}
    return format_table(rows)
