"""Run one job: claim it, start torchrun in its own process group, supervise it, record the end.

Plain functions on a job id and the settings, so tests run them without Celery. While the
trainer runs, the worker ingests its events, renews the lease and watches for a cancel, a
trainer that stopped making progress and the job's run-time limit; the trainer's process group
never outlives the call. A worker that loses its lease stops at once and records nothing more:
the reconciler owns the job then. A watchdog thread kills the trainer when the lease runs out
without a confirmed renewal, whatever the supervising thread is blocked on.

A trainer that ends is an outcome worth keeping: the worker writes it (with the last events) as
long as nobody claimed the job again, though the lease ran out while the database was away;
and an attempt that finds its run dir already trained to the end records that at once.

A job on several nodes (`resources.nnodes`) is a gang: the reconciler claims it for several
workers at once (store.db.placement) and sends each its node (`run_node`). A job on one node is
a gang of one that its worker claims itself (`run_job`); both then run the same attempt. Every
node renews its own lease and watches the job's claim token and cancel flag; node 0 alone
renews the job's lease, ingests the events and records the outcome. Another node records only
a hand-back (the whole job goes back) or, when its trainer failed, that its lease ends now, so
that the reconciler re-queues the whole gang as one attempt.
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
from typing import Protocol

from sqlalchemy import desc, select
from sqlalchemy.orm import Session

from store.db import placement, sends, transitions, workers
from store.db.models import Job, JobEvent, JobNode, utcnow
from store.db.session import TRANSIENT_ERRORS, session_scope
from store.queue import RUN_JOB, enqueue
from store.settings import Settings
from tid_core.launch import Rendezvous, terminate_with_parent, torchrun_command
from tid_core.spec import JobSpec, ResourcesSpec
from worker.db_retry import retrying
from worker.finished_run import finished_run
from worker.ingest import EVENTS_FILE, ingest_events
from worker.process_tree import kill_tree
from worker.resolve import resolve_spec
from worker.watchdog import Watchdog

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5
SHUTDOWN_REASON = "handed back: the worker is shutting down"
LOG_TAIL_LINES = 20
GROUP_EXIT_SECONDS = 5.0  # how long SIGKILLed processes get to disappear
# stop reasons that SIGKILL the trainer at once: another attempt may own the run dir, or the
# trainer is stuck and would never reach the checkpoint that SIGTERM asks for
KILL_AT_ONCE = ("lease_lost", "stalled")


def worker_name(settings: Settings) -> str:
    """The lease owner's name, for people (a claim's token tells claims apart): unique per
    worker process unless the settings name it."""
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
    token: str  # the claim's: every write of this attempt names it
    run_dir: Path
    settings: Settings
    leased_at: (
        float  # time.monotonic() before the claim: the lease and the run time count from here
    )
    rank: int = 0  # this node's, of the job's `nnodes`
    nnodes: int = 1
    address: str = ""  # this node's, as the others reach it
    master: str = ""  # node 0's address: the rendezvous

    @property
    def records(self) -> bool:
        """Node 0 ingests the events and records the outcome."""
        return self.rank == 0

    def file(self, name: str, suffix: str) -> Path:
        """A file of this node in the (shared) run dir: `spec.json`, `train.log` for node 0,
        `spec.node1.json`... for the others."""
        node = f".node{self.rank}" if self.rank else ""
        return self.run_dir / f"{name}{node}.{suffix}"

    def rendezvous(self) -> Rendezvous | None:
        """torchrun's c10d rendezvous on node 0, one per attempt; None on one node."""
        if self.nnodes == 1:
            return None
        endpoint = f"{self.master}:{self.settings.rendezvous_port}"
        run_id = f"{self.job_id}-{self.attempt}"
        return Rendezvous(self.nnodes, endpoint, run_id, self.address, host=self.rank == 0)


@dataclass(frozen=True)
class _RunTime:
    """The job's run-time limit, and how much of it its earlier attempts used."""

    minutes: float
    source: str  # the setting the limit comes from
    used_seconds: float

    @classmethod
    def of(cls, spec: JobSpec, settings: Settings, used_seconds: float) -> _RunTime:
        """The spec's limit, capped by the server's (lowered since the job was submitted)."""
        asked = spec.schedule.max_runtime_minutes
        if asked is not None and asked <= settings.max_runtime_minutes:
            return cls(asked, "schedule.max_runtime_minutes", used_seconds)
        return cls(settings.max_runtime_minutes, "TID_MAX_RUNTIME_MINUTES", used_seconds)

    @property
    def left_seconds(self) -> float:
        return self.minutes * 60 - self.used_seconds

    @property
    def exceeded(self) -> str:
        return (
            f"exceeded its maximum run time of {self.minutes:g} min, all attempts together "
            f"({self.source})"
        )


