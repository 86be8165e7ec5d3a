"""How a running job learns that its worker is going away (a deploy's SIGTERM), in any pool.

On SIGTERM a running job is handed back to the queue (worker.runner) instead of being trained
to the end or killed; `shutdown_event()` is the flag it watches.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from celery import signals

from worker.runner import Flag

# This worker is going away: running jobs hand themselves back. Made at import, before the
# prefork pool forks, so the pool's children see the main process set it: they are never sent
# a signal of their own (an idle child killed by SIGTERM can die holding the pool's queue lock,
# and the pool then hangs at exit waiting for it; docs/RELIABILITY.md).
_SHUTDOWN = multiprocessing.get_context("fork").Event()
_main_pid: int | None = None  # the worker's main process; prefork children have other pids


@dataclass(frozen=True)
class AnyFlag:
    """Set when any of its flags is."""

    flags: tuple[Flag, ...]

    def is_set(self) -> bool:
        return any(flag.is_set() for flag in self.flags)


def _on_worker_init(**_: Any) -> None:
    global _main_pid
    _main_pid = os.getpid()


def _on_shutting_down(**_: Any) -> None:
    """Celery's warm shutdown, in the main process: jobs running in it (solo or threads pool)
    or in its prefork children see the event, since the warm shutdown would wait for them."""
    _SHUTDOWN.set()


signals.worker_init.connect(_on_worker_init)
signals.worker_shutting_down.connect(_on_shutting_down)


@contextmanager
def shutdown_event() -> Iterator[Flag]:
    """The flag a job watches while it runs. In a prefork child, a SIGTERM to the child itself
    (its process group signalled) also sets it for that time, instead of billiard's default
    exit, which would orphan the trainer."""
    if _main_pid is None or os.getpid() == _main_pid:
        yield _SHUTDOWN
        return
    signalled = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda _signum, _frame: signalled.set())
    try:
        yield AnyFlag((_SHUTDOWN, signalled))
    finally:
        signal.signal(signal.SIGTERM, previous)
