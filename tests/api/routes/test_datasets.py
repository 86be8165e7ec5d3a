"""Creating datasets: the builtin generator, a registered server folder, an uploaded zip."""

from __future__ import annotations

import io
import json
import os
import stat
import zipfile
from pathlib import Path

import pytest
from factories import make_dataset
from fastapi.testclient import TestClient
from httpx import Response
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from support import Sent, assert_problem

import api.storage
import store.queue
from store.db.models import Dataset
from store.queue import PREPARE_DATASET
from store.settings import Settings

BUILTIN = {
    "name": "shapes",
    "builtin": "shapes",
    "num_train": 16,
    "num_val": 4,
    "image_size": 64,
    "seed": 1,
}
COCO = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "circle"}]}
COCO_2017_SPLITS = {"train_split": "train2017", "val_split": "val2017"}


def make_zip(entries: dict[str, bytes], *, links: tuple[str, ...] = ()) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
        for name in links:
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, "/etc/passwd")
    return buffer.getvalue()


def coco_entries(top: str = "", splits: tuple[str, str] = ("train", "val")) -> dict[str, bytes]:
    ann = json.dumps(COCO).encode()
    entries = {}
    for split in splits:
        entries[f"{top}annotations/instances_{split}.json"] = ann
        entries[f"{top}{split}/0.png"] = b"\x89PNG fake"
    return entries


def upload(
    client: TestClient,
    headers: dict[str, str],
    data: bytes,
    name: str = "up",
    **fields: str,
) -> Response:
    files = {"file": ("coco.zip", data, "application/zip")}
    response: Response = client.post(
        "/v1/datasets/upload", data={"name": name, **fields}, files=files, headers=headers
    )
    return response


def dataset_count(db: Session) -> int:
    return db.scalar(select(func.count()).select_from(Dataset)) or 0


