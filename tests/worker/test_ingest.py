"""events.jsonl -> rows, exactly once, on hand-written events (no training)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from databases import POSTGRES, postgres_database
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from worker_support import MakeJob, read_job

from api.evaluations import metric_points
from store.db.migrate import upgrade
from store.db.models import Artifact, Checkpoint, Evaluation, JobEvent, Metric
from store.db.session import session_scope
from store.settings import Settings
from worker import ingest as ingest_module
from worker.ingest import ingest_events
from worker.runner import worker_name

EVAL_METRICS = {
    "AP": 12.5,
    "AP50": 30.0,
    "AP75": 10.0,
    "APs": None,
    "APm": 11.0,
    "APl": 14.0,
    "per_class": {"circle": 20.0},
    "backend": "faster-coco-eval",
    "num_images": 6,
    "num_detections": 40,
}
START = {
    "type": "start",
    "step": 0,
    "total_steps": 4,
    "resumed": False,
    "spec_hash": "f" * 64,
    "epoch": 0,
    "world_size": 1,
    "device": "cpu",
    "amp": False,
    "steps_per_epoch": 2,
    "num_classes": 1,
    "class_names": ["circle"],
}
EVENTS: list[dict[str, Any]] = [
    START,
    {"type": "step", "step": 1, "epoch": 0, "total_steps": 4, "lr": 0.01, "losses": {"loss": 2.5,
     "classification": 1.5}, "stats": {"tid/key_frac": 0.25}},
    {"type": "step", "step": 2, "epoch": 0, "total_steps": 4, "lr": 0.02,
     "losses": {"loss": "nan"}, "stats": {}},
    {"type": "grad_ratio", "step": 2, "method": "tid", "ratio": 40.0, "steps": 2,
     "helpful_range": [0.1, 10.0]},
    {"type": "warning", "step": 2, "message": "tid: ratio 40", "method": "tid", "ratio": 40.0,
     "helpful_range": [0.1, 10.0]},
    {"type": "checkpoint", "step": 2, "epoch": 1, "path": "checkpoints/epoch_0001.pt",
     "sha256": "a" * 64, "bytes": 123},
    {"type": "eval", "step": 2, "epoch": 1, "metrics": EVAL_METRICS},
    {"type": "eval", "step": 4, "epoch": 2, "metrics": {**EVAL_METRICS, "AP": 9.0}},
    {"type": "end", "step": 4, "metrics": {**EVAL_METRICS, "step": 4, "epoch": 2},
     "artifacts": {"student.pt": {"sha256": "b" * 64, "bytes": 7},
     "student.safetensors": {"sha256": "c" * 64, "bytes": 8}}},
    {"type": "error", "step": -1, "message": "boom", "kind": "RuntimeError", "retryable": False,
     "traceback": "x" * 10_000},
]  # fmt: skip


def step_event(step: int, loss: float) -> dict[str, Any]:
    return {"type": "step", "step": step, "epoch": 0, "total_steps": 4, "lr": 0.1,
            "losses": {"loss": loss}, "stats": {}}  # fmt: skip


RESUMED_AT_2 = {**START, "step": 2, "resumed": True, "epoch": 1}


@pytest.fixture(params=["sqlite"] + (["postgresql"] if POSTGRES else []))
def settings(request: pytest.FixtureRequest, settings: Settings) -> Iterator[Settings]:
    """The worker's settings, and on PostgreSQL too where `TID_TEST_POSTGRES_URL` is set
    (`.ci/run`): the metric upsert is spelled per dialect."""
    if request.param == "sqlite":
        yield settings
        return
    with postgres_database() as url:
        upgrade(url)
        yield Settings(**{**settings.model_dump(), "database_url": url})


def write_events(run_dir: Path, events: list[dict[str, Any]], *, tail: str = "") -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / "events.jsonl").open("a") as f:
        f.write("".join(json.dumps(e) + "\n" for e in events) + tail)


def ingest(settings: Settings, job_id: str, run_dir: Path, *, attempt: int = 1) -> int:
    with session_scope(settings.database_url) as session:
        return ingest_events(session, job_id, run_dir=run_dir, attempt=attempt)


def metric_rows(settings: Settings, job_id: str) -> list[tuple[int, int, str, float]]:
    """(attempt, step, name, value) of the job's metric rows in logging (id) order."""
    with session_scope(settings.database_url) as session:
        rows = session.execute(
            select(Metric.attempt, Metric.step, Metric.name, Metric.value)
            .where(Metric.job_id == job_id)
            .order_by(Metric.id)
        )
        return [(attempt, step, name, value) for attempt, step, name, value in rows]


