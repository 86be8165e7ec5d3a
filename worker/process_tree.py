"""Kill a trainer's whole process tree at once, wherever its processes are.

torchrun starts each trainer worker in a session of its own (and each worker its data loader
workers in process groups of their own), so a signal to torchrun's group reaches only torchrun.
The workers follow it through their parent-death signal, but a worker arms that only once it
runs its own code: one still importing torch when torchrun is killed (a stall or a lost lease
during start-up) lives on as an orphan beside the next attempt. Walking the tree from /proc
reaches every process, armed or not.
"""

from __future__ import annotations

import os
import signal
import time
from contextlib import suppress
from pathlib import Path

MAX_PROCESSES = 4096  # far more than a trainer has (ranks, loader workers, compile workers)
# per process: one in uninterruptible sleep (a dead mount) may not stop, but forks nothing
STOP_WAIT_SECONDS = 1.0


def _state(pid: int) -> str | None:
    """The process state letter (R, S, D, T, Z...), None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2]


def _children(pid: int) -> list[int]:
    children: list[int] = []
    with suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with suppress(OSError):
                children.extend(int(child) for child in (task / "children").read_text().split())
    return children


def _stop(pid: int) -> None:
    """SIGSTOP `pid` and wait until it is stopped, so that it forks no child after we look."""
    with suppress(ProcessLookupError):
        os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + STOP_WAIT_SECONDS
    while _state(pid) not in (None, "T", "t", "Z") and time.monotonic() < deadline:
        time.sleep(0.001)


def kill_tree(root: int) -> None:
    """SIGKILL `root`, its process group and every process below it. Each process is stopped
    before its children are listed, parents first, so none escapes by forking meanwhile."""
    found: list[int] = []
    todo = [root]
    while todo and len(found) < MAX_PROCESSES:
        pid = todo.pop()
        _stop(pid)
        found.append(pid)
        todo.extend(_children(pid))
    with suppress(ProcessLookupError):
        os.killpg(root, signal.SIGKILL)
    for pid in found:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
