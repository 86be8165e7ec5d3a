"""`runner.run_job` on real torchrun processes with tiny specs (no Celery)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from processes import trainer_processes
from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError
from worker_support import MakeJob, queued_messages, read_job, tiny_spec

from store.db import transitions
from store.db.models import (
    Artifact,
    Checkpoint,
    Evaluation,
    Job,
    JobEvent,
    Metric,
    new_id,
    utcnow,
)
from store.db.session import session_scope
from store.queue import RUN_JOB
from store.settings import Settings
from tid_core.events import read_events
from worker import runner
from worker.reconcile import reconcile

pytestmark = pytest.mark.slow


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def rows(settings: Settings, table: Any, job_id: str) -> list[Any]:
    with session_scope(settings.database_url) as session:
        return list(session.scalars(select(table).where(table.job_id == job_id).order_by(table.id)))


def trainer_pgid(run_dir: Path) -> int:
    """The trainer's process group: torchrun (its leader) is the only child of this test."""
    log = (run_dir / "train.log").read_text()
    assert log.startswith("--- attempt")
    (child,) = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split()
    return os.getpgid(int(child))


def in_background(
    settings: Settings, job_id: str, until: Any
) -> tuple[threading.Thread, dict[str, int]]:
    """Run `until(job_id)` in a thread once the trainer has taken a step; records its pgid."""
    seen: dict[str, int] = {}

    def act() -> None:
        deadline = time.monotonic() + 120
        while read_job(settings, job_id).step < 1:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        seen["pgid"] = trainer_pgid(settings.jobs_dir / job_id)
        until(job_id)

    thread = threading.Thread(target=act, daemon=True)
    thread.start()
    return thread, seen


