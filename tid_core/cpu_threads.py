"""The trainer's OpenMP settings, from the cores it was given, however it was started.

Importing this module sets them, so it must come before anything imports torch: OpenMP reads
its wait policy once, when torch loads it. Spinning OpenMP threads (the default policy) beside
another job on the same cores made each step about 10x slower; passive threads sleep instead.
The thread count is this process's share of its CPU affinity (torchrun's LOCAL_WORLD_SIZE
processes share it). Values already in the environment (from the worker, torchrun or the user)
win.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping


def threads_per_process(environ: MutableMapping[str, str]) -> int:
    """The cores this process may run on, divided among the node's trainer processes."""
    local = max(1, int(environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, len(os.sched_getaffinity(0)) // local)


def claim_cores(environ: MutableMapping[str, str]) -> None:
    environ.setdefault("OMP_NUM_THREADS", str(threads_per_process(environ)))
    environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


claim_cores(os.environ)
