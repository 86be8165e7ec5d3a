"""Every job state change, as a conditional UPDATE that says whether it applied.

`queued -> running -> succeeded | failed | cancelled`, and `running -> queued` when a lease is
lost. Nothing leaves a final state. Callers commit; a transition that did not apply changed
nothing, so a duplicate message or a racing worker is a no-op.

Each claim gets a token of its own: a lease holder's writes name it, so they never apply to a
later claim of the job, whoever made it, while its outcome still lands on a job that the
reconciler re-queued meanwhile (`queued -> succeeded`...). Lease times come from the database's
clock only, so hosts whose clocks disagree still agree on when a lease ends.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Any

from sqlalchemy import (
    ColumnElement,
    CursorResult,
    Update,
    and_,
    case,
    exists,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Session

from store.db.models import FINAL_STATES, Job, JobEvent, JobNode, new_id, utcnow


def db_now(session: Session) -> datetime:
    """The database's clock (its transaction's start on PostgreSQL): the one clock that lease
    times are set and judged by. SQLite is a file on this host, so its clock is this host's."""
    if session.get_bind().dialect.name == "sqlite":
        return utcnow()
    now: datetime = session.execute(select(func.now())).scalar_one()
    return now.astimezone(UTC)


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
    to the queue), at the database's time (the run-time limit adds up these events' times).
    `where` adds a condition (e.g. the claim token).
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
        at = db_now(session)
        session.add(
            JobEvent(job_id=job_id, attempt=attempt, type="state", data=data, created_at=at)
        )
    return applied


def claim(
    session: Session,
    job_id: str,
    *,
    worker: str,
    lease_seconds: int,
    nodes: Sequence[tuple[str, str]] = (),
) -> str | None:
    """queued -> running for `worker`, with a fresh lease and the next attempt number, and a
    `job_nodes` row with a lease of its own for each of the attempt's `nodes` ((worker,
    address) by node rank; default: `worker` alone, a job on one node).

    Returns the new claim's token (None: nothing to claim), which the holder's writes name.
    """
    now = db_now(session)
    token = new_id()
    expires = now + timedelta(seconds=lease_seconds)
    claimed = transition(
        session,
        job_id,
        from_="queued",
        to="running",
        attempt=Job.attempt + 1,
        lease_owner=worker,
        claim_token=token,
        lease_expires=expires,
        started_at=now,
        waiting_reason=None,
    )
    if not claimed:
        return None
    attempt = session.scalar(select(Job.attempt).where(Job.id == job_id))
    for rank, (name, address) in enumerate(nodes or [(worker, "")]):
        session.add(
            JobNode(
                job_id=job_id,
                attempt=attempt,
                node_rank=rank,
                worker=name,
                address=address,
                lease_expires=expires,
            )
        )
    return token


