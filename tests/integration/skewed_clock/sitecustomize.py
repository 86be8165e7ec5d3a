"""Test-only: puts this process's wall clock `TEST_CLOCK_SKEW_SECONDS` off, as on a host whose
clock is off. Python imports it at start-up when its folder comes first on `PYTHONPATH`, which
the clock-skew fault test sets for the service processes it starts (their trainers inherit
it); the service itself has no such hook.

Every wall-clock read of Python code is shifted: `time.time()`, `time.time_ns()` and
`datetime.now()`, `utcnow()`, `today()` (the `datetime` class is replaced by a subclass before
anything imports it). The monotonic clock is left alone, as a host's clock that is off leaves
it. libfaketime, which shifts the C library's clock instead, breaks Python 3.11's timed waits in
Debian 12's version 0.9.10: `time.sleep` fails with EINVAL, or `Event.wait` hangs.
"""

from __future__ import annotations

import datetime
import os
import time
from typing import Any

_SKEW = float(os.environ["TEST_CLOCK_SKEW_SECONDS"])
_OFFSET = datetime.timedelta(seconds=_SKEW)
_time, _time_ns = time.time, time.time_ns
time.time = lambda: _time() + _SKEW
time.time_ns = lambda: _time_ns() + round(_SKEW * 1e9)


class _SkewedDatetime(datetime.datetime):
    __slots__ = ()  # the layout of `datetime`, which C extensions check when they import it

    @classmethod
    def now(cls, tz: Any = None) -> Any:
        return super().now(tz) + _OFFSET

    @classmethod
    def utcnow(cls) -> Any:
        return super().utcnow() + _OFFSET

    @classmethod
    def today(cls) -> Any:
        return cls.now()


datetime.datetime = _SkewedDatetime  # type: ignore[misc]
