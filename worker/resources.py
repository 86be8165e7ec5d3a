"""Short worker tasks that make an uploaded or registered resource `ready` (they need torch).

Torch is imported by the first such task, not when the worker starts: it is 5 of the 6 s a
worker takes to import, and training jobs run it in the trainer process, never here.

A dataset is `ready` once both splits parse as COCO and their images exist; an uploaded model
once its weights load, without unpickling code, into the detector its own metadata describes
(or, without tid metadata, into the backbone whose tensors it holds).
Either is `failed` with the reason otherwise. A resource that is no longer `pending` is left
alone, so a duplicate message is a no-op.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import update

from store.db.models import Dataset, Model
from store.db.session import session_scope
from store.settings import Settings
from tid_core.data.builtin import generate_builtin
from tid_core.spec import BuiltinDataset

if TYPE_CHECKING:
    from tid_core.data.coco import CocoDetection

log = logging.getLogger(__name__)

Row = TypeVar("Row", Dataset, Model)


def _pending(settings: Settings, kind: type[Row], id_: str) -> Row | None:
    """The row if it still waits for this check, else None (gone, or already decided)."""
    with session_scope(settings.database_url) as session:
        row = session.get(kind, id_)
    if row is None or row.state != "pending":
        log.info("%s %s: nothing to do (%s)", kind.__name__, id_, row.state if row else "gone")
        return None
    return row


def _decide(settings: Settings, kind: type[Row], id_: str, **values: Any) -> None:
    """pending -> ready or failed, conditionally, like job transitions."""
    with session_scope(settings.database_url) as session:
        session.execute(
            update(kind).where(kind.id == id_, kind.state == "pending").values(**values)
        )
    log.info("%s %s: %s %s", kind.__name__, id_, values["state"], values.get("error") or "")


def _count_split(root: Path, split: str, *, allowed: list[Path]) -> CocoDetection:
    """The split, once each of its images exists and resolves under an allowed folder: a
    `file_name` with `..` or a symlink must not make the trainer read files outside them."""
    from tid_core.data.coco import CocoDetection

    ds = CocoDetection(root, split, train=False)
    paths = [ds.image_path(i) for i in range(len(ds))]
    outside = [p for p in paths if not any(p.resolve().is_relative_to(a) for a in allowed)]
    if outside:
        raise ValueError(
            f"{len(outside)} {split} image(s) resolve outside the dataset's allowed folders, "
            f"e.g. {outside[0]}"
        )
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} {split} image(s) missing, e.g. {missing[0]}")
    return ds


def prepare_dataset(dataset_id: str, *, settings: Settings) -> None:
    """Generate a builtin dataset, or check a registered/uploaded COCO folder; then count it.

    A builtin dataset's `source` is the JobSpec form `{"builtin": "shapes", "num_train": ...}`.
    """
    row = _pending(settings, Dataset, dataset_id)
    if row is None:
        return
    try:
        root = Path(row.path)
        if row.kind == "builtin":
            generate_builtin(BuiltinDataset.model_validate(row.source), root)
        # a registered folder may link into the other allowed roots; the others stay inside
        allowed = [root.resolve()]
        if row.kind == "path":
            allowed += [r.resolve() for r in settings.dataset_roots]
        train_split, val_split = row.splits()
        train = _count_split(root, train_split, allowed=allowed)
        val = _count_split(root, val_split, allowed=allowed)
        if train.class_names != val.class_names:
            raise ValueError(
                f"train and val name different classes: {train.class_names} vs {val.class_names}"
            )
    except (OSError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
        _decide(settings, Dataset, dataset_id, state="failed", error=str(exc))
        return
    _decide(
        settings,
        Dataset,
        dataset_id,
        state="ready",
        error=None,
        num_train=len(train),
        num_val=len(val),
        class_names=train.class_names,
    )


def check_model(model_id: str, *, settings: Settings) -> None:
    """Load uploaded weights safely and strictly: a detector into the one its metadata
    declares (meta: arch, backbone, classes...), a file without tid metadata as the backbone it
    holds (meta: just `backbone`, for a student's `weights_backbone`)."""
    row = _pending(settings, Model, model_id)
    if row is None:
        return
    from tid_core.models import describe_weights

    try:
        meta = describe_weights(Path(row.path))
    except (OSError, ValueError) as exc:  # WeightsMismatchError is a ValueError
        _decide(settings, Model, model_id, state="failed", error=str(exc))
        return
    _decide(settings, Model, model_id, state="ready", error=None, meta=meta)
