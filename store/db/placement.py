"""Gang placement: a job on several nodes starts only when all its workers are assigned at once.

Each reconciler pass takes the queued jobs with `nnodes > 1`, oldest `queued_at` first, and
for each one picks `nnodes` alive idle workers that fit it (a CUDA job: workers with at least
`nproc_per_node` GPUs; a CPU job: any, those without GPUs first; `auto`: GPU workers that fit,
else workers without GPUs). In one transaction it reserves them (busy with the job), claims
the job as a worker claims one (`transitions.claim`: next attempt, new token, leases) and
writes a node row per rank; rank 0's worker's address is the rendezvous. A gang that cannot
form reserves nothing: the job keeps a `waiting_reason` a user can read, and younger jobs may
take the workers.

All or nothing in one transaction means that two gangs competing for the same workers never
deadlock (neither holds part of what the other waits for), and oldest first means the same
job wins every pass until it starts (no livelock). The trade-off: nothing is reserved for a
waiting gang, so a large one can wait behind a stream of smaller jobs that keep taking the
workers it needs one at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from store.db import transitions
from store.db.models import Job, Worker
from store.db.workers import alive_since
from tid_core.spec import ResourcesSpec


@dataclass(frozen=True)
class Placed:
    """A job claimed for a gang: the token its nodes' writes name, each node's worker queue."""

    job_id: str
    token: str
    queues: tuple[str, ...]  # by node rank
    workers: tuple[str, ...]  # by node rank


def _kinds(resources: ResourcesSpec) -> list[Callable[[int], bool]]:
    """Which workers, by their GPU count, may hold a node of the job, one kind per try: a gang's
    nodes must agree on their device (nccl or gloo). A CUDA job needs `nproc_per_node` GPUs;
    `auto` takes that many, else a worker without GPUs (where its trainer picks the CPU); a CPU
    job runs on any worker."""
    nproc = resources.nproc_per_node
    if resources.device == "cuda":
        return [lambda gpus: gpus >= nproc]
    if resources.device == "auto":
        return [lambda gpus: gpus >= nproc, lambda gpus: gpus == 0]
    return [lambda _gpus: True]


def fits(resources: ResourcesSpec, gpus: int) -> bool:
    """Whether a worker with `gpus` GPUs may run a node of the job: the rule of the gangs here,
    and of a worker that declares its GPUs and is sent a job of one node (worker/runner.py)."""
    return any(kind(gpus) for kind in _kinds(resources))


def _gang(idle: list[Worker], resources: ResourcesSpec) -> tuple[list[Worker], str]:
    """The workers for the job (best fit first: fewest GPUs, so a CPU job takes workers without
    GPUs before any with them), or none and why it waits."""
    nnodes, nproc, device = resources.nnodes, resources.nproc_per_node, resources.device
    kinds = _kinds(resources)
    for kind in kinds:
        fit = sorted((w for w in idle if kind(len(w.gpus))), key=lambda w: (len(w.gpus), w.name))
        if len(fit) >= nnodes:
            return fit[:nnodes], ""
    fitting = max(sum(kind(len(w.gpus)) for w in idle) for kind in kinds)
    offer = f" with {nproc} GPU{'s' if nproc > 1 else ''}" if device == "cuda" else ""
    return [], f"waiting for {nnodes} workers{offer}; {fitting} idle"


def place(session: Session, *, heartbeat_seconds: float, lease_seconds: int) -> list[Placed]:
    """One pass over the waiting gangs (the caller commits, then sends each node its task)."""
    now = transitions.db_now(session)
    # on PostgreSQL, rows another transaction holds are skipped: a worker claiming a job of one
    # node, a job another reconciler places (SQLite runs one writing transaction at a time)
    alive = Worker.heartbeat_at >= alive_since(now, heartbeat_seconds)
    idle = list(
        session.scalars(
            select(Worker)
            .where(Worker.state == "idle", alive)
            .order_by(Worker.name)
            .with_for_update(skip_locked=True)
        )
    )
    waiting = session.scalars(
        select(Job)
        .where(Job.state == "queued", Job.nnodes > 1)
        .order_by(Job.queued_at, Job.id)
        .with_for_update(skip_locked=True)
    ).all()
    placed = []
    for job in waiting:
        gang, reason = _gang(idle, ResourcesSpec.model_validate(job.spec.get("resources", {})))
        if not gang:
            if job.waiting_reason != reason:
                job.waiting_reason = reason
            continue
        placing = session.begin_nested()
        names = [w.name for w in gang]
        reserved = session.execute(
            update(Worker)
            .where(Worker.name.in_(names), Worker.state == "idle")
            .values(state="busy", job_id=job.id)
        )
        token = transitions.claim(
            session,
            job.id,
            worker=names[0],
            lease_seconds=lease_seconds,
            nodes=[(w.name, w.address) for w in gang],
        )
        if getattr(reserved, "rowcount", 0) != len(gang) or token is None:
            placing.rollback()  # a worker or the job changed meanwhile: the next pass sees it
            continue
        placing.commit()
        placed.append(Placed(job.id, token, tuple(w.queue for w in gang), tuple(names)))
        idle = [w for w in idle if w.name not in names]
    return placed
