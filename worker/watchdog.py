"""A deadline that acts on its own thread: whatever the caller is blocked on (a database that
stopped answering), the action runs when the deadline passes unless it was pushed back first.

The worker arms one with its job's lease and pushes it back on each renewal the database
confirmed, so a trainer never outlives the lease that lets it run.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Self


class Watchdog:
    """Calls `action` once when `time.monotonic()` passes the deadline; `fired` says it did."""

    def __init__(self, action: Callable[[], None], *, deadline: float, name: str) -> None:
        self._action = action
        self._deadline = deadline
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.fired = False

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    def extend(self, deadline: float) -> None:
        """Push the deadline back (never forward); too late once it has fired."""
        with self._cond:
            self._deadline = max(self._deadline, deadline)

    def _run(self) -> None:
        """Sleeps to the deadline, again after each extension: ends when it fires or closes."""
        with self._cond:
            while not self._closed:
                left = self._deadline - time.monotonic()
                if left <= 0:
                    self.fired = True
                    break
                self._cond.wait(left)
        if self.fired:
            self._action()
