"""Every job state change, as a conditional UPDATE that says whether it applied.

`queued -> running -> succeeded | failed | cancelled`, and `running -> queued` when a lease is
lost. Nothing leaves a final state. Callers commit; a transition that did not apply changed
nothing, so a duplicate message or a racing worker is a no-op.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from itertools import pairwise
from typing import Any

from sqlalchemy import CursorResult, and_, case, select, update
from sqlalchemy.orm import Session

from store.db.models import FINAL_STATES, Job, JobEvent, utcnow


def transition(
    session: Session,
    job_id: str,
    *,
    from_: str | tuple[str, ...],
    to: str,
    where: Any = None,
    reason: str | None = None,
    **values: Any,
) -> bool:
    """Move `job_id` from one of `from_` to `to` (setting `values`) if it is still there.

    Records a `state` event when it applies, with the `error` or `reason` (why a job went back
    to the queue). `where` adds a condition (e.g. the lease owner).
    """
    sources = (from_,) if isinstance(from_, str) else from_
    if any(s in FINAL_STATES for s in sources):
        raise ValueError(f"a job never leaves a final state ({sources} -> {to})")
    cond = and_(Job.id == job_id, Job.state.in_(sources))
    if where is not None:
        cond = and_(cond, where)
    result = session.execute(update(Job).where(cond).values(state=to, **values))
    applied = isinstance(result, CursorResult) and result.rowcount == 1
    if applied:
        attempt = session.scalar(select(Job.attempt).where(Job.id == job_id)) or 0
        data: dict[str, Any] = {"state": to}
        if values.get("error"):
            data["error"] = values["error"]
        if reason:
            data["reason"] = reason
        session.add(JobEvent(job_id=job_id, attempt=attempt, type="state", data=data))
    return applied


def claim(session: Session, job_id: str, *, worker: str, lease_seconds: int) -> bool:
    """queued -> running for this worker, with a fresh lease and the next attempt number."""
    now = utcnow()
    return transition(
        session,
        job_id,
        from_="queued",
        to="running",
        attempt=Job.attempt + 1,
        lease_owner=worker,
        lease_expires=now + timedelta(seconds=lease_seconds),
        started_at=now,
    )


def renew_lease(session: Session, job_id: str, *, worker: str, lease_seconds: int) -> bool:
    """Extend the lease if this worker still holds the running job; False means: stop now."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == "running", Job.lease_owner == worker)
        .values(lease_expires=utcnow() + timedelta(seconds=lease_seconds))
    )
    return isinstance(result, CursorResult) and result.rowcount == 1


def finish(
    session: Session, job_id: str, *, worker: str, state: str, error: str | None = None
) -> bool:
    """running -> a final state, only for the worker that holds the lease."""
    if state not in FINAL_STATES:
        raise ValueError(f"finish needs a final state {FINAL_STATES}, got {state!r}")
    return transition(
        session,
        job_id,
        from_="running",
        to=state,
        where=Job.lease_owner == worker,
        error=error,
        finished_at=utcnow(),
        lease_owner=None,
        lease_expires=None,
    )


def requeue(
    session: Session, job_id: str, *, worker: str, reason: str, handback: bool = False
) -> bool:
    """running -> queued for the lease holder: a deploy hand-back (`handback`, not counted
    against max_attempts) or a retry after a retryable failure."""
    extra = {"handbacks": Job.handbacks + 1} if handback else {}
    return transition(
        session,
        job_id,
        from_="running",
        to="queued",
        where=Job.lease_owner == worker,
        reason=reason,
        lease_owner=None,
        lease_expires=None,
        queued_at=utcnow(),
        **extra,
    )


def attempts_left(job: Job) -> int:
    """How many more attempts may start: hand-backs are not failures and do not count."""
    return job.max_attempts - (job.attempt - job.handbacks)


def running_seconds(session: Session, job_id: str) -> float:
    """How long the job ran in its attempts that ended: from each `running` state event to the
    state change after it (so a run-time limit holds over retries and hand-backs)."""
    changes = session.execute(
        select(JobEvent.created_at, JobEvent.data)
        .where(JobEvent.job_id == job_id, JobEvent.type == "state")
        .order_by(JobEvent.id)
    ).all()
    ran: float = sum(
        (end - start).total_seconds()
        for (start, data), (end, _) in pairwise(changes)
        if data.get("state") == "running"
    )
    return ran


def request_cancel(session: Session, job_id: str) -> bool:
    """Flag a job for cancelling; a queued job is cancelled at once. False if already final.

    One UPDATE decides both cases, so a job that changes state meanwhile (claimed, or sent back
    to the queue) is never missed between two statements, and a queued job cancelled here can
    no longer be claimed: the claim is a `queued -> running` UPDATE of its own.
    """
    queued = Job.state == "queued"
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state.in_(("queued", "running")))
        .values(
            cancel_requested=True,
            state=case((queued, "cancelled"), else_=Job.state),
            finished_at=case((queued, utcnow()), else_=Job.finished_at),
        )
        .returning(Job.state, Job.attempt)
    )
    row = result.one_or_none()
    if row is None:
        return False
    if row.state == "cancelled":
        data = {"state": "cancelled"}
        session.add(JobEvent(job_id=job_id, attempt=row.attempt, type="state", data=data))
    return True


def expired_leases(session: Session, *, now: datetime) -> list[Job]:
    return list(session.scalars(select(Job).where(Job.state == "running", Job.lease_expires < now)))


def requeue_lost(session: Session, job: Job, *, now: datetime) -> str | None:
    """Reconciler: a running job whose lease expired is re-queued, or failed when out of
    attempts (or cancelled if a cancel was pending). Returns the new state, or None."""
    lost = and_(Job.lease_expires < now, Job.lease_owner == job.lease_owner)
    if job.cancel_requested:
        done = transition(
            session, job.id, from_="running", to="cancelled", where=lost, finished_at=now
        )
        return "cancelled" if done else None
    lost_how = f"worker {job.lease_owner} lost (lease expired)"
    if attempts_left(job) <= 0:
        error = f"{lost_how} on attempt {job.attempt - job.handbacks} of {job.max_attempts}"
        done = transition(
            session, job.id, from_="running", to="failed", where=lost, error=error, finished_at=now
        )
        return "failed" if done else None
    done = transition(
        session,
        job.id,
        from_="running",
        to="queued",
        where=lost,
        reason=lost_how,
        lease_owner=None,
        lease_expires=None,
        queued_at=now,
    )
    return "queued" if done else None


def stale_queued(session: Session, *, older_than: datetime) -> list[str]:
    """Queued jobs nobody picked up since `older_than` (a lost message): to be sent again."""
    ids = list(
        session.scalars(select(Job.id).where(Job.state == "queued", Job.queued_at < older_than))
    )
    if ids:
        session.execute(update(Job).where(Job.id.in_(ids)).values(queued_at=utcnow()))
    return ids
