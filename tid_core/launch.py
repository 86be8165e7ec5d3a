"""How the trainer is started: the torchrun command line for a spec and a run dir.

Torch-free (it only builds argv), so the worker and the benchmarks start trainers exactly as
`python -m torch.distributed.run --standalone ... -m tid_core.train` does by hand.
"""

from __future__ import annotations

import sys
from pathlib import Path


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
