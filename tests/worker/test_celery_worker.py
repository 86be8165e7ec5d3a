"""A real `celery worker` process on the file-system broker: hand a job back on SIGTERM (a
deploy) so that the next worker resumes it and runs it to the end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import select
from worker_support import MakeJob, queued_messages, read_job, tiny_spec

from store.db.models import Job, JobEvent, JobNode, Worker
from store.db.session import session_scope
from store.queue import RUN_JOB, send
from store.settings import Settings
from worker.reconcile import reconcile

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
StartWorker = Callable[..., subprocess.Popen[bytes]]


def worker_env(settings: Settings) -> dict[str, str]:
    fields = ("data_root", "queue", "lease_seconds", "reconcile_seconds", "requeue_after_seconds")
    tid = {f"TID_{name.upper()}": str(getattr(settings, name)) for name in fields}
    # a deploy waits for the trainer's checkpoint: give it time on a busy 2-core machine
    return {**os.environ, **tid, "TID_CANCEL_GRACE_SECONDS": "30"}


@pytest.fixture
def start_worker(settings: Settings, tmp_path: Path) -> Iterator[StartWorker]:
    """Start `celery -A worker.celery_app worker` processes; stop any left at the end."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(name: str, pool: str = "prefork") -> subprocess.Popen[bytes]:
        cmd = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-P", pool]
        args = ["-Q", settings.queue, "-c", "1", "--prefetch-multiplier", "1", "-l", "INFO"]
        with (tmp_path / f"{name}.log").open("ab") as out:
            proc = subprocess.Popen(
                [*cmd, *args, "-n", f"{name}@%h"],
                cwd=REPO,
                env=worker_env(settings),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_for(settings: Settings, job_id: str, done: Callable[[Job], bool], logs: Path) -> Job:
    deadline = time.monotonic() + 120
    while not done(job := read_job(settings, job_id)):
        if time.monotonic() > deadline:
            tails = {p.name: p.read_text(errors="replace")[-3000:] for p in logs.glob("*.log")}
            pytest.fail(f"job {job_id} stuck in {job.state} at step {job.step}: {tails}")
        time.sleep(0.3)
    return job


def stop(proc: subprocess.Popen[bytes], timeout: float = 60) -> int:
    """SIGTERM to the worker's main process only, as `docker stop` does."""
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=timeout)


@pytest.mark.parametrize("pool", ["prefork", "solo"])
def test_sigterm_hands_the_job_back_and_another_worker_resumes_it(
    settings: Settings, make_job: MakeJob, start_worker: StartWorker, tmp_path: Path, pool: str
) -> None:
    job_id = make_job(spec=tiny_spec(dataset={"num_train": 120}))  # 30 steps
    first = start_worker("w1", pool)
    send(settings, RUN_JOB, job_id)
    wait_for(settings, job_id, lambda j: j.step >= 1, tmp_path)

    assert stop(first) == 0

    job = read_job(settings, job_id)
    assert (job.state, job.attempt, job.lease_owner) == ("queued", 1, None), job.error
    assert (settings.jobs_dir / job_id / "checkpoints" / "last.pt").is_file()
    # The stopping worker may have fetched (and dropped) the message it re-sent: the
    # reconciler sends queued jobs again once they are stale.
    time.sleep(settings.requeue_after_seconds)
    reconcile(settings=settings)
    assert set(queued_messages(settings)) == {(RUN_JOB, (job_id,))}

    second = start_worker("w2", pool)
    job = wait_for(settings, job_id, lambda j: j.state in ("succeeded", "failed"), tmp_path)
    assert (job.state, job.attempt, job.step) == ("succeeded", 2, 30), job.error
    assert job.lease_owner is None
    with session_scope(settings.database_url) as session:
        starts = session.scalars(
            select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.type == "start")
        ).all()
        assert [(e.attempt, e.data["resumed"]) for e in starts] == [(1, False), (2, True)]
    assert stop(second) == 0  # an idle worker stops cleanly after its job...
    # ...and its pool child is not killed by a signal (one idle in billiard's blocking pool
    # can die holding the task-queue lock and hang the worker's exit: docs/RELIABILITY.md)
    assert "exited with 'signal" not in (tmp_path / "w2.log").read_text()


@pytest.mark.parametrize("pool", ["prefork", "solo"])
def test_a_worker_keeps_its_registry_row_under_one_name_while_it_runs(
    settings: Settings, make_job: MakeJob, start_worker: StartWorker, tmp_path: Path, pool: str
) -> None:
    worker = start_worker("w1", pool)
    deadline = time.monotonic() + 60
    while not (rows := registered(settings)):
        assert time.monotonic() < deadline, (tmp_path / "w1.log").read_text()[-3000:]
        time.sleep(0.2)
    ((name, queue, device, state),) = rows
    assert (queue, device, state) == (f"{settings.queue}.node.{name}", "cpu", "idle")
    assert name.endswith(f"-{worker.pid}")  # the main process's pid: hostname-pid

    job_id = make_job()
    send(settings, RUN_JOB, job_id)
    job = wait_for(settings, job_id, lambda j: j.state == "succeeded", tmp_path)
    with session_scope(settings.database_url) as session:
        (node,) = session.scalars(select(JobNode).where(JobNode.job_id == job_id)).all()
    assert node.worker == name  # the pool process that ran it claimed under the same name
    assert job.attempt == 1
    deadline = time.monotonic() + 30  # idle again once the task returns
    while registered(settings)[0][3] != "idle":
        assert time.monotonic() < deadline
        time.sleep(0.2)

    assert stop(worker) == 0
    assert registered(settings) == []  # gone: no job is placed on it


def registered(settings: Settings) -> list[tuple[str, str, str, str]]:
    with session_scope(settings.database_url) as session:
        rows = session.execute(select(Worker.name, Worker.queue, Worker.device, Worker.state))
        return [tuple(row) for row in rows]  # type: ignore[misc]
