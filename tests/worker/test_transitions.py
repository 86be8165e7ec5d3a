"""Job state changes that race with workers: each is one conditional UPDATE."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from databases import POSTGRES, postgres_database
from sqlalchemy import event, func, select
from worker_support import MakeJob, read_job, tiny_spec

from store.db import transitions
from store.db.migrate import upgrade
from store.db.models import Job, JobEvent, utcnow
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


def claim(settings: Settings, job_id: str, worker: str = "w") -> str | None:
    with session_scope(settings.database_url) as session:
        return transitions.claim(session, job_id, worker=worker, lease_seconds=30)


def lose_lease(settings: Settings, job_id: str) -> str | None:
    """The lease runs out and the reconciler acts on it: the job's new state."""
    with session_scope(settings.database_url) as session:
        job = session.get_one(Job, job_id)
        job.lease_expires = utcnow() - timedelta(seconds=1)
        session.flush()
        return transitions.requeue_lost(session, job, fail_after_seconds=300)


def test_only_the_claim_that_holds_the_job_renews_finishes_or_requeues_it(
    settings: Settings, make_job: MakeJob
) -> None:
    """A second claim under the same worker name (a worker restarted in a container keeps its
    hostname and pid) is told apart from the first by its token."""
    job_id = make_job()
    first = claim(settings, job_id)
    assert lose_lease(settings, job_id) == "queued"
    second = claim(settings, job_id)
    assert first and second and first != second

    with session_scope(settings.database_url) as session:
        stale = (
            transitions.renew_lease(session, job_id, token=first, lease_seconds=30),
            transitions.requeue(session, job_id, token=first, reason="retry"),
            transitions.finish(session, job_id, token=first, state="succeeded"),
            transitions.claimed_by(session, job_id, first),
        )
        renewed = transitions.renew_lease(session, job_id, token=second, lease_seconds=30)

    assert stale == (False, False, False, None)
    assert renewed
    job = read_job(settings, job_id)
    assert (job.state, job.attempt, job.claim_token) == ("running", 2, second)


@pytest.mark.parametrize("how", ["retry", "handback", "lease lost"])
def test_a_job_sent_back_to_the_queue_waits_unsent(
    settings: Settings, make_job: MakeJob, how: str
) -> None:
    """Its earlier message was taken: the reconciler must see it unsent until it is sent again."""
    job_id = make_job(last_sent_at=utcnow(), send_count=1)
    token = claim(settings, job_id)
    assert token
    if how == "lease lost":
        assert lose_lease(settings, job_id) == "queued"
    else:
        with session_scope(settings.database_url) as session:
            handback = how == "handback"
            assert transitions.requeue(session, job_id, token=token, reason=how, handback=handback)

    job = read_job(settings, job_id)
    assert (job.state, job.last_sent_at, job.send_count) == ("queued", None, 1)


def test_an_outcome_lands_on_a_requeued_job_until_it_is_claimed_again(
    settings: Settings, make_job: MakeJob
) -> None:
    """A worker cut off from the database for longer than its lease still records the
    attempt's outcome once it is back, as long as nobody claimed the job since."""
    recorded, reclaimed = make_job(), make_job()
    tokens = {job_id: claim(settings, job_id) for job_id in (recorded, reclaimed)}
    for job_id in tokens:
        assert lose_lease(settings, job_id) == "queued"
    assert claim(settings, reclaimed, worker="another")

    with session_scope(settings.database_url) as session:
        held = {job_id: transitions.claimed_by(session, job_id, t) for job_id, t in tokens.items()}
        done = {
            job_id: transitions.finish(session, job_id, token=token, state="succeeded")
            for job_id, token in tokens.items()
            if token
        }

    assert held == {recorded: "queued", reclaimed: None}
    assert done == {recorded: True, reclaimed: False}
    job = read_job(settings, recorded)
    assert (job.state, job.attempt, job.lease_expires) == ("succeeded", 1, None)
    assert read_job(settings, reclaimed).state == "running"


@pytest.mark.skipif(not POSTGRES, reason="needs TID_TEST_POSTGRES_URL (.ci/run sets it)")
def test_lease_times_come_from_the_database_clock_not_this_hosts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """This host's clock runs 60 s behind the database's: the lease it takes and renews still
    ends `lease_seconds` after the database's now, so nobody sees it expired."""
    behind = utcnow() - timedelta(seconds=60)
    monkeypatch.setattr(transitions, "utcnow", lambda: behind)
    with postgres_database() as url:
        upgrade(url)
        with session_scope(url) as session:
            job = Job(owner="alice", name="j", spec=tiny_spec(), method="none")
            session.add(job)
            session.flush()
            job_id = job.id
        with session_scope(url) as session:
            token = transitions.claim(session, job_id, worker="w", lease_seconds=30)
            waiting = Job(owner="alice", name="j", spec=tiny_spec(), method="none")
            session.add(waiting)
            session.flush()
            waiting_id = waiting.id
        assert token
        with session_scope(url) as session:
            assert transitions.request_cancel(session, waiting_id)
        with session_scope(url) as session:
            assert transitions.renew_lease(session, job_id, token=token, lease_seconds=30)
        with session_scope(url) as session:
            now = session.execute(select(func.now())).scalar_one()
            job = session.get_one(Job, job_id)
            assert job.lease_expires is not None and job.started_at is not None
            assert timedelta(seconds=25) < job.lease_expires - now <= timedelta(seconds=30)
            assert abs(job.started_at - now) < timedelta(seconds=5)
            assert transitions.expired_leases(session) == []
            cancelled = session.get_one(Job, waiting_id)
            assert cancelled.finished_at is not None
            assert abs(cancelled.finished_at - now) < timedelta(seconds=5)
            events = session.scalars(select(JobEvent).where(JobEvent.job_id == waiting_id))
            assert [abs(e.created_at - now) < timedelta(seconds=5) for e in events] == [True]
