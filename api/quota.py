"""Fair use of the workers: one owner may have only so many jobs queued or running at once,
so a script in a loop cannot fill the queue ahead of everybody else.

The count is read before the insert and not locked: two submissions racing each other may both
pass it. That is a quota, not an invariant, and it keeps submit free of table locks.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.problems import TooManyRequests
from store.db.models import FINAL_STATES, Job
from store.settings import Settings

RETRY_AFTER_SECONDS = 60  # jobs run for minutes: asking again sooner only adds load


def check_active_jobs(session: Session, settings: Settings, *, owner: str) -> None:
    """429 when `owner` already has `max_active_jobs_per_owner` jobs queued or running."""
    limit = settings.max_active_jobs_per_owner
    if limit == 0:
        return
    active = session.scalar(
        select(func.count())
        .select_from(Job)
        .where(Job.owner == owner, Job.state.not_in(FINAL_STATES))
    )
    if active is not None and active >= limit:
        raise TooManyRequests(
            f"you have {active} jobs queued or running and the limit is {limit}: "
            "wait for one to finish or cancel one",
            retry_after=RETRY_AFTER_SECONDS,
        )
