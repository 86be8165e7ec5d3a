"""Jobs across several worker hosts through the whole service (issue 24): each worker "host" is
a network namespace with its own address (bench/netns.py); PostgreSQL and Redis listen on the
service host's address (the bridge's, in the machine's own namespace, where the API and the
reconciler run), which every worker host reaches over its own link; the run dirs are on the
machine's file system, which every host shares (the shared storage a job on several hosts
needs). The trainers' rendezvous and gloo's traffic go over the hosts' own links. A gang short
of workers is checked on the embedded defaults (SQLite, the file-system broker).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import Stack, running_stack
from prerequisites import missing
from processes import AttemptWatch, trainer_processes
from servers import private_servers
from service_jobs import assert_nothing_lost, tiny_spec, wait_job
from sqlalchemy import select

from bench import netns
from store.db.models import Job, JobEvent, JobNode
from store.db.session import session_scope
from tid_core.events import read_events
from tid_core.models import load_student
from worker.resources import prepare_dataset

pytestmark = [pytest.mark.slow, pytest.mark.integration]
HEARTBEAT = {"TID_HEARTBEAT_SECONDS": "1"}  # a killed worker is gone for placement in 3 s
GANG_TIMEOUT_S = 400.0


@dataclass
class Hosts:
    """A running service, worker hosts and a watch on the trainers of every host."""

    stack: Stack
    net: netns.Network
    watch: AttemptWatch

    def start_worker(self, host: netns.Host) -> subprocess.Popen[bytes]:
        """`tid worker` inside `host`, named after it, reached at its address."""
        env = {**self.stack.env, "TID_WORKER_NAME": host.name, "TID_WORKER_ADDRESS": host.address}
        with (self.stack.logs / f"{host.name}.log").open("ab") as out:
            proc = host.popen(
                [sys.executable, "-m", "cli.main", "worker"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.stack.procs[host.name] = proc  # stopped (SIGTERM) with the stack
        return proc

    def dataset(self, *, num_train: int) -> str:
        """A builtin dataset, made ready with the worker's own function."""
        body = {"name": "d", "builtin": "shapes", "image_size": 64, "num_val": 4}
        ds = self.stack.client.create_dataset({**body, "num_train": num_train})
        prepare_dataset(ds["id"], settings=self.stack.settings)
        return str(ds["id"])

    def submit(self, spec: dict[str, Any]) -> str:
        job_id = str(self.stack.client.submit(spec)["id"])
        self.watch.watch(self.stack.settings.jobs_dir / job_id)
        return job_id

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
            for p in sorted(self.stack.logs.glob("*.log"))
        )

    def wait(self, job_id: str, **kw: Any) -> Job:
        return wait_job(self.stack.settings, job_id, logs=self.logs, timeout=GANG_TIMEOUT_S, **kw)


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[Any]:
    """Start `count` worker hosts (netns: fails in CI where they cannot be made), PostgreSQL and
    Redis on the service host's address and the service on them; afterwards nothing runs in the
    hosts and they are gone."""
    with contextlib.ExitStack() as exits:

        def start(count: int) -> Hosts:
            try:
                net = exits.enter_context(netns.hosts(count))
            except netns.NetnsUnavailable as exc:
                missing(f"network namespaces cannot be made here: {exc}")
            pg, redis = exits.enter_context(private_servers(tmp_path, net.bridge_address))
            stack = exits.enter_context(
                running_stack(tmp_path, database_url=pg.url, broker_url=redis.url, **HEARTBEAT)
            )
            watch = AttemptWatch(
                host_of=lambda pid: next((h.name for h in net.hosts if h.holds(pid)), None)
            )
            exits.callback(watch.close)
            return Hosts(stack, net, watch)

        yield start


def gang_spec(dataset_id: str, name: str, **overrides: Any) -> dict[str, Any]:
    """Two nodes of one process each (gloo), no loader processes: batch 4 per process."""
    resources = {"nnodes": 2, "num_workers": 0, **overrides.pop("resources", {})}
    return tiny_spec(dataset_id, name, resources=resources, **overrides)


def nodes(settings: Any, job_id: str) -> dict[int, list[str]]:
    """attempt -> the worker of each node, by rank."""
    with session_scope(settings.database_url) as session:
        rows = session.execute(
            select(JobNode.attempt, JobNode.worker)
            .where(JobNode.job_id == job_id)
            .order_by(JobNode.attempt, JobNode.node_rank)
        ).all()
    placed: dict[int, list[str]] = {}
    for attempt, worker in rows:
        placed.setdefault(attempt, []).append(worker)
    return placed


def starts(settings: Any, job_id: str) -> list[tuple[int, bool]]:
    with session_scope(settings.database_url) as session:
        events = session.scalars(
            select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.type == "start")
        ).all()
        return [(e.attempt, e.data["resumed"]) for e in events]


def assert_no_trainer_left(run_dir: Path) -> None:
    assert trainer_processes(run_dir) == {}, "a trainer process outlived its job"


