"""Service settings from the environment (prefix `TID_`), with embedded defaults.

With nothing set, everything lives under `var/`: a SQLite database and a Celery transport on
the file system, so `make demo` and the tests need no server. Production sets
`TID_DATABASE_URL` (PostgreSQL) and `TID_BROKER_URL` (Redis).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Self

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tid_core.spec import MAX_RUNTIME_MINUTES

KEEPALIVE_PROBES = 3


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TID_", env_ignore_empty=True, extra="ignore")

    data_root: Path = Path("var")
    database_url: str = ""  # default: sqlite:///<data_root>/tid.db
    broker_url: str = ""  # default: filesystem:// under <data_root>/broker
    queue: str = "tid"
    # folders under which a user may register an existing server-side dataset
    dataset_roots: list[Path] = Field(default_factory=list)
    lease_seconds: int = Field(default=30, ge=2, le=3600)
    reconcile_seconds: float = Field(default=10.0, gt=0, le=3600)
    # a waiting job, dataset or model whose message was not sent (a failed send, a process that
    # died before it) this long after it began to wait, or was sent this long ago and is missing
    # from the broker's queue, is sent again (store/db/sends.py)
    requeue_after_seconds: float = Field(default=60.0, gt=0, le=86400)
    # the Redis transport's visibility timeout: a message a worker took and never acknowledged
    # (it died) goes back to the queue after this. A dataset's or model's check holds its
    # message while it runs, so it is sent again only this long after its last send: keep it
    # above the longest check (TID_CHECK_SECONDS)
    broker_visibility_seconds: int = Field(default=7200, ge=1, le=7 * 86400)
    # the most messages one reconciler pass sends again
    resend_per_pass: int = Field(default=100, ge=1, le=100_000)
    # a dataset or model still pending after this many sends of its check (and found lost again),
    # or after this long, is failed with the reason instead of waiting for ever
    check_max_sends: int = Field(default=5, ge=1, le=100)
    check_max_pending_seconds: float = Field(default=86400.0, gt=0, le=30 * 86400)
    cancel_grace_seconds: float = Field(default=10.0, ge=0, le=3600)
    # how long a worker keeps retrying the write of a finished job's outcome while the
    # database is away, before it leaves the job to its lease (and the reconciler)
    db_retry_seconds: float = Field(default=300.0, ge=0, le=86400)
    max_attempts: int = Field(default=3, ge=1, le=100)
    # a trainer that writes no event for this long is stuck (a deadlocked collective, a hung
    # data loader, a dead mount): killed, and the attempt counts as a retryable failure. Keep it
    # above the longest quiet stretch of a run: an evaluation, `log_every` steps, the wait for
    # the run dir's lock (300 s)
    stall_seconds: float = Field(default=1800.0, ge=1, le=7 * 86400)
    # the most a job may run, all attempts together; a spec's schedule.max_runtime_minutes may
    # only lower it
    max_runtime_minutes: float = Field(default=7 * 24 * 60, gt=0, le=MAX_RUNTIME_MINUTES)
    # bounded waits on PostgreSQL (store/db/postgres.py): connecting, one statement or lock wait
    # (the client gives the server up 5 s later)
    db_connect_timeout_seconds: int = Field(default=10, ge=2, le=600)
    db_statement_timeout_seconds: float = Field(default=30.0, gt=0, le=86400)
    # connecting to Redis and each command: a send to a broker that does not answer gives up
    # (the job stays queued, and the reconciler sends it again)
    broker_timeout_seconds: float = Field(default=5.0, ge=2, le=600)
    # TCP keepalive on PostgreSQL and Redis connections: idle seconds before probing a peer,
    # which is given up about as long again later
    keepalive_seconds: int = Field(default=30, ge=3, le=3600)
    # a dataset or model check runs in a child process under these limits (worker.resource_check):
    # its address space, torch's libraries included (~3.6 GB of it with the CUDA build; COCO
    # 2017's train split needs ~6.5 GB in all); its CPU time; its wall-clock time
    check_memory_mb: int = Field(default=16384, ge=256, le=1 << 24)
    check_cpu_seconds: int = Field(default=3600, ge=1, le=7 * 86400)
    check_seconds: float = Field(default=3600.0, gt=0, le=7 * 86400)
    # deliveries of one check's message; the next one fails the dataset or model rather than
    # run again a check that keeps killing or losing its worker
    check_max_deliveries: int = Field(default=3, ge=1, le=100)
    # jobs one owner may have queued or running at once, so nobody floods the queue (0: no limit)
    max_active_jobs_per_owner: int = Field(default=20, ge=0, le=100_000)
    # what one owner may hold (0: no limit), whatever its state: a failed upload's files stay
    max_datasets_per_owner: int = Field(default=100, ge=0, le=1_000_000)
    max_models_per_owner: int = Field(default=100, ge=0, le=1_000_000)
    # uploaded models and unpacked dataset uploads together (generated ones are capped below)
    max_stored_bytes_per_owner: int = Field(default=200 << 30, ge=0)
    # event streams (SSE) one owner may have open at once, over every API process (0: no limit)
    max_event_streams_per_owner: int = Field(default=20, ge=0, le=100_000)
    # caps on what one job or generated dataset may ask for (a spec above them is a 422)
    max_nproc_per_node: int = Field(default=8, ge=1, le=64)
    # hosts (workers) one job may span (resources.nnodes)
    max_nnodes: int = Field(default=4, ge=1, le=64)
    max_num_workers: int = Field(default=16, ge=0, le=64)
    # a job's size: epochs x training images (COCO's 3x schedule: 36 x 118,287 = 4.3 million)
    max_job_images: int = Field(default=5_000_000, ge=1)
    # training + validation images of a generated (builtin) dataset
    max_builtin_images: int = Field(default=20_000, ge=2)
    max_json_bytes: int = Field(default=1 << 20, ge=1024)
    max_upload_bytes: int = Field(default=4 << 30, ge=1024)
    worker_name: str = ""  # default: hostname-pid
    # a worker's row in the registry (store/db/workers.py): written this often, on the database's
    # clock; a worker whose last one is older than 3 of them is gone (no job is placed on it)
    heartbeat_seconds: float = Field(default=5.0, gt=0, le=3600)
    # the address the other nodes of a job reach this worker at (its rendezvous, when it runs a
    # job's node 0); default: this host's address on its route to the database (worker/registry.py)
    worker_address: str = Field(default="", max_length=255)
    # the GPUs this worker gives its jobs, comma-separated device ids (CUDA_VISIBLE_DEVICES'
    # form, e.g. "0,1,2,3"); empty: a CPU worker
    worker_gpus: str = Field(default="", pattern=r"^[A-Za-z0-9\-]*(,[A-Za-z0-9\-]+)*$")
    # the TCP port of a multi-node job's rendezvous on its node 0's worker (open between workers)
    rendezvous_port: int = Field(default=29400, ge=1, le=65535)
    # `Authorization: Bearer <token>` that /metrics then requires (unset: open, so firewall it)
    metrics_token: SecretStr | None = None
    # `user:password` for `tid flower`, which refuses a non-loopback address without it
    flower_basic_auth: SecretStr | None = None

    @model_validator(mode="after")
    def _defaults(self) -> Self:
        self.data_root = self.data_root.resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_root / 'tid.db'}"
        if self.database_url.startswith("postgresql://"):
            self.database_url = "postgresql+psycopg://" + self.database_url.removeprefix(
                "postgresql://"
            )
        if not self.broker_url:
            self.broker_url = "filesystem://"
        return self

    @model_validator(mode="after")
    def _check_within_visibility(self) -> Self:
        """A check that may run past the visibility timeout would be handed, still running, to
        another worker by Redis, and sent again by the reconciler: two checks of one row."""
        if self.check_seconds >= self.broker_visibility_seconds:
            raise ValueError(
                f"TID_CHECK_SECONDS ({self.check_seconds:g}) must be below "
                f"TID_BROKER_VISIBILITY_SECONDS ({self.broker_visibility_seconds}): a check "
                "still running then would be handed to another worker and run twice"
            )
        return self

    @property
    def jobs_dir(self) -> Path:
        return self.data_root / "jobs"

    @property
    def datasets_dir(self) -> Path:
        return self.data_root / "datasets"

    @property
    def models_dir(self) -> Path:
        return self.data_root / "models"

    @property
    def gpu_ids(self) -> list[str]:
        """`worker_gpus` as a list (empty: a CPU worker)."""
        return [gpu for gpu in self.worker_gpus.split(",") if gpu]

    @property
    def broker_dir(self) -> Path:
        return self.data_root / "broker"

    @property
    def keepalive(self) -> tuple[int, int, int]:
        """TCP keepalive for the database and the broker: idle and interval seconds, probes."""
        return self.keepalive_seconds, self.keepalive_seconds // KEEPALIVE_PROBES, KEEPALIVE_PROBES


@lru_cache
def get_settings() -> Settings:
    return Settings()
