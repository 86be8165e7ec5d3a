"""Poison messages (docs/RELIABILITY.md, fault 16): a dataset whose check would kill the worker
that runs it, in the whole service as processes (API, a prefork Celery worker, the reconciler).

The check runs in a child process under limits, so an upload built to exhaust memory fails
the dataset and not the worker, which runs the next job. A check whose worker dies anyway (its
pool child is `SIGKILL`ed from outside, as by the OOM killer, each time it starts) is delivered
again and again by the broker (`task_reject_on_worker_lost`), until the delivery count in the
row passes `TID_CHECK_MAX_DELIVERIES` and the dataset fails.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Stack
from databases import ANY_BACKEND
from poison_inputs import check_memory_limit_mb, memory_bomb_zip
from processes import AttemptWatch, alive, trainer_processes
from service_jobs import assert_nothing_lost, make_dataset, tiny_spec, wait_job

from store.db.models import Dataset
from store.db.session import session_scope

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def children(pid: int) -> set[int]:
    with contextlib.suppress(OSError):
        tasks = Path(f"/proc/{pid}/task").iterdir()
        return {int(c) for task in tasks for c in (task / "children").read_text().split()}
    return set()


def pool_children(worker: subprocess.Popen[bytes]) -> set[int]:
    """The prefork pool's processes, once the worker has started them."""
    deadline = time.monotonic() + 120
    while not (pool := children(worker.pid)):
        assert worker.poll() is None and time.monotonic() < deadline, "no pool child started"
        time.sleep(0.2)
    return pool


def checks_of(worker: subprocess.Popen[bytes]) -> dict[int, int]:
    """check process -> its pool child, for every check this worker runs now."""
    return {
        check: pool
        for pool in children(worker.pid)
        for check in children(pool)
        if b"worker.resource_check" in cmdline(check)
    }


def cmdline(pid: int) -> bytes:
    with contextlib.suppress(OSError):  # gone since it was listed
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    return b""


def wait_decided(stack: Stack, dataset_id: str, *, timeout: float = 300) -> Any:
    return stack.client.wait(
        lambda: stack.client.dataset(dataset_id),
        done=lambda d: d["state"] != "pending",
        timeout=timeout,
        interval=0.3,
    )


def deliveries(stack: Stack, dataset_id: str) -> int:
    with session_scope(stack.settings.database_url) as session:
        return session.get_one(Dataset, dataset_id).deliveries


@pytest.mark.parametrize("stack", ANY_BACKEND, indirect=True)
def test_an_upload_that_exhausts_the_check_memory_limit_fails_and_its_worker_runs_on(
    stack: Stack, tmp_path: Path
) -> None:
    limit = check_memory_limit_mb()
    worker = stack.start("worker", "worker", TID_CHECK_MEMORY_MB=str(limit))
    pool = pool_children(worker)
    archive = memory_bomb_zip(tmp_path / "bomb.zip")

    bomb = stack.client.upload("/v1/datasets/upload", archive, {"name": "bomb"})
    bomb = wait_decided(stack, bomb["id"])

    assert (bomb["state"], bomb["error"]) == (
        "failed",
        f"the check ran out of memory: it needs more than {limit} MiB (TID_CHECK_MEMORY_MB)",
    ), stack.log("worker")
    assert deliveries(stack, bomb["id"]) == 1
    # the next dataset and the next job, by the very pool process that checked the bomb
    dataset_id = make_dataset(stack.client, num_train=8, num_val=4)
    watch = AttemptWatch()
    try:
        job_id = stack.client.submit(tiny_spec(dataset_id, "next", schedule={"epochs": 1}))["id"]
        run_dir = stack.settings.jobs_dir / job_id
        watch.watch(run_dir)
        job = wait_job(stack.settings, job_id, logs=lambda: stack.log("worker"))
    finally:
        watch.close()
    assert (job.state, job.attempt) == ("succeeded", 1), job.error
    assert_nothing_lost(stack.settings, job_id, steps=2)
    assert watch.most[run_dir] == 1
    assert trainer_processes(run_dir) == {}
    assert worker.poll() is None
    assert children(worker.pid) == pool, "a pool process died"


def test_a_check_whose_worker_dies_each_time_fails_past_its_delivery_limit(
    stack: Stack,
) -> None:
    worker = stack.start("worker", "worker", TID_CHECK_MAX_DELIVERIES="2")
    pool_children(worker)
    body = {"name": "d", "builtin": "shapes", "num_train": 8, "num_val": 4, "image_size": 64}
    dataset_id = stack.client.create_dataset(body)["id"]

    killed: dict[int, int] = {}  # check -> its pool child
    deadline = time.monotonic() + 120
    while stack.client.dataset(dataset_id)["state"] == "pending":
        assert time.monotonic() < deadline, stack.log("worker")
        for check, pool in checks_of(worker).items():
            if check not in killed:  # (listed until the kill of its pool child takes effect)
                os.kill(pool, signal.SIGKILL)  # the check goes with it (parent-death signal)
                killed[check] = pool
        time.sleep(0.05)

    dataset = stack.client.dataset(dataset_id)
    assert (dataset["state"], dataset["error"]) == (
        "failed",
        "delivered 3 times without finishing: the worker running its check died or was stopped "
        "each time (TID_CHECK_MAX_DELIVERIES is 2)",
    ), stack.log("worker")
    assert len(killed) == 2  # two deliveries ran a check; the third decided without one
    assert deliveries(stack, dataset_id) == 3
    deadline = time.monotonic() + 30
    while any(alive(check) for check in killed):
        assert time.monotonic() < deadline, "a check outlived its pool child"
        time.sleep(0.1)
    assert worker.poll() is None
    make_dataset(stack.client, num_train=8, num_val=4)  # and the worker takes the next one
