"""prepare_dataset and check_model: pending resources become ready or failed with a reason."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest
import torch
from coco_folders import COCO_2017, with_split_names
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session
from torchvision.models import resnet34

from store.db.models import Dataset, Model
from store.db.session import session_scope
from store.settings import Settings
from tid_core.models import DetectorMeta, build_detector, save_weights
from worker import resource_check, resources
from worker.resources import check_model, prepare_dataset

SHAPES = {"builtin": "shapes", "num_train": 3, "num_val": 2, "image_size": 64}


def add(settings: Settings, row: Dataset | Model) -> str:
    with session_scope(settings.database_url) as session:
        session.add(row)
        session.flush()
        return row.id


def read(settings: Settings, kind: type[Dataset] | type[Model], id_: str) -> Any:
    with session_scope(settings.database_url) as session:
        row = session.get_one(kind, id_)
        session.expunge(row)
        return row


def add_dataset(settings: Settings, *, kind: str, path: Path, source: dict[str, Any]) -> str:
    return add(settings, Dataset(owner="alice", name="d", kind=kind, source=source, path=str(path)))


def add_model(settings: Settings, path: Path) -> str:
    return add(settings, Model(owner="alice", name="m", path=str(path), sha256="0" * 64, bytes=1))


@pytest.mark.parametrize(("builtin", "classes"), [("shapes", 5), ("scenes", 12)])
def test_prepare_builtin_dataset_is_ready_with_counts(
    settings: Settings, builtin: str, classes: int
) -> None:
    path = settings.datasets_dir / builtin
    source = {**SHAPES, "builtin": builtin}
    dataset_id = add_dataset(settings, kind="builtin", path=path, source=source)

    prepare_dataset(dataset_id, settings=settings)

    row = read(settings, Dataset, dataset_id)
    assert (row.state, row.error, row.num_train, row.num_val) == ("ready", None, 3, 2)
    assert row.deliveries == 1
    assert row.class_names and all(isinstance(n, str) for n in row.class_names)
    assert len(row.class_names) == classes  # the generator the spec names, not always shapes
    assert (path / "annotations" / "instances_train.json").is_file()


def test_prepare_path_dataset_counts_and_fails_on_a_missing_image(settings: Settings) -> None:
    builtin_id = add_dataset(
        settings, kind="builtin", path=settings.datasets_dir / "a", source=SHAPES
    )
    prepare_dataset(builtin_id, settings=settings)
    copy = settings.datasets_dir / "b"
    shutil.copytree(settings.datasets_dir / "a", copy)
    good = add_dataset(settings, kind="path", path=settings.datasets_dir / "a", source={})
    next(iter((copy / "val").glob("*.png"))).unlink()
    broken = add_dataset(settings, kind="upload", path=copy, source={})

    prepare_dataset(good, settings=settings)
    prepare_dataset(broken, settings=settings)

    assert read(settings, Dataset, good).num_train == 3
    row = read(settings, Dataset, broken)
    assert row.state == "failed"
    assert "1 val image(s) missing" in row.error


def test_prepare_path_dataset_counts_the_splits_it_names(settings: Settings) -> None:
    builtin_id = add_dataset(
        settings, kind="builtin", path=settings.datasets_dir / "a", source=SHAPES
    )
    prepare_dataset(builtin_id, settings=settings)
    coco = with_split_names(settings.datasets_dir / "a", settings.datasets_dir / "b", COCO_2017)
    splits = {"train_split": "train2017", "val_split": "val2017"}
    named = add_dataset(settings, kind="path", path=coco, source=splits)
    unnamed = add_dataset(settings, kind="path", path=coco, source={})

    prepare_dataset(named, settings=settings)
    prepare_dataset(unnamed, settings=settings)

    row = read(settings, Dataset, named)
    assert (row.state, row.num_train, row.num_val) == ("ready", 3, 2)
    row = read(settings, Dataset, unnamed)
    assert row.state == "failed"
    assert "this folder has the splits train2017, val2017" in row.error


@pytest.mark.parametrize("escape", ["dotdot", "symlink"])
def test_prepare_dataset_with_images_outside_its_folder_fails(
    settings: Settings, tmp_path: Path, escape: str
) -> None:
    builtin_id = add_dataset(
        settings, kind="builtin", path=settings.datasets_dir / "a", source=SHAPES
    )
    prepare_dataset(builtin_id, settings=settings)
    copy = settings.datasets_dir / "b"
    shutil.copytree(settings.datasets_dir / "a", copy)
    secret = tmp_path / "secret.png"
    secret.write_bytes(next(iter((copy / "train").glob("*.png"))).read_bytes())
    ann_file = copy / "annotations" / "instances_train.json"
    coco = json.loads(ann_file.read_text())
    if escape == "dotdot":
        coco["images"][0]["file_name"] = os.path.relpath(secret, copy / "train")
    else:
        (copy / "train" / coco["images"][0]["file_name"]).unlink()
        (copy / "train" / coco["images"][0]["file_name"]).symlink_to(secret)
    ann_file.write_text(json.dumps(coco))
    uploaded = add_dataset(settings, kind="upload", path=copy, source={})

    prepare_dataset(uploaded, settings=settings)

    row = read(settings, Dataset, uploaded)
    assert row.state == "failed"
    assert "1 train image(s) resolve outside the dataset's allowed folders" in row.error


def test_prepare_dataset_without_annotations_fails(settings: Settings, tmp_path: Path) -> None:
    dataset_id = add_dataset(settings, kind="path", path=tmp_path, source={})

    prepare_dataset(dataset_id, settings=settings)

    row = read(settings, Dataset, dataset_id)
    assert row.state == "failed"
    assert "annotation file not found" in row.error


def test_check_model_reads_metadata(settings: Settings, tmp_path: Path) -> None:
    model = build_detector(arch="fcos", backbone="resnet18", num_classes=3, fpn_channels=64)
    meta = DetectorMeta(
        arch="fcos",
        backbone="resnet18",
        num_classes=3,
        fpn_channels=64,
        input_size=64,
        class_names=["a", "b", "c"],
    )
    path = tmp_path / "teacher.safetensors"
    save_weights(model, meta, path)
    model_id = add_model(settings, path)

    check_model(model_id, settings=settings)

    row = read(settings, Model, model_id)
    assert (row.state, row.error) == ("ready", None)
    assert row.meta["backbone"] == "resnet18"
    assert row.meta["class_names"] == ["a", "b", "c"]


def test_check_model_without_metadata_is_a_backbone_or_fails(
    settings: Settings, tmp_path: Path
) -> None:
    """A torchvision classifier's file is a backbone for `student.weights_backbone`."""
    torch.save(resnet34().state_dict(), tmp_path / "resnet34.pth")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "plain.pt")
    backbone = add_model(settings, tmp_path / "resnet34.pth")
    plain = add_model(settings, tmp_path / "plain.pt")

    check_model(backbone, settings=settings)
    check_model(plain, settings=settings)

    row = read(settings, Model, backbone)
    assert (row.state, row.meta) == ("ready", {"backbone": "resnet34"})
    row = read(settings, Model, plain)
    assert row.state == "failed"
    assert "neither tid detector weights nor the weights of a backbone" in row.error