def assert_trainer_gone(pgid: int, run_dir: Path) -> None:
    """torchrun's group is gone, and so are its workers, which live in sessions of their own."""
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)
    deadline = time.monotonic() + 10
    while trainer_processes(run_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert trainer_processes(run_dir) == {}, "a trainer process outlived its supervisor"


def test_run_job_succeeds_and_records_everything(settings: Settings, make_job: MakeJob) -> None:
    job_id = make_job()

    runner.run_job(job_id, settings=settings)

    job = read_job(settings, job_id)
    run_dir = settings.jobs_dir / job_id
    assert job.state == "succeeded", (job.error, (run_dir / "train.log").read_text()[-2000:])
    assert (job.attempt, job.step, job.total_steps, job.lease_owner) == (1, 2, 2, None)
    assert (run_dir / "spec.json").is_file()
    metric_names = {(m.step, m.name) for m in rows(settings, Metric, job_id)}
    assert {(1, "loss"), (1, "lr"), (2, "loss"), (2, "lr")} <= metric_names
    (evaluation,) = rows(settings, Evaluation, job_id)  # mAP's one place in the database
    assert (evaluation.step, evaluation.backend) == (2, "faster-coco-eval")
    assert evaluation.ap is not None
    checkpoints = rows(settings, Checkpoint, job_id)
    assert checkpoints
    for ckpt in checkpoints:
        assert ckpt.sha256 == sha256(run_dir / ckpt.path)
        assert ckpt.bytes == (run_dir / ckpt.path).stat().st_size
    artifacts = {a.name: a for a in rows(settings, Artifact, job_id)}
    assert set(artifacts) == {"student.pt", "student.safetensors"}
    for name, artifact in artifacts.items():
        assert artifact.sha256 == sha256(run_dir / name)
    states = [e.data["state"] for e in rows(settings, JobEvent, job_id) if e.type == "state"]
    assert states == ["running", "succeeded"]
    types = {e.type for e in rows(settings, JobEvent, job_id)}
    assert {"start", "step", "eval", "checkpoint", "end"} <= types

    before = len(rows(settings, JobEvent, job_id))
    runner.run_job(job_id, settings=settings)  # a duplicate delivery
    assert read_job(settings, job_id).state == "succeeded"
    assert len(rows(settings, JobEvent, job_id)) == before


def test_cancel_stops_the_trainer_group(settings: Settings, make_job: MakeJob) -> None:
    spec = tiny_spec(dataset={"num_train": 200})  # 50 steps: plenty of time to cancel
    job_id = make_job(spec=spec)

    def cancel(job_id: str) -> None:
        with session_scope(settings.database_url) as session:
            assert transitions.request_cancel(session, job_id)

    thread, seen = in_background(settings, job_id, cancel)
    runner.run_job(job_id, settings=settings)
    thread.join(timeout=10)

    job = read_job(settings, job_id)
    assert job.state == "cancelled", job.error
    assert job.step < 50
    assert_trainer_gone(seen["pgid"], settings.jobs_dir / job_id)
    run_dir = settings.jobs_dir / job_id
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    checkpoints = rows(settings, Checkpoint, job_id)
    assert checkpoints, "the interrupted trainer saved a checkpoint"
    assert checkpoints[-1].sha256 == sha256(run_dir / checkpoints[-1].path)
    assert "interrupted" in {e.type for e in rows(settings, JobEvent, job_id)}


def test_lost_lease_stops_the_trainer_and_records_nothing(
    settings: Settings, make_job: MakeJob
) -> None:
    """Another claim took the job, under the same worker name (a worker restarted in a
    container keeps its hostname and pid): the claim's token tells them apart."""
    job_id = make_job(spec=tiny_spec(dataset={"num_train": 200}))
    other = new_id()

    def take_over(job_id: str) -> None:
        with session_scope(settings.database_url) as session:
            session.execute(update(Job).where(Job.id == job_id).values(claim_token=other))

    thread, seen = in_background(settings, job_id, take_over)
    runner.run_job(job_id, settings=settings)
    thread.join(timeout=10)

    job = read_job(settings, job_id)
    assert (job.state, job.claim_token, job.finished_at) == ("running", other, None)
    assert job.lease_owner == runner.worker_name(settings)
    assert_trainer_gone(seen["pgid"], settings.jobs_dir / job_id)
    # killed, not asked to checkpoint: the new owner's run dir gets nothing more from it
    events = read_events(settings.jobs_dir / job_id / "events.jsonl")
    assert not {"interrupted", "end"} & {e["type"] for e in events}


def test_database_outage_longer_than_the_lease_stops_the_trainer(
    settings: Settings, make_job: MakeJob, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = make_job(spec=tiny_spec(dataset={"num_train": 800}))  # far longer than the lease
    real_sync = runner._sync
    outage = threading.Event()

    def flaky_sync(run: Any, *, renew: bool) -> tuple[bool, bool]:
        if outage.is_set():
            raise OperationalError("SELECT 1", {}, Exception("database down"))
        return real_sync(run, renew=renew)

    monkeypatch.setattr(runner, "_sync", flaky_sync)
    thread, seen = in_background(settings, job_id, lambda _job_id: outage.set())
    runner.run_job(job_id, settings=settings)  # returns once the lease would have expired
    thread.join(timeout=10)

    # the trainer does not run on beside a second attempt
    assert_trainer_gone(seen["pgid"], settings.jobs_dir / job_id)
    job = read_job(settings, job_id)
    assert (job.state, job.finished_at) == ("running", None)  # the reconciler decides now
    events = read_events(settings.jobs_dir / job_id / "events.jsonl")
    assert "end" not in {e["type"] for e in events}  # stopped, not left to train to the end


def test_a_supervisor_stuck_on_the_database_still_stops_the_trainer_at_the_lease_end(
    settings: Settings, make_job: MakeJob, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database that stops answering blocks the supervising thread in `_sync`; the lease
    watchdog kills the trainer on time all the same."""
    job_id = make_job(spec=tiny_spec(dataset={"num_train": 800}))  # far longer than the lease
    real_sync = runner._sync
    stalled, answered = threading.Event(), threading.Event()
    seen: dict[str, float] = {}

    def stalling_sync(run: Any, *, renew: bool) -> tuple[bool, bool]:
        if stalled.is_set():
            answered.wait(60)  # no reply, until the test has seen what it waits for
            raise OperationalError("SELECT 1", {}, Exception("no answer"))
        return real_sync(run, renew=renew)

    def stall(_job_id: str) -> None:
        stalled.set()
        since = time.monotonic()
        # torchrun stays a zombie until the blocked thread reaps it: count the live processes
        while trainer_processes(settings.jobs_dir / job_id) and time.monotonic() - since < 30:
            time.sleep(0.05)
        seen["gone_after"] = time.monotonic() - since
        answered.set()

    monkeypatch.setattr(runner, "_sync", stalling_sync)
    thread, seen_pgid = in_background(settings, job_id, stall)
    runner.run_job(job_id, settings=settings)
    thread.join(timeout=10)

    # the last renewal was at most a poll before the stall: killed within the 3 s lease
    assert seen["gone_after"] < settings.lease_seconds + 1
    assert_trainer_gone(seen_pgid["pgid"], settings.jobs_dir / job_id)
    job = read_job(settings, job_id)
    assert (job.state, job.finished_at) == ("running", None)  # the reconciler decides now


def test_a_job_that_used_up_its_run_time_fails_without_starting(
    settings: Settings, make_job: MakeJob
) -> None:
    job_id = make_job(spec=tiny_spec(schedule={"max_runtime_minutes": 1}), attempt=1)
    ago = utcnow() - timedelta(minutes=5)
    with session_scope(settings.database_url) as session:  # attempt 1 ran for two minutes
        for minutes, state in ((0, "running"), (2, "queued")):
            at = ago + timedelta(minutes=minutes)
            data = {"state": state}
            session.add(JobEvent(job_id=job_id, attempt=1, type="state", data=data, created_at=at))

    runner.run_job(job_id, settings=settings)

    job = read_job(settings, job_id)
    assert (job.state, job.attempt) == ("failed", 2)
    assert job.error == (
        "exceeded its maximum run time of 1 min, all attempts together "
        "(schedule.max_runtime_minutes)"
    )
    assert not (settings.jobs_dir / job_id).exists()


def test_trainer_failure_is_recorded_with_its_error(settings: Settings, make_job: MakeJob) -> None:
    never_ran = make_job(state="failed")
    teacher = {"arch": "fcos", "backbone": "resnet18", "fpn_channels": 64}
    spec = tiny_spec(teacher={**teacher, "weights": {"job": never_ran}}, distill={"method": "tid"})
    job_id = make_job(spec=spec)

    runner.run_job(job_id, settings=settings)

    job = read_job(settings, job_id)
    missing = settings.jobs_dir / never_ran / "student.safetensors"
    assert job.state == "failed"
    assert job.error is not None and str(missing) in job.error
    assert job.error.startswith("FileNotFoundError")


def test_unresolvable_spec_fails_without_starting(settings: Settings, make_job: MakeJob) -> None:
    job_id = make_job(spec={**tiny_spec(), "dataset": {"id": "nope"}})

    runner.run_job(job_id, settings=settings)

    job = read_job(settings, job_id)
    assert job.state == "failed"
    assert job.error == "cannot run this spec: dataset 'nope' not found"
    assert not (settings.jobs_dir / job_id).exists()


def test_shutdown_hands_the_job_back_with_a_checkpoint(
    settings: Settings, make_job: MakeJob
) -> None:
    job_id = make_job(spec=tiny_spec(dataset={"num_train": 200}))
    shutdown = threading.Event()

    thread, seen = in_background(settings, job_id, lambda _job_id: shutdown.set())
    runner.run_job(job_id, settings=settings, shutdown=shutdown)
    thread.join(timeout=10)

    job = read_job(settings, job_id)
    assert (job.state, job.attempt, job.lease_owner, job.error) == ("queued", 1, None, None)
    assert queued_messages(settings) == [(RUN_JOB, (job_id,))]
    assert_trainer_gone(seen["pgid"], settings.jobs_dir / job_id)
    assert (settings.jobs_dir / job_id / "checkpoints" / "last.pt").is_file()
    assert "interrupted" in {e.type for e in rows(settings, JobEvent, job_id)}


def test_a_killed_worker_takes_its_trainer_with_it(settings: Settings, make_job: MakeJob) -> None:
    """SIGKILL leaves no time to clean up: the trainer must still not outlive its worker."""
    job_id = make_job(spec=tiny_spec(dataset={"num_train": 200}, schedule={"epochs": 5}))
    code = "import sys; from store.settings import Settings; from worker.runner import run_job; "
    code += "run_job(sys.argv[1], settings=Settings.model_validate_json(sys.argv[2]))"
    worker = subprocess.Popen(
        [sys.executable, "-c", code, job_id, settings.model_dump_json()],
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        deadline = time.monotonic() + 120
        while read_job(settings, job_id).step < 1:
            assert time.monotonic() < deadline and worker.poll() is None
            time.sleep(0.2)
        (child,) = Path(f"/proc/{worker.pid}/task/{worker.pid}/children").read_text().split()
        pgid = os.getpgid(int(child))
    finally:
        worker.kill()
        worker.wait()

    deadline = time.monotonic() + 30  # a checkpoint's time, far less than the 250 steps left
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    assert_trainer_gone(pgid, settings.jobs_dir / job_id)
    events = read_events(settings.jobs_dir / job_id / "events.jsonl")
    assert events[-1]["type"] == "interrupted"  # stopped by the signal, not run to its end
    assert read_job(settings, job_id).state == "running"  # the reconciler's to re-queue


def lease_runs_out(settings: Settings, job_id: str) -> None:
    """Wait until the job's lease has run out, and let the reconciler send the job back to the
    queue."""
    deadline = time.monotonic() + 30
    while True:
        with session_scope(settings.database_url) as session:
            if [job.id for job in transitions.expired_leases(session)] == [job_id]:
                break
        assert time.monotonic() < deadline, "the lease never ran out"
        time.sleep(0.2)
    assert reconcile(settings=settings)["requeued"] == 1


def assert_recorded_whole(settings: Settings, job_id: str) -> None:
    """Every event of the run's one training is a row, and every export has its row."""
    run_dir = settings.jobs_dir / job_id
    events = read_events(run_dir / "events.jsonl")
    assert [e["type"] for e in events].count("start") == 1  # trained once
    assert read_job(settings, job_id).events_offset == (run_dir / "events.jsonl").stat().st_size
    artifacts = {a.name: a.sha256 for a in rows(settings, Artifact, job_id)}
    assert artifacts == {name: sha256(run_dir / name) for name in events[-1]["artifacts"]}


def test_an_outcome_kept_from_the_database_past_the_lease_is_recorded_once_it_is_back(
    settings: Settings, make_job: MakeJob, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trainer ended, and the database was away for longer than the lease: meanwhile the
    reconciler sent the job back to the queue. Nobody claimed it since, so the worker still
    records the attempt's outcome once the database is back, and the job is not trained again."""
    job_id = make_job()
    real_claimed_by = transitions.claimed_by
    outages: list[float] = []

    def away_past_the_lease(session: Any, job_id: str, token: str) -> str | None:
        if not outages:  # the first try of the outcome's write
            outages.append(time.monotonic())
            lease_runs_out(settings, job_id)
            raise OperationalError("SELECT 1", {}, Exception("database down"))
        return real_claimed_by(session, job_id, token)

    monkeypatch.setattr(transitions, "claimed_by", away_past_the_lease)
    runner.run_job(job_id, settings=settings)

    job = read_job(settings, job_id)
    assert (job.state, job.attempt) == ("succeeded", 1), job.error
    states = [e.data for e in rows(settings, JobEvent, job_id) if e.type == "state"]
    assert [d["state"] for d in states] == ["running", "queued", "succeeded"]
    assert "lost (lease expired)" in states[1]["reason"]
    assert_recorded_whole(settings, job_id)
    assert queued_messages(settings) == [(RUN_JOB, (job_id,))]  # the reconciler's re-send...
    runner.run_job(job_id, settings=settings)  # ...finds nothing to claim
    assert read_job(settings, job_id).attempt == 1


def test_a_requeued_job_whose_run_ended_is_recorded_without_training_again(
    settings: Settings, make_job: MakeJob, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker died between its trainer's end and the outcome's write: the next attempt
    finds the run's whole `end` event in the run dir and records the run as it is."""
    job_id = make_job()
    with monkeypatch.context() as patch:
        patch.setattr(runner, "_record", lambda *_: None)  # the worker dies here
        runner.run_job(job_id, settings=settings)
    assert read_job(settings, job_id).state == "running"
    lease_runs_out(settings, job_id)

    runner.run_job(job_id, settings=settings)

    job = read_job(settings, job_id)
    assert (job.state, job.attempt) == ("succeeded", 2), job.error
    assert "--- attempt 2" not in (settings.jobs_dir / job_id / "train.log").read_text()
    states = [e.data["state"] for e in rows(settings, JobEvent, job_id) if e.type == "state"]
    assert states == ["running", "queued", "running", "succeeded"]
    assert_recorded_whole(settings, job_id)


def test_a_worker_with_fewer_gpus_than_a_job_asks_leaves_it_queued_saying_why(
    settings: Settings, make_job: MakeJob
) -> None:
    """A job of one node on 2 GPUs, delivered to a worker that declares 1: not claimed, no
    trainer, unsent (the reconciler sends it again, to any worker), and the job says why."""
    job_id = make_job(
        spec=tiny_spec(resources={"nproc_per_node": 2, "device": "cuda"}), last_sent_at=utcnow()
    )
    one_gpu = settings.model_copy(update={"worker_gpus": "0"})

    runner.run_job(job_id, settings=one_gpu)

    job = read_job(settings, job_id)
    assert (job.state, job.attempt, job.last_sent_at) == ("queued", 0, None)
    name = runner.worker_name(one_gpu)
    assert job.waiting_reason == f"waiting for a worker with 2 GPUs; {name}, which took it, has 1"
    assert not (settings.jobs_dir / job_id).exists()


@pytest.mark.parametrize(
    ("gpus", "resources", "fits"),
    [
        ("", {"nproc_per_node": 4, "device": "cuda"}, True),  # GPUs not declared: as before
        ("0,1", {"nproc_per_node": 2, "device": "cuda"}, True),
        ("0,1", {"nproc_per_node": 4, "device": "auto"}, False),
        ("0", {"nproc_per_node": 4, "device": "cpu"}, True),  # a CPU job needs no GPU
    ],
)
def test_a_job_of_one_node_fits_a_worker_with_as_many_gpus_as_it_asks(
    settings: Settings, gpus: str, resources: dict[str, Any], fits: bool
) -> None:
    job = Job(state="queued", spec=tiny_spec(resources=resources))
    worker = settings.model_copy(update={"worker_gpus": gpus})
    assert (runner._misfit(job, "w", worker) is None) == fits