@dataclass(frozen=True)
class _Outcome:
    """How an attempt ends: a final state, or back to the queue (`queued`)."""

    state: str
    message: str | None = None  # a failure's error, or why the job goes back to the queue
    handback: bool = False  # back to the queue for a deploy: not counted against max_attempts


class _Progress:
    """When the trainer last showed progress: `events.jsonl` grew (a step, an evaluation...)."""

    def __init__(self, path: Path, now: float) -> None:
        self._path = path
        self._size = self._read_size()
        self._at = now

    def _read_size(self) -> int:
        try:
            return self._path.stat().st_size
        except FileNotFoundError:
            return 0

    def quiet_for(self, now: float) -> float:
        """Seconds since the last new event."""
        size = self._read_size()
        if size != self._size:
            self._size, self._at = size, now
        return now - self._at


def run_job(job_id: str, *, settings: Settings, shutdown: Flag | None = None) -> None:
    """Claim and run `job_id` (a job on one node) to a final state; a job that is not queued
    is left alone, and so is one while this worker is reserved for a gang (it is sent again).

    `shutdown` set (this worker is going away) stops the trainer, which checkpoints, and hands
    the job back to the queue so that another worker resumes it.
    """
    worker = worker_name(settings)
    leased_at = time.monotonic()
    with session_scope(settings.database_url) as session:
        misfit = _misfit(session.get(Job, job_id), worker, settings)
        if misfit is not None:
            sends.unsend(session, job_id, reason=misfit)
            log.info("job %s: not claimed: %s", job_id, misfit)
            return
        token = transitions.claim(
            session,
            job_id,
            worker=worker,
            lease_seconds=settings.lease_seconds,
            nodes=[(worker, settings.worker_address)],
        )
        if token is not None and workers.occupy(session, worker, job_id) is False:
            session.rollback()
            sends.unsend(session, job_id)
            log.info("job %s: not claimed, this worker is reserved for a gang", job_id)
            return
        if token is None:
            log.info("job %s: nothing to claim (taken by another delivery, or final)", job_id)
            return
        attempt = session.get_one(Job, job_id).attempt
    run = _Run(job_id, attempt, worker, token, settings.jobs_dir / job_id, settings, leased_at)
    try:
        _attempt(run, shutdown or threading.Event())
    finally:
        _release(run)


def _misfit(job: Job | None, worker: str, settings: Settings) -> str | None:
    """Why this worker cannot run a queued job of one node (None: it can), by the placement's
    rule (`placement.fits`). Only a worker that declares its GPUs (TID_WORKER_GPUS) checks; one
    that does not runs what it is sent, as workers always did."""
    gpus = settings.gpu_ids
    if job is None or job.state != "queued" or not gpus:
        return None
    resources = ResourcesSpec.model_validate(job.spec.get("resources", {}))
    if placement.fits(resources, len(gpus)):
        return None
    return (
        f"waiting for a worker with {resources.nproc_per_node} GPUs; {worker}, which took it, "
        f"has {len(gpus)}"
    )


def run_node(
    job_id: str, token: str, rank: int, *, settings: Settings, shutdown: Flag | None = None
) -> None:
    """Run node `rank` of the attempt of `job_id` that the claim `token` placed on this
    worker; an attempt that is over, or another worker's node, is left alone."""
    worker = worker_name(settings)
    leased_at = time.monotonic()
    with session_scope(settings.database_url) as session:
        job = session.get_one(Job, job_id)
        nodes = {
            node.node_rank: node
            for node in session.scalars(
                select(JobNode).where(JobNode.job_id == job_id, JobNode.attempt == job.attempt)
            )
        }
        mine = nodes.get(rank)
        if job.state != "running" or job.claim_token != token or mine is None:
            log.info("job %s: node %d's attempt is over; nothing to run", job_id, rank)
            workers.release(session, worker, job_id)
            return
        if mine.worker != worker:
            log.warning("job %s: node %d is %s's, not this worker's", job_id, rank, mine.worker)
            return
        run = _Run(
            job_id,
            job.attempt,
            worker,
            token,
            settings.jobs_dir / job_id,
            settings,
            leased_at,
            rank=rank,
            nnodes=len(nodes),
            address=mine.address,
            master=nodes[0].address,
        )
    try:
        _attempt(run, shutdown or threading.Event())
    finally:
        _release(run)


