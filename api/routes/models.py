"""Models: uploaded weights (`.pt`, `.pth` or `.safetensors`): a detector (a teacher) or a
backbone (a student's `weights_backbone`, e.g. torchvision's ImageNet file). Each starts
`pending`; a worker loads it with `weights_only=True` and records what it is (CHECK_MODEL)
before it is `ready`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Form, Response, UploadFile

from api.deps import CurrentOwner, IdPath, SessionDep, SettingsDep, get_owned, list_owned
from api.problems import Unprocessable, responses
from api.quota import check_held, check_stored_bytes
from api.schemas import ModelPublic, ModelsPublic
from api.storage import save_upload
from store.db.models import Model, new_id
from store.queue import CHECK_MODEL, commit_and_enqueue
from tid_core.spec import Name

router = APIRouter(prefix="/v1/models", tags=["models"], responses=responses(401, 422))

WEIGHT_SUFFIXES = (".pt", ".pth", ".safetensors")  # .pth: how torchvision names its files


@router.post("", status_code=202, responses=responses(400, 413, 429))
def upload_model(
    *,
    session: SessionDep,
    owner: CurrentOwner,
    settings: SettingsDep,
    name: Annotated[Name, Form()],
    file: UploadFile,
    response: Response,
) -> ModelPublic:
    """Store the file as `<models_dir>/<id>/weights.<ext>` with its sha256; its bytes count
    against the owner's storage quota."""
    suffix = Path(file.filename or "").suffix.lower()
    if suffix not in WEIGHT_SUFFIXES:
        raise Unprocessable(
            f"weights must be a {' or '.join(WEIGHT_SUFFIXES)} file, got {file.filename!r}",
            loc=("body", "file"),
        )
    check_held(session, settings, Model, owner=owner)
    # the multipart parser counted what it spooled: the size of the file to be stored
    check_stored_bytes(session, settings, owner=owner, adding=file.size or 0)
    model_id = new_id()
    path = settings.models_dir / model_id / f"weights{suffix}"
    sha256, size = save_upload(file.file, path, max_bytes=settings.max_upload_bytes)
    model = Model(id=model_id, owner=owner, name=name, path=str(path), sha256=sha256, bytes=size)
    commit_and_enqueue(session, settings, model, CHECK_MODEL)
    response.headers["Location"] = f"{router.prefix}/{model.id}"
    return ModelPublic.model_validate(model)


@router.get("")
def list_models(*, session: SessionDep, owner: CurrentOwner) -> ModelsPublic:
    rows = list_owned(session, Model, owner=owner)
    return ModelsPublic(data=[ModelPublic.model_validate(r) for r in rows])


@router.get("/{model_id}", responses=responses(404))
def read_model(*, session: SessionDep, owner: CurrentOwner, model_id: IdPath) -> ModelPublic:
    return ModelPublic.model_validate(get_owned(session, Model, model_id, owner=owner))
