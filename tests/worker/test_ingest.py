"""events.jsonl -> rows, exactly once, on hand-written events (no training)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from worker_support import MakeJob, read_job

from store.db.models import Artifact, Checkpoint, Evaluation, JobEvent, Metric
from store.db.session import session_scope
from store.settings import Settings
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
}
EVENTS: list[dict[str, Any]] = [
    {"type": "start", "step": 0, "total_steps": 4, "resumed": False},
    {"type": "step", "step": 1, "total_steps": 4, "lr": 0.01, "losses": {"loss": 2.5,
     "classification": 1.5}, "stats": {"tid/key_frac": 0.25}},
    {"type": "step", "step": 2, "total_steps": 4, "lr": 0.02, "losses": {"loss": "nan"},
     "stats": {}},
    {"type": "checkpoint", "step": 2, "epoch": 1, "path": "checkpoints/epoch_0001.pt",
     "sha256": "a" * 64, "bytes": 123},
    {"type": "eval", "step": 2, "epoch": 1, "metrics": EVAL_METRICS},
    {"type": "eval", "step": 4, "epoch": 2, "metrics": {**EVAL_METRICS, "AP": 9.0}},
    {"type": "end", "step": 4, "artifacts": {"student.pt": {"sha256": "b" * 64, "bytes": 7},
     "student.safetensors": {"sha256": "c" * 64, "bytes": 8}}},
    {"type": "error", "step": -1, "message": "boom", "traceback": "x" * 10_000},
]  # fmt: skip


def write_events(run_dir: Path, events: list[dict[str, Any]], *, tail: str = "") -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / "events.jsonl").open("a") as f:
        f.write("".join(json.dumps(e) + "\n" for e in events) + tail)


def ingest(settings: Settings, job_id: str, run_dir: Path) -> int:
    with session_scope(settings.database_url) as session:
        return ingest_events(session, job_id, run_dir=run_dir, attempt=1)


def count(settings: Settings, table: Any, job_id: str) -> int:
    with session_scope(settings.database_url) as session:
        return (
            session.scalar(select(func.count()).select_from(table).where(table.job_id == job_id))
            or 0
        )


def running_job(settings: Settings, make_job: MakeJob) -> str:
    return make_job(state="running", attempt=1, lease_owner=worker_name(settings))


def test_ingest_turns_every_event_into_rows(settings: Settings, make_job: MakeJob) -> None:
    job_id = running_job(settings, make_job)
    run_dir = settings.jobs_dir / job_id
    write_events(run_dir, EVENTS)

    assert ingest(settings, job_id, run_dir) == len(EVENTS)

    job = read_job(settings, job_id)
    # the end event (step 4) moves the job's step past the last logged step event (2)
    assert (job.step, job.total_steps, job.best_ap) == (4, 4, 12.5)
    assert job.events_offset == (run_dir / "events.jsonl").stat().st_size
    with session_scope(settings.database_url) as session:
        metrics = {
            (m.step, m.name): m.value
            for m in session.scalars(select(Metric).where(Metric.job_id == job_id))
        }
        assert metrics == {
            (1, "loss"): 2.5,
            (1, "classification"): 1.5,
            (1, "lr"): 0.01,
            (1, "tid/key_frac"): 0.25,
            (2, "lr"): 0.02,  # the non-finite loss is skipped, not stored as a number
            (2, "eval/AP"): 12.5,
            (2, "eval/AP50"): 30.0,
            (2, "eval/AP75"): 10.0,
            (2, "eval/APm"): 11.0,
            (2, "eval/APl"): 14.0,
            (4, "eval/AP"): 9.0,
            (4, "eval/AP50"): 30.0,
            (4, "eval/AP75"): 10.0,
            (4, "eval/APm"): 11.0,
            (4, "eval/APl"): 14.0,
        }
        first = session.scalars(select(Evaluation).order_by(Evaluation.id)).first()
        assert first is not None
        assert (first.ap, first.ap50, first.aps, first.epoch, first.step) == (
            12.5,
            30.0,
            None,
            1,
            2,
        )
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


def test_ingest_skips_an_event_of_the_wrong_shape_and_goes_on(
    settings: Settings, make_job: MakeJob
) -> None:
    job_id = running_job(settings, make_job)
    run_dir = settings.jobs_dir / job_id
    bad = {"type": "checkpoint", "step": 1, "path": "checkpoints/last.pt"}  # no sha256/bytes/epoch
    good = {"type": "step", "step": 2, "total_steps": 4, "lr": 0.1, "losses": {"loss": 1.5}}
    write_events(run_dir, [bad, good])

    assert ingest(settings, job_id, run_dir) == 1
    job = read_job(settings, job_id)
    assert job.events_offset == (run_dir / "events.jsonl").stat().st_size  # not stuck on it
    assert job.step == 2
    with session_scope(settings.database_url) as session:
        assert session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id)).all() == []
        names = {m.name for m in session.scalars(select(Metric).where(Metric.job_id == job_id))}
    assert names == {"loss", "lr"}