class _Exploit:
    """Unpickling this runs a shell command: the model check must never do it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_check_model_never_unpickles_code(settings: Settings, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": _Exploit(marker)}, path)
    model_id = add_model(settings, path)

    check_model(model_id, settings=settings)

    row = read(settings, Model, model_id)
    assert row.state == "failed"
    assert "not a plain weights file" in row.error
    assert not marker.exists()


@pytest.mark.parametrize("state", ["ready", "failed"])
def test_check_model_leaves_a_decided_model_alone(
    settings: Settings, tmp_path: Path, state: str
) -> None:
    model_id = add(
        settings,
        Model(owner="a", name="m", path="/nope", sha256="0" * 64, bytes=1, state=state),
    )

    check_model(model_id, settings=settings)

    row = read(settings, Model, model_id)
    assert (row.state, row.deliveries) == (state, 0)  # a no-op delivery is not counted


class _WorkerDied(BaseException):
    """A pool child killed during the check, as its row sees it: the check never returns."""


@pytest.mark.parametrize("kind", ["dataset", "model"])
def test_past_its_delivery_limit_a_check_that_never_finished_fails_without_running(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, kind: str
) -> None:
    def die(*_: Any) -> NoReturn:
        raise _WorkerDied

    monkeypatch.setattr(resource_check, "run", die)
    table: type[Dataset] | type[Model] = Dataset if kind == "dataset" else Model
    deliver: Callable[..., None] = prepare_dataset if kind == "dataset" else check_model
    if kind == "dataset":
        path = settings.datasets_dir / "a"
        resource_id = add_dataset(settings, kind="builtin", path=path, source=SHAPES)
    else:
        resource_id = add_model(settings, tmp_path / "m.pt")
    for _ in range(settings.check_max_deliveries):  # 3: each counted before its check starts
        with pytest.raises(_WorkerDied):
            deliver(resource_id, settings=settings)

    deliver(resource_id, settings=settings)  # the 4th: no check (it would raise), a decision
    deliver(resource_id, settings=settings)  # a duplicate after it: a no-op, not counted

    row = read(settings, table, resource_id)
    assert (row.state, row.deliveries) == ("failed", 4)
    assert row.error == (
        "delivered 4 times without finishing: the worker running its check died or was "
        "stopped each time (TID_CHECK_MAX_DELIVERIES is 3)"
    )


def test_a_database_blip_after_the_check_retries_the_decision_not_the_check(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Celery retry would run a long check again and count a delivery that was not one."""
    checks: list[object] = []

    def check(*args: object) -> resource_check.Outcome:
        checks.append(args)
        return resource_check.Outcome(state="ready", values={"num_train": 3, "num_val": 2})

    opened = 0

    @contextlib.contextmanager
    def blipping_scope(url: str) -> Iterator[Session]:
        nonlocal opened
        opened += 1
        if opened in (2, 3):  # the decision's first two tries (the first scope counts delivery)
            raise OperationalError("UPDATE datasets", {}, Exception("server closed the connection"))
        with session_scope(url) as session:
            yield session

    monkeypatch.setattr(resource_check, "run", check)
    monkeypatch.setattr(resources, "session_scope", blipping_scope)
    path = settings.datasets_dir / "a"
    dataset_id = add_dataset(settings, kind="builtin", path=path, source=SHAPES)

    prepare_dataset(dataset_id, settings=settings)

    row = read(settings, Dataset, dataset_id)
    assert (row.state, row.deliveries, row.num_train, len(checks)) == ("ready", 1, 3, 1)
