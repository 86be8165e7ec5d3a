"""Exclusive ownership of a run dir: at most one trainer writes into it at a time.

The service runs one attempt of a job at a time, but a trainer whose worker died may still be
saving its last checkpoint when the next attempt starts on the same shared volume. The main
process of every trainer holds an `flock` on `DIR/.lock` for its whole life (the kernel drops
it when the process dies, however it dies), and a new trainer waits for it before it reads a
checkpoint or writes an event. `flock` is advisory and per host, and NFSv4 maps it to a lock
the server enforces across clients.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from typing import IO

LOCK_FILE = ".lock"
POLL_SECONDS = 0.2


class RunDirLocked(RuntimeError):
    """Another trainer still holds the run dir after the wait: a retry later may succeed."""


def lock_run_dir(run_dir: Path, *, timeout: float) -> IO[str]:
    """Wait up to `timeout` seconds for the run dir's lock; keep the returned file open (and
    referenced) for as long as the lock must be held."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = (run_dir / LOCK_FILE).open("a+")
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                lock.seek(0)
                holder = lock.read().strip() or "unknown"
                lock.close()
                raise RunDirLocked(
                    f"{run_dir} is still in use by another trainer (pid {holder}) after "
                    f"{timeout:.0f} s"
                ) from None
            time.sleep(POLL_SECONDS)
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock
