"""How the trainer is started: the torchrun command line for a spec and a run dir (on one host
or as one node of several), and the parent-death signal that keeps a trainer from outliving
whoever started it.

Torch-free, so the worker and the benchmarks start trainers exactly as
`python -m torch.distributed.run --standalone ... -m tid_core.train` does by hand.
"""

from __future__ import annotations

import ctypes
import signal
import socket
import sys
from dataclasses import dataclass
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


def route_source(host: str) -> str | None:
    """The IPv4 address this host sends from toward `host` (an IPv4 address or a name): the
    kernel's choice of route, found by a UDP connect, which sends nothing. None without one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((host, 9))
        except OSError:
            return None
        source: str = probe.getsockname()[0]
        return source


@dataclass(frozen=True)
class Rendezvous:
    """One node's part in a job that spans `nnodes` hosts: torchrun's c10d rendezvous.

    `endpoint` ("ADDRESS:PORT") is on the node that hosts the rendezvous store, the one whose
    `local_addr` is ADDRESS, spelled the same; `run_id` names one attempt of the job, so that
    a retry never joins a dead attempt's round. `local_addr` is this node's address as the
    other nodes reach it: torchrun names the node by it instead of by the host name (which may
    resolve to a loopback or unreachable address), and the node that c10d makes rank 0 (the
    nodes sorted by it: not necessarily the endpoint's) serves the trainers' store there
    (MASTER_ADDR). Global rank 0, the one that writes the run dir, is on that node.
    """

    nnodes: int
    endpoint: str
    run_id: str
    local_addr: str
    # whether this node serves the store; None: the node whose address is the endpoint's (two
    # nodes on one host, one worker per GPU, share an address: their starter says which)
    host: bool | None = None

    @property
    def hosts_store(self) -> bool:
        if self.host is not None:
            return self.host
        return self.endpoint.rsplit(":", 1)[0].strip("[]") == self.local_addr

    def torchrun_args(self) -> list[str]:
        """torchrun's flags. `is_host` says which node serves the store: torchrun's own guess
        compares the endpoint with the host name and its addresses, and misses both where the
        address is not the one the host name resolves to. No restarts: a failed node fails the
        attempt, and the service decides about the next one."""
        return [
            f"--nnodes={self.nnodes}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={self.endpoint}",
            f"--rdzv-id={self.run_id}",
            f"--rdzv-conf=is_host={int(self.hosts_store)}",
            f"--local-addr={self.local_addr}",
            "--max-restarts=0",
        ]


def torchrun_command(
    spec: Path, run_dir: Path, *, nproc: int, rendezvous: Rendezvous | None = None
) -> list[str]:
    """argv for `nproc` trainer processes on this host: alone (a standalone rendezvous) or
    as one node of several."""
    nodes = ["--standalone"] if rendezvous is None else rendezvous.torchrun_args()
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *nodes,
        f"--nproc-per-node={nproc}",
        "-m",
        "tid_core.train",
        "--spec",
        str(spec),
        "--run-dir",
        str(run_dir),
    ]
