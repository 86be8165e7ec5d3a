"""How the trainer is started: the torchrun command line for a spec and a run dir, and the
parent-death signal that keeps a trainer from outliving whoever started it.

Torch-free, so the worker and the benchmarks start trainers exactly as
`python -m torch.distributed.run --standalone ... -m tid_core.train` does by hand.
"""

from __future__ import annotations

import ctypes
import signal
import sys
from pathlib import Path

PR_SET_PDEATHSIG = 1  # linux/prctl.h
# looked up at import, before any fork: a forked child may only make the call itself
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None


def set_parent_death_signal(sig: signal.Signals) -> None:
    """Ask the kernel to send `sig` to this process when its parent dies (Linux; elsewhere a
    no-op). One libc call, so it is safe in a `preexec_fn` between fork and exec."""
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, sig)


def terminate_with_parent() -> None:
    """A `preexec_fn` for service children (trainers, the demo's API and worker): SIGTERM when
    their starter dies without cleaning up (SIGKILL, OOM), so they stop as on `docker stop`
    instead of living on as orphans. One libc call: safe between fork and exec."""
    set_parent_death_signal(signal.SIGTERM)


def torchrun_command(spec: Path, run_dir: Path, *, nproc: int) -> list[str]:
    """argv for `nproc` trainer processes on this host (a standalone rendezvous)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "tid_core.train",
        "--spec",
        str(spec),
        "--run-dir",
        str(run_dir),
    ]
