"""The worker registry: which workers live, what devices they offer, and whether they are busy.

A worker writes its row when it starts (`register`), its heartbeat while it lives, on the
database's clock (so hosts whose clocks disagree still agree on who is alive), and removes the
row when it stops. It is alive while its heartbeat is younger than `ALIVE_HEARTBEATS`
heartbeats. The placement of jobs on several nodes (`store.db.placement`) reserves idle ones,
and a worker that claims a job on one node from the service queue occupies its own row in the
claim's transaction: whichever commits first has the worker. A worker without a row (a test
that runs a job in-process) claims as it always did.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import CursorResult, delete, exists, update
from sqlalchemy.orm import Session

from store.db.models import Job, JobNode, Worker
from store.db.transitions import db_now

ALIVE_HEARTBEATS = 3  # heartbeats missed before a worker counts as gone


def register(session: Session, *, name: str, queue: str, address: str, gpus: list[str]) -> None:
    """This worker starts: idle, with its queue, address and devices (a row of an earlier
    process of the same name is replaced: whatever it held, it holds no longer)."""
    now = db_now(session)
    session.execute(delete(Worker).where(Worker.name == name))
    session.add(
        Worker(
            name=name,
            queue=queue,
            address=address,
            device="cuda" if gpus else "cpu",
            gpus=gpus,
            state="idle",
            job_id=None,
            heartbeat_at=now,
            started_at=now,
        )
    )


def heartbeat(session: Session, name: str) -> bool:
    """This worker lives (False: its row is gone, so register again)."""
    result = session.execute(
        update(Worker).where(Worker.name == name).values(heartbeat_at=db_now(session))
    )
    return isinstance(result, CursorResult) and result.rowcount == 1


def remove(session: Session, name: str) -> None:
    """This worker stops: no job is placed on it any more."""
    session.execute(delete(Worker).where(Worker.name == name))


def alive_since(now: datetime, heartbeat_seconds: float) -> datetime:
    """The oldest heartbeat of a worker that is still alive at `now`."""
    return now - timedelta(seconds=ALIVE_HEARTBEATS * heartbeat_seconds)


def occupy(session: Session, name: str, job_id: str | None) -> bool | None:
    """The worker `name` takes `job_id` (None: a dataset's or model's check): True if it was
    idle (now busy with it), False if it is not (a gang placement reserved it), None if it has
    no row (it runs as it always did)."""
    result = session.execute(
        update(Worker)
        .where(Worker.name == name, Worker.state == "idle")
        .values(state="busy", job_id=job_id)
    )
    if isinstance(result, CursorResult) and result.rowcount == 1:
        return True
    return False if session.get(Worker, name) is not None else None


def release(session: Session, name: str, job_id: str | None) -> None:
    """The worker's job (or its node of one, or its check: None) ended: idle again, unless it
    holds another."""
    held = Worker.job_id.is_(None) if job_id is None else Worker.job_id == job_id
    session.execute(
        update(Worker)
        .where(Worker.name == name, Worker.state == "busy", held)
        .values(state="idle", job_id=None)
    )


def release_stale(session: Session) -> list[str]:
    """Busy workers that hold no live node of their job (its lease ran out unrenewed or ended:
    the message that would have started it was lost, or the node ended without saying so) are
    idle again; their names. A worker that runs a node renews that node's lease; one busy with
    a check (no job) frees itself."""
    now = db_now(session)
    live_node = exists().where(
        JobNode.job_id == Worker.job_id,
        JobNode.worker == Worker.name,
        Job.id == JobNode.job_id,
        JobNode.attempt == Job.attempt,
        JobNode.lease_expires >= now,
    )
    result = session.execute(
        update(Worker)
        .where(Worker.state == "busy", Worker.job_id.is_not(None), ~live_node)
        .values(state="idle", job_id=None)
        .returning(Worker.name)
    )
    return list(result.scalars())
