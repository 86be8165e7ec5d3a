"""The trainer sets its own OpenMP threads and wait policy, however it is started."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tid_core.cpu_threads import claim_cores, threads_per_process

PROBE = (
    "import os, tid_core.train, torch;"
    "print(os.environ.get('OMP_WAIT_POLICY'), torch.get_num_threads())"
)


def started(**env: str) -> list[str]:
    """What a trainer process started with `env` (and no OpenMP settings of its own) runs with."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "LOCAL_"))}
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**inherited, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return out.stdout.split()


def test_the_cores_are_shared_among_the_nodes_processes() -> None:
    cores = len(os.sched_getaffinity(0))
    assert threads_per_process({}) == cores
    assert threads_per_process({"LOCAL_WORLD_SIZE": str(cores)}) == 1
    assert threads_per_process({"LOCAL_WORLD_SIZE": str(2 * cores)}) == 1


def test_settings_already_given_win() -> None:
    environ = {"OMP_NUM_THREADS": "3", "OMP_WAIT_POLICY": "ACTIVE"}
    claim_cores(environ)
    assert environ == {"OMP_NUM_THREADS": "3", "OMP_WAIT_POLICY": "ACTIVE"}


def test_a_trainer_started_directly_waits_passively_on_its_share_of_the_cores() -> None:
    cores = len(os.sched_getaffinity(0))
    if cores < 2:
        pytest.fail("needs 2 cores to tell a share from the whole machine")
    assert started(LOCAL_WORLD_SIZE="2") == ["PASSIVE", str(cores // 2)]
    assert started(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="ACTIVE") == ["ACTIVE", "1"]