def test_create_builtin_dataset_is_pending_and_sent(
    client: TestClient, owner_headers: dict[str, str], db: Session, sent: Sent, settings: Settings
) -> None:
    response = client.post("/v1/datasets", json=BUILTIN, headers=owner_headers)
    assert response.status_code == 202, response.text
    body = response.json()
    assert response.headers["location"] == f"/v1/datasets/{body['id']}"
    assert (body["name"], body["kind"], body["state"]) == ("shapes", "builtin", "pending")
    assert body["source"] == {k: v for k, v in BUILTIN.items() if k != "name"}
    row = db.get(Dataset, body["id"])
    assert row is not None and row.path == str(settings.datasets_dir / body["id"])
    assert sent == [(PREPARE_DATASET, (body["id"],))]


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"num_train": 0}, "num_train"),
        ({"image_size": 100}, "multiple of 32"),
        ({"builtin": "mnist"}, "builtin"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_create_builtin_dataset_out_of_bounds_is_422(
    client: TestClient, owner_headers: dict[str, str], change: dict[str, object], fragment: str
) -> None:
    response = client.post("/v1/datasets", json={**BUILTIN, **change}, headers=owner_headers)
    assert_problem(response, 422, fragment)


@pytest.mark.parametrize(
    ("splits", "names"),
    [({}, ("train", "val")), (COCO_2017_SPLITS, ("train2017", "val2017"))],
    ids=["default-splits", "coco-2017"],
)
def test_register_path_dataset_under_a_root(
    client: TestClient,
    owner_headers: dict[str, str],
    db: Session,
    sent: Sent,
    settings: Settings,
    splits: dict[str, str],
    names: tuple[str, str],
) -> None:
    folder = settings.dataset_roots[0] / "coco"
    folder.mkdir()
    body = {"name": "mine", "path": str(folder), **splits}
    response = client.post("/v1/datasets", json=body, headers=owner_headers)
    assert response.status_code == 202, response.text
    created = response.json()
    source = {"path": str(folder), "train_split": names[0], "val_split": names[1]}
    assert (created["kind"], created["source"]) == ("path", source)
    row = db.get(Dataset, created["id"])
    assert row is not None and row.path == str(folder.resolve())
    assert row.splits() == names
    assert sent == [(PREPARE_DATASET, (created["id"],))]


def test_register_path_with_a_bad_split_name_is_422(
    client: TestClient, owner_headers: dict[str, str], settings: Settings
) -> None:
    body = {"name": "mine", "path": str(settings.dataset_roots[0]), "val_split": "../val"}
    response = client.post("/v1/datasets", json=body, headers=owner_headers)
    problem = assert_problem(response, 422, "val_split")
    assert problem["errors"][0]["loc"] == ["body", "path", "val_split"]


def test_register_path_outside_the_roots_is_422(
    client: TestClient,
    owner_headers: dict[str, str],
    db: Session,
    settings: Settings,
    tmp_path: Path,
) -> None:
    root = settings.dataset_roots[0]
    outside = tmp_path / "outside"
    (outside / "coco").mkdir(parents=True)
    os.symlink(outside, root / "link")  # a link inside the root to a folder outside it
    paths = (str(outside), f"{root}/../outside", f"{root}/link", f"{root}/link/coco", "coco")
    for path in paths:
        response = client.post(
            "/v1/datasets", json={"name": "x", "path": path}, headers=owner_headers
        )
        problem = assert_problem(response, 422, repr(path))
        assert problem["errors"][0]["loc"] == ["body", "path"]
    assert dataset_count(db) == 0


def test_upload_zip_is_extracted_pending_and_sent(
    client: TestClient, owner_headers: dict[str, str], db: Session, sent: Sent, settings: Settings
) -> None:
    response = upload(client, owner_headers, make_zip(coco_entries(top="coco/")))
    assert response.status_code == 202, response.text
    body = response.json()
    assert (body["kind"], body["state"], body["source"]) == (
        "upload",
        "pending",
        {"filename": "coco.zip", "train_split": "train", "val_split": "val"},
    )
    root = settings.datasets_dir / body["id"]
    assert json.loads((root / "annotations" / "instances_val.json").read_text()) == COCO
    assert (root / "train" / "0.png").read_bytes() == b"\x89PNG fake"
    assert not (root / "coco").exists()  # the single top-level folder became the root
    assert sent == [(PREPARE_DATASET, (body["id"],))]


@pytest.mark.parametrize(
    ("entries", "links", "fragment"),
    [
        ({"../evil": b"x"}, (), "outside the archive"),
        ({"annotations/../../evil": b"x"}, (), "outside the archive"),
        ({"/tmp/evil": b"x"}, (), "absolute path"),
        ({"C:/evil": b"x"}, (), "absolute path"),
        ({}, ("train/evil",), "symbolic link"),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "drive", "symlink"],
)
def test_upload_zip_escaping_entries_are_422_and_write_nothing(
    client: TestClient,
    owner_headers: dict[str, str],
    db: Session,
    sent: Sent,
    settings: Settings,
    tmp_path: Path,
    entries: dict[str, bytes],
    links: tuple[str, ...],
    fragment: str,
) -> None:
    before = sorted(p for p in tmp_path.rglob("*") if "tid.db" not in p.name)
    data = make_zip({**coco_entries(), **entries}, links=links)
    assert_problem(upload(client, owner_headers, data), 422, fragment)
    after = sorted(p for p in tmp_path.rglob("*") if "tid.db" not in p.name)
    assert after == before and not Path("/tmp/evil").exists()
    assert dataset_count(db) == 0 and sent == []


def test_upload_zip_bomb_is_422(
    client: TestClient, owner_headers: dict[str, str], settings: Settings
) -> None:
    bomb = {"train/zeros.bin": bytes(200 * 1024)}  # well under the size cap, ratio ~1000
    response = upload(client, owner_headers, make_zip({**coco_entries(), **bomb}))
    assert_problem(response, 422, "compression ratio")
    assert not settings.datasets_dir.exists() or not any(settings.datasets_dir.iterdir())


def test_upload_zip_with_a_huge_directory_is_422_before_it_is_read(
    client: TestClient,
    owner_headers: dict[str, str],
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(api.storage, "MAX_ZIP_DIRECTORY_BYTES", 4096)
    entries = {f"train/{i:06d}.png": b"" for i in range(100)}  # ~6 KB of directory
    read = []
    monkeypatch.setattr(zipfile.ZipFile, "_RealGetContents", lambda self: read.append(self))
    response = upload(client, owner_headers, make_zip({**coco_entries(), **entries}))
    assert_problem(response, 422, "too many entries")
    assert read == []  # refused from the end record alone
    assert not settings.datasets_dir.exists() or not any(settings.datasets_dir.iterdir())


def test_upload_zip_expanding_past_the_cap_is_422(
    client: TestClient, owner_headers: dict[str, str], settings: Settings
) -> None:
    # half zeros, half noise: ~180 KiB packed (under the 256 KiB cap), 360 KiB unpacked
    big = {f"train/{i}.bin": bytes(60 * 1024) + os.urandom(60 * 1024) for i in range(3)}
    response = upload(client, owner_headers, make_zip({**coco_entries(), **big}))
    assert_problem(response, 422, "expands to", "above the limit")
    assert not settings.datasets_dir.exists() or not any(settings.datasets_dir.iterdir())


def test_upload_not_a_coco_zip_is_422(client: TestClient, owner_headers: dict[str, str]) -> None:
    assert_problem(upload(client, owner_headers, b"not a zip"), 422, "not a zip archive")
    no_annotations = make_zip({"train/0.png": b"x"})
    assert_problem(upload(client, owner_headers, no_annotations), 422, "instances_train.json")


def test_upload_zip_of_a_coco_2017_folder_names_its_splits(
    client: TestClient, owner_headers: dict[str, str], settings: Settings
) -> None:
    coco_2017 = make_zip(coco_entries(top="coco/", splits=("train2017", "val2017")))
    unnamed = upload(client, owner_headers, coco_2017)
    assert_problem(unnamed, 422, "instances_train.json")

    response = upload(client, owner_headers, coco_2017, **COCO_2017_SPLITS)
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["source"] == {"filename": "coco.zip", **COCO_2017_SPLITS}
    root = settings.datasets_dir / body["id"]
    assert (root / "annotations" / "instances_val2017.json").is_file()
    assert (root / "train2017" / "0.png").is_file()


def test_upload_over_the_limit_is_413(
    client: TestClient, owner_headers: dict[str, str], db: Session, settings: Settings
) -> None:
    huge = b"0" * (settings.max_upload_bytes + 128 * 1024)  # refused by its Content-Length
    assert_problem(upload(client, owner_headers, huge), 413, "upload larger than")
    just_over = b"0" * (settings.max_upload_bytes + 1)  # within the multipart slack
    assert_problem(upload(client, owner_headers, just_over), 413, "exceeds the limit")
    assert dataset_count(db) == 0


def test_dataset_stays_pending_when_its_task_cannot_be_sent(
    client: TestClient, owner_headers: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unsent, for the reconciler to send (tests/worker/test_reconcile.py)."""

    def send(*_: str) -> None:
        raise ConnectionError("broker down")

    monkeypatch.setattr(store.queue, "send", send)
    response = client.post("/v1/datasets", json=BUILTIN, headers=owner_headers)
    assert response.status_code == 202
    assert (response.json()["state"], response.json()["error"]) == ("pending", None)
    read = client.get(response.headers["location"], headers=owner_headers).json()
    assert read["state"] == "pending"


def test_list_and_read_datasets_are_per_owner(
    client: TestClient, owner_headers: dict[str, str], other_headers: dict[str, str], db: Session
) -> None:
    mine = make_dataset(db, owner="alice", num_train=16, num_val=4, class_names=["circle"])
    theirs = make_dataset(db, owner="bob")
    listed = client.get("/v1/datasets", headers=owner_headers).json()["data"]
    assert [d["id"] for d in listed] == [mine.id]
    read = client.get(f"/v1/datasets/{mine.id}", headers=owner_headers).json()
    assert (read["state"], read["num_train"], read["class_names"]) == ("ready", 16, ["circle"])
    assert "path" not in read
    response = client.get(f"/v1/datasets/{theirs.id}", headers=owner_headers)
    assert_problem(response, 404, f"dataset {theirs.id} not found")
    assert_problem(client.get(f"/v1/datasets/{mine.id}", headers=other_headers), 404)


def test_register_path_with_dotdot_inside_the_root_is_pinned_to_the_real_folder(
    client: TestClient, owner_headers: dict[str, str], db: Session, settings: Settings
) -> None:
    root = settings.dataset_roots[0]
    (root / "coco").mkdir()
    (root / "sub").mkdir()
    body = {"name": "mine", "path": f"{root}/sub/../coco"}
    response = client.post("/v1/datasets", json=body, headers=owner_headers)
    assert response.status_code == 202, response.text
    row = db.get(Dataset, response.json()["id"])
    assert row is not None and row.path == str((root / "coco").resolve())


def test_register_path_that_cannot_be_resolved_is_422(
    client: TestClient, owner_headers: dict[str, str], db: Session, settings: Settings
) -> None:
    root = settings.dataset_roots[0]
    os.symlink(root / "loop", root / "loop")
    for path in (f"{root}/loop", f"{root}/loop/coco", f"{root}/co\x00co"):
        response = client.post(
            "/v1/datasets", json={"name": "x", "path": path}, headers=owner_headers
        )
        problem = assert_problem(response, 422, "cannot be resolved")
        assert problem["errors"][0]["loc"] == ["body", "path"]
    assert dataset_count(db) == 0


@pytest.mark.parametrize(
    "change",
    [{"seed": False}, {"num_train": "16"}, {"image_size": 128.0}, {"name": 7}],
    ids=["bool-seed", "string-count", "float-size", "number-name"],
)
def test_create_builtin_dataset_with_a_wrong_json_type_is_422(
    client: TestClient, owner_headers: dict[str, str], db: Session, change: dict[str, object]
) -> None:
    response = client.post("/v1/datasets", json={**BUILTIN, **change}, headers=owner_headers)
    body = assert_problem(response, 422)
    assert body["errors"][0]["loc"][-1] == next(iter(change))
    assert dataset_count(db) == 0