def _release(run: _Run) -> None:
    """This worker is free again (a worker without a registry row has nothing to free)."""
    try:
        with session_scope(run.settings.database_url) as session:
            workers.release(session, run.worker, run.job_id)
    except TRANSIENT_ERRORS as exc:  # the reconciler frees it once its node's lease is gone
        log.warning("job %s: could not mark this worker idle: %s", run.job_id, exc)


def _attempt(run: _Run, shutdown: Flag) -> None:
    """Run this node's part of an attempt that is claimed, to its end."""
    job_id, settings = run.job_id, run.settings
    if finished_run(run.run_dir) is not None:
        log.warning(
            "job %s: the run dir holds a run trained to its end whose outcome was never "
            "recorded; recording it without training again",
            job_id,
        )
        _record(run, _Outcome("succeeded"))
        return
    try:
        with session_scope(settings.database_url) as session:
            spec = resolve_spec(session, session.get_one(Job, job_id), settings)
            used = transitions.running_seconds(session, job_id)
    except ValueError as exc:  # ResolveError and pydantic's ValidationError
        _record(run, _Outcome("failed", f"cannot run this spec: {exc}"))
        return
    log.info("job %s: attempt %d, node %d, on %s", job_id, run.attempt, run.rank, run.worker)
    runtime = _RunTime.of(spec, settings, used)
    if shutdown.is_set():
        _record(run, _Outcome("queued", SHUTDOWN_REASON, handback=True))
        return
    if runtime.left_seconds <= 0:
        _record(run, _Outcome("failed", runtime.exceeded))
        return
    if time.monotonic() >= run.leased_at + settings.lease_seconds:  # the database was that slow
        log.warning("job %s: the lease ran out before the trainer started", job_id)
        return
    try:
        proc = _start(run, spec)
    except OSError as exc:
        _record(run, _Outcome("failed", f"cannot start the trainer: {exc}"))
        return
    try:
        stop = _supervise(run, proc, shutdown, runtime)
    finally:
        _kill_group(proc)
    _conclude(run, proc.returncode, stop, runtime)


def _start(run: _Run, spec: JobSpec) -> subprocess.Popen[bytes]:
    """torchrun in a new session (its own process group), output appended to train.log."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    spec_path = run.file("spec", "json")  # a file per node: the nodes write at once
    tmp = spec_path.with_name(f"{spec_path.name}.tmp")
    tmp.write_text(json.dumps(spec.model_dump(mode="json"), indent=2) + "\n")
    tmp.replace(spec_path)
    nproc = spec.resources.nproc_per_node
    env = dict(os.environ)
    gpus = run.settings.gpu_ids
    if gpus:  # the trainer sees only the devices it was given
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[:nproc])
    env.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // nproc)))
    # spin-waiting OpenMP threads stall CPU training by up to 6x when the cores are shared
    # with the data loaders and the worker (bench/ddp.py, docs/BENCHMARKS.md)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    cmd = torchrun_command(spec_path, run.run_dir, nproc=nproc, rendezvous=run.rendezvous())
    with run.file("train", "log").open("ab") as out:
        node = f", node {run.rank} of {run.nnodes}" if run.nnodes > 1 else ""
        started = f"--- attempt {run.attempt}{node} on {run.worker} at {utcnow():%FT%TZ}\n"
        out.write(started.encode())
        out.flush()
        return subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=terminate_with_parent,  # no orphan trains beside the next attempt
        )


def _renew(session: Session, run: _Run) -> bool:
    """Renew this node's lease, and on node 0 the job's; False: the claim is gone."""
    lease = run.settings.lease_seconds
    node = transitions.renew_node(
        session,
        run.job_id,
        token=run.token,
        attempt=run.attempt,
        rank=run.rank,
        lease_seconds=lease,
    )
    if not run.records:
        return node
    # a job claimed before nodes had rows (an upgrade meanwhile) has none to renew
    return transitions.renew_lease(session, run.job_id, token=run.token, lease_seconds=lease)


def _sync(run: _Run, *, renew: bool) -> tuple[bool, bool]:
    """One database round: check (and renew) the lease, ingest new events (node 0), read the
    cancel flag.

    Returns (lease still held, cancel requested). Events are ingested only under the lease.
    """
    with session_scope(run.settings.database_url) as session:
        state, token, cancel = session.execute(
            select(Job.state, Job.claim_token, Job.cancel_requested).where(Job.id == run.job_id)
        ).one()
        held = state == "running" and token == run.token
        if held and renew:
            held = _renew(session, run)
        if not held:
            return False, False
        if run.records:
            ingest_events(session, run.job_id, run_dir=run.run_dir, attempt=run.attempt)
        return True, bool(cancel)


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL every process of the trainer: its whole tree while torchrun is not reaped (its
    pid is still its own), else what is left of its process group."""
    if proc.poll() is None:
        kill_tree(proc.pid)
    else:
        _signal_group(proc, signal.SIGKILL)


