"""Worker fixtures: settings on a tmp SQLite database, file-system broker and data root, and a
job factory."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from databases import copy_sqlite
from worker_support import MakeJob, tiny_spec

from store.db.models import Job
from store.db.session import session_scope
from store.settings import Settings


@pytest.fixture(autouse=True)
def _one_thread_trainers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Trainer subprocesses share 2 cores with the test; more threads only spin."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture
def settings(tmp_path: Path, migrated_sqlite: Path) -> Settings:
    s = Settings(
        data_root=tmp_path / "data",
        queue=f"tid-test-{uuid.uuid4().hex[:8]}",
        lease_seconds=3,
        cancel_grace_seconds=2,
        reconcile_seconds=1,
        requeue_after_seconds=1,
    )
    copy_sqlite(migrated_sqlite, s.database_url)
    return s


@pytest.fixture
def make_job(settings: Settings) -> MakeJob:
    """Insert a job row (queued unless columns say otherwise) and return its id."""

    def make(*, owner: str = "alice", spec: dict[str, Any] | None = None, **columns: Any) -> str:
        spec = spec or tiny_spec()
        method = spec.get("distill", {}).get("method", "none")
        with session_scope(settings.database_url) as session:
            job = Job(owner=owner, name=spec["name"], spec=spec, method=method, **columns)
            session.add(job)
            session.flush()
            return job.id

    return make
