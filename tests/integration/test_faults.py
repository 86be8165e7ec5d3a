"""The fault matrix (docs/RELIABILITY.md): each test injects one fault into the whole service
running as processes (API, Celery workers, reconciler, torchrun trainers) on a private
PostgreSQL and Redis that it may restart, and asserts the job's final state, its attempts,
that at most one attempt ran at any time, and that no metric, checkpoint or event was lost.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import torch
from conftest import Stack, running_stack
from processes import AttemptWatch, alive, rank0_trainer, signal_pending, trainer_processes
from servers import PrivatePostgres, PrivateRedis, free_port, private_servers, stalling_relay
from service_jobs import (
    assert_nothing_lost,
    read_job,
    sha256,
    state_events,
    tiny_spec,
    wait_job,
)
from sqlalchemy import select

from store.db.models import Checkpoint, Job
from store.db.models import Dataset as DatasetRow
from store.db.session import session_scope
from store.queue import RUN_JOB, send
from tid_core.events import read_events
from worker.resources import prepare_dataset

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.faults]

STEPS_PER_EPOCH = 16  # 64 training images, batch 4


@dataclass
class Faults:
    """A running stack on private servers, and a watch on its trainers."""

    stack: Stack
    pg: PrivatePostgres
    redis: PrivateRedis
    watch: AttemptWatch

    @property
    def settings(self) -> Any:
        return self.stack.settings

    def run_dir(self, job_id: str) -> Path:
        path: Path = self.settings.jobs_dir / job_id
        return path

    def submit(self, spec: dict[str, Any]) -> str:
        job_id = str(self.stack.client.submit(spec)["id"])
        self.watch.watch(self.run_dir(job_id))
        return job_id

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
            for p in sorted(self.stack.logs.glob("*.log"))
        )

    def wait(self, job_id: str, done: Callable[[Job], bool] | None = None, **kw: Any) -> Job:
        if done is None:
            return wait_job(self.settings, job_id, logs=self.logs, **kw)
        return wait_job(self.settings, job_id, done, logs=self.logs, **kw)

    def wait_events(self, job_id: str, match: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """The first trainer event of the job that matches, as soon as it is written."""
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            for event in read_events(self.run_dir(job_id) / "events.jsonl"):
                if match(event):
                    return event
            time.sleep(0.01)
        pytest.fail(f"job {job_id}: no matching event")

    def assert_one_attempt_at_a_time_and_none_left(self, job_id: str) -> None:
        run_dir = self.run_dir(job_id)
        deadline = time.monotonic() + 30
        while trainer_processes(run_dir) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert trainer_processes(run_dir) == {}, "a trainer process outlived its job"
        assert self.watch.most[run_dir] == 1, "attempts overlapped (or none ever ran)"


@pytest.fixture
def faults(tmp_path: Path) -> Iterator[Callable[..., Faults]]:
    """Start a stack on private servers (settings may be overridden: `TID_*=value`)."""
    with contextlib.ExitStack() as exits:

        def start(**env: str) -> Faults:
            pg, redis_server = exits.enter_context(private_servers(tmp_path))
            stack = exits.enter_context(
                running_stack(
                    tmp_path,
                    database_url=pg.url,
                    broker_url=redis_server.url,
                    TID_DB_RETRY_SECONDS="120",
                    **env,
                )
            )
            watch = AttemptWatch()
            exits.callback(watch.close)
            return Faults(stack, pg, redis_server, watch)

        yield start


def dataset(f: Faults, *, num_train: int = 64, num_val: int = 4) -> str:
    """A builtin dataset, made ready here with the worker's own function, so that tests
    choose when the first worker starts (the prepare message it leaves is then a no-op)."""
    body = {"name": "d", "builtin": "shapes", "image_size": 64}
    ds = f.stack.client.create_dataset({**body, "num_train": num_train, "num_val": num_val})
    prepare_dataset(ds["id"], settings=f.settings)
    assert f.stack.client.dataset(ds["id"])["state"] == "ready"
    return str(ds["id"])


def long_spec(dataset_id: str, epochs: int = 3, **overrides: Any) -> dict[str, Any]:
    """16 steps an epoch, a checkpoint at each epoch's end, one evaluation at the end."""
    schedule = {"epochs": epochs, "eval_every": 0, **overrides.pop("schedule", {})}
    return tiny_spec(dataset_id, "fault", schedule=schedule, **overrides)


