"""The reconciler: repair what a lost worker or a lost message left behind.

Torch-free on purpose: it also runs as `tid reconcile --loop` in the API image. Every change is
a conditional transition and a re-sent message is a no-op for a job that is already claimed,
so passes may overlap, on one host or several.
"""

from __future__ import annotations

import logging
from collections import Counter
from datetime import timedelta

from store.db import transitions
from store.db.models import utcnow
from store.db.session import session_scope
from store.queue import RUN_JOB, enqueue
from store.settings import Settings

log = logging.getLogger(__name__)


def _send_all(settings: Settings, job_ids: list[str]) -> int:
    """Send RUN_JOB for each job; a failed send is retried by a later pass (the job stays
    queued and turns stale), so it is logged rather than allowed to stop this pass."""
    return sum(enqueue(settings, RUN_JOB, job_id) for job_id in job_ids)


def reconcile(*, settings: Settings) -> dict[str, int]:
    """One pass. Returns counts: requeued, failed, cancelled (lost leases) and resent."""
    now = utcnow()
    counts: Counter[str] = Counter()
    requeued: list[str] = []
    with session_scope(settings.database_url) as session:
        for job in transitions.expired_leases(session, now=now):
            state = transitions.requeue_lost(session, job, now=now)
            if state is None:
                continue
            log.warning("job %s: lease of %s expired; now %s", job.id, job.lease_owner, state)
            counts[state] += 1
            if state == "queued":
                requeued.append(job.id)
    _send_all(settings, requeued)
    older_than = now - timedelta(seconds=settings.requeue_after_seconds)
    with session_scope(settings.database_url) as session:
        stale = transitions.stale_queued(session, older_than=older_than)
    if stale:
        log.warning("re-sending %d queued job(s) nobody picked up: %s", len(stale), stale)
    counts["resent"] = _send_all(settings, stale)
    return {
        "requeued": counts["queued"],
        "failed": counts["failed"],
        "cancelled": counts["cancelled"],
        "resent": counts["resent"],
    }
