"""Retrying one database write through a blip, in place, for a bounded time.

For writes whose work is done and costly to repeat (hours of training, a resource's check):
raising to Celery instead would redo that work, and count a delivery that was not one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from store.db.session import TRANSIENT_ERRORS
from store.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")


def retrying(settings: Settings, subject: str, what: str, call: Callable[[], T]) -> T:
    """`call()` until the database answers (a restart takes seconds), for at most
    `db_retry_seconds`; then its last transient error is raised. `subject` and `what` name it
    in the log ("job ...", "recording the outcome")."""
    deadline = time.monotonic() + settings.db_retry_seconds
    delay = 0.5
    while True:
        try:
            return call()
        except TRANSIENT_ERRORS as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("%s: database unavailable %s; retrying: %s", subject, what, exc)
            time.sleep(delay)
            delay = min(2 * delay, 10.0)
