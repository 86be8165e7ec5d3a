"""Turn the trainer's `events.jsonl` into rows, exactly once.

The file is append-only and `jobs.events_offset` counts the bytes already turned into rows. The
rows of a batch of events and the new offset are written in the caller's transaction, and the
offset moves by compare-and-set, so a worker that crashes before its commit, or two workers
that race, never ingest a line twice or skip one. Each line is parsed into its event type
(`tid_core.events`); a line that is not one is logged and skipped, so it never stalls the job.

A resumed attempt logs again the steps after its checkpoint. Metric rows are keyed by (job,
step, name) and upserted, so the job's series holds each point once, with the value and the
attempt that logged it last. The re-logged row takes a new id, the next in logging order: the
API's `after_id` cursor is a row id, and a client that already read the old point sees the new
one on its next read.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy import CursorResult, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from store.db.models import Artifact, Base, Checkpoint, Evaluation, Job, JobEvent, Metric
from tid_core.events import (
    COCO_STATS,
    CheckpointEvent,
    EndEvent,
    ErrorEvent,
    EvalEvent,
    Event,
    StartEvent,
    StepEvent,
    as_record,
    parse_event,
)

log = logging.getLogger(__name__)

EVENTS_FILE = "events.jsonl"
MAX_NAME_CHARS = 64  # metrics.name
MAX_TRACEBACK_CHARS = 4000  # the event keeps a traceback's end; train.log has all of it
MAX_LOGGED_CHARS = 200  # of a skipped line


def _finite_or_none(value: float | None) -> float | None:
    """A column value: the trainer writes NaN/inf as strings, which parse back to floats."""
    return value if value is not None and math.isfinite(value) else None


def _read_new_lines(path: Path, offset: int) -> tuple[list[bytes], int]:
    """Complete lines after byte `offset` and the offset just past the last of them."""
    if not path.exists():
        return [], offset
    with path.open("rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1  # a trailing partial line waits for its newline
    return data[:end].splitlines(), offset + end


def _parse(job_id: str, line: bytes) -> Event | None:
    """The line's event, or None (logged with why) for a line that is not one: not JSON, an
    unknown type, a missing field or one of the wrong type."""
    try:
        return parse_event(line)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"])
        log.warning(
            "job %s: skipping an event line (%s%s; %d error(s)): %r",
            job_id,
            f"{where}: " if where else "",
            first["msg"],
            exc.error_count(),
            line[:MAX_LOGGED_CHARS],
        )
        return None


class _Batch:
    """The rows and job columns that a run of events turns into."""

    def __init__(self, job_id: str, *, attempt: int, artifacts: set[str]) -> None:
        self.job_id, self.attempt = job_id, attempt
        self.rows: list[Base] = []
        # (step, name) -> the point's columns, in logging order; a point logged again in the
        # same batch moves to its end with its later value: a driver that sends the batch as
        # one statement may not upsert a row twice ("cannot affect row a second time")
        self.metrics: dict[tuple[int, str], dict[str, Any]] = {}
        self.values: dict[str, Any] = {}
        self.artifacts = artifacts  # names that already have a row
        # name -> (sha256, bytes) of a file with a row whose export was written again: the row
        # must describe the file as it is now, or a download's ETag and checksum go stale
        self.rewritten: dict[str, tuple[str, int]] = {}

    def metric(self, step: int, name: str, value: float) -> None:
        if not math.isfinite(value):  # the trainer logs NaN/inf as strings; no row holds them
            log.warning(
                "job %s step %d: %s=%r is not a finite number", self.job_id, step, name, value
            )
            return
        key = (step, name[:MAX_NAME_CHARS])
        self.metrics.pop(key, None)
        self.metrics[key] = {
            "job_id": self.job_id,
            "attempt": self.attempt,
            "step": step,
            "name": key[1],
            "value": value,
        }

    def add(self, event: Event) -> None:
        if isinstance(event, StartEvent | StepEvent):
            self.values["total_steps"] = event.total_steps
        if not isinstance(event, ErrorEvent):  # every other event says where training stands
            self.values["step"] = event.step  # (steps are logged only every log_every)
        if isinstance(event, StepEvent):
            for name, value in event.losses.items():
                self.metric(event.step, name, value)
            self.metric(event.step, "lr", event.lr)
            for name, value in event.stats.items():
                self.metric(event.step, name, value)
        elif isinstance(event, EvalEvent):
            self._evaluation(event)
        elif isinstance(event, CheckpointEvent):
            self.rows.append(
                Checkpoint(
                    job_id=self.job_id,
                    attempt=self.attempt,
                    epoch=event.epoch,
                    step=event.step,
                    path=event.path,
                    sha256=event.sha256,
                    bytes=event.bytes,
                )
            )
        elif isinstance(event, EndEvent):
            for name, info in event.artifacts.items():
                if name in self.artifacts:  # a re-run after the end exported it again
                    self.rewritten[name] = (info.sha256, info.bytes)
                    continue
                self.artifacts.add(name)
                self.rows.append(
                    Artifact(
                        job_id=self.job_id,
                        name=name,
                        path=name,
                        sha256=info.sha256,
                        bytes=info.bytes,
                    )
                )
        data = as_record(event)
        del data["type"]
        if isinstance(event, ErrorEvent):
            data["traceback"] = event.traceback[-MAX_TRACEBACK_CHARS:]
        self.rows.append(
            JobEvent(job_id=self.job_id, attempt=self.attempt, type=event.type, data=data)
        )

    def _evaluation(self, event: EvalEvent) -> None:
        """The one place the database keeps mAP: the API derives `best_ap` and the `eval/AP`
        points from these rows."""
        metrics = event.metrics
        self.rows.append(
            Evaluation(
                job_id=self.job_id,
                attempt=self.attempt,
                epoch=event.epoch,
                step=event.step,
                per_class={name: _finite_or_none(ap) for name, ap in metrics.per_class.items()},
                backend=metrics.backend,
                **{name.lower(): _finite_or_none(getattr(metrics, name)) for name in COCO_STATS},
            )
        )


def _upsert_metrics(session: Session, points: list[dict[str, Any]]) -> None:
    """Insert the points, or overwrite the row a point with the same (job, step, name) has.

    The overwritten row also takes the new row's id (`excluded.id`: the one the insert drew
    from the sequence, or SQLite's next rowid), so it moves to the end of the logging order.
    """
    dialect = session.get_bind().dialect.name
    stmt: postgresql.Insert | sqlite.Insert
    if dialect == "postgresql":
        stmt = postgresql.insert(Metric)
    elif dialect == "sqlite":
        stmt = sqlite.insert(Metric)
    else:
        raise NotImplementedError(f"no metric upsert for the {dialect} dialect")
    moved = ("id", "attempt", "value", "created_at")
    session.execute(
        stmt.on_conflict_do_update(
            index_elements=[Metric.job_id, Metric.step, Metric.name],
            set_={column: stmt.excluded[column] for column in moved},
        ),
        points,
    )


def ingest_events(session: Session, job_id: str, *, run_dir: Path, attempt: int) -> int:
    """Add rows for the complete events past `jobs.events_offset`; returns how many.

    Nothing is committed here: the caller commits rows and offset together. Returns 0 without
    adding anything when another session moved the offset first.
    """
    offset = session.execute(select(Job.events_offset).where(Job.id == job_id)).scalar_one()
    lines, new_offset = _read_new_lines(run_dir / EVENTS_FILE, offset)
    if new_offset == offset:
        return 0
    artifacts = set(session.scalars(select(Artifact.name).where(Artifact.job_id == job_id)))
    batch = _Batch(job_id, attempt=attempt, artifacts=artifacts)
    count = 0
    for line in lines:
        event = _parse(job_id, line)
        if event is not None:
            batch.add(event)
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
    if batch.metrics:
        _upsert_metrics(session, list(batch.metrics.values()))
    for name, (sha256, size) in batch.rewritten.items():
        session.execute(
            update(Artifact)
            .where(Artifact.job_id == job_id, Artifact.name == name)
            .values(sha256=sha256, bytes=size)
        )
    return count
