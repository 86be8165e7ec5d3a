"""Test settings, and rows inserted directly into the database: the states a worker would
have produced."""

from __future__ import annotations

import hashlib
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from store.db.models import (
    Artifact,
    Dataset,
    Evaluation,
    Job,
    JobEvent,
    Metric,
    Model,
    new_id,
    utcnow,
)
from store.settings import Settings

SPEC: dict[str, Any] = {"name": "job", "dataset": {"builtin": "shapes"}}


def make_settings(tmp_path: Path) -> Settings:
    allowed = tmp_path / "allowed"
    allowed.mkdir(exist_ok=True)
    data = tmp_path / "data"
    return Settings(
        data_root=data,
        database_url=f"sqlite:///{data / 'tid.db'}",
        broker_url="filesystem://",
        dataset_roots=[allowed],
        max_attempts=2,
        max_json_bytes=16 * 1024,
        max_upload_bytes=256 * 1024,
    )


def _commit(session: Session, row: Any) -> Any:
    session.add(row)
    session.commit()
    return row


def make_job(session: Session, *, owner: str, state: str = "succeeded", **overrides: Any) -> Job:
    values: dict[str, Any] = {"name": "job", "spec": SPEC, "method": "none", "state": state}
    if state != "queued":
        values.update(attempt=1, started_at=utcnow() - timedelta(minutes=1))
    if state in ("succeeded", "failed", "cancelled"):
        values["finished_at"] = utcnow()
    job: Job = _commit(session, Job(owner=owner, **{**values, **overrides}))
    return job


def make_dataset(
    session: Session, *, owner: str, state: str = "ready", **overrides: Any
) -> Dataset:
    values: dict[str, Any] = {
        "id": new_id(),
        "name": "ds",
        "kind": "builtin",
        "source": {"builtin": "shapes"},
        "state": state,
        **overrides,
    }
    values.setdefault("path", f"/nowhere/{values['id']}")
    dataset: Dataset = _commit(session, Dataset(owner=owner, **values))
    return dataset


def make_model(session: Session, *, owner: str, state: str = "ready", **overrides: Any) -> Model:
    values: dict[str, Any] = {
        "name": "m",
        "path": "/nowhere/weights.pt",
        "sha256": "0" * 64,
        "bytes": 1,
        "state": state,
    }
    model: Model = _commit(session, Model(owner=owner, **{**values, **overrides}))
    return model


def add_metrics(session: Session, job: Job, points: list[tuple[int, str, float]]) -> None:
    session.add_all(
        Metric(job_id=job.id, attempt=1, step=step, name=name, value=value)
        for step, name, value in points
    )
    session.commit()


def add_evaluation(
    session: Session, job: Job, *, step: int, ap: float | None, attempt: int = 1
) -> None:
    """An evaluation row as the worker ingests one (AP as given, APs not measured)."""
    session.add(
        Evaluation(
            job_id=job.id,
            attempt=attempt,
            epoch=0,
            step=step,
            ap=ap,
            ap50=30.0,
            ap75=10.0,
            aps=None,
            apm=5.0,
            apl=20.0,
            per_class={"circle": 14.0},
            backend="faster-coco-eval",
        )
    )
    session.commit()


def add_event(
    session: Session, job: Job, kind: str, data: dict[str, Any], *, attempt: int = 1
) -> JobEvent:
    event: JobEvent = _commit(
        session, JobEvent(job_id=job.id, attempt=attempt, type=kind, data=data)
    )
    return event


def add_artifact(
    session: Session, settings: Settings, job: Job, *, name: str, content: bytes
) -> Artifact:
    """The file under the job's run directory and its row, as the worker records an export."""
    path = settings.jobs_dir / job.id / "export" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    artifact: Artifact = _commit(
        session,
        Artifact(
            job_id=job.id,
            name=name,
            path=f"export/{name}",
            sha256=hashlib.sha256(content).hexdigest(),
            bytes=len(content),
        ),
    )
    return artifact