def test_two_jobs_on_two_hosts_run_one_after_the_other_each_across_both(hosts: Any) -> None:
    h = hosts(2)
    for host in h.net.hosts:
        h.start_worker(host)
    data = h.dataset(num_train=16)  # 2 nodes x batch 4: 2 steps an epoch, 4 in all
    first = h.submit(gang_spec(data, "first"))
    second = h.submit(gang_spec(data, "second"))

    done = [h.wait(first), h.wait(second)]

    assert [j.state for j in done] == ["succeeded", "succeeded"], [j.error for j in done]
    assert done[1].started_at >= done[0].finished_at  # one gang at a time on two workers
    settings = h.stack.settings
    names = sorted(host.name for host in h.net.hosts)
    for job in done:
        assert job.attempt == 1 and nodes(settings, job.id) == {1: names}
        run_dir = settings.jobs_dir / job.id
        assert h.watch.hosts[run_dir] == set(names)  # a trainer on each host
        assert h.watch.most_on_a_host[run_dir] == 1
        events = read_events(run_dir / "events.jsonl")
        assert events[0]["world_size"] == 2
        assert [e["step"] for e in events if e["type"] == "step"] == [1, 2, 3, 4]  # once each
        assert_nothing_lost(settings, job.id, steps=4)
        model, meta = load_student(run_dir / "student.safetensors")
        assert meta.input_size == 64
        assert set(model([torch.rand(3, 64, 64)])[0]) == {"boxes", "scores", "labels"}
        assert (run_dir / "train.log").is_file() and (run_dir / "train.node1.log").is_file()
        assert_no_trainer_left(run_dir)


def test_a_lost_host_stops_the_gang_and_the_job_resumes_on_another(hosts: Any) -> None:
    h = hosts(3)
    workers = {host.name: h.start_worker(host) for host in h.net.hosts}
    data = h.dataset(num_train=64)  # 8 steps an epoch, a checkpoint at each epoch's end
    job_id = h.submit(gang_spec(data, "resumed", schedule={"epochs": 2}))
    settings = h.stack.settings
    run_dir = settings.jobs_dir / job_id
    h.wait(job_id, done=lambda j: j.step >= 9)  # past the first epoch's checkpoint

    first = nodes(settings, job_id)[1]
    lost = workers[first[1]]
    os.killpg(lost.pid, signal.SIGKILL)  # node 1's host is lost: its worker and trainer
    h.stack.procs.pop(first[1])
    lost.wait()

    job = h.wait(job_id)
    assert (job.state, job.attempt) == ("succeeded", 2), job.error
    placed = nodes(settings, job_id)
    assert first[1] not in placed[2] and len(placed[2]) == 2  # a new gang, without the lost host
    assert starts(settings, job_id) == [(1, False), (2, True)]  # from the checkpoint
    assert h.watch.most[run_dir] <= 2, "two gangs ran at once"
    assert h.watch.most_on_a_host[run_dir] == 1, "two attempts ran at once on one host"
    assert_nothing_lost(settings, job_id, steps=16)
    assert_no_trainer_left(run_dir)


def test_a_gang_short_of_workers_waits_while_a_job_of_one_node_runs(tmp_path: Path) -> None:
    with running_stack(tmp_path, **HEARTBEAT) as stack:
        stack.start_worker("worker")
        ds = stack.client.create_dataset(
            {"name": "d", "builtin": "shapes", "image_size": 64, "num_train": 8, "num_val": 4}
        )
        prepare_dataset(ds["id"], settings=stack.settings)
        gang = stack.client.submit(gang_spec(ds["id"], "gang"))["id"]
        stack.client.wait(
            lambda: stack.client.job(gang),
            done=lambda j: j["waiting_reason"] == "waiting for 2 workers; 1 idle",
            interval=0.3,
            timeout=60,
        )
        single = stack.client.submit(tiny_spec(ds["id"], "single", schedule={"epochs": 1}))["id"]

        job = wait_job(stack.settings, single, logs=lambda: stack.log("worker"), timeout=300)

        assert job.state == "succeeded", job.error
        still = stack.client.job(gang)
        assert (still["state"], still["attempt"]) == ("queued", 0)
        # 0 idle while the job of one node held the worker, 1 again once it is done
        assert still["waiting_reason"].startswith("waiting for 2 workers; ")
        # `tid ls` shows its nodes and, under its row, why it waits
        env = {**stack.env, "TID_URL": stack.client.url}
        env["TID_API_KEY"] = stack.client.http.headers["Authorization"].removeprefix("Bearer ")
        listed = subprocess.run(
            [sys.executable, "-m", "cli.main", "ls"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout.splitlines()
        row = next(i for i, line in enumerate(listed) if line.startswith(gang))
        assert listed[row].split()[1:5] == ["gang", "none", "queued", "2x1"]
        assert listed[row + 1].strip().startswith("waiting for 2 workers; ")  # idle: it varies
