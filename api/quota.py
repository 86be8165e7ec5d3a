"""Fair use of the workers: one owner may have only so many jobs queued or running at once,
so a script in a loop cannot fill the queue ahead of everybody else, and no job may ask to run
longer than the server allows.

The count is read before the insert and not locked: two submissions racing each other may both
pass it. That is a quota, not an invariant, and it keeps submit free of table locks.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.problems import TooManyRequests, Unprocessable
from store.db.models import FINAL_STATES, Job
from store.settings import Settings
from tid_core.spec import JobSpec

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


def check_runtime(settings: Settings, spec: JobSpec) -> None:
    """422 when the spec asks for a longer run than `max_runtime_minutes` allows."""
    asked, limit = spec.schedule.max_runtime_minutes, settings.max_runtime_minutes
    if asked is not None and asked > limit:
        raise Unprocessable(
            f"schedule.max_runtime_minutes is {asked}, over this server's limit of {limit:g} "
            "minutes (TID_MAX_RUNTIME_MINUTES)",
            loc=("body", "schedule", "max_runtime_minutes"),
        )