def _supervise(
    run: _Run, proc: subprocess.Popen[bytes], shutdown: Flag, runtime: _RunTime
) -> str | None:
    """Poll until the trainer exits; returns why we stopped it (cancel, shutdown, lease_lost,
    stalled, runtime)."""
    settings = run.settings
    stop: str | None = None
    kill_at = math.inf
    next_renew = 0.0
    progress = _Progress(run.run_dir / EVENTS_FILE, time.monotonic())
    runtime_ends = run.leased_at + runtime.left_seconds  # from the claim, as the history counts
    lease = Watchdog(
        lambda: _kill(proc),
        deadline=run.leased_at + settings.lease_seconds,
        name=f"lease-{run.job_id}",
    )
    with lease:
        while proc.poll() is None:
            asked = time.monotonic()  # a renewal counts from before the database saw it
            if stop != "lease_lost":
                try:
                    renew = asked >= next_renew
                    held, cancel = _sync(run, renew=renew)
                except TRANSIENT_ERRORS as exc:  # train through a blip; not past the lease
                    log.warning("job %s: database unavailable, will retry: %s", run.job_id, exc)
                else:
                    if renew and held:
                        next_renew = asked + settings.lease_seconds / 3
                        lease.extend(asked + settings.lease_seconds)
                    if not held:
                        log.warning("job %s: lease lost; stopping the trainer", run.job_id)
                        stop = "lease_lost"
                    elif cancel and stop is None:
                        log.info("job %s: cancel requested", run.job_id)
                        stop = "cancel"
            now = time.monotonic()
            if lease.fired and stop != "lease_lost":
                log.warning("job %s: lease ran out unrenewed: trainer killed", run.job_id)
                stop = "lease_lost"  # the reconciler may already have re-queued the job
            if stop is None and shutdown.is_set():
                log.info("job %s: worker shutting down; stopping the trainer", run.job_id)
                stop = "shutdown"
            if stop is None and progress.quiet_for(now) >= settings.stall_seconds:
                log.warning("job %s: %s; killing the trainer", run.job_id, _stalled(settings))
                stop = "stalled"
            if stop is None and now >= runtime_ends:
                log.warning("job %s: %s; stopping the trainer", run.job_id, runtime.exceeded)
                stop = "runtime"
            if stop in KILL_AT_ONCE:
                _kill(proc)
            elif stop is not None and kill_at == math.inf:
                _signal_group(proc, signal.SIGTERM)
                kill_at = now + settings.cancel_grace_seconds
            elif now >= kill_at:
                log.warning("job %s: trainer ignored SIGTERM; killing it", run.job_id)
                _kill(proc)
                kill_at = now + settings.cancel_grace_seconds
            with suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=POLL_SECONDS)
    return "lease_lost" if lease.fired else stop


def _stalled(settings: Settings) -> str:
    return f"stalled: no progress for {settings.stall_seconds:g} s"


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """Nothing of the trainer outlives its supervisor (torchrun's workers included)."""
    _kill(proc)
    proc.wait()
    deadline = time.monotonic() + GROUP_EXIT_SECONDS
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    log.warning("process group %d still has members after SIGKILL", proc.pid)


def _conclude(run: _Run, returncode: int, stop: str | None, runtime: _RunTime) -> None:
    """Record the outcome the exit code and our stop reason give, unless the lease was lost
    while the trainer ran (it was killed: the reconciler decides). A run that trained to its
    end succeeded whatever stopped its trainer on the way out (the lease's end, with the
    database away during a slow exit)."""
    if finished_run(run.run_dir) is not None:
        _record(run, _Outcome("succeeded"))
    elif stop == "lease_lost":
        log.warning("job %s: not recording an outcome: the lease is gone", run.job_id)
    elif not run.records:  # node 0 reads the error events; this node says only how it ended
        ended = "succeeded" if returncode == 0 else "failed"
        _record(
            run,
            _Outcome("queued", SHUTDOWN_REASON, True) if stop == "shutdown" else _Outcome(ended),
        )
    else:
        _record(run, lambda session: _outcome(session, run, returncode, stop, runtime))


