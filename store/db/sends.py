"""The messages of waiting jobs, datasets and models: when each was sent, and which may be lost.

The database cannot see into the broker. What it holds, per row, is whether the broker accepted
a message for it since it began to wait (`last_sent_at`, recorded by `store.queue.enqueue`, and
cleared when a job goes back to the queue, so that "sent" compares no clocks: `queued_at` and
`created_at` may come from a host whose clock disagrees with the database's) and how many it
accepted (`send_count`); the broker can say how many messages wait in its queue. A
waiting row's message is lost in one of two ways: it was never sent (the send failed, or its
process died first), which the row shows; or the broker lost it (a restart without
persistence, a worker that took it and dropped it), which shows as a queue that holds fewer
messages than rows wait with one sent. The reconciler (`worker.reconcile`) re-sends on those
two signs only: re-sending on age alone added a message per job per pass to a backlog that
was merely slow. A job on several nodes is never sent on the service queue (the reconciler
places it, `store.db.placement`): it is no waiting row here.
"""

from __future__ import annotations

from datetime import datetime
from typing import TypeAlias

from sqlalchemy import ColumnElement, and_, func, not_, select, update
from sqlalchemy.orm import InstrumentedAttribute, Session

from store.db.models import Dataset, Job, Model
from store.db.transitions import db_now

Waiting: TypeAlias = type[Job] | type[Dataset] | type[Model]
KINDS: tuple[Waiting, ...] = (Job, Dataset, Model)


def _waiting(kind: Waiting) -> ColumnElement[bool]:
    if kind is Job:
        return and_(Job.state == "queued", Job.nnodes == 1)
    return kind.state == "pending"


def _since(kind: Waiting) -> InstrumentedAttribute[datetime]:
    """When the row began to wait (a job begins again with each re-queue): only a never-sent
    row's age is judged by it."""
    return Job.queued_at if kind is Job else kind.created_at


def _sent(kind: Waiting) -> ColumnElement[bool]:
    """The broker accepted a message for the row since it began to wait (a re-queue clears
    `last_sent_at`)."""
    return kind.last_sent_at.is_not(None)


def record_sent(session: Session, kind: Waiting, row_id: str) -> None:
    """The broker accepted a message for the row, now by the database's clock (which the
    reconciler judges a send's age by)."""
    session.execute(
        update(kind)
        .where(kind.id == row_id)
        .values(last_sent_at=db_now(session), send_count=kind.send_count + 1)
    )


def unsend(session: Session, job_id: str, *, reason: str | None = None) -> None:
    """A queued job's message was taken but not acted on (its worker was reserved for a gang,
    or does not fit the job: `reason`, which the job shows while it waits): it waits unsent,
    so the reconciler sends it again."""
    values: dict[str, object] = {"last_sent_at": None}
    if reason is not None:
        values["waiting_reason"] = reason
    session.execute(update(Job).where(Job.id == job_id, Job.state == "queued").values(values))


def never_sent(session: Session, kind: Waiting, *, before: datetime, limit: int) -> list[str]:
    """Rows waiting since before `before` whose message was never sent since, longest first."""
    query = (
        select(kind.id)
        .where(_waiting(kind), not_(_sent(kind)), _since(kind) < before)
        .order_by(_since(kind))
        .limit(limit)
    )
    return list(session.scalars(query))


def count_sent(session: Session, *, before: datetime) -> int:
    """Rows waiting with a message sent at or before `before`: each one's message should be in
    the queue, unless a worker holds it (one that took it a moment ago, or a dataset's or
    model's check, which holds it while it runs)."""
    return sum(
        session.scalar(
            select(func.count())
            .select_from(kind)
            .where(_waiting(kind), _sent(kind), kind.last_sent_at <= before)
        )
        or 0
        for kind in KINDS
    )


def sent_longest_ago(
    session: Session, kind: Waiting, *, before: datetime, limit: int
) -> list[tuple[datetime, str, int]]:
    """Rows waiting with a message last sent before `before`, the longest ago first:
    (last sent, id, sends)."""
    query = (
        select(kind.last_sent_at, kind.id, kind.send_count)
        .where(_waiting(kind), _sent(kind), kind.last_sent_at < before)
        .order_by(kind.last_sent_at)
        .limit(limit)
    )
    rows = session.execute(query)
    return [(sent, row_id, count) for sent, row_id, count in rows if sent is not None]


def fail_pending(
    session: Session, kind: type[Dataset] | type[Model], where: ColumnElement[bool], error: str
) -> list[str]:
    """pending -> failed with `error` for the rows `where` selects (conditionally, as a worker's
    check decides them); their ids."""
    result = session.execute(
        update(kind)
        .where(kind.state == "pending", where)
        .values(state="failed", error=error)
        .returning(kind.id)
    )
    return list(result.scalars())
