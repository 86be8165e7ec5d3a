"""Turn a stored JobSpec into the one the trainer runs: service ids become file paths.

The trainer only knows files (`tid_core.spec`); datasets, uploaded models and finished jobs are
rows of the service. Resolution happens at run time, on the worker, so a job re-queued onto
another host resolves against the same shared volume.
"""

from __future__ import annotations

from typing import TypeVar

from sqlalchemy.orm import Session

from store.db.models import Dataset, Job, Model
from store.db.owned import Owned, find_owned
from store.settings import Settings
from tid_core.spec import (
    IdDataset,
    JobSpec,
    JobWeights,
    ModelWeights,
    PathDataset,
    PathWeights,
    Weights,
)

Ready = TypeVar("Ready", Dataset, Model)
STUDENT_WEIGHTS = "student.safetensors"  # a finished job's export, read as weights by later jobs


class ResolveError(ValueError):
    """The spec names a dataset or model this job cannot use; the job fails with this message."""


def _owned(session: Session, table: type[Owned], row_id: str, *, job: Job) -> Owned:
    row = find_owned(session, table, row_id, owner=job.owner)
    if row is None:
        raise ResolveError(f"{table.__name__.lower()} {row_id!r} not found")
    return row


def _ready(session: Session, table: type[Ready], row_id: str, *, job: Job) -> Ready:
    row = _owned(session, table, row_id, job=job)
    if row.state != "ready":
        raise ResolveError(f"{table.__name__.lower()} {row.id!r} is {row.state}, not ready")
    return row


def resolve_spec(session: Session, job: Job, settings: Settings) -> JobSpec:
    """The job's spec with `{"id"}` datasets and `{"job"}` / `{"model"}` weights as paths.

    Raises ResolveError (a ValueError) when a referenced dataset or model is missing or not
    ready. A source job is not checked beyond existing: if it left no student file, the trainer
    fails naming the missing file, which says more than a state would.
    """
    spec = JobSpec.model_validate(job.spec)
    dataset, student, teacher = spec.dataset, spec.student, spec.teacher
    if isinstance(dataset, IdDataset):
        row = _ready(session, Dataset, dataset.id, job=job)
        train_split, val_split = row.splits()
        dataset = PathDataset(
            path=row.path,
            input_size=dataset.input_size,
            train_split=train_split,
            val_split=val_split,
        )
    if student.weights_backbone is not None:
        weights = _weights_path(session, job, settings, student.weights_backbone)
        student = student.model_copy(update={"weights_backbone": weights})
    if teacher is not None:
        teacher = teacher.model_copy(
            update={"weights": _weights_path(session, job, settings, teacher.weights)}
        )
    return spec.model_copy(update={"dataset": dataset, "student": student, "teacher": teacher})


def _weights_path(session: Session, job: Job, settings: Settings, weights: Weights) -> Weights:
    """`{"job"}` / `{"model"}` weights as `{"path"}`."""
    if isinstance(weights, JobWeights):
        source = _owned(session, Job, weights.job, job=job)
        return PathWeights(path=str(settings.jobs_dir / source.id / STUDENT_WEIGHTS))
    if isinstance(weights, ModelWeights):
        return PathWeights(path=_ready(session, Model, weights.model, job=job).path)
    return weights
