"""Run one job: claim it, start torchrun in its own process group, supervise it, record the end.

Plain functions on a job id and the settings, so tests run them without Celery. While the
trainer runs, the worker ingests its events, renews the lease and watches for a cancel; the
trainer's process group never outlives the call. A worker that loses its lease stops at once
and records nothing more: the reconciler owns the job then.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from sqlalchemy import desc, select

from store.db import transitions
from store.db.models import Job, JobEvent, utcnow
from store.db.session import TRANSIENT_ERRORS, session_scope
from store.queue import RUN_JOB, enqueue
from store.settings import Settings
from tid_core.launch import terminate_with_parent, torchrun_command
from tid_core.spec import JobSpec
from worker.ingest import ingest_events
from worker.resolve import resolve_spec

log = logging.getLogger(__name__)
T = TypeVar("T")

POLL_SECONDS = 0.5
SHUTDOWN_REASON = "handed back: the worker is shutting down"
LOG_TAIL_LINES = 20
GROUP_EXIT_SECONDS = 5.0  # how long SIGKILLed processes get to disappear


def worker_name(settings: Settings) -> str:
    """The lease owner's name: unique per worker process unless the settings name it."""
    return settings.worker_name or f"{socket.gethostname()}-{os.getpid()}"


class Flag(Protocol):
    """What a running job watches to learn that its worker is going away."""

    def is_set(self) -> bool: ...


@dataclass(frozen=True)
class _Run:
    """One attempt of one job on this worker."""

    job_id: str
    attempt: int
    worker: str
    run_dir: Path
    settings: Settings


def run_job(job_id: str, *, settings: Settings, shutdown: Flag | None = None) -> None:
    """Claim and run `job_id` to a final state; a job that is not queued is left alone.

    `shutdown` set (this worker is going away) stops the trainer, which checkpoints, and hands
    the job back to the queue so that another worker resumes it.
    """
    shutdown = shutdown or threading.Event()
    worker = worker_name(settings)
    with session_scope(settings.database_url) as session:
        if not transitions.claim(
            session, job_id, worker=worker, lease_seconds=settings.lease_seconds
        ):
            log.info("job %s: nothing to claim (taken by another delivery, or final)", job_id)
            return
        attempt = session.get_one(Job, job_id).attempt
    run = _Run(job_id, attempt, worker, settings.jobs_dir / job_id, settings)
    try:
        with session_scope(settings.database_url) as session:
            spec = resolve_spec(session, session.get_one(Job, job_id), settings)
    except ValueError as exc:  # ResolveError and pydantic's ValidationError
        _finish(run, "failed", f"cannot run this spec: {exc}")
        return
    log.info("job %s: attempt %d on %s", job_id, run.attempt, worker)
    if shutdown.is_set():
        requeue(job_id, settings=settings, worker=worker, reason=SHUTDOWN_REASON, handback=True)
        return
    try:
        proc = _start(run, spec)
    except OSError as exc:
        _finish(run, "failed", f"cannot start the trainer: {exc}")
        return
    try:
        stop = _supervise(run, proc, shutdown)
    finally:
        _kill_group(proc)
    _conclude(run, proc.returncode, stop)


