"""Fair use of a shared service, each limit a setting that its problem names.

Quotas bound what one owner holds or runs at once: jobs queued or running, datasets and models
(how many, and the bytes the service stores for them). A full one is a 429: the same request
may succeed later, once a job ends or an operator makes room. Caps bound what one request may
ask for: a job's nodes, processes, loader workers, size (epochs x training images) and run
time, a generated dataset's images. A spec above one is a 422: as it is, it can never succeed.

The counts are read before the insert and not locked: two requests racing each other may both
pass them. That is a quota, not an invariant, and it keeps submits and uploads free of table
locks. (Open event streams, which must hold across API processes, are in `api.stream_leases`.)
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.problems import TooManyRequests, Unprocessable
from store.db.models import FINAL_STATES, Dataset, Job, Model
from store.settings import Settings
from tid_core.spec import BuiltinDataset, IdDataset, JobSpec

RETRY_AFTER_SECONDS = 60  # jobs run for minutes: asking again sooner only adds load
HELD = {Dataset: "max_datasets_per_owner", Model: "max_models_per_owner"}


def setting_name(field: str) -> str:
    """The environment variable of a Settings field, as a problem names it to the client."""
    return f"{Settings.model_config.get('env_prefix', '')}{field}".upper()


def _cap(settings: Settings, field: str, asked: int, *, what: str, loc: Sequence[str]) -> None:
    limit = getattr(settings, field)
    if asked > limit:
        raise Unprocessable(
            f"{what} is {asked}, over this server's limit of {limit} ({setting_name(field)})",
            loc=loc,
        )


def check_active_jobs(session: Session, settings: Settings, *, owner: str) -> None:
    """429 when `owner` already has `max_active_jobs_per_owner` jobs queued or running."""
    limit = settings.max_active_jobs_per_owner
    if limit == 0:
        return
    active = session.scalar(
        select(func.count())
        .select_from(Job)
        .where(Job.owner == owner, Job.state.not_in(FINAL_STATES))
    )
    if active is not None and active >= limit:
        raise TooManyRequests(
            f"you have {active} jobs queued or running and the limit is {limit} "
            f"({setting_name('max_active_jobs_per_owner')}): wait for one to finish or cancel one",
            retry_after=RETRY_AFTER_SECONDS,
        )


def check_builtin(settings: Settings, dataset: BuiltinDataset, *, loc: Sequence[str]) -> None:
    """422 when a generated dataset would have more images than `max_builtin_images`."""
    images = dataset.num_train + dataset.num_val
    _cap(settings, "max_builtin_images", images, what="num_train + num_val", loc=loc)


def _check_runtime(settings: Settings, spec: JobSpec) -> None:
    asked, limit = spec.schedule.max_runtime_minutes, settings.max_runtime_minutes
    if asked is not None and asked > limit:
        raise Unprocessable(
            f"schedule.max_runtime_minutes is {asked}, over this server's limit of {limit:g} "
            f"minutes ({setting_name('max_runtime_minutes')})",
            loc=("body", "schedule", "max_runtime_minutes"),
        )


def check_job_caps(session: Session, settings: Settings, spec: JobSpec, *, owner: str) -> None:
    """422 when the spec asks for more than the server's caps allow. A job's size counts the
    training images of a builtin dataset or of a registered one (`num_train`, known once it is
    ready); a server path's are known only to the worker that reads it, so that is not capped."""
    _check_runtime(settings, spec)
    resources = spec.resources
    for field in ("nnodes", "nproc_per_node", "num_workers"):
        _cap(
            settings,
            f"max_{field}",
            getattr(resources, field),
            what=f"resources.{field}",
            loc=("body", "resources", field),
        )
    dataset, images = spec.dataset, None
    if isinstance(dataset, BuiltinDataset):
        check_builtin(settings, dataset, loc=("body", "dataset", "num_train"))
        images = dataset.num_train
    elif isinstance(dataset, IdDataset):  # none (not the caller's, not ready): a 422 later
        query = select(Dataset.num_train).where(Dataset.id == dataset.id, Dataset.owner == owner)
        images = session.scalar(query)
    if images is not None:
        epochs = spec.schedule.epochs
        _cap(
            settings,
            "max_job_images",
            epochs * images,
            what=f"the job's size, schedule.epochs x training images ({epochs} x {images}),",
            loc=("body", "schedule", "epochs"),
        )


def check_held(
    session: Session, settings: Settings, table: type[Dataset] | type[Model], *, owner: str
) -> None:
    """429 when `owner` already holds as many datasets (or models) as the quota allows."""
    field = HELD[table]
    limit = getattr(settings, field)
    if limit == 0:
        return
    held = session.scalar(select(func.count()).select_from(table).where(table.owner == owner))
    if held is not None and held >= limit:
        raise TooManyRequests(
            f"you have {held} {table.__tablename__} and the limit is {limit} "
            f"({setting_name(field)}): an operator can remove some or raise it",
            retry_after=None,
        )


def check_stored_bytes(session: Session, settings: Settings, *, owner: str, adding: int) -> None:
    """429 when `adding` bytes more would take what the service stores for `owner` (uploaded
    models, unpacked dataset uploads) past `max_stored_bytes_per_owner`."""
    limit = settings.max_stored_bytes_per_owner
    if limit == 0:
        return
    stored = sum(
        session.scalar(select(func.coalesce(func.sum(table.bytes), 0)).where(table.owner == owner))
        or 0
        for table in (Dataset, Model)
    )
    if stored + adding > limit:
        raise TooManyRequests(
            f"this upload ({adding} bytes) would take what you store to {stored + adding} bytes, "
            f"over the limit of {limit} ({setting_name('max_stored_bytes_per_owner')}): an "
            "operator can remove some of yours or raise it",
            retry_after=None,
        )
