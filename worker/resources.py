"""Short worker tasks that make an uploaded or registered resource `ready`.

A dataset is `ready` once both splits parse as COCO and their images exist; an uploaded model
once its weights load, without unpickling code, into the detector its own metadata describes
(or, without tid metadata, into the backbone whose tensors it holds). Either is `failed` with
the reason otherwise. The check itself runs in a child process under memory and time limits
(`worker.resource_check`), so this process never parses the upload nor imports torch.

Each delivery of a check's message is counted in the row before the check starts. A message
whose check never finishes (its worker killed or lost each time, which the limits should
prevent but cannot for a host that dies) is redelivered: past `TID_CHECK_MAX_DELIVERIES` the
resource fails instead of running the check once more. A resource that is no longer `pending`
is left alone, so a duplicate message is a no-op.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import update

from store.db.models import Dataset, Model
from store.db.session import session_scope
from store.settings import Settings
from worker import resource_check
from worker.db_retry import retrying
from worker.resource_check import DatasetCheck, ModelCheck, Outcome

log = logging.getLogger(__name__)

Row = TypeVar("Row", Dataset, Model)


def _deliver(settings: Settings, kind: type[Row], id_: str) -> Row | None:
    """Count this delivery; the row if it still waits for its check, else None (gone, or
    already decided). One conditional UPDATE ... RETURNING, so racing deliveries each count."""
    with session_scope(settings.database_url) as session:
        row = session.scalars(
            update(kind)
            .where(kind.id == id_, kind.state == "pending")
            .values(deliveries=kind.deliveries + 1)
            .returning(kind)
        ).one_or_none()
    if row is None:
        log.info("%s %s: nothing to do (gone, or no longer pending)", kind.__name__, id_)
    return row


def _decide(settings: Settings, kind: type[Row], id_: str, outcome: Outcome) -> None:
    """pending -> ready or failed, conditionally, like job transitions. Retried here through
    a database blip: a Celery retry would run the check again, and count a delivery."""

    def write() -> None:
        with session_scope(settings.database_url) as session:
            session.execute(
                update(kind)
                .where(kind.id == id_, kind.state == "pending")
                .values(state=outcome.state, error=outcome.error, **outcome.values)
            )

    retrying(settings, f"{kind.__name__} {id_}", "recording the check's outcome", write)
    log.info("%s %s: %s %s", kind.__name__, id_, outcome.state, outcome.error or "")


def _check(
    settings: Settings,
    kind: type[Row],
    id_: str,
    check_of: Callable[[Row], DatasetCheck | ModelCheck],
) -> None:
    row = _deliver(settings, kind, id_)
    if row is None:
        return
    if row.deliveries > settings.check_max_deliveries:
        outcome = Outcome.failed(
            f"delivered {row.deliveries} times without finishing: the worker running its "
            f"check died or was stopped each time (TID_CHECK_MAX_DELIVERIES is "
            f"{settings.check_max_deliveries})"
        )
    else:
        outcome = resource_check.run(check_of(row), settings)
    _decide(settings, kind, id_, outcome)


def prepare_dataset(dataset_id: str, *, settings: Settings) -> None:
    """Generate a builtin dataset, or check a registered/uploaded COCO folder; then count it."""

    def check_of(row: Dataset) -> DatasetCheck:
        # a registered folder may link into the other allowed roots; the others stay inside
        roots = [str(r) for r in settings.dataset_roots] if row.kind == "path" else []
        return DatasetCheck.model_validate(
            {
                "kind": row.kind,
                "source": row.source,
                "path": row.path,
                "splits": row.splits(),
                "roots": roots,
            }
        )

    _check(settings, Dataset, dataset_id, check_of)


def check_model(model_id: str, *, settings: Settings) -> None:
    """Load uploaded weights safely and strictly (`worker.resource_check.ModelCheck`)."""
    _check(settings, Model, model_id, lambda row: ModelCheck(path=row.path))
