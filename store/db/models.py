"""SQLAlchemy 2 tables: the service's single source of truth.

Ids are 32-character hex UUIDs; times are timezone-aware UTC (SQLite stores them naive, so a
type decorator re-attaches UTC on read). Alembic is the only way these tables are created.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from tid_core.spec import TRAIN_SPLIT, VAL_SPLIT

JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINAL_STATES = ("succeeded", "failed", "cancelled")


def new_id() -> str:
    return uuid.uuid4().hex


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """DateTime that always comes back timezone-aware UTC, on SQLite too."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:  # noqa: ARG002
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:  # noqa: ARG002
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime,
        dict[str, Any]: JSON,
        list[Any]: JSON,
    }


class ApiKey(Base):
    """An API key, stored as the SHA-256 of its secret (keys are random, so no slow hash)."""

    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner: Mapped[str] = mapped_column(String(128), index=True)
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)
    expires_at: Mapped[datetime | None] = mapped_column(default=None)  # None: never


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner: Mapped[str] = mapped_column(String(128), index=True)
    name: Mapped[str] = mapped_column(String(128))
    spec: Mapped[dict[str, Any]]  # as submitted (validated JobSpec, ids unresolved)
    method: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    attempt: Mapped[int] = mapped_column(Integer, default=0)  # attempts started
    # attempts a deploy handed back (the trainer checkpointed and stopped on request): they
    # are not failures, so `attempt - handbacks` is what max_attempts caps
    handbacks: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    lease_owner: Mapped[str | None] = mapped_column(String(128), default=None)  # for people
    # new with each claim, kept until the next: what a lease holder's writes must name
    claim_token: Mapped[str | None] = mapped_column(String(32), default=None)
    lease_expires: Mapped[datetime | None] = mapped_column(default=None)  # the database's clock
    events_offset: Mapped[int] = mapped_column(
        BigInteger, default=0
    )  # bytes of events.jsonl ingested
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int | None] = mapped_column(Integer, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    queued_at: Mapped[datetime] = mapped_column(default=utcnow)  # last (re)queue
    # its message (store/db/sends.py): when a send was last accepted by the broker, and how many
    last_sent_at: Mapped[datetime | None] = mapped_column(default=None)
    send_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    # the spec's resources.nnodes, for the queries that place jobs (store/db/placement.py)
    nnodes: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    # why a queued job on several nodes has not started (its gang cannot form); cleared on claim
    waiting_reason: Mapped[str | None] = mapped_column(Text, default=None)

    __table_args__ = (Index("ix_jobs_owner_created", "owner", "created_at", "id"),)


class Worker(Base):
    """A worker process in the registry (store/db/workers.py): where a job's node can run.

    It writes its row when it starts and its heartbeat while it lives, on the database's clock;
    it is alive while that heartbeat is recent. `busy` with `job_id` from a claim, or from a
    gang placement that reserved it, until its job or node ends."""

    __tablename__ = "workers"
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    queue: Mapped[str] = mapped_column(String(256))  # its own: where its nodes are sent
    address: Mapped[str] = mapped_column(String(256))  # where the other nodes reach it
    device: Mapped[str] = mapped_column(String(8))  # cpu | cuda
    gpus: Mapped[list[Any]] = mapped_column(JSON)  # device ids it gives its jobs
    state: Mapped[str] = mapped_column(String(16), default="idle")  # idle | busy
    job_id: Mapped[str | None] = mapped_column(String(32), default=None)
    heartbeat_at: Mapped[datetime]
    started_at: Mapped[datetime]


class JobNode(Base):
    """One node of one attempt of a job: the worker that runs it and that node's lease (the
    database's clock). Rank 0's address is the attempt's rendezvous."""

    __tablename__ = "job_nodes"
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer, primary_key=True)
    node_rank: Mapped[int] = mapped_column(Integer, primary_key=True)
    worker: Mapped[str] = mapped_column(String(128))
    address: Mapped[str] = mapped_column(String(256))
    # None: the node's trainer ended well, and it holds the job no longer
    lease_expires: Mapped[datetime | None] = mapped_column(default=None)


class Metric(Base):
    """One scalar of one step: loss terms, lr, TID area fractions (mAP is in `evaluations`).

    One row per (job, step, name) across attempts: a resume's re-logged step overwrites the row
    (worker/ingest.py), which then holds the attempt that logged it last and a new id (`id` is
    the logging order the API's cursors follow)."""

    __tablename__ = "metrics"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer)
    step: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(64))
    value: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (
        Index("ix_metrics_job_id", "job_id", "id"),
        Index("ux_metrics_job_id_step_name", "job_id", "step", "name", unique=True),
    )


