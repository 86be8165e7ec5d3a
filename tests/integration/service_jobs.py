"""Jobs for the whole-service tests: tiny specs, a dataset, and reading back what happened."""

from __future__ import annotations

import hashlib
import math
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from cli.client import Client
from store.db.models import Artifact, Checkpoint, Evaluation, Job, JobEvent, Metric
from store.db.session import TRANSIENT_ERRORS, session_scope
from store.settings import Settings
from tid_core.events import read_events

FINAL = ("succeeded", "failed", "cancelled")


def tiny_spec(dataset_id: str, name: str, **overrides: Any) -> dict[str, Any]:
    """ResNet18-FPN64 at 64 px, batch 4, a data loader worker process (as the spec's default
    has two: the trainer's process tree is what deploys, cancels and faults signal); blocks
    given in `overrides` are merged."""
    spec: dict[str, Any] = {
        "name": name,
        "student": {"arch": "fcos", "backbone": "resnet18", "fpn_channels": 64},
        "dataset": {"id": dataset_id, "input_size": 64},
        "schedule": {"epochs": 2, "batch_size": 4, "warmup_iters": 2, "log_every": 1},
        "resources": {"num_workers": 1, "device": "cpu"},
    }
    for key, value in overrides.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    return spec


def teacher_of(job_id: str) -> dict[str, Any]:
    """The spec's teacher entry for the student exported by a finished `tiny_spec` job."""
    return {"arch": "fcos", "backbone": "resnet18", "fpn_channels": 64, "weights": {"job": job_id}}


def make_dataset(client: Client, *, num_train: int = 16, num_val: int = 4) -> str:
    body = {
        "name": "tiny",
        "builtin": "shapes",
        "num_train": num_train,
        "num_val": num_val,
        "image_size": 64,
    }
    ds = client.create_dataset(body)
    ds = client.wait(
        lambda: client.dataset(ds["id"]),
        done=lambda d: d["state"] != "pending",
        timeout=120,
        interval=0.3,
    )
    assert ds["state"] == "ready", ds
    assert (ds["num_train"], ds["num_val"]) == (num_train, num_val)
    return str(ds["id"])


def read_job(settings: Settings, job_id: str) -> Job:
    """The job row, straight from the database (waits out a database restart)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            with session_scope(settings.database_url) as session:
                job = session.get_one(Job, job_id)
                session.expunge(job)
                return job
        except TRANSIENT_ERRORS:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def wait_job(
    settings: Settings,
    job_id: str,
    done: Callable[[Job], bool] = lambda j: j.state in FINAL,
    *,
    logs: Callable[[], str] = lambda: "",
    timeout: float = 300,
) -> Job:
    deadline = time.monotonic() + timeout
    while not done(job := read_job(settings, job_id)):
        if time.monotonic() > deadline:
            pytest.fail(f"job {job_id} stuck in {job.state} at step {job.step}:\n{logs()}")
        time.sleep(0.2)
    return job


def state_events(settings: Settings, job_id: str) -> list[tuple[int, dict[str, Any]]]:
    """(attempt, data) of every state change, in order."""
    with session_scope(settings.database_url) as session:
        rows = session.execute(
            select(JobEvent.attempt, JobEvent.data)
            .where(JobEvent.job_id == job_id, JobEvent.type == "state")
            .order_by(JobEvent.id)
        ).all()
    return [(attempt, data) for attempt, data in rows]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def logged_points(events: list[dict[str, Any]]) -> dict[tuple[int, str], float]:
    """(step, name) -> the finite value the trainer logged last for it (a resume logs the steps
    after its checkpoint again)."""
    points = {}
    for event in events:
        if event["type"] == "step":
            logged = {**event["losses"], "lr": event["lr"], **event["stats"]}
            for name, value in logged.items():
                if math.isfinite(float(value)):  # non-finite values are strings, never rows
                    points[event["step"], name] = float(value)
    return points


def assert_nothing_lost(settings: Settings, job_id: str, *, steps: int | None = None) -> None:
    """Every trainer event became rows, once: all of events.jsonl is ingested, each logged
    (step, name) has exactly one metric row, with the value logged last, each logged step its
    loss (`steps`: all of 1..steps), each checkpoint and evaluation its row, the newest
    checkpoint and every artifact match their sha256, no temporary file is left."""
    run_dir = settings.jobs_dir / job_id
    events = read_events(run_dir / "events.jsonl")
    with session_scope(settings.database_url) as session:
        job = session.get_one(Job, job_id)
        assert job.events_offset == (run_dir / "events.jsonl").stat().st_size
        rows = session.execute(
            select(Metric.step, Metric.name, Metric.value).where(Metric.job_id == job_id)
        ).all()
        counts = Counter((step, name) for step, name, _ in rows)
        assert {key: n for key, n in counts.items() if n > 1} == {}  # nothing duplicated
        assert {(step, name): value for step, name, value in rows} == logged_points(events)
        loss_steps = {step for step, name, _ in rows if name == "loss"}
        assert loss_steps == {e["step"] for e in events if e["type"] == "step"}
        if steps is not None:
            assert loss_steps == set(range(1, steps + 1))
        checkpoints = list(
            session.scalars(
                select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.id)
            )
        )
        saved = [e for e in events if e["type"] == "checkpoint"]
        assert [(c.step, c.sha256) for c in checkpoints] == [
            (e["step"], e["sha256"]) for e in saved
        ]
        if checkpoints:
            newest = checkpoints[-1]
            assert sha256(run_dir / newest.path) == newest.sha256
            assert sha256(run_dir / "checkpoints" / "last.pt") == newest.sha256
        evaluations = session.scalar(
            select(func.count()).select_from(Evaluation).where(Evaluation.job_id == job_id)
        )
        assert evaluations == sum(e["type"] == "eval" for e in events)
        for artifact in session.scalars(select(Artifact).where(Artifact.job_id == job_id)):
            assert sha256(run_dir / artifact.path) == artifact.sha256
    for folder in (run_dir / "checkpoints", run_dir):  # no torn checkpoint or export left
        assert not list(folder.glob(".*.tmp.*"))
