"""Tasks are sent only after the rows they name are committed, and a failed send never turns a
written row into an error response: jobs are re-sent by the reconciler, and a dataset or model
whose check could not be queued is marked failed with the reason, so nothing waits forever.
"""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session

from api.db.models import Dataset, Model
from api.queue import send
from api.settings import Settings

log = logging.getLogger(__name__)


def enqueue(settings: Settings, task: str, resource_id: str) -> bool:
    """Send `task` for a committed row; False (and logged) when the broker refused it."""
    try:
        send(settings, task, resource_id)
    except Exception:
        log.exception("could not send %s(%s) to the task queue", task, resource_id)
        return False
    return True


def commit_and_enqueue(
    session: Session, settings: Settings, row: Dataset | Model, task: str
) -> None:
    """Insert a pending dataset or model, commit, then queue the worker task that checks it."""
    session.add(row)
    session.commit()
    if not enqueue(settings, task, row.id):
        row.state = "failed"
        row.error = "the task queue could not be reached: please create it again"