class JobEvent(Base):
    """The job's event stream (state changes and the trainer's events), served over SSE."""

    __tablename__ = "job_events"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer)
    type: Mapped[str] = mapped_column(String(32))
    data: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (Index("ix_job_events_job_id", "job_id", "id"),)


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    epoch: Mapped[int] = mapped_column(Integer)
    step: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(String(1024))  # relative to the job's run dir
    sha256: Mapped[str] = mapped_column(String(64))
    bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Evaluation(Base):
    """One COCO evaluation of the student: the one place the database keeps mAP (the API
    derives a job's `best_ap` and its `eval/AP` points from these rows)."""

    __tablename__ = "evaluations"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    epoch: Mapped[int] = mapped_column(Integer)
    step: Mapped[int] = mapped_column(Integer)
    ap: Mapped[float | None] = mapped_column(Float)
    ap50: Mapped[float | None] = mapped_column(Float)
    ap75: Mapped[float | None] = mapped_column(Float)
    aps: Mapped[float | None] = mapped_column(Float)
    apm: Mapped[float | None] = mapped_column(Float)
    apl: Mapped[float | None] = mapped_column(Float)
    per_class: Mapped[dict[str, Any]]
    backend: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Artifact(Base):
    """A finished job's exported student weights (`student.pt`, `student.safetensors`)."""

    __tablename__ = "artifacts"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(1024))  # relative to the job's run dir
    sha256: Mapped[str] = mapped_column(String(64))
    bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (UniqueConstraint("job_id", "name"),)


class Dataset(Base):
    """A COCO-format folder the service can train on: generated, registered or uploaded."""

    __tablename__ = "datasets"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner: Mapped[str] = mapped_column(String(128), index=True)
    name: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(16))  # builtin | path | upload
    source: Mapped[dict[str, Any]]  # what the user asked for
    path: Mapped[str] = mapped_column(String(4096))  # absolute folder on the shared volume
    state: Mapped[str] = mapped_column(String(16), default="pending")
    error: Mapped[str | None] = mapped_column(Text, default=None)
    # deliveries of its check's message (worker.resources): past TID_CHECK_MAX_DELIVERIES it fails
    deliveries: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    last_sent_at: Mapped[datetime | None] = mapped_column(default=None)  # its check's, as jobs'
    send_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    num_train: Mapped[int | None] = mapped_column(Integer, default=None)
    num_val: Mapped[int | None] = mapped_column(Integer, default=None)
    class_names: Mapped[list[Any] | None] = mapped_column(JSON, default=None)
    # what an upload unpacked to, for the owner's storage quota; None where the service stores
    # no copy (a registered folder) or a generated one (bounded by TID_MAX_BUILTIN_IMAGES)
    bytes: Mapped[int | None] = mapped_column(BigInteger, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    def splits(self) -> tuple[str, str]:
        """(training, validation) split names: a registered or uploaded folder may name its
        own (COCO 2017: `train2017`, `val2017`); generated ones are `train` and `val`."""
        return self.source.get("train_split", TRAIN_SPLIT), self.source.get("val_split", VAL_SPLIT)


class Model(Base):
    """Uploaded weights (a detector, or a bare backbone), checked by a worker (weights_only)
    before they are `ready`."""

    __tablename__ = "models"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner: Mapped[str] = mapped_column(String(128), index=True)
    name: Mapped[str] = mapped_column(String(128))
    path: Mapped[str] = mapped_column(String(4096))
    sha256: Mapped[str] = mapped_column(String(64))
    bytes: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(16), default="pending")
    error: Mapped[str | None] = mapped_column(Text, default=None)
    deliveries: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # as datasets'
    last_sent_at: Mapped[datetime | None] = mapped_column(default=None)  # its check's, as jobs'
    send_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    meta: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)  # arch, backbone...
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class EventStream(Base):
    """An open event stream (SSE), counted against its owner's limit by every API process;
    renewed while it streams, so the row of one whose process died stops counting on expiry."""

    __tablename__ = "event_streams"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner: Mapped[str] = mapped_column(String(128), index=True)
    expires_at: Mapped[datetime]


class IdempotencyKey(Base):
    __tablename__ = "idempotency_keys"
    owner: Mapped[str] = mapped_column(String(128), primary_key=True)
    key: Mapped[str] = mapped_column(String(256), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