def start_api(f: Faults, name: str, **env: str) -> str:
    """Another API process on the stack's database and broker unless `env` says otherwise;
    its URL, once it answers."""
    port = free_port()
    f.stack.start(name, "serve", "--port", str(port), **env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return url
        assert time.monotonic() < deadline, f.stack.log(name)
        time.sleep(0.2)


def first_step_of(events: list[dict[str, Any]], start: dict[str, Any]) -> int:
    after = events[events.index(start) + 1 :]
    return int(next(e["step"] for e in after if e["type"] == "step"))


def resumed_starts(f: Faults, job_id: str) -> list[dict[str, Any]]:
    events = read_events(f.run_dir(job_id) / "events.jsonl")
    return [e for e in events if e["type"] == "start"]


# 1 ------------------------------------------------------------------------------------------
def test_worker_sigkilled_mid_epoch_its_trainer_stops_and_another_worker_resumes(
    faults: Callable[..., Faults],
) -> None:
    f = faults()
    f.stack.start_worker("worker-a")
    job_id = f.submit(long_spec(dataset(f)))
    f.wait(job_id, lambda j: j.step >= STEPS_PER_EPOCH + 3)  # past epoch 1's checkpoint

    f.stack.stop("worker-a", sig=signal.SIGKILL)  # the whole Celery process group, no clean-up
    # still running until its lease runs out (read at once: the orphaned trainer's checkpoint
    # and exit below can outlast the 5 s lease on a slow machine)
    assert read_job(f.settings, job_id).state == "running"

    deadline = time.monotonic() + 60  # the orphaned trainer must stop by itself, soon
    while trainer_processes(f.run_dir(job_id)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert trainer_processes(f.run_dir(job_id)) == {}
    f.stack.start_worker("worker-b")
    job = f.wait(job_id)

    assert (job.state, job.attempt, job.handbacks) == ("succeeded", 2, 0), job.error
    first, second = resumed_starts(f, job_id)
    assert (first["resumed"], second["resumed"]) == (False, True)
    events = read_events(f.run_dir(job_id) / "events.jsonl")
    assert second["step"] > STEPS_PER_EPOCH  # from the orphan's last checkpoint, not epoch 1
    assert first_step_of(events, second) == second["step"] + 1  # continues, does not restart
    assert [d["state"] for _, d in state_events(f.settings, job_id)] == [
        "running",
        "queued",
        "running",
        "succeeded",
    ]
    assert_nothing_lost(f.settings, job_id, steps=3 * STEPS_PER_EPOCH)
    f.assert_one_attempt_at_a_time_and_none_left(job_id)


# 2 ------------------------------------------------------------------------------------------
def test_trainer_error_fails_the_job_with_the_error_and_no_retry(
    faults: Callable[..., Faults],
) -> None:
    f = faults()
    dataset_id = dataset(f, num_train=16)
    with session_scope(f.settings.database_url) as session:
        root = Path(session.get_one(DatasetRow, dataset_id).path)
    image = next((root / "train").iterdir())
    image.unlink()  # the dataset breaks after it was checked: the trainer hits it
    f.stack.start_worker("worker")
    job_id = f.submit(tiny_spec(dataset_id, "broken"))

    job = f.wait(job_id)

    assert (job.state, job.attempt) == ("failed", 1)  # an error of its own: no retry
    assert job.error and job.error.startswith("FileNotFoundError: ")
    assert image.name in job.error
    f.assert_one_attempt_at_a_time_and_none_left(job_id)


@pytest.mark.parametrize("max_attempts", [2, 1])
def test_trainer_killed_from_outside_is_retried_up_to_max_attempts(
    faults: Callable[..., Faults], max_attempts: int
) -> None:
    """A trainer that dies without an error of its own (the OOM killer, a node problem) may
    well succeed on another attempt; `resources.max_attempts` caps how many."""
    f = faults()
    f.stack.start_worker("worker")
    job_id = f.submit(long_spec(dataset(f), resources={"max_attempts": max_attempts}))
    f.wait(job_id, lambda j: j.step >= STEPS_PER_EPOCH + 2)

    os.kill(rank0_trainer(f.run_dir(job_id)), signal.SIGKILL)
    job = f.wait(job_id)

    if max_attempts == 1:
        assert (job.state, job.attempt) == ("failed", 1)
        assert job.error and job.error.startswith("trainer exited with code 1")
        assert job.error.endswith("(attempt 1 of 1: none left)")
        return
    assert (job.state, job.attempt) == ("succeeded", 2), job.error
    requeued = [d for _, d in state_events(f.settings, job_id) if d["state"] == "queued"]
    assert len(requeued) == 1
    assert requeued[0]["reason"].startswith("retrying (1 attempt(s) left) after: trainer exited")
    _, second = resumed_starts(f, job_id)
    assert second["resumed"] and second["step"] == STEPS_PER_EPOCH  # epoch 1's checkpoint
    assert_nothing_lost(f.settings, job_id, steps=3 * STEPS_PER_EPOCH)
    f.assert_one_attempt_at_a_time_and_none_left(job_id)


# 3 ------------------------------------------------------------------------------------------
def test_broker_restarted_while_a_job_is_queued_the_job_still_runs(
    faults: Callable[..., Faults],
) -> None:
    f = faults()
    dataset_id = dataset(f, num_train=16)
    broker = redis.Redis.from_url(f.redis.url)
    waiting = broker.llen(f.settings.queue)
    job_id = f.submit(tiny_spec(dataset_id, "queued", schedule={"epochs": 1}))
    assert broker.llen(f.settings.queue) == waiting + 1  # the message waits for a worker

    f.redis.restart()  # no persistence: the message is gone
    assert broker.llen(f.settings.queue) == 0

    f.stack.start_worker("worker")  # the reconciler sends the stale queued job again
    job = f.wait(job_id)
    assert (job.state, job.attempt) == ("succeeded", 1), job.error
    # and the worker, API and reconciler all reconnect after a restart under their feet
    f.redis.restart()
    later = f.submit(tiny_spec(dataset_id, "after-restart", schedule={"epochs": 1}))
    job = f.wait(later)
    assert (job.state, job.attempt) == ("succeeded", 1), job.error
    for done in (job_id, later):
        assert_nothing_lost(f.settings, done, steps=4)
        f.assert_one_attempt_at_a_time_and_none_left(done)


# 4 ------------------------------------------------------------------------------------------
def test_database_restarted_while_a_job_runs_and_as_it_finishes_the_job_finishes(
    faults: Callable[..., Faults],
) -> None:
    # a lease longer than the outage: the worker keeps its job through it
    f = faults(TID_LEASE_SECONDS="20")
    f.stack.start_worker("worker")
    job_id = f.submit(long_spec(dataset(f)))
    f.wait(job_id, lambda j: j.step >= 5)

    f.pg.stop()
    down = f.stack.client.http.get(f"/v1/jobs/{job_id}")
    assert down.status_code == 503, down.text
    assert down.headers["content-type"] == "application/problem+json"
    assert down.json()["detail"] == "the database is unavailable; retry shortly"
    time.sleep(4)  # training goes on; events wait in events.jsonl
    f.pg.start()

    # again as the trainer evaluates, exports and exits: the outcome must still be written.
    # Caught at the final evaluation, which lasts seconds: at the export phase a quiet machine
    # can finish the job before the trainer is found
    f.wait_events(job_id, lambda e: e["type"] == "phase" and e["phase"] == "eval")
    pid = rank0_trainer(f.run_dir(job_id))
    os.kill(pid, signal.SIGSTOP)  # hold it until the database is down
    f.pg.stop()
    os.kill(pid, signal.SIGCONT)
    f.wait_events(job_id, lambda e: e["type"] == "end")
    while trainer_processes(f.run_dir(job_id)):
        time.sleep(0.1)
    time.sleep(2)
    f.pg.start()

    job = f.wait(job_id)
    assert (job.state, job.attempt) == ("succeeded", 1), job.error
    assert "database unavailable recording the outcome; retrying" in f.stack.log("worker")
    assert_nothing_lost(f.settings, job_id, steps=3 * STEPS_PER_EPOCH)
    f.assert_one_attempt_at_a_time_and_none_left(job_id)


# 5 ------------------------------------------------------------------------------------------
def test_the_same_task_delivered_to_two_racing_workers_runs_once(
    faults: Callable[..., Faults],
) -> None:
    f = faults()
    dataset_id = dataset(f, num_train=16)
    f.stack.start_worker("worker-a")
    f.stack.start_worker("worker-b")
    job_id = f.submit(tiny_spec(dataset_id, "twice"))
    for _ in range(3):  # duplicates: a redelivery, a reconciler re-send, a retried publish
        send(f.settings, RUN_JOB, job_id)

    job = f.wait(job_id)
    assert (job.state, job.attempt) == ("succeeded", 1), job.error
    running = [a for a, d in state_events(f.settings, job_id) if d["state"] == "running"]
    assert running == [1]
    assert len(resumed_starts(f, job_id)) == 1
    assert_nothing_lost(f.settings, job_id, steps=8)
    f.assert_one_attempt_at_a_time_and_none_left(job_id)


# 6 ------------------------------------------------------------------------------------------
@contextlib.contextmanager
def black_hole() -> Iterator[int]:
    """A port that accepts connections and never answers: a send to it hangs."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                held.append(server.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()


def test_api_killed_after_commit_before_enqueue_the_job_still_runs(
    faults: Callable[..., Faults],
) -> None:
    f = faults(TID_REQUEUE_AFTER_SECONDS="15")  # so the test sees that nothing was sent
    dataset_id = dataset(f, num_train=16)
    with black_hole() as hole:
        # a broker timeout far past the moment the test kills the API: the send is under way
        broker = {"TID_BROKER_URL": f"redis://127.0.0.1:{hole}", "TID_BROKER_TIMEOUT_SECONDS": "60"}
        url = start_api(f, "api-doomed", **broker)
        headers = dict(f.stack.client.http.headers)

        def post() -> None:
            with contextlib.suppress(httpx.HTTPError):  # the API dies before it answers
                spec = tiny_spec(dataset_id, "orphan")
                httpx.post(f"{url}/v1/jobs", json=spec, headers=headers, timeout=120)

        poster = threading.Thread(target=post)
        poster.start()
        deadline = time.monotonic() + 60
        while True:  # committed, and stuck sending the task
            with session_scope(f.settings.database_url) as session:
                job_id = session.scalar(select(Job.id).where(Job.name == "orphan"))
            if job_id:
                break
            assert time.monotonic() < deadline, f.stack.log("api-doomed")
            time.sleep(0.05)
        doomed = f.stack.procs.pop("api-doomed")
        os.killpg(doomed.pid, signal.SIGKILL)
        doomed.wait()
        poster.join()

    f.watch.watch(f.run_dir(job_id))
    assert read_job(f.settings, job_id).state == "queued"
    messages = redis.Redis.from_url(f.redis.url).lrange(f.settings.queue, 0, -1)
    assert not [m for m in messages if job_id.encode() in m]  # nothing was sent for the job
    f.stack.start_worker("worker")
    job = f.wait(job_id)
    assert (job.state, job.attempt) == ("succeeded", 1), job.error
    assert_nothing_lost(f.settings, job_id, steps=8)
    f.assert_one_attempt_at_a_time_and_none_left(job_id)


# 7 ------------------------------------------------------------------------------------------
def cancel_with_trainer_held(f: Faults, job_id: str, pid: int) -> None:
    """Cancel while the trainer is frozen (SIGSTOP) where the test stopped it, so that the
    worker's SIGTERM reaches it exactly there; then let it go on."""
    f.stack.client.request("POST", f"/v1/jobs/{job_id}/cancel")
    deadline = time.monotonic() + 30
    while not signal_pending(pid, signal.SIGTERM):
        assert time.monotonic() < deadline, "the worker never sent SIGTERM"
        time.sleep(0.05)
    os.kill(pid, signal.SIGCONT)


def assert_cancelled_intact(f: Faults, job_id: str) -> None:
    job = f.wait(job_id)
    assert (job.state, job.attempt) == ("cancelled", 1), job.error
    assert_nothing_lost(f.settings, job_id)
    with session_scope(f.settings.database_url) as session:
        newest = session.scalars(
            select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.id.desc())
        ).first()
    assert newest is not None
    ckpt = torch.load(f.run_dir(job_id) / newest.path, map_location="cpu", weights_only=True)
    assert ckpt["progress"]["step"] == newest.step  # a whole checkpoint, loadable
    f.assert_one_attempt_at_a_time_and_none_left(job_id)


def test_cancel_while_evaluating_is_cancelled_without_finishing_the_evaluation(
    faults: Callable[..., Faults],
) -> None:
    f = faults(TID_CANCEL_GRACE_SECONDS="60")
    job_id = f.submit(long_spec(dataset(f, num_train=16, num_val=64), epochs=2))
    f.stack.start_worker("worker")
    f.wait_events(job_id, lambda e: e["type"] == "phase" and e["phase"] == "eval")
    pid = rank0_trainer(f.run_dir(job_id))
    os.kill(pid, signal.SIGSTOP)
    events = read_events(f.run_dir(job_id) / "events.jsonl")
    assert events[-1]["type"] == "phase" and events[-1]["phase"] == "eval"  # held inside it

    cancel_with_trainer_held(f, job_id, pid)

    assert_cancelled_intact(f, job_id)
    tail = [e["type"] for e in read_events(f.run_dir(job_id) / "events.jsonl")][-2:]
    assert tail == ["phase", "interrupted"]  # the evaluation was abandoned, not finished


def test_cancel_while_checkpointing_keeps_every_checkpoint_whole(
    faults: Callable[..., Faults],
) -> None:
    f = faults(TID_CANCEL_GRACE_SECONDS="60")
    job_id = f.submit(long_spec(dataset(f), schedule={"checkpoint_every": 2}))
    f.stack.start_worker("worker")
    ckpt_dir = f.run_dir(job_id) / "checkpoints"
    deadline = time.monotonic() + 300
    while True:  # freeze the trainer half-way through writing a checkpoint
        assert time.monotonic() < deadline, "never caught a checkpoint being written"
        if list(ckpt_dir.glob(".last.pt.tmp.*")):
            pid = rank0_trainer(f.run_dir(job_id))
            os.kill(pid, signal.SIGSTOP)
            if list(ckpt_dir.glob(".last.pt.tmp.*")):
                break
            os.kill(pid, signal.SIGCONT)  # it had just finished: try the next one
        time.sleep(0.002)

    cancel_with_trainer_held(f, job_id, pid)

    assert_cancelled_intact(f, job_id)
    events = read_events(f.run_dir(job_id) / "events.jsonl")
    assert [e["type"] for e in events[-2:]] == ["checkpoint", "interrupted"]


# 8 ------------------------------------------------------------------------------------------
def test_disk_full_on_checkpoint_fails_clearly_and_keeps_the_previous_checkpoint(
    faults: Callable[..., Faults],
) -> None:
    f = faults()
    f.stack.start_worker("worker")
    job_id = f.submit(long_spec(dataset(f)))
    saved = f.wait_events(job_id, lambda e: e["type"] == "checkpoint")
    # every write of the trainer past 1 MB now fails (EFBIG), as ENOSPC does on a full disk
    resource.prlimit(rank0_trainer(f.run_dir(job_id)), resource.RLIMIT_FSIZE, (1 << 20,) * 2)

    job = f.wait(job_id)

    last = f.run_dir(job_id) / "checkpoints" / "last.pt"
    assert (job.state, job.attempt) == ("failed", 1)
    assert job.error == (
        f"CheckpointWriteError: [Errno 27] cannot write checkpoint {last} at step "
        f"{2 * STEPS_PER_EPOCH}: File too large (disk full or run dir not writable?); "
        "the previous checkpoint is kept"
    )
    assert sha256(last) == saved["sha256"]
    assert_nothing_lost(f.settings, job_id)
    f.assert_one_attempt_at_a_time_and_none_left(job_id)


# 9 ------------------------------------------------------------------------------------------
def test_nan_loss_fails_naming_the_step_and_keeps_the_last_good_checkpoint(
    faults: Callable[..., Faults],
) -> None:
    f = faults()
    f.stack.start_worker("worker")
    spec = long_spec(dataset(f), schedule={"lr": 10.0, "grad_clip": 0.0, "checkpoint_every": 1})
    job_id = f.submit(spec)

    job = f.wait(job_id)

    error = read_events(f.run_dir(job_id) / "events.jsonl")[-1]
    assert (job.state, job.attempt, error["type"]) == ("failed", 1, "error")
    bad = error["step"]
    assert job.error and job.error.startswith(f"NonFiniteLossError: non-finite loss at step {bad}:")
    assert_nothing_lost(f.settings, job_id)
    last = torch.load(
        f.run_dir(job_id) / "checkpoints" / "last.pt", map_location="cpu", weights_only=True
    )
    assert last["progress"]["step"] == bad - 1  # the last good step, not the diverged one
    f.assert_one_attempt_at_a_time_and_none_left(job_id)


# 10 -----------------------------------------------------------------------------------------
def test_worker_sigterm_checkpoints_hands_back_and_another_worker_resumes(
    faults: Callable[..., Faults],
) -> None:
    f = faults(TID_CANCEL_GRACE_SECONDS="60")  # a deploy waits for the checkpoint
    worker = f.stack.start_worker("worker-a")
    job_id = f.submit(long_spec(dataset(f), resources={"max_attempts": 1}))
    f.wait(job_id, lambda j: j.step >= 5)

    worker.send_signal(signal.SIGTERM)  # `docker stop`: to the main process only
    assert worker.wait(timeout=120) == 0
    f.stack.procs.pop("worker-a")

    job = read_job(f.settings, job_id)
    assert (job.state, job.attempt, job.handbacks) == ("queued", 1, 1)
    f.stack.start_worker("worker-b")
    job = f.wait(job_id)
    # a hand-back is no failure: max_attempts 1 still allows the resumed attempt
    assert (job.state, job.attempt, job.handbacks) == ("succeeded", 2, 1), job.error
    events = read_events(f.run_dir(job_id) / "events.jsonl")
    _, second = (e for e in events if e["type"] == "start")
    stopped = next(e for e in events if e["type"] == "interrupted")
    assert second["resumed"] and second["step"] == stopped["step"]
    assert first_step_of(events, second) == stopped["step"] + 1
    assert_nothing_lost(f.settings, job_id, steps=3 * STEPS_PER_EPOCH)
    f.assert_one_attempt_at_a_time_and_none_left(job_id)


# 11 -----------------------------------------------------------------------------------------
def assert_answered_in_time(response: httpx.Response, took: float, within: float) -> None:
    """A dependency that does not answer is a prompt problem+json, not a hang."""
    assert took < within, f"answered after {took:.1f} s, not within {within} s"
    assert response.headers["content-type"] == "application/problem+json", response.text


def test_database_that_stops_answering_stops_the_trainer_at_its_lease_end(
    faults: Callable[..., Faults],
) -> None:
    """The worker's database connection stalls (a failover, a half-open connection): its
    supervising thread waits on it longer than the lease (a reply is given up 6 + 5 s later),
    yet its trainer is killed when the lease runs out, before the reconciler re-queues the job
    for another worker."""
    f = faults(TID_DB_STATEMENT_TIMEOUT_SECONDS="6", TID_DB_CONNECT_TIMEOUT_SECONDS="3")
    dataset_id = dataset(f)
    with stalling_relay(f.pg.port) as relay:
        stalled = {"TID_DATABASE_URL": relay.url(f.pg.url)}
        url = start_api(f, "api-stalled", **stalled)
        f.stack.start("worker-a", "worker", **stalled)
        # 45 steps left when it stalls: the trainer cannot finish within the 5 s lease (a
        # trainer that finished unrecorded is run again, and re-exports its student)
        job_id = f.submit(long_spec(dataset_id, epochs=4))
        f.wait(job_id, lambda j: j.step >= STEPS_PER_EPOCH + 3)  # past epoch 1's checkpoint

        first = set(trainer_processes(f.run_dir(job_id)))
        relay.stall()
        stalled_at = time.monotonic()
        f.stack.start_worker("worker-b")  # on the database directly, as the reconciler is
        lease = int(f.settings.lease_seconds)
        while any(alive(pid) for pid in first):
            assert time.monotonic() - stalled_at < lease + 2, "the trainer outlived its lease"
            time.sleep(0.05)

        started = time.monotonic()
        headers = f.stack.client.http.headers
        response = httpx.get(f"{url}/v1/jobs/{job_id}", headers=headers, timeout=120)
        # the pool's ping waits 6 + 5 s for a reply, the new connection 3 s for its start-up
        assert_answered_in_time(response, time.monotonic() - started, within=6 + 5 + 3 + 5)
        assert response.status_code == 503
        assert response.json()["detail"] == "the database is unavailable; retry shortly"

        job = f.wait(job_id)
        # worker-a never gets its database back: it goes as a lost machine does. A SIGTERM
        # waits for a task it may still run, retrying the database for TID_DB_RETRY_SECONDS
        # (CI saw the teardown's SIGTERM time out after 60 s, its task retrying a write)
        f.stack.stop("worker-a", sig=signal.SIGKILL)
    assert (job.state, job.attempt) == ("succeeded", 2), job.error
    assert "lease ran out unrenewed: trainer killed" in f.stack.log("worker-a")
    assert [d["state"] for _, d in state_events(f.settings, job_id)] == [
        "running",
        "queued",
        "running",
        "succeeded",
    ]
    _, second = resumed_starts(f, job_id)
    assert second["resumed"] and second["step"] >= STEPS_PER_EPOCH  # the last checkpoint
    assert_nothing_lost(f.settings, job_id, steps=4 * STEPS_PER_EPOCH)
    f.assert_one_attempt_at_a_time_and_none_left(job_id)


# 12 -----------------------------------------------------------------------------------------
def test_broker_that_stops_answering_delays_the_job_and_never_hangs_the_api(
    faults: Callable[..., Faults],
) -> None:
    """Redis stalls for the API and the worker: a submit still answers 202 within the broker
    timeout (the send gives up; the reconciler sends again), readiness says why, and the job
    runs once the broker answers again, through a second stall while it trains."""
    f = faults(TID_BROKER_TIMEOUT_SECONDS="2")
    dataset_id = dataset(f, num_train=32)
    with stalling_relay(f.redis.port) as relay:
        stalled = {"TID_BROKER_URL": relay.url(f.redis.url)}
        url = start_api(f, "api-stalled", **stalled)
        f.stack.start("worker", "worker", **stalled)
        headers = f.stack.client.http.headers

        relay.stall()
        started = time.monotonic()
        spec = tiny_spec(dataset_id, "stalled-broker")
        response = httpx.post(f"{url}/v1/jobs", json=spec, headers=headers, timeout=60)
        assert time.monotonic() - started < 2 + 3, "the send did not give up in time"
        assert response.status_code == 202 and response.json()["state"] == "queued", response.text
        job_id = str(response.json()["id"])
        f.watch.watch(f.run_dir(job_id))
        started = time.monotonic()
        ready = httpx.get(f"{url}/readyz", timeout=60)
        assert_answered_in_time(ready, time.monotonic() - started, within=2 + 3)
        assert ready.status_code == 503 and "broker" in ready.json()["detail"]
        time.sleep(3)
        assert read_job(f.settings, job_id).state == "queued"  # nothing reached the worker
        relay.resume()

        f.wait(job_id, lambda j: j.step >= 3)
        relay.stall()  # training needs no broker: the job goes on
        time.sleep(4)
        relay.resume()
        job = f.wait(job_id)
    assert (job.state, job.attempt) == ("succeeded", 1), job.error
    assert_nothing_lost(f.settings, job_id, steps=2 * 8)
    f.assert_one_attempt_at_a_time_and_none_left(job_id)


# 13 -----------------------------------------------------------------------------------------
def test_trainer_that_stalls_is_killed_and_retried(faults: Callable[..., Faults]) -> None:
    """A trainer that stops making progress (a deadlocked collective, a hung data loader, a dead
    mount: here frozen with SIGSTOP) writes no event for TID_STALL_SECONDS: the worker kills it
    and the attempt counts as a retryable failure."""
    f = faults(TID_STALL_SECONDS="30")  # above a start-up on a busy machine (25 s seen)
    f.stack.start_worker("worker")
    job_id = f.submit(long_spec(dataset(f), epochs=2, resources={"max_attempts": 2}))
    f.wait(job_id, lambda j: j.step >= STEPS_PER_EPOCH + 2)

    os.kill(rank0_trainer(f.run_dir(job_id)), signal.SIGSTOP)
    job = f.wait(job_id)

    assert (job.state, job.attempt) == ("succeeded", 2), job.error
    requeued = [d["reason"] for _, d in state_events(f.settings, job_id) if d["state"] == "queued"]
    assert requeued == ["retrying (1 attempt(s) left) after: stalled: no progress for 30 s"]
    _, second = resumed_starts(f, job_id)
    assert second["resumed"] and second["step"] == STEPS_PER_EPOCH  # epoch 1's checkpoint
    assert_nothing_lost(f.settings, job_id, steps=2 * STEPS_PER_EPOCH)
    f.assert_one_attempt_at_a_time_and_none_left(job_id)


# 14 -----------------------------------------------------------------------------------------
def test_job_past_its_run_time_limit_fails_naming_the_limit(
    faults: Callable[..., Faults],
) -> None:
    """A run past TID_MAX_RUNTIME_MINUTES (here 1 min: a trainer's start-up took 30 s on a
    busy machine) is stopped as a cancel is (it checkpoints) and fails, naming the limit."""
    f = faults(TID_MAX_RUNTIME_MINUTES="1")
    f.stack.start_worker("worker")
    job_id = f.submit(long_spec(dataset(f), epochs=100))  # 1600 steps: minutes

    job = f.wait(job_id)

    assert (job.state, job.attempt) == ("failed", 1), job.error
    assert job.error == (
        "exceeded its maximum run time of 1 min, all attempts together (TID_MAX_RUNTIME_MINUTES)"
    )
    assert job.finished_at and job.started_at
    assert 60 <= (job.finished_at - job.started_at).total_seconds() < 60 + 15
    events = read_events(f.run_dir(job_id) / "events.jsonl")
    assert events[-1]["type"] == "interrupted" and events[-1]["step"] > 0  # checkpointed
    assert_nothing_lost(f.settings, job_id)
    f.assert_one_attempt_at_a_time_and_none_left(job_id)


# 17 -----------------------------------------------------------------------------------------
def wait_trainer_gone(f: Faults, job_id: str) -> None:
    deadline = time.monotonic() + 60
    while trainer_processes(f.run_dir(job_id)):
        assert time.monotonic() < deadline, "the trainer never exited"
        time.sleep(0.1)


def test_database_away_longer_than_the_lease_as_the_trainer_ends_keeps_the_outcome(
    faults: Callable[..., Faults],
) -> None:
    """PostgreSQL stops as the trainer evaluates, exports and exits, and stays away for longer
    than the lease. The reconciler sends the job back to the queue once the database is back
    (the worker's way to it, through a relay, stays cut until then: otherwise which of the two
    writes first is a race); nobody claimed the job since, so the worker's retried write still
    records the attempt's outcome, and the run is not trained again."""
    # well above the evaluation, export and exit, which the trainer does on the lease last
    # renewed before the database stopped, even on a loaded 2-core host; the wait below for
    # the lease to run out grows with it (the test's length: about lease + 2 s more)
    lease = 40
    timeouts = {"TID_DB_STATEMENT_TIMEOUT_SECONDS": "6", "TID_DB_CONNECT_TIMEOUT_SECONDS": "3"}
    f = faults(TID_LEASE_SECONDS=str(lease), **timeouts)
    dataset_id = dataset(f)
    with stalling_relay(f.pg.port) as relay:
        f.stack.start("worker", "worker", TID_DATABASE_URL=relay.url(f.pg.url))
        job_id = f.submit(long_spec(dataset_id, epochs=1))
        f.wait_events(job_id, lambda e: e["type"] == "phase" and e["phase"] == "eval")
        pid = rank0_trainer(f.run_dir(job_id))
        os.kill(pid, signal.SIGSTOP)  # hold it until the database is down
        f.pg.stop()
        stopped_at = time.monotonic()
        relay.stall()
        os.kill(pid, signal.SIGCONT)
        f.wait_events(job_id, lambda e: e["type"] == "end")
        wait_trainer_gone(f, job_id)
        time.sleep(max(0.0, stopped_at + lease + 2 - time.monotonic()))  # the lease ran out
        f.pg.start()
        f.wait(job_id, lambda j: j.state == "queued", timeout=60)  # the reconciler's pass
        relay.resume()
        job = f.wait(job_id)

    assert (job.state, job.attempt) == ("succeeded", 1), job.error
    states = [d for _, d in state_events(f.settings, job_id)]
    assert [d["state"] for d in states] == ["running", "queued", "succeeded"]
    assert "lost (lease expired)" in states[1]["reason"]
    assert "database unavailable recording the outcome; retrying" in f.stack.log("worker")
    assert len(resumed_starts(f, job_id)) == 1  # trained once
    assert_nothing_lost(f.settings, job_id, steps=STEPS_PER_EPOCH)
    f.assert_one_attempt_at_a_time_and_none_left(job_id)


# 18 -----------------------------------------------------------------------------------------
def test_worker_lost_between_the_trainers_end_and_its_outcome_the_next_attempt_records_it(
    faults: Callable[..., Faults],
) -> None:
    """The worker is frozen while its trainer evaluates, exports and exits, then killed: the
    outcome was never written. The reconciler re-queues the job when the lease runs out; the
    next attempt finds the run's whole `end` event in the run dir and records the run as it
    is, without starting a trainer."""
    f = faults()
    worker = f.stack.start_worker("worker-a")
    job_id = f.submit(long_spec(dataset(f), epochs=1))
    f.wait_events(job_id, lambda e: e["type"] == "phase" and e["phase"] == "eval")
    os.killpg(worker.pid, signal.SIGSTOP)  # it neither renews its lease nor writes
    f.wait_events(job_id, lambda e: e["type"] == "end")  # the trainer has a session of its own
    wait_trainer_gone(f, job_id)
    f.stack.stop("worker-a", sig=signal.SIGKILL)
    f.wait(job_id, lambda j: j.state == "queued")  # the reconciler, once the lease ran out

    f.stack.start_worker("worker-b")
    job = f.wait(job_id)

    assert (job.state, job.attempt) == ("succeeded", 2), job.error
    assert [d["state"] for _, d in state_events(f.settings, job_id)] == [
        "running",
        "queued",
        "running",
        "succeeded",
    ]
    assert "recording it without training again" in f.stack.log("worker-b")
    assert "--- attempt 2" not in (f.run_dir(job_id) / "train.log").read_text()
    assert len(resumed_starts(f, job_id)) == 1  # trained once
    assert_nothing_lost(f.settings, job_id, steps=STEPS_PER_EPOCH)
    f.assert_one_attempt_at_a_time_and_none_left(job_id)


# 19 -----------------------------------------------------------------------------------------
SKEWED_CLOCK = Path(__file__).with_name("skewed_clock")  # its sitecustomize.py


def skewed_clock(seconds: int) -> dict[str, str]:
    """The environment of a process whose wall clock is `seconds` off (`time.time()` and
    `datetime.now()`; skewed_clock/sitecustomize.py says how, and why not libfaketime)."""
    path = [str(SKEWED_CLOCK), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {"PYTHONPATH": os.pathsep.join(path), "TEST_CLOCK_SKEW_SECONDS": str(seconds)}


def clock_of(env: dict[str, str]) -> datetime:
    """What `datetime.now()` says in a process with `env`."""
    code = "import datetime; print(datetime.datetime.now(datetime.UTC).isoformat())"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return datetime.fromisoformat(out.stdout.strip())


def test_worker_and_reconciler_whose_clocks_are_a_minute_off_cause_no_requeue(
    faults: Callable[..., Faults],
) -> None:
    """The worker's clock is 60 s behind, a second reconciler's 60 s ahead: leases are set and
    judged by the database's clock only, so neither makes a live lease look expired (by their
    own clocks, the worker's 5 s lease ended 55 s before it was taken)."""
    behind, ahead = skewed_clock(-60), skewed_clock(+60)
    for env, seconds in ((behind, -60), (ahead, 60)):
        off = (clock_of(env) - datetime.now(UTC)).total_seconds()
        assert abs(off - seconds) < 5, f"the clock is {off:.1f} s off, not {seconds} s"
    f = faults()
    f.stack.start("worker", "worker", **behind)
    f.stack.start("reconciler-ahead", "reconcile", "--loop", **ahead)
    job_id = f.submit(long_spec(dataset(f), epochs=1))  # start-up and 16 steps: many leases

    job = f.wait(job_id)

    assert (job.state, job.attempt) == ("succeeded", 1), job.error
    assert [d["state"] for _, d in state_events(f.settings, job_id)] == ["running", "succeeded"]
    # the worker's clock really was off: it stamped the trainer's start in train.log a minute
    # before the database's time of the claim
    header = (f.run_dir(job_id) / "train.log").read_text().split("\n", 1)[0]
    stamped = datetime.strptime(header.rsplit(" at ", 1)[1], "%Y-%m-%dT%H:%M:%SZ")
    assert job.started_at
    behind_by = (job.started_at - stamped.replace(tzinfo=UTC)).total_seconds()
    assert 55 < behind_by < 65, header
    assert_nothing_lost(f.settings, job_id, steps=STEPS_PER_EPOCH)
    f.assert_one_attempt_at_a_time_and_none_left(job_id)
