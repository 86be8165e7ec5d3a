"""The reconciler: repair what a lost worker or a lost message left behind, and start the jobs
on several nodes whose workers are all free (store.db.placement).

Torch-free on purpose: it also runs as `tid reconcile --loop` in the API image. Every change is
a conditional transition and a re-sent message is a no-op for a job that is already claimed,
so passes may overlap, on one host or several (each may then send a duplicate).
"""

from __future__ import annotations

import logging
from collections import Counter
from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from store.db import placement, sends, transitions, workers
from store.db.models import Dataset, Job, Model
from store.db.session import session_scope
from store.queue import RUN_JOB, TASK_FOR_ROW, enqueue, queue_length, send_node
from store.settings import Settings

log = logging.getLogger(__name__)


def _send_all(settings: Settings, job_ids: list[str]) -> int:
    """Send RUN_JOB for each job; a failed send is retried by a later pass (the job stays
    queued, its message unsent), so it is logged rather than allowed to stop this pass."""
    return sum(enqueue(settings, RUN_JOB, job_id) for job_id in job_ids)


def _place(settings: Settings) -> int:
    """Free the workers whose node is gone, start the gangs that can form (store.db.placement),
    and send each node its task on its worker's queue; how many jobs were placed."""
    with session_scope(settings.database_url) as session:
        freed = workers.release_stale(session)
        placed = placement.place(
            session,
            heartbeat_seconds=settings.heartbeat_seconds,
            lease_seconds=settings.lease_seconds,
        )
    if freed:
        log.warning("workers idle again, their node gone: %s", freed)
    for gang in placed:
        log.info(
            "job %s: placed on %s (node 0, the rendezvous host: %s)",
            gang.job_id,
            list(gang.workers),
            gang.workers[0],
        )
        sent = [
            send_node(settings, q, gang.job_id, gang.token, r) for r, q in enumerate(gang.queues)
        ]
        if not all(sent):
            _unplace(settings, gang)
    return len(placed)


def _unplace(settings: Settings, gang: placement.Placed) -> None:
    """A node's message could not be sent: the job goes back to the queue at once, as a
    hand-back (no attempt of it trained), and its workers are free; the nodes sent find the
    attempt over."""
    reason = "a node's message could not be sent (the broker refused it)"
    with session_scope(settings.database_url) as session:
        transitions.requeue(session, gang.job_id, token=gang.token, reason=reason, handback=True)
        for name in gang.workers:
            workers.release(session, name, gang.job_id)


def reconcile(*, settings: Settings) -> dict[str, int]:
    """One pass. Returns counts: jobs requeued, failed and cancelled (lost leases), messages
    resent, datasets and models expired (failed for waiting too long), and jobs on several
    nodes placed."""
    counts: Counter[str] = Counter()
    requeued: list[str] = []
    with session_scope(settings.database_url) as session:
        for job in transitions.expired_leases(session):  # by the database's clock
            owner = job.lease_owner  # the transition clears it
            # a failure waits until the worker's retried write of its outcome has given up
            grace = settings.db_retry_seconds
            state = transitions.requeue_lost(session, job, fail_after_seconds=grace)
            if state is None:
                continue
            log.warning("job %s: lease of %s expired; now %s", job.id, owner, state)
            counts[state] += 1
            if state == "queued" and job.nnodes == 1:  # a gang is placed, not sent
                requeued.append(job.id)
    _send_all(settings, requeued)
    due, expired = _lost_messages(settings)
    counts["resent"] = sum(enqueue(settings, TASK_FOR_ROW[kind], row_id) for kind, row_id in due)
    placed = _place(settings)
    return {
        "requeued": counts["queued"],
        "failed": counts["failed"],
        "cancelled": counts["cancelled"],
        "resent": counts["resent"],
        "expired": expired,
        "placed": placed,
    }


def _lost_messages(settings: Settings) -> tuple[list[tuple[sends.Waiting, str]], int]:
    """The messages to send again, at most `resend_per_pass`: of rows never sent first, then of
    rows whose message is missing from the queue. And how many datasets and models were failed
    instead, for waiting too long or being sent too often."""
    budget = settings.resend_per_pass
    with session_scope(settings.database_url) as session:
        # sends are recorded by the database's clock; read before the broker counts, so that a
        # message sent meanwhile is not counted missing
        now = transitions.db_now(session)
        in_queue = queue_length(settings)
        expired = _expire_waiting(session, settings, now=now)
        grace = now - timedelta(seconds=settings.requeue_after_seconds)
        due = [
            (kind, row_id)
            for kind in sends.KINDS
            for row_id in sends.never_sent(session, kind, before=grace, limit=budget)
        ][:budget]
        # the queue holds fewer messages than rows wait with one sent: that many are lost (a
        # broker restart, a dropped message) or with a worker; which ones is not known
        missing = 0 if in_queue is None else sends.count_sent(session, before=now) - in_queue
        limit = min(missing, budget - len(due))
        for kind, row_id, count in _sent_longest_ago(session, settings, now=now, limit=limit):
            if issubclass(kind, Job) or count < settings.check_max_sends:
                due.append((kind, row_id))
            else:  # a dataset's or model's check that keeps getting lost
                error = (
                    f"its check was sent {count} times and never ran (TID_CHECK_MAX_SENDS);"
                    " please create it again"
                )
                expired += len(sends.fail_pending(session, kind, kind.id == row_id, error))
    if due:
        log.warning(
            "sending %d message(s) again (never sent, or missing from the queue): %s",
            len(due),
            [f"{kind.__tablename__}/{row_id}" for kind, row_id in due],
        )
    return due, expired


def _sent_longest_ago(
    session: Session, settings: Settings, *, now: datetime, limit: int
) -> list[tuple[sends.Waiting, str, int]]:
    """Of the rows waiting with a message sent, the `limit` sent longest ago (a FIFO queue
    hands those out first), once their message may be lost: a job's `requeue_after_seconds`
    after its send; a dataset's or model's check only after the broker's visibility timeout,
    as it holds its message while it runs (and Redis gives a dead worker's message to another
    after that): before it, a duplicate would check it twice. (kind, id, sends) each."""
    if limit <= 0:
        return []
    visible = settings.broker_visibility_seconds
    lost_after = {Job: settings.requeue_after_seconds, Dataset: visible, Model: visible}
    rows = [
        (sent, kind, row_id, count)
        for kind in sends.KINDS
        for sent, row_id, count in sends.sent_longest_ago(
            session, kind, before=now - timedelta(seconds=lost_after[kind]), limit=limit
        )
    ]
    rows.sort(key=lambda row: row[0])
    return [(kind, row_id, count) for _, kind, row_id, count in rows[:limit]]


def _expire_waiting(session: Session, settings: Settings, *, now: datetime) -> int:
    """Fail the datasets and models that no worker checked within
    `check_max_pending_seconds`, whatever the reason (workers down, a message lost in a way
    the queue count cannot show): their users learn it, rather than wait for ever."""
    limit = settings.check_max_pending_seconds
    error = (
        f"no worker checked it within {limit:g} s (TID_CHECK_MAX_PENDING_SECONDS);"
        " please create it again"
    )
    expired = 0
    for kind in (Dataset, Model):
        ids = sends.fail_pending(
            session, kind, kind.created_at < now - timedelta(seconds=limit), error
        )
        if ids:
            log.warning("%s failed, pending too long: %s", kind.__tablename__, ids)
        expired += len(ids)
    return expired