def _start(run: _Run, spec: JobSpec) -> subprocess.Popen[bytes]:
    """torchrun in a new session (its own process group), output appended to train.log."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    spec_path = run.run_dir / "spec.json"
    tmp = spec_path.with_name("spec.json.tmp")
    tmp.write_text(json.dumps(spec.model_dump(mode="json"), indent=2) + "\n")
    tmp.replace(spec_path)
    nproc = spec.resources.nproc_per_node
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // nproc)))
    # spin-waiting OpenMP threads stall CPU training by up to 6x when the cores are shared
    # with the data loaders and the worker (bench/ddp.py, docs/BENCHMARKS.md)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    cmd = torchrun_command(spec_path, run.run_dir, nproc=nproc)
    with (run.run_dir / "train.log").open("ab") as out:
        out.write(f"--- attempt {run.attempt} on {run.worker} at {utcnow():%FT%TZ}\n".encode())
        out.flush()
        return subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=terminate_with_parent,  # no orphan trains beside the next attempt
        )


def _sync(run: _Run, *, renew: bool) -> tuple[bool, bool]:
    """One database round: check (and renew) the lease, ingest new events, read the cancel flag.

    Returns (lease still held, cancel requested). Events are ingested only under the lease.
    """
    with session_scope(run.settings.database_url) as session:
        state, owner, cancel = session.execute(
            select(Job.state, Job.lease_owner, Job.cancel_requested).where(Job.id == run.job_id)
        ).one()
        held = state == "running" and owner == run.worker
        if held and renew:
            held = transitions.renew_lease(
                session, run.job_id, worker=run.worker, lease_seconds=run.settings.lease_seconds
            )
        if not held:
            return False, False
        ingest_events(session, run.job_id, run_dir=run.run_dir, attempt=run.attempt)
        return True, bool(cancel)


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def _supervise(run: _Run, proc: subprocess.Popen[bytes], shutdown: Flag) -> str | None:
    """Poll until the trainer exits; returns why we stopped it (cancel, shutdown, lease_lost)."""
    stop: str | None = None
    kill_at = math.inf
    next_renew = 0.0
    renewed_at = time.monotonic()  # the lease was fresh when the job was claimed
    while proc.poll() is None:
        now = time.monotonic()
        if stop != "lease_lost":
            try:
                renew = now >= next_renew
                held, cancel = _sync(run, renew=renew)
            except TRANSIENT_ERRORS as exc:  # keep training through a database blip...
                log.warning("job %s: database unavailable, will retry: %s", run.job_id, exc)
                if now - renewed_at >= run.settings.lease_seconds:  # ...but not past the lease:
                    log.warning("job %s: lease expired while the database was away", run.job_id)
                    stop = "lease_lost"  # the reconciler may already have re-queued the job
            else:
                if renew:
                    next_renew = now + run.settings.lease_seconds / 3
                    renewed_at = now if held else renewed_at
                if not held:
                    log.warning("job %s: lease lost; stopping the trainer", run.job_id)
                    stop = "lease_lost"
                elif cancel and stop is None:
                    log.info("job %s: cancel requested", run.job_id)
                    stop = "cancel"
        if shutdown.is_set() and stop is None:
            log.info("job %s: worker shutting down; stopping the trainer", run.job_id)
            stop = "shutdown"
        if stop == "lease_lost":
            # another attempt may own the run dir now: no checkpoint, no more events from us
            _signal_group(proc, signal.SIGKILL)
        elif stop is not None and kill_at == math.inf:
            _signal_group(proc, signal.SIGTERM)
            kill_at = now + run.settings.cancel_grace_seconds
        elif now >= kill_at:
            log.warning("job %s: trainer ignored SIGTERM; killing it", run.job_id)
            _signal_group(proc, signal.SIGKILL)
            kill_at = now + run.settings.cancel_grace_seconds
        with suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=POLL_SECONDS)
    return stop


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """Nothing of the trainer outlives its supervisor (torchrun's workers included)."""
    _signal_group(proc, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + GROUP_EXIT_SECONDS
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    log.warning("process group %d still has members after SIGKILL", proc.pid)


def _retrying(run: _Run, what: str, call: Callable[[], T]) -> T:
    """`call()` until the database answers (a restart takes seconds), for at most
    `db_retry_seconds`: the outcome of hours of training is worth waiting for."""
    deadline = time.monotonic() + run.settings.db_retry_seconds
    delay = 0.5
    while True:
        try:
            return call()
        except TRANSIENT_ERRORS as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("job %s: database unavailable %s; retrying: %s", run.job_id, what, exc)
            time.sleep(delay)
            delay = min(2 * delay, 10.0)


def _conclude(run: _Run, returncode: int, stop: str | None) -> None:
    """Ingest the last events and record the outcome the exit code and our stop reason give."""
    if stop == "lease_lost" or not _retrying(
        run, "ingesting the last events", lambda: _sync(run, renew=True)[0]
    ):
        log.warning("job %s: not recording an outcome: the lease is gone", run.job_id)
        return
    if returncode == 0:
        _finish(run, "succeeded")
    elif stop == "cancel":
        _finish(run, "cancelled")
    elif stop == "shutdown":
        _requeue(run, SHUTDOWN_REASON, handback=True)
    else:
        _fail_or_retry(run, returncode)


def _finish(run: _Run, state: str, error: str | None = None) -> None:
    def write() -> bool:
        with session_scope(run.settings.database_url) as session:
            return transitions.finish(
                session, run.job_id, worker=run.worker, state=state, error=error
            )

    if _retrying(run, f"recording {state}", write):
        log.info("job %s: %s%s", run.job_id, state, f" ({error})" if error else "")
    else:
        log.warning("job %s: could not record %s: no longer ours", run.job_id, state)


def _fail_or_retry(run: _Run, returncode: int) -> None:
    """A crashed trainer: retried while attempts are left if the failure may not repeat,
    else failed with the trainer's own error (or the end of its log)."""
    reason, retryable = _retrying(run, "reading the error", lambda: _failure(run, returncode))

    def attempts() -> tuple[int, int, int]:
        with session_scope(run.settings.database_url) as session:
            job = session.get_one(Job, run.job_id)
            return transitions.attempts_left(job), job.attempt - job.handbacks, job.max_attempts

    left, used, most = _retrying(run, "reading the attempts", attempts)
    if not retryable:
        _finish(run, "failed", reason)
    elif left > 0:
        _requeue(run, f"retrying ({left} attempt(s) left) after: {reason}")
    else:
        _finish(run, "failed", f"{reason}\n(attempt {used} of {most}: none left)")


def _failure(run: _Run, returncode: int) -> tuple[str, bool]:
    """Why the trainer failed and whether another attempt may succeed: its `error` event of
    this attempt says both; without one it died from outside (a signal, the OOM killer, a
    busy run dir), which is worth another attempt."""
    with session_scope(run.settings.database_url) as session:
        data = session.scalar(
            select(JobEvent.data)
            .where(
                JobEvent.job_id == run.job_id,
                JobEvent.attempt == run.attempt,
                JobEvent.type == "error",
            )
            .order_by(desc(JobEvent.id))
            .limit(1)
        )
    if data and data.get("message"):
        return f"{data.get('kind', 'Error')}: {data['message']}", bool(data.get("retryable"))
    tail = _log_tail(run.run_dir / "train.log")
    return f"trainer exited with code {returncode}; last lines of train.log:\n{tail}", True


def _log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - 64 * 1024))
            text = f.read().decode(errors="replace")
    except OSError as exc:
        return f"(no train.log: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def _requeue(run: _Run, reason: str, *, handback: bool = False) -> bool:
    return _retrying(
        run,
        "putting the job back in the queue",
        lambda: requeue(
            run.job_id, settings=run.settings, worker=run.worker, reason=reason, handback=handback
        ),
    )


def requeue(
    job_id: str, *, settings: Settings, worker: str, reason: str, handback: bool = False
) -> bool:
    """Put a running job of this worker (its trainer has stopped) back in the queue and send
    it again, so that a worker resumes it from its last checkpoint. False if no longer ours.
    A lost message is re-sent by the reconciler, as the job stays queued."""
    with session_scope(settings.database_url) as session:
        done = transitions.requeue(session, job_id, worker=worker, reason=reason, handback=handback)
    if done:
        log.info("job %s: back in the queue (%s)", job_id, reason)
        enqueue(settings, RUN_JOB, job_id)
    return done
