"""What a JobSpec refers to must exist, belong to the caller and be usable: a dataset that is
`ready`, a teacher from a `succeeded` job or a `ready` uploaded model, a server path only under
an allowed root. Checked at submit time, so a queued job never waits on a bad reference; each
failure is a 422 naming the reference and where it is in the body.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy.orm import Session

from api.db.models import Dataset, Job, Model
from api.deps import Owned, find_owned
from api.problems import Unprocessable
from api.settings import Settings
from api.storage import resolve_under_roots
from tid_core.spec import IdDataset, JobSpec, JobWeights, ModelWeights, PathDataset, Weights


def _require(
    session: Session,
    table: type[Owned],
    row_id: str,
    *,
    owner: str,
    state: str,
    loc: Sequence[str],
) -> None:
    """A referenced resource must be the caller's and in `state`; otherwise the spec is 422."""
    kind = table.__name__.lower()
    row = find_owned(session, table, row_id, owner=owner)
    if row is None:
        raise Unprocessable(f"{kind} {row_id} not found", loc=loc)
    if row.state != state:
        raise Unprocessable(f"{kind} {row_id} is {row.state}, it must be {state}", loc=loc)


def _check_weights(session: Session, weights: Weights, *, owner: str) -> None:
    loc = ("body", "teacher", "weights")
    if isinstance(weights, JobWeights):
        _require(session, Job, weights.job, owner=owner, state="succeeded", loc=(*loc, "job"))
    elif isinstance(weights, ModelWeights):
        _require(session, Model, weights.model, owner=owner, state="ready", loc=(*loc, "model"))
    else:
        raise Unprocessable(
            'teacher weights by server path are not accepted through the API: use {"job": id} '
            'of a finished job, or upload the file (POST /v1/models) and use {"model": id}',
            loc=(*loc, "path"),
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
    if spec.teacher is not None:
        _check_weights(session, spec.teacher.weights, owner=owner)
    return spec
