"""The worker's Celery app: `tid worker`, or `celery -A worker.celery_app worker -Q <queue> -c 1
--prefetch-multiplier 1`.

Built by `api.queue.make_celery`, so the API and the workers agree on broker, queue and task
names; importing `worker.tasks` below registers the implementations.

Deploys: on SIGTERM a running job is handed back to the queue (worker.runner) instead of being
trained to the end or killed. `shutdown_event()` is how a job learns of it, in any pool.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

from billiard.process import active_children
from celery import signals

from api.queue import make_celery
from api.settings import get_settings

settings = get_settings()
app = make_celery(settings)

_SHUTDOWN = threading.Event()  # this process is going away: running jobs hand themselves back
_main_pid: int | None = None  # the worker's main process; prefork children have other pids


def _on_worker_init(**_: Any) -> None:
    global _main_pid
    _main_pid = os.getpid()


def _on_shutting_down(sig: str, **_: Any) -> None:
    """Celery's warm shutdown, in the main process. Jobs running in this process (solo or
    threads pool) see the event; prefork children running one get the SIGTERM that `docker
    stop` sent only to this process, since the warm shutdown would wait for the job to end."""
    _SHUTDOWN.set()
    if sig != "SIGTERM":
        return
    for child in active_children():
        if child.pid is not None:
            with suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGTERM)


signals.worker_init.connect(_on_worker_init)
signals.worker_shutting_down.connect(_on_shutting_down)


@contextmanager
def shutdown_event() -> Iterator[threading.Event]:
    """The event a job watches while it runs. In a prefork child, SIGTERM sets it for that
    time instead of billiard's handler, which would exit the child and orphan the trainer."""
    if _main_pid is None or os.getpid() == _main_pid:
        yield _SHUTDOWN
        return
    previous = signal.signal(signal.SIGTERM, lambda _signum, _frame: _SHUTDOWN.set())
    try:
        yield _SHUTDOWN
    finally:
        signal.signal(signal.SIGTERM, previous)


import worker.tasks  # noqa: E402, F401  (registers the tasks on `app`)
