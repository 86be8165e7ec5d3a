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

from api.client import Client
from tid_core.recipes import METRICS, format_table

EVALUATION_COLUMNS = ("ap", "ap50", "ap75", "aps", "apm", "apl")  # in the order of METRICS


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
    ap = "-" if job.get("best_ap") is None else f"{job['best_ap']:.1f}"
    epochs = job["spec"]["schedule"]["epochs"]
    with _bar(console) as progress:
        task = progress.add_task(
            f"{job['name']} ({job_id[:8]})",
            total=job.get("total_steps"),
            completed=job.get("step", 0),
            state=job["state"],
            epoch=f"-/{epochs}",
            loss="-",
            ap=ap,
        )
        for kind, data in client.events(job_id):
            if kind == "state":
                reason = data.get("error") or data.get("reason")
                progress.console.print(f"state {data['state']}" + (f": {reason}" if reason else ""))
                progress.update(task, state=data["state"])
            elif kind == "start":
                progress.update(task, total=data.get("total_steps"), completed=data["step"])
            elif kind == "phase":
                progress.update(task, state=data["phase"])
            elif kind == "step":
                loss = data.get("losses", {}).get("loss")
                progress.update(task, completed=data["step"], epoch=f"{data['epoch'] + 1}/{epochs}")
                if isinstance(loss, int | float):
                    progress.update(task, loss=f"{loss:.3f}")
            elif kind == "eval":
                metrics = data.get("metrics", {})
                progress.console.print(
                    f"epoch {data.get('epoch')}: AP {metrics.get('AP', 0):.1f}  "
                    f"AP50 {metrics.get('AP50', 0):.1f}  AP75 {metrics.get('AP75', 0):.1f}"
                )
                progress.update(task, ap=f"{metrics.get('AP', 0):.1f}")
    final: dict[str, Any] = client.job(job_id)
    return final


def evaluation_table(client: Client, jobs: dict[str, str]) -> str:
    """A mAP table (label -> job id) from each job's last evaluation, as the API reports it."""
    rows = {}
    for label, job_id in jobs.items():
        evaluations = client.metrics(job_id)["evaluations"]
        last = evaluations[-1] if evaluations else {}
        rows[label] = {m: last.get(c) for m, c in zip(METRICS, EVALUATION_COLUMNS, strict=True)}
    return format_table(rows)
