"""Datasets: generate the synthetic one, register a server folder, or upload a zipped COCO
folder. Each starts `pending`; a worker checks and counts it (PREPARE_DATASET) before it is
`ready` for jobs.
"""

from __future__ import annotations

import shutil
from typing import Annotated

from fastapi import APIRouter, Form, Response, UploadFile

from api.deps import CurrentOwner, IdPath, SessionDep, SettingsDep, get_owned, list_owned
from api.problems import responses
from api.quota import check_builtin, check_held, check_stored_bytes
from api.schemas import BuiltinDatasetCreate, DatasetCreate, DatasetPublic, DatasetsPublic
from api.storage import extract_dataset_zip, resolve_under_roots
from store.db.models import Dataset, new_id
from store.queue import PREPARE_DATASET, commit_and_enqueue
from tid_core.spec import TRAIN_SPLIT, VAL_SPLIT, Name, SplitName

router = APIRouter(prefix="/v1/datasets", tags=["datasets"], responses=responses(401, 422))


def _created(response: Response, dataset: Dataset) -> DatasetPublic:
    response.headers["Location"] = f"{router.prefix}/{dataset.id}"
    return DatasetPublic.model_validate(dataset)


@router.post("", status_code=202, responses=responses(400, 413, 429))
def create_dataset(
    *,
    session: SessionDep,
    owner: CurrentOwner,
    settings: SettingsDep,
    body: DatasetCreate,
    response: Response,
) -> DatasetPublic:
    """`{"name", "builtin": "shapes" | "scenes", ...}` generates it; `{"name", "path"}`
    registers a folder under one of the allowed roots."""
    check_held(session, settings, Dataset, owner=owner)
    dataset_id = new_id()
    if isinstance(body, BuiltinDatasetCreate):
        check_builtin(settings, body, loc=("body", "num_train"))
        kind, path = "builtin", settings.datasets_dir / dataset_id
        source = body.model_dump(mode="json", exclude={"name"})
    else:
        kind, source = "path", body.model_dump(exclude={"name"})
        path = resolve_under_roots(body.path, settings.dataset_roots, loc=("body", "path"))
    dataset = Dataset(
        id=dataset_id, owner=owner, name=body.name, kind=kind, source=source, path=str(path)
    )
    commit_and_enqueue(session, settings, dataset, PREPARE_DATASET)
    return _created(response, dataset)


@router.post("/upload", status_code=202, responses=responses(400, 413, 429))
def upload_dataset(
    *,
    session: SessionDep,
    owner: CurrentOwner,
    settings: SettingsDep,
    name: Annotated[Name, Form()],
    file: UploadFile,
    response: Response,
    train_split: Annotated[SplitName, Form()] = TRAIN_SPLIT,
    val_split: Annotated[SplitName, Form()] = VAL_SPLIT,
) -> DatasetPublic:
    """A .zip of a COCO folder (`annotations/instances_<split>.json` and the images under
    `<split>/` for both splits), unpacked into the service's datasets folder after its entries
    are checked. What it unpacks to counts against the owner's storage quota."""
    check_held(session, settings, Dataset, owner=owner)
    dataset_id = new_id()
    path = settings.datasets_dir / dataset_id
    splits = {"train_split": train_split, "val_split": val_split}
    size = extract_dataset_zip(
        file.file, path, max_bytes=settings.max_upload_bytes, splits=list(splits.values())
    )
    try:  # the unpacked size is known only now: exact, at the cost of unpacking it once
        check_stored_bytes(session, settings, owner=owner, adding=size)
    except Exception:
        shutil.rmtree(path, ignore_errors=True)
        raise
    dataset = Dataset(
        id=dataset_id,
        owner=owner,
        name=name,
        kind="upload",
        source={"filename": file.filename, **splits},
        path=str(path),
        bytes=size,
    )
    commit_and_enqueue(session, settings, dataset, PREPARE_DATASET)
    return _created(response, dataset)


@router.get("")
def list_datasets(*, session: SessionDep, owner: CurrentOwner) -> DatasetsPublic:
    rows = list_owned(session, Dataset, owner=owner)
    return DatasetsPublic(data=[DatasetPublic.model_validate(r) for r in rows])


@router.get("/{dataset_id}", responses=responses(404))
def read_dataset(*, session: SessionDep, owner: CurrentOwner, dataset_id: IdPath) -> DatasetPublic:
    return DatasetPublic.model_validate(get_owned(session, Dataset, dataset_id, owner=owner))
