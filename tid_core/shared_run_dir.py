"""The check that every node of a job sees the same run dir, before anything is written.

Rank 0 writes every file, and every rank reads what it wrote (the builtin dataset, the
checkpoint to resume from), so a job on several hosts needs its run dir on storage they all
share. Where the path is a local folder on some host, that host's ranks would miss the
dataset, or resume from another checkpoint than rank 0 (or from none) and train out of step
with it; the job fails at once instead, naming the path.
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

from tid_core import dist
from tid_core.checkpoint import write_atomic

MARKER = ".shared-run-dir"
# a shared file system may show another host's new file late (NFS caches attributes)
READ_TIMEOUT_S = 5.0
READ_POLL_S = 0.1


class RunDirNotShared(RuntimeError):
    """Some node does not see the run dir that rank 0 writes into (never retryable)."""


def _sees(marker: Path, token: bytes) -> bool:
    """Whether `marker` holds `token`, within READ_TIMEOUT_S."""
    deadline = time.monotonic() + READ_TIMEOUT_S
    while True:
        try:
            if marker.read_bytes() == token:
                return True
        except OSError:
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(READ_POLL_S)


def check_shared_run_dir(run_dir: Path) -> None:
    """On a job across nodes (a no-op otherwise): rank 0 writes a fresh token into
    `run_dir/MARKER` and sends it to every rank; each rank reads the file; if any rank did
    not find the token, every rank raises RunDirNotShared, so the whole job stops at once
    and rank 0's error event says which node missed it."""
    if not dist.spans_nodes():
        return
    marker = run_dir.resolve() / MARKER
    token = None
    if dist.is_main_process():
        fresh = token = secrets.token_hex(16).encode()
        write_atomic(marker, lambda f: f.write(fresh))
    token = dist.broadcast_from_main(token)
    views = dist.all_gather((os.environ.get("GROUP_RANK", "?"), str(marker), _sees(marker, token)))
    blind = [
        f"rank {rank} on node {node} ({path})"
        for rank, (node, path, seen) in enumerate(views)
        if not seen
    ]
    if blind:
        node0, path0, _ = views[0]
        raise RunDirNotShared(
            f"the run dir is not shared by the job's nodes: {', '.join(blind)} did not find "
            f"the marker that rank 0 on node {node0} wrote to {path0}; a job on several nodes "
            "needs its run dir on storage all nodes share (the same path on each, e.g. an NFS "
            "mount)"
        )