def _outcome(
    session: Session, run: _Run, returncode: int, stop: str | None, runtime: _RunTime
) -> _Outcome:
    """A failed attempt is retried while attempts are left if the failure may not repeat;
    else the job fails with the reason."""
    if returncode == 0:
        return _Outcome("succeeded")
    if stop == "cancel":
        return _Outcome("cancelled")
    if stop == "shutdown":
        return _Outcome("queued", SHUTDOWN_REASON, handback=True)
    if stop == "runtime":
        return _Outcome("failed", runtime.exceeded)
    if stop == "stalled":  # a hang may well not repeat (a lost peer, a mount back)
        reason, retryable = _stalled(run.settings), True
    else:
        reason, retryable = _failure(session, run, returncode)
    if not retryable:
        return _Outcome("failed", reason)
    job = session.get_one(Job, run.job_id)
    left = transitions.attempts_left(job)
    if left > 0:
        return _Outcome("queued", f"retrying ({left} attempt(s) left) after: {reason}")
    used = job.attempt - job.handbacks
    return _Outcome("failed", f"{reason}\n(attempt {used} of {job.max_attempts}: none left)")


def _record(run: _Run, outcome: _Outcome | Callable[[Session], _Outcome]) -> None:
    """Ingest the trainer's last events and write the attempt's outcome (or the one `outcome`
    reads from those events) in one transaction, retried while the database is away.

    It applies while the job is still this claim's: running, or sent back to the queue by the
    reconciler when the lease ran out (the database was away longer) and claimed by nobody
    since. A job put back in the queue is sent again.
    """

    def write() -> tuple[_Outcome, bool] | None:
        """The outcome, and whether this write put the job back in the queue; None if the job
        is no longer this claim's."""
        with session_scope(run.settings.database_url) as session:
            state = transitions.claimed_by(session, run.job_id, run.token)
            if state is None:
                return None
            ingest_events(session, run.job_id, run_dir=run.run_dir, attempt=run.attempt)
            session.flush()
            decided = outcome(session) if callable(outcome) else outcome
            if decided.state != "queued":
                done = transitions.finish(
                    session, run.job_id, token=run.token, state=decided.state, error=decided.message
                )
                return (decided, False) if done else None
            if state == "queued":  # the reconciler put it back already, and sent it
                return decided, False
            reason, handback = decided.message or "", decided.handback
            done = transitions.requeue(
                session, run.job_id, token=run.token, reason=reason, handback=handback
            )
            return (decided, True) if done else None

    if not run.records:
        if not callable(outcome):
            _end_node(run, outcome)
        return
    recorded = retrying(run.settings, f"job {run.job_id}", "recording the outcome", write)
    if recorded is None:
        log.warning("job %s: not recording an outcome: claimed again since, or final", run.job_id)
        return
    decided, requeued = recorded
    message = f" ({decided.message})" if decided.message else ""
    log.info("job %s: %s%s", run.job_id, decided.state, message)
    if requeued and run.nnodes == 1:  # a gang is placed again by the reconciler
        enqueue(run.settings, RUN_JOB, run.job_id)


def _end_node(run: _Run, outcome: _Outcome) -> None:
    """How a node other than 0 ends its part: a hand-back sends the whole job back to the
    queue; a trainer that ended well frees the node's lease; any other end makes it run out now,
    so that the reconciler re-queues the gang unless node 0 records the attempt first."""

    def write() -> bool:
        with session_scope(run.settings.database_url) as session:
            if outcome.handback:
                return transitions.requeue(
                    session,
                    run.job_id,
                    token=run.token,
                    reason=outcome.message or "",
                    handback=True,
                )
            done = outcome.state == "succeeded"
            transitions.end_node(session, run.job_id, attempt=run.attempt, rank=run.rank, done=done)
            return done

    retrying(run.settings, f"job {run.job_id}", f"ending node {run.rank}", write)
    log.info("job %s: node %d ended (%s)", run.job_id, run.rank, outcome.state)


def _failure(session: Session, run: _Run, returncode: int) -> tuple[str, bool]:
    """Why the trainer failed and whether another attempt may succeed: its `error` event of
    this attempt says both; without one it died from outside (a signal, the OOM killer, a
    busy run dir), which is worth another attempt."""
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
