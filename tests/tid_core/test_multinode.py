"""The trainer as one job across two hosts: each host a network namespace with its own address
(bench/netns.py), torchrun on each with a c10d rendezvous on the first host's address, gloo
between them, and the run dir in a folder both see, as a shared file system."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import torch
from prerequisites import missing
from processes import alive, trainer_processes

from bench import netns
from tid_core.data.synthetic import generate_shapes
from tid_core.dist import route_interface
from tid_core.events import read_events
from tid_core.launch import Rendezvous, torchrun_command
from tid_core.models import load_student
from tid_core.shared_run_dir import MARKER

pytestmark = pytest.mark.slow
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
RDZV_PORT = 29400  # free: each host is a fresh network namespace
RUN_TIMEOUT_S = 240.0


@pytest.fixture
def network() -> Iterator[netns.Network]:
    with ExitStack() as stack:
        try:
            net = stack.enter_context(netns.hosts(2))
        except netns.NetnsUnavailable as exc:
            missing(f"network namespaces cannot be made here: {exc}")
        yield net


@pytest.fixture
def spec(tmp_path: Path) -> Path:
    """A tiny job: 8 images, 2 per process and step, 2 processes: 2 steps, then the eval."""
    data = generate_shapes(tmp_path / "shapes", num_train=8, num_val=4, image_size=64, seed=0)
    spec: dict[str, Any] = {
        "name": "two-nodes",
        "student": {"arch": "fcos", "backbone": "resnet18", "fpn_channels": 64},
        "dataset": {"path": str(data), "input_size": 64},
        "schedule": {"epochs": 1, "batch_size": 2, "warmup_iters": 1, "log_every": 1},
        "resources": {"num_workers": 0, "device": "cpu"},
    }
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    return path


def start_nodes(
    net: netns.Network, spec: Path, run_dirs: list[Path], logs: Path
) -> list[subprocess.Popen[bytes]]:
    """torchrun on each host, as the worker of each node of one attempt will start it."""
    run_id = f"test-{uuid.uuid4().hex[:8]}-1"
    endpoint = f"{net.hosts[0].address}:{RDZV_PORT}"
    procs = []
    for i, (host, run_dir) in enumerate(zip(net.hosts, run_dirs, strict=True)):
        rendezvous = Rendezvous(len(net.hosts), endpoint, run_id, local_addr=host.address)
        cmd = torchrun_command(spec, run_dir, nproc=1, rendezvous=rendezvous)
        with (logs / f"node{i}.log").open("wb") as log:
            procs.append(host.popen(cmd, env=ENV, stdout=log, stderr=subprocess.STDOUT))
    return procs


def wait_all(
    procs: list[subprocess.Popen[bytes]], net: netns.Network, run_dirs: list[Path]
) -> set[str]:
    """Wait, bounded, for every node to exit; the hosts where the /proc sampler saw a trainer
    of the run dirs meanwhile (one PID namespace: every host's processes are in /proc)."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    seen = set()
    while any(p.poll() is None for p in procs):
        assert time.monotonic() < deadline, f"the nodes ran past {RUN_TIMEOUT_S} s"
        pids = {pid for run_dir in run_dirs for pid in trainer_processes(run_dir)}
        seen |= {h.name for h in net.hosts for pid in pids if h.holds(pid)}
        time.sleep(0.2)
    return seen


def test_one_job_trains_across_two_hosts(
    network: netns.Network, spec: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "shared" / "run"
    procs = start_nodes(network, spec, [run_dir, run_dir], tmp_path)
    seen = wait_all(procs, network, [run_dir])
    logs = [(tmp_path / f"node{i}.log").read_text(errors="replace") for i in range(2)]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
    assert seen == {h.name for h in network.hosts}
    assert all("gloo uses eth0" in log for log in logs)  # each host's own interface

    events = read_events(run_dir / "events.jsonl")
    types = [e["type"] for e in events]
    assert types.count("start") == 1 and types.count("end") == 1  # rank 0 alone writes events
    assert events[0]["world_size"] == 2 and events[0]["total_steps"] == 2
    assert [e["step"] for e in events if e["type"] == "step"] == [1, 2]  # once per step
    assert (run_dir / MARKER).is_file()
    model, meta = load_student(run_dir / "student.safetensors")
    assert meta.num_classes == 5 and meta.input_size == 64
    assert set(model([torch.rand(3, 64, 64)])[0]) == {"boxes", "scores", "labels"}


def test_a_run_dir_the_nodes_do_not_share_fails_the_job_naming_it(
    network: netns.Network, spec: Path, tmp_path: Path
) -> None:
    run_dirs = [tmp_path / "host0" / "run", tmp_path / "host1" / "run"]  # as if not shared
    procs = start_nodes(network, spec, run_dirs, tmp_path)
    wait_all(procs, network, run_dirs)
    logs = [(tmp_path / f"node{i}.log").read_text(errors="replace") for i in range(2)]
    assert all(p.returncode == 1 for p in procs), "\n".join(log[-3000:] for log in logs)
    assert all("RunDirNotShared" in log or "not shared" in log for log in logs)

    # rank 0 (on either host: c10d orders the nodes itself) wrote the one error event
    written = [d for d in run_dirs if (d / "events.jsonl").exists()]
    assert len(written) == 1
    (error,) = read_events(written[0] / "events.jsonl")
    assert error["type"] == "error" and error["kind"] == "RunDirNotShared"
    assert error["retryable"] is False
    (other,) = set(run_dirs) - set(written)
    assert str(other.resolve() / MARKER) in error["message"]
    assert "storage all nodes share" in error["message"]


def test_the_hosts_leave_nothing_behind(tmp_path: Path) -> None:
    # an error in the block: the hosts' processes are killed, the namespaces and links gone
    with pytest.raises(RuntimeError, match="boom"), ExitStack() as stack:
        try:
            net = stack.enter_context(netns.hosts(2))
        except netns.NetnsUnavailable as exc:
            missing(f"network namespaces cannot be made here: {exc}")
        sleepers = [h.popen(["sleep", "300"]) for h in net.hosts]
        raise RuntimeError("boom")
    assert not netns.leftovers() & netns.slot_names(net.slot, 2)
    assert [p.returncode for p in sleepers] == [-signal.SIGKILL] * 2

    # a run killed before its cleanup: the next run removes what it left
    crash = (
        "import os, signal, subprocess\n"
        "from bench import netns\n"
        "hosts = netns.hosts(1)\n"  # referenced: its collection would clean up
        "net = hosts.__enter__()\n"
        "quiet = {'stdout': subprocess.DEVNULL, 'stderr': subprocess.DEVNULL}\n"
        "sleeper = net.hosts[0].popen(['sleep', '300'], **quiet)\n"
        "print(net.slot, sleeper.pid, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", crash], capture_output=True, text=True, timeout=60, check=False
    )
    slot, sleeper = map(int, done.stdout.split())
    assert netns.slot_names(slot, 1) <= netns.leftovers() and alive(sleeper), done.stderr
    with netns.hosts(1):  # sweeps before it makes its own (maybe in the same slot)
        assert not alive(sleeper)
    assert not netns.leftovers() & netns.slot_names(slot, 1)


def test_each_node_gets_the_rendezvous_flags_of_its_part() -> None:
    nodes = [
        Rendezvous(2, "10.0.0.2:29400", "job-1", local_addr=a) for a in ("10.0.0.2", "10.0.0.3")
    ]
    args = [torchrun_command(Path("s.json"), Path("run"), nproc=2, rendezvous=r) for r in nodes]
    assert "--standalone" not in args[0]
    assert "--rdzv-conf=is_host=1" in args[0] and "--rdzv-conf=is_host=0" in args[1]
    assert "--local-addr=10.0.0.3" in args[1] and "--rdzv-id=job-1" in args[1]
    assert "--standalone" in torchrun_command(Path("s.json"), Path("run"), nproc=2)
    # two nodes on one host (one worker per GPU) share its address: node 0 alone hosts
    same = [Rendezvous(2, "10.0.0.2:29400", "job-1", "10.0.0.2", host=r == 0) for r in (0, 1)]
    assert [r.hosts_store for r in same] == [True, False]


def test_the_interface_toward_an_address_is_the_one_that_holds_the_route_source() -> None:
    assert route_interface("127.0.0.1") == "lo"
    assert route_interface("::1") is None  # IPv4 only: gloo then keeps its own choice