def points_after(settings: Settings, job_id: str, after_id: int) -> list[Any]:
    """The API's metric points past the cursor `after_id`."""
    with session_scope(settings.database_url) as session:
        return metric_points(session, job_id, name=None, after_id=after_id, limit=1000)[0]


def count(settings: Settings, table: Any, job_id: str) -> int:
    with session_scope(settings.database_url) as session:
        return (
            session.scalar(select(func.count()).select_from(table).where(table.job_id == job_id))
            or 0
        )


def running_job(settings: Settings, make_job: MakeJob) -> str:
    return make_job(state="running", attempt=1, lease_owner=worker_name(settings))


def test_an_export_written_again_after_a_resume_updates_its_row(
    settings: Settings, make_job: MakeJob
) -> None:
    """A run that resumes after its end (its worker's lease ran out) exports again; the new
    file's bytes may differ, so the row (a download's ETag) must follow the file."""
    job_id = running_job(settings, make_job)
    run_dir = settings.jobs_dir / job_id
    end = EVENTS[-2]
    write_events(run_dir, [START, end])
    ingest(settings, job_id, run_dir)
    again = {**end, "artifacts": {"student.safetensors": {"sha256": "d" * 64, "bytes": 9}}}
    write_events(run_dir, [START, again])

    ingest(settings, job_id, run_dir)

    with session_scope(settings.database_url) as session:
        rows = {a.name: (a.sha256, a.bytes) for a in session.scalars(select(Artifact))}
    assert rows == {"student.pt": ("b" * 64, 7), "student.safetensors": ("d" * 64, 9)}


def test_a_resume_overwrites_the_points_it_logs_again_and_a_cursor_reads_them_next(
    settings: Settings, make_job: MakeJob
) -> None:
    """Attempt 2 resumes from step 2's checkpoint and logs steps 3 and 4 again: the series holds
    each (step, name) once, with the resumed run's value, and a client that read past the old
    points with the API's cursor reads the new ones next, in logging order."""
    job_id = running_job(settings, make_job)
    run_dir = settings.jobs_dir / job_id
    write_events(run_dir, [START, *(step_event(step, 10.0 - step) for step in (1, 2, 3, 4))])
    ingest(settings, job_id, run_dir)
    seen = points_after(settings, job_id, 0)
    write_events(run_dir, [RESUMED_AT_2, step_event(3, 0.3), step_event(4, 0.4)])

    ingest(settings, job_id, run_dir, attempt=2)

    kept = [(1, 1, "loss", 9.0), (1, 1, "lr", 0.1), (1, 2, "loss", 8.0), (1, 2, "lr", 0.1)]
    relogged = [(2, 3, "loss", 0.3), (2, 3, "lr", 0.1), (2, 4, "loss", 0.4), (2, 4, "lr", 0.1)]
    assert metric_rows(settings, job_id) == kept + relogged
    newer = points_after(settings, job_id, seen[-1].id)
    assert [(p.attempt, p.step, p.name, p.value) for p in newer] == relogged
    whole = points_after(settings, job_id, 0)
    assert [(p.attempt, p.step, p.name, p.value) for p in whole] == kept + relogged


