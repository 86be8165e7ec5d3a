"""Job state changes that race with workers: each is one conditional UPDATE."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import event
from worker_support import MakeJob, read_job

from store.db import transitions
from store.db.models import JobEvent, utcnow
from store.db.session import get_engine, session_scope
from store.settings import Settings


def cancel(settings: Settings, job_id: str) -> tuple[bool, list[str]]:
    """request_cancel's answer and the statements it sent to the database."""
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        statements.append(statement.split(None, 1)[0].upper())

    engine = get_engine(settings.database_url)
    event.listen(engine, "before_cursor_execute", record)
    try:
        with session_scope(settings.database_url) as session:
            applied = transitions.request_cancel(session, job_id)
    finally:
        event.remove(engine, "before_cursor_execute", record)
    return applied, statements


@pytest.mark.parametrize(
    ("state", "applied", "after", "flagged"),
    [
        ("queued", True, "cancelled", True),
        ("running", True, "running", True),
        ("succeeded", False, "succeeded", False),
        ("cancelled", False, "cancelled", False),
    ],
)
def test_cancel_decides_in_one_update(
    settings: Settings, make_job: MakeJob, state: str, applied: bool, after: str, flagged: bool
) -> None:
    job_id = make_job(state=state, lease_owner="w" if state == "running" else None)

    answer, statements = cancel(settings, job_id)

    assert answer is applied
    assert statements.count("UPDATE") == 1  # nothing can change the job between two
    job = read_job(settings, job_id)
    assert (job.state, job.cancel_requested) == (after, flagged)
    if state == "queued":
        assert job.finished_at is not None


def test_a_cancelled_queued_job_can_no_longer_be_claimed(
    settings: Settings, make_job: MakeJob
) -> None:
    job_id = make_job(state="queued")
    assert cancel(settings, job_id)[0]

    with session_scope(settings.database_url) as session:
        claimed = transitions.claim(session, job_id, worker="w", lease_seconds=30)

    assert not claimed
    assert read_job(settings, job_id).state == "cancelled"


def test_running_seconds_add_up_the_attempts_that_ended(
    settings: Settings, make_job: MakeJob
) -> None:
    job_id = make_job(state="running", attempt=3)
    start = utcnow() - timedelta(hours=1)
    changes = [(0, "running"), (70, "queued"), (100, "running"), (130, "queued"), (200, "running")]
    with session_scope(settings.database_url) as session:
        for seconds, state in changes:
            at = start + timedelta(seconds=seconds)
            for kind, data in (("state", {"state": state}), ("step", {})):  # only states count
                session.add(JobEvent(job_id=job_id, attempt=1, type=kind, data=data, created_at=at))
        session.flush()
        ran = transitions.running_seconds(session, job_id)

    assert ran == 70 + 30  # the running attempt is not over: its own worker counts it
