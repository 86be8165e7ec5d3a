"""What a JobSpec refers to must exist, belong to the caller and be usable: a dataset that is
`ready`, weights (a teacher, a student's backbone) from a `succeeded` job or a `ready` uploaded
model that hold what the spec declares, a server path only under an allowed root. Checked at
submit time, so a queued job never waits on a bad reference; each failure is a 422 naming the
reference and where it is in the body.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy.orm import Session

from api.problems import Unprocessable
from api.storage import resolve_under_roots
from store.db.models import Dataset, Job, Model
from store.db.owned import Owned, find_owned
from store.settings import Settings
from tid_core.spec import (
    IdDataset,
    JobSpec,
    JobWeights,
    ModelWeights,
    PathDataset,
    Weights,
)


def _require(
    session: Session,
    table: type[Owned],
    row_id: str,
    *,
    owner: str,
    state: str,
    loc: Sequence[str],
) -> Owned:
    """A referenced resource must be the caller's and in `state`; otherwise the spec is 422."""
    kind = table.__name__.lower()
    row = find_owned(session, table, row_id, owner=owner)
    if row is None:
        raise Unprocessable(f"{kind} {row_id} not found", loc=loc)
    if row.state != state:
        raise Unprocessable(f"{kind} {row_id} is {row.state}, it must be {state}", loc=loc)
    return row


def _check_weights(
    session: Session,
    weights: Weights,
    *,
    owner: str,
    field: tuple[str, str],
    declared: dict[str, Any],
) -> None:
    """The weights at `field` exist, are ready, and hold what the spec `declared` of them (a
    whole detector for a teacher, a backbone for a student's init): a mismatch would otherwise
    fail the job only once a worker loads the file."""
    loc: tuple[str, ...] = ("body", *field)
    if isinstance(weights, JobWeights):
        loc = (*loc, "job")
        job = _require(session, Job, weights.job, owner=owner, state="succeeded", loc=loc)
        source, held = f"job {job.id}", JobSpec.model_validate(job.spec).student.model_dump()
    elif isinstance(weights, ModelWeights):
        loc = (*loc, "model")
        row = _require(session, Model, weights.model, owner=owner, state="ready", loc=loc)
        source, held = f"model {row.id}", row.meta or {}
        if "arch" in declared and "arch" not in held:
            raise Unprocessable(
                f"{source} holds a {held.get('backbone')} backbone, not a detector: use it as "
                "student.weights_backbone; a teacher needs detector weights",
                loc=loc,
            )
    else:
        raise Unprocessable(
            f'{".".join(field)} by server path is not accepted through the API: use {{"job": '
            'id} of a finished job, or upload the file (POST /v1/models) and use {"model": id}',
            loc=(*loc, "path"),
        )
    for key, want in declared.items():
        if held.get(key) != want:
            raise Unprocessable(
                f"{source} has {key}={held.get(key)!r} but {field[0]} declares {key}={want!r}",
                loc=loc,
            )


def checked_spec(session: Session, settings: Settings, spec: JobSpec, *, owner: str) -> JobSpec:
    """Check every id and path the spec names; a path dataset is pinned to its real folder."""
    dataset = spec.dataset
    if isinstance(dataset, IdDataset):
        loc = ("body", "dataset", "id")
        _require(session, Dataset, dataset.id, owner=owner, state="ready", loc=loc)
    elif isinstance(dataset, PathDataset):
        loc = ("body", "dataset", "path")
        real = resolve_under_roots(dataset.path, settings.dataset_roots, loc=loc)
        spec = spec.model_copy(update={"dataset": dataset.model_copy(update={"path": str(real)})})
    student, teacher = spec.student, spec.teacher
    if student.weights_backbone is not None:
        field, declared = ("student", "weights_backbone"), {"backbone": student.backbone}
        _check_weights(
            session, student.weights_backbone, owner=owner, field=field, declared=declared
        )
    if teacher is not None:
        declared = teacher.model_dump(include={"arch", "backbone", "fpn_channels"})
        field = ("teacher", "weights")
        _check_weights(session, teacher.weights, owner=owner, field=field, declared=declared)
    return spec
