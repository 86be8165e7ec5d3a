"""Turn the trainer's `events.jsonl` into rows, exactly once.

The file is append-only and `jobs.events_offset` counts the bytes already turned into rows. The
rows of a batch of events and the new offset are written in the caller's transaction, and the
offset moves by compare-and-set, so a worker that crashes before its commit, or two workers
that race, never ingest a line twice or skip one.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from sqlalchemy import CursorResult, select, update
from sqlalchemy.orm import Session

from store.db.models import Artifact, Base, Checkpoint, Evaluation, Job, JobEvent, Metric

log = logging.getLogger(__name__)

EVENTS_FILE = "events.jsonl"
MAX_NAME_CHARS = 64  # metrics.name
MAX_TRACEBACK_CHARS = 4000  # the event keeps a traceback's end; train.log has all of it
EVAL_COLUMNS = {
    "AP": "ap",
    "AP50": "ap50",
    "AP75": "ap75",
    "APs": "aps",
    "APm": "apm",
    "APl": "apl",
}


def _number(value: Any) -> float | None:
    """A finite float, or None: the trainer writes non-finite values as strings."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _read_new_lines(path: Path, offset: int) -> tuple[list[bytes], int]:
    """Complete lines after byte `offset` and the offset just past the last of them."""
    if not path.exists():
        return [], offset
    with path.open("rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1  # a trailing partial line waits for its newline
    return data[:end].splitlines(), offset + end


class _Batch:
    """The rows and job columns that a run of events turns into."""

    def __init__(
        self, job_id: str, *, attempt: int, best_ap: float | None, artifacts: set[str]
    ) -> None:
        self.job_id, self.attempt = job_id, attempt
        self.rows: list[Base] = []
        self.values: dict[str, Any] = {}
        self.best_ap = best_ap
        self.artifacts = artifacts  # names that already have a row

    def metric(self, step: int, name: str, value: Any) -> None:
        number = _number(value)
        if number is None:
            log.warning(
                "job %s step %d: %s=%r is not a finite number", self.job_id, step, name, value
            )
            return
        self.rows.append(
            Metric(
                job_id=self.job_id,
                attempt=self.attempt,
                step=step,
                name=name[:MAX_NAME_CHARS],
                value=number,
            )
        )

    def add_whole(self, event: dict[str, Any]) -> bool:
        """`add` all of the event or nothing of it; False when its fields have the wrong shape."""
        saved = (len(self.rows), dict(self.values), self.best_ap, set(self.artifacts))
        try:
            self.add(event)
        except (KeyError, TypeError, ValueError, AttributeError):
            del self.rows[saved[0] :]
            self.values, self.best_ap, self.artifacts = saved[1], saved[2], saved[3]
            return False
        return True

    def add(self, event: dict[str, Any]) -> None:
        kind, step = event["type"], int(event.get("step", 0))
        if kind in ("start", "step") and event.get("total_steps") is not None:
            self.values["total_steps"] = int(event["total_steps"])
        if kind != "error":  # every other event says where training stands (steps are logged
            self.values["step"] = step  # only every log_every; checkpoints and the end are not)
        if kind == "step":
            for name, value in event.get("losses", {}).items():
                self.metric(step, name, value)
            self.metric(step, "lr", event.get("lr"))
            for name, value in event.get("stats", {}).items():
                self.metric(step, name, value)
        elif kind == "eval":
            self._eval(event, step)
        elif kind == "checkpoint":
            self.rows.append(
                Checkpoint(
                    job_id=self.job_id,
                    attempt=self.attempt,
                    epoch=int(event["epoch"]),
                    step=step,
                    path=event["path"],
                    sha256=event["sha256"],
                    bytes=int(event["bytes"]),
                )
            )
        elif kind == "end":
            for name, info in event.get("artifacts", {}).items():
                if name not in self.artifacts:  # a re-run after the end re-exports the same names
                    self.artifacts.add(name)
                    self.rows.append(
                        Artifact(
                            job_id=self.job_id,
                            name=name,
                            path=name,
                            sha256=info["sha256"],
                            bytes=int(info["bytes"]),
                        )
                    )
        data = {k: v for k, v in event.items() if k != "type"}
        if isinstance(data.get("traceback"), str):
            data["traceback"] = data["traceback"][-MAX_TRACEBACK_CHARS:]
        self.rows.append(JobEvent(job_id=self.job_id, attempt=self.attempt, type=kind, data=data))

    def _eval(self, event: dict[str, Any], step: int) -> None:
        metrics = event.get("metrics", {})
        columns = {col: _number(metrics.get(key)) for key, col in EVAL_COLUMNS.items()}
        self.rows.append(
            Evaluation(
                job_id=self.job_id,
                attempt=self.attempt,
                epoch=int(event.get("epoch", 0)),
                step=step,
                per_class=metrics.get("per_class") or {},
                backend=str(metrics.get("backend", "")),
                **columns,
            )
        )
        for key in EVAL_COLUMNS:
            if _number(metrics.get(key)) is not None:
                self.metric(step, f"eval/{key}", metrics[key])
        ap = columns["ap"]
        if ap is not None and (self.best_ap is None or ap > self.best_ap):
            self.best_ap = self.values["best_ap"] = ap


def ingest_events(session: Session, job_id: str, *, run_dir: Path, attempt: int) -> int:
    """Add rows for the complete events past `jobs.events_offset`; returns how many.

    Nothing is committed here: the caller commits rows and offset together. Returns 0 without
    adding anything when another session moved the offset first.
    """
    offset, best_ap = session.execute(
        select(Job.events_offset, Job.best_ap).where(Job.id == job_id)
    ).one()
    lines, new_offset = _read_new_lines(run_dir / EVENTS_FILE, offset)
    if new_offset == offset:
        return 0
    artifacts = set(session.scalars(select(Artifact.name).where(Artifact.job_id == job_id)))
    batch = _Batch(job_id, attempt=attempt, best_ap=best_ap, artifacts=artifacts)
    count = 0
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            event = None
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            log.warning("job %s: skipping a malformed event line %r", job_id, line[:200])
            continue
        if not batch.add_whole(event):  # a line of the wrong shape must not stall the job
            log.warning("job %s: skipping an event of the wrong shape %r", job_id, line[:200])
            continue
        count += 1
    moved = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.events_offset == offset)
        .values(events_offset=new_offset, **batch.values)
    )
    if not (isinstance(moved, CursorResult) and moved.rowcount == 1):
        log.info("job %s: events past byte %d were ingested by another session", job_id, offset)
        return 0
    session.add_all(batch.rows)
    return count