def renew_lease(session: Session, job_id: str, *, token: str, lease_seconds: int) -> bool:
    """Extend the lease if this claim still holds the running job; False means: stop now."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == "running", Job.claim_token == token)
        .values(lease_expires=db_now(session) + timedelta(seconds=lease_seconds))
    )
    return isinstance(result, CursorResult) and result.rowcount == 1


def _holds(job_id: str, token: str) -> ColumnElement[bool]:
    return exists().where(Job.id == job_id, Job.state == "running", Job.claim_token == token)


def _leased_node(job_id: str, attempt: int, rank: int) -> Update:
    """An update of one node of an attempt whose part has not ended (it still has a lease)."""
    return update(JobNode).where(
        JobNode.job_id == job_id,
        JobNode.attempt == attempt,
        JobNode.node_rank == rank,
        JobNode.lease_expires.is_not(None),
    )


def renew_node(
    session: Session, job_id: str, *, token: str, attempt: int, rank: int, lease_seconds: int
) -> bool:
    """Extend one node's lease while its claim still holds the running job (and the node has
    not ended); False means: stop now."""
    result = session.execute(
        _leased_node(job_id, attempt, rank)
        .where(_holds(job_id, token))
        .values(lease_expires=db_now(session) + timedelta(seconds=lease_seconds))
    )
    return isinstance(result, CursorResult) and result.rowcount == 1


def end_node(session: Session, job_id: str, *, attempt: int, rank: int, done: bool) -> None:
    """A node's part of an attempt ended: well (`done`: it needs no lease any more), or not (its
    lease expires now, so that the reconciler re-queues the whole gang)."""
    session.execute(
        _leased_node(job_id, attempt, rank).values(lease_expires=None if done else db_now(session))
    )


def claimed_by(session: Session, job_id: str, token: str) -> str | None:
    """The job's state if its last claim is `token` and it may still take that claim's outcome:
    `running`, or `queued` when the reconciler sent it back after the lease ran out (the worker
    was cut off from the database) and nobody claimed it since. None otherwise."""
    return session.scalar(
        select(Job.state).where(
            Job.id == job_id, Job.claim_token == token, Job.state.in_(("running", "queued"))
        )
    )


def finish(
    session: Session, job_id: str, *, token: str, state: str, error: str | None = None
) -> bool:
    """running -> a final state for the claim `token`; also from queued while nobody claimed
    the job again since its lease ran out, so that an attempt that finished while the database
    was away still records its outcome."""
    if state not in FINAL_STATES:
        raise ValueError(f"finish needs a final state {FINAL_STATES}, got {state!r}")
    return transition(
        session,
        job_id,
        from_=("running", "queued"),
        to=state,
        where=Job.claim_token == token,
        error=error,
        finished_at=db_now(session),
        lease_owner=None,
        lease_expires=None,
    )


def requeue(
    session: Session, job_id: str, *, token: str, reason: str, handback: bool = False
) -> bool:
    """running -> queued for the claim `token`: a deploy hand-back (`handback`, not counted
    against max_attempts) or a retry after a retryable failure."""
    extra = {"handbacks": Job.handbacks + 1} if handback else {}
    return transition(
        session,
        job_id,
        from_="running",
        to="queued",
        where=Job.claim_token == token,
        reason=reason,
        **_back_in_queue(db_now(session)),
        **extra,
    )


def _back_in_queue(now: datetime) -> dict[str, Any]:
    """A job's columns as it goes back to the queue: no lease, waiting since `now`, and unsent
    (its earlier message was taken: it waits so until it is sent again)."""
    return {"lease_owner": None, "lease_expires": None, "queued_at": now, "last_sent_at": None}


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
    now = db_now(session)
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state.in_(("queued", "running")))
        .values(
            cancel_requested=True,
            state=case((queued, "cancelled"), else_=Job.state),
            finished_at=case((queued, now), else_=Job.finished_at),
        )
        .returning(Job.state, Job.attempt)
    )
    row = result.one_or_none()
    if row is None:
        return False
    if row.state == "cancelled":
        data = {"state": "cancelled"}
        session.add(
            JobEvent(job_id=job_id, attempt=row.attempt, type="state", data=data, created_at=now)
        )
    return True


def _node_expired(now: datetime) -> ColumnElement[bool]:
    """A node of the job's current attempt whose lease ran out."""
    return exists().where(
        JobNode.job_id == Job.id, JobNode.attempt == Job.attempt, JobNode.lease_expires < now
    )


def expired_leases(session: Session) -> list[Job]:
    """Running jobs whose lease, or the lease of one of their nodes, ran out by the database's
    clock: a gang is lost as one when any node is."""
    now = db_now(session)
    expired = or_(Job.lease_expires < now, _node_expired(now))
    return list(session.scalars(select(Job).where(Job.state == "running", expired)))


def requeue_lost(session: Session, job: Job, *, fail_after_seconds: float) -> str | None:
    """Reconciler: a running job whose lease expired is re-queued, or cancelled if a cancel was
    pending, or failed when out of attempts. Returns the new state, or None.

    A failure waits until `fail_after_seconds` after the lease ran out: until then the worker
    may still record its attempt's outcome (a run that finished while the database was away),
    and a final state set here would take that outcome's place for good. A re-queued job can
    still take it, as long as nobody claimed it again.
    """
    now = db_now(session)
    # still the claim that was seen expired (a NULL token: claimed before claims had tokens)
    lost = and_(
        or_(Job.lease_expires < now, _node_expired(now)),
        Job.claim_token.is_not_distinct_from(job.claim_token),
    )
    if job.cancel_requested:
        done = transition(
            session, job.id, from_="running", to="cancelled", where=lost, finished_at=now
        )
        return "cancelled" if done else None
    lost_how = _lost_how(session, job, now)
    if attempts_left(job) <= 0:
        error = f"{lost_how} on attempt {job.attempt - job.handbacks} of {job.max_attempts}"
        grace = now - timedelta(seconds=fail_after_seconds)
        given_up = and_(lost, or_(Job.lease_expires < grace, _node_expired(grace)))
        done = transition(
            session,
            job.id,
            from_="running",
            to="failed",
            where=given_up,
            error=error,
            finished_at=now,
        )
        return "failed" if done else None
    done = transition(
        session,
        job.id,
        from_="running",
        to="queued",
        where=lost,
        reason=lost_how,
        **_back_in_queue(now),
    )
    return "queued" if done else None


def _lost_how(session: Session, job: Job, now: datetime) -> str:
    """Which worker was lost: the job's (its lease), or those of the nodes whose lease ran out."""
    if job.nnodes <= 1:
        return f"worker {job.lease_owner} lost (lease expired)"
    nodes = session.execute(
        select(JobNode.node_rank, JobNode.worker)
        .where(
            JobNode.job_id == job.id, JobNode.attempt == job.attempt, JobNode.lease_expires < now
        )
        .order_by(JobNode.node_rank)
    ).all()
    lost = ", ".join(f"node {rank} on worker {worker}" for rank, worker in nodes)
    return f"{lost or f'worker {job.lease_owner}'} lost (lease expired)"