def test_a_point_logged_twice_in_one_batch_keeps_the_later_value(
    settings: Settings, make_job: MakeJob
) -> None:
    """An orphaned trainer's last steps and the next attempt's re-log of them reach the
    database in one batch when the next attempt's worker ingests both."""
    job_id = running_job(settings, make_job)
    run_dir = settings.jobs_dir / job_id
    orphan = [START, *(step_event(step, 10.0 - step) for step in (1, 2, 3))]
    write_events(run_dir, [*orphan, RESUMED_AT_2, step_event(3, 0.3)])

    ingest(settings, job_id, run_dir, attempt=2)

    assert metric_rows(settings, job_id) == [
        (2, 1, "loss", 9.0),
        (2, 1, "lr", 0.1),
        (2, 2, "loss", 8.0),
        (2, 2, "lr", 0.1),
        (2, 3, "loss", 0.3),
        (2, 3, "lr", 0.1),
    ]


def test_one_upsert_statement_never_names_a_point_twice(
    settings: Settings, make_job: MakeJob, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A driver that sends the batch as one statement would fail on PostgreSQL with "ON
    CONFLICT DO UPDATE command cannot affect row a second time"."""
    batches: list[list[tuple[int, str, float]]] = []
    upsert = ingest_module._upsert_metrics

    def recording(session: Session, points: list[dict[str, Any]]) -> None:
        batches.append([(p["step"], p["name"], p["value"]) for p in points])
        upsert(session, points)

    monkeypatch.setattr(ingest_module, "_upsert_metrics", recording)
    job_id = running_job(settings, make_job)
    run_dir = settings.jobs_dir / job_id
    write_events(run_dir, [START, step_event(1, 9.0), RESUMED_AT_2, step_event(1, 0.9)])

    ingest(settings, job_id, run_dir, attempt=2)

    assert batches == [[(1, "loss", 0.9), (1, "lr", 0.1)]]


def test_ingest_turns_every_event_into_rows(settings: Settings, make_job: MakeJob) -> None:
    job_id = running_job(settings, make_job)
    run_dir = settings.jobs_dir / job_id
    write_events(run_dir, EVENTS)

    assert ingest(settings, job_id, run_dir) == len(EVENTS)

    job = read_job(settings, job_id)
    # the end event (step 4) moves the job's step past the last logged step event (2)
    assert (job.step, job.total_steps) == (4, 4)
    assert job.events_offset == (run_dir / "events.jsonl").stat().st_size
    with session_scope(settings.database_url) as session:
        metrics = {
            (m.step, m.name): m.value
            for m in session.scalars(select(Metric).where(Metric.job_id == job_id))
        }
        assert metrics == {  # mAP is in evaluations only
            (1, "loss"): 2.5,
            (1, "classification"): 1.5,
            (1, "lr"): 0.01,
            (1, "tid/key_frac"): 0.25,
            (2, "lr"): 0.02,  # the non-finite loss is skipped, not stored as a number
        }
        evaluations = list(session.scalars(select(Evaluation).order_by(Evaluation.id)))
        first = evaluations[0]
        assert (first.ap, first.ap50, first.aps, first.epoch, first.step) == (
            12.5,
            30.0,
            None,
            1,
            2,
        )
        assert [e.ap for e in evaluations] == [12.5, 9.0]
        assert (first.per_class, first.backend) == ({"circle": 20.0}, "faster-coco-eval")
        ckpt = session.scalars(select(Checkpoint)).one()
        assert (ckpt.path, ckpt.sha256, ckpt.bytes, ckpt.epoch, ckpt.step) == (
            "checkpoints/epoch_0001.pt", "a" * 64, 123, 1, 2,
        )  # fmt: skip
        artifacts = {a.name: (a.path, a.sha256, a.bytes) for a in session.scalars(select(Artifact))}
        assert artifacts == {
            "student.pt": ("student.pt", "b" * 64, 7),
            "student.safetensors": ("student.safetensors", "c" * 64, 8),
        }
        events = list(session.scalars(select(JobEvent).order_by(JobEvent.id)))
        assert [e.type for e in events] == [e["type"] for e in EVENTS]
        assert events[1].data["losses"] == {"loss": 2.5, "classification": 1.5}
        assert events[2].data["losses"] == {"loss": "nan"}  # as written: JSON has no NaN
        warning = next(e for e in events if e.type == "warning")
        assert warning.data["message"] == "tid: ratio 40"
        assert warning.data["helpful_range"] == [0.1, 10.0]
        assert len(events[-1].data["traceback"]) < 10_000


def test_ingest_twice_adds_nothing(settings: Settings, make_job: MakeJob) -> None:
    job_id = running_job(settings, make_job)
    run_dir = settings.jobs_dir / job_id
    write_events(run_dir, EVENTS)
    ingest(settings, job_id, run_dir)
    tables = (Metric, Evaluation, Checkpoint, Artifact, JobEvent)
    before = [count(settings, t, job_id) for t in tables]

    assert ingest(settings, job_id, run_dir) == 0

    assert [count(settings, t, job_id) for t in tables] == before


def test_ingest_waits_for_a_partial_line(settings: Settings, make_job: MakeJob) -> None:
    job_id = running_job(settings, make_job)
    run_dir = settings.jobs_dir / job_id
    whole = json.dumps(EVENTS[1])
    write_events(run_dir, EVENTS[:1], tail=whole[:20])

    assert ingest(settings, job_id, run_dir) == 1
    assert count(settings, Metric, job_id) == 0

    write_events(run_dir, [], tail=whole[20:] + "\n")
    assert ingest(settings, job_id, run_dir) == 1
    assert count(settings, Metric, job_id) == 4


def test_ingest_rolled_back_is_ingested_again(settings: Settings, make_job: MakeJob) -> None:
    """A worker that dies before its commit leaves offset and rows as they were."""
    job_id = running_job(settings, make_job)
    run_dir = settings.jobs_dir / job_id
    write_events(run_dir, EVENTS[:2])
    with session_scope(settings.database_url) as session:
        ingest_events(session, job_id, run_dir=run_dir, attempt=1)
        session.rollback()
    assert read_job(settings, job_id).events_offset == 0

    assert ingest(settings, job_id, run_dir) == 2
    assert count(settings, Metric, job_id) == 4


def test_ingest_skips_a_line_that_is_no_event_and_goes_on(
    settings: Settings, make_job: MakeJob, caplog: pytest.LogCaptureFixture
) -> None:
    job_id = running_job(settings, make_job)
    run_dir = settings.jobs_dir / job_id
    bad = {"type": "checkpoint", "step": 1, "path": "checkpoints/last.pt"}  # no sha256/bytes/epoch
    good = {"type": "step", "step": 2, "epoch": 0, "total_steps": 4, "lr": 0.1,
            "losses": {"loss": 1.5}, "stats": {}}  # fmt: skip
    unknown = {"type": "telemetry", "step": 2}  # e.g. a newer trainer's
    write_events(run_dir, [bad, good, unknown], tail='[1, 2]\n{"type": "st\n')

    with caplog.at_level(logging.WARNING, logger="worker.ingest"):
        assert ingest(settings, job_id, run_dir) == 1
    job = read_job(settings, job_id)
    assert job.events_offset == (run_dir / "events.jsonl").stat().st_size  # not stuck on them
    assert job.step == 2
    with session_scope(settings.database_url) as session:
        assert session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id)).all() == []
        names = {m.name for m in session.scalars(select(Metric).where(Metric.job_id == job_id))}
        assert count(settings, JobEvent, job_id) == 1
    assert names == {"loss", "lr"}
    reasons = [m for r in caplog.records if "skipping an event line" in (m := r.getMessage())]
    assert len(reasons) == 4  # each with why, in one place
    assert "checkpoint.epoch: Field required" in reasons[0]
    assert "does not match any of the expected tags" in reasons[1]
    assert "Input should be an object" in reasons[2]
    assert "Invalid JSON" in reasons[3]
