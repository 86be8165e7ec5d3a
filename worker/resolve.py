"""Turn a stored JobSpec into the one the trainer runs: service ids become file paths.

The trainer only knows files (`tid_core.spec`); datasets, uploaded models and finished jobs are
rows of the service. Resolution happens at run time, on the worker, so a job re-queued onto
another host resolves against the same shared volume.
"""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy.orm import Session

from api.db.models import Dataset, Job, Model
from api.settings import Settings
from tid_core.spec import JobSpec

STUDENT_WEIGHTS = "student.safetensors"  # a finished job's export, read as weights by later jobs

Row = TypeVar("Row", Dataset, Model, Job)


class ResolveError(ValueError):
    """The spec names a dataset or model this job cannot use; the job fails with this message."""


def _owned(session: Session, kind: type[Row], id_: str, *, job: Job, what: str) -> Row:
    """The row, only if the job's owner owns it: another owner's resource does not exist."""
    row = session.get(kind, id_)
    if row is None or row.owner != job.owner:
        raise ResolveError(f"{what} {id_!r} not found")
    return row


def resolve_spec(session: Session, job: Job, settings: Settings) -> dict[str, Any]:
    """The job's spec with `{"id"}` datasets and `{"job"}` / `{"model"}` weights as paths.

    Raises ResolveError (a ValueError) when a referenced dataset or model is missing or not
    ready. A source job is not checked beyond existing: if it left no student file, the trainer
    fails naming the missing file, which says more than a state would.
    """
    spec = JobSpec.model_validate(job.spec).model_dump(mode="json")
    dataset = spec["dataset"]
    if "id" in dataset:
        ds = _owned(session, Dataset, dataset["id"], job=job, what="dataset")
        if ds.state != "ready":
            raise ResolveError(f"dataset {ds.id!r} is {ds.state}, not ready")
        train_split, val_split = ds.splits()
        spec["dataset"] = {
            "path": ds.path,
            "input_size": dataset["input_size"],
            "train_split": train_split,
            "val_split": val_split,
        }
    if spec["student"].get("weights_backbone") is not None:
        weights = spec["student"]["weights_backbone"]
        spec["student"]["weights_backbone"] = _weights_path(session, job, settings, weights)
    if spec["teacher"] is not None:
        weights = spec["teacher"]["weights"]
        spec["teacher"]["weights"] = _weights_path(session, job, settings, weights)
    return JobSpec.model_validate(spec).model_dump(mode="json")


def _weights_path(
    session: Session, job: Job, settings: Settings, weights: dict[str, str]
) -> dict[str, str]:
    """`{"job"}` / `{"model"}` weights as `{"path"}`."""
    if "job" in weights:
        source = _owned(session, Job, weights["job"], job=job, what="job")
        return {"path": str(settings.jobs_dir / source.id / STUDENT_WEIGHTS)}
    if "model" in weights:
        model = _owned(session, Model, weights["model"], job=job, what="model")
        if model.state != "ready":
            raise ResolveError(f"model {model.id!r} is {model.state}, not ready")
        return {"path": model.path}
    return weights
