"""What the fault tests watch from outside: a job's trainer processes, read from /proc.

An attempt is one process tree: torchrun, its workers (which torchrun starts in sessions of
their own) and their data loader workers (in process groups of their own), or a worker orphaned
by a dead torchrun. The topmost trainer process of each tree is that attempt's root, so the
distinct roots of the trees that still train are the attempts running at that moment. A loader
worker whose trainer just died is a root too, until its parent-death signal lands, and a
torchrun whose workers are gone trains nothing (a lost host's, closing its rendezvous after its
SIGTERM): neither is an attempt. A sampler thread records the largest number it ever saw.
"""

from __future__ import annotations

import signal
import threading
from collections import Counter
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

SAMPLE_SECONDS = 0.05


def _cmdline(pid: int) -> list[str]:
    with suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    return []


def _stat(pid: int) -> tuple[int, int, int] | None:
    """Parent pid, process group and session of a live process (None: a zombie, or gone)."""
    with suppress(OSError, IndexError, ValueError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        return None if fields[0] == "Z" else (int(fields[1]), int(fields[2]), int(fields[3]))
    return None


def alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped counts as gone)."""
    return _stat(pid) is not None


def _parent(pid: int) -> int | None:
    """The parent pid of a live process (None for a zombie or a gone one)."""
    stat = _stat(pid)
    return None if stat is None else stat[0]


def _launcher(pid: int) -> bool:
    """torchrun itself, which starts the processes that train."""
    return "torch.distributed.run" in _cmdline(pid)


def _loader_worker(pid: int) -> bool:
    """A data loader worker: it leads a process group of its own inside its trainer's session
    (`tid_core.data.coco`), where torchrun and its workers each lead a session."""
    stat = _stat(pid)
    return stat is not None and stat[1] == pid != stat[2]


def trainer_processes(run_dir: Path) -> dict[int, int]:
    """pid -> attempt root of every live process training into `run_dir` (torchrun too)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        args = _cmdline(int(entry.name))
        if "tid_core.train" in args and str(run_dir) in args:
            parent = _parent(int(entry.name))
            if parent is not None:
                parents[int(entry.name)] = parent
    roots = {}
    for pid in parents:
        root = pid
        while parents.get(root) in parents:
            root = parents[root]
        roots[pid] = root
    return roots


def rank0_trainer(run_dir: Path) -> int:
    """The pid of the trainer process itself (torchrun's worker): not the launcher, and not
    one of its data loader workers (forks with the same command line)."""
    trainers = {pid for pid in trainer_processes(run_dir) if not _launcher(pid)}
    pids = [pid for pid in trainers if _parent(pid) not in trainers]
    assert len(pids) == 1, f"expected one trainer process for {run_dir}, found {pids}"
    return pids[0]


def signal_pending(pid: int, sig: signal.Signals) -> bool:
    """Whether `sig` waits, undelivered, for the (stopped) process `pid`."""
    status = Path(f"/proc/{pid}/status").read_text()
    masks = [line.split()[1] for line in status.splitlines() if line[:6] in ("SigPnd", "ShdPnd")]
    return any(int(mask, 16) & (1 << (sig - 1)) for mask in masks)


class AttemptWatch:
    """Samples the trainer processes of some run dirs in a thread while a test runs.

    With `host_of` (a pid's host: its network namespace, bench/netns.py, on one PID namespace)
    it also records the most attempts seen at once on any one host, and each host that ran one:
    a job on several nodes runs one trainer tree per host."""

    def __init__(self, host_of: Callable[[int], str | None] | None = None) -> None:
        self.run_dirs: list[Path] = []
        self.most: dict[Path, int] = {}
        self.most_on_a_host: dict[Path, int] = {}
        self.hosts: dict[Path, set[str]] = {}
        self._host_of = host_of
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def watch(self, run_dir: Path) -> None:
        self.most.setdefault(run_dir, 0)
        self.run_dirs.append(run_dir)

    def _loop(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            for run_dir in list(self.run_dirs):
                procs = trainer_processes(run_dir)
                roots = {root for pid, root in procs.items() if not _launcher(pid)}
                attempts = {root for root in roots if not _loader_worker(root)}
                self.most[run_dir] = max(self.most[run_dir], len(attempts))
                if self._host_of is not None:
                    on = Counter(self._host_of(root) for root in attempts)
                    most = max(on.values(), default=0)
                    self.most_on_a_host[run_dir] = max(self.most_on_a_host.get(run_dir, 0), most)
                    self.hosts.setdefault(run_dir, set()).update(h for h in on if h)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
