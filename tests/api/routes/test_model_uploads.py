"""Uploading teacher weights (`/v1/models`)."""

from __future__ import annotations

import hashlib

from factories import make_model
from fastapi.testclient import TestClient
from httpx import Response
from sqlalchemy.orm import Session
from support import Sent, assert_problem

from store.db.models import Model
from store.queue import CHECK_MODEL
from store.settings import Settings

WEIGHTS = b"PK\x03\x04 not really a checkpoint" * 100


def post_model(client: TestClient, headers: dict[str, str], filename: str, data: bytes) -> Response:
    files = {"file": (filename, data, "application/octet-stream")}
    response: Response = client.post(
        "/v1/models", data={"name": "r50"}, files=files, headers=headers
    )
    return response


def test_upload_model_stores_file_with_sha256_and_sends_check(
    client: TestClient, owner_headers: dict[str, str], db: Session, sent: Sent, settings: Settings
) -> None:
    response = post_model(client, owner_headers, "teacher.PT", WEIGHTS)
    assert response.status_code == 202, response.text
    body = response.json()
    assert response.headers["location"] == f"/v1/models/{body['id']}"
    digest = hashlib.sha256(WEIGHTS).hexdigest()
    assert (body["name"], body["state"], body["sha256"], body["bytes"], body["meta"]) == (
        "r50",
        "pending",
        digest,
        len(WEIGHTS),
        None,
    )
    path = settings.models_dir / body["id"] / "weights.pt"
    assert path.read_bytes() == WEIGHTS
    assert not list(path.parent.glob("*.part"))
    row = db.get(Model, body["id"])
    assert row is not None and (row.owner, row.path) == ("alice", str(path))
    assert sent == [(CHECK_MODEL, (body["id"],))]


def test_upload_model_with_another_suffix_is_422(
    client: TestClient, owner_headers: dict[str, str], sent: Sent
) -> None:
    assert_problem(post_model(client, owner_headers, "teacher.pkl", WEIGHTS), 422, ".safetensors")
    assert sent == []


def test_upload_model_over_the_limit_is_413_and_leaves_nothing(
    client: TestClient, owner_headers: dict[str, str], settings: Settings, sent: Sent
) -> None:
    response = post_model(
        client, owner_headers, "t.safetensors", b"0" * (settings.max_upload_bytes + 1)
    )
    assert_problem(response, 413, "exceeds the limit")
    assert not settings.models_dir.exists() or not any(settings.models_dir.rglob("*.*"))
    assert sent == []


def test_list_and_read_models_are_per_owner(
    client: TestClient, owner_headers: dict[str, str], other_headers: dict[str, str], db: Session
) -> None:
    mine = make_model(db, owner="alice")
    theirs = make_model(db, owner="bob")
    assert [m["id"] for m in client.get("/v1/models", headers=owner_headers).json()["data"]] == [
        mine.id
    ]
    read = client.get(f"/v1/models/{mine.id}", headers=owner_headers).json()
    assert (read["state"], read["sha256"]) == ("ready", "0" * 64) and "path" not in read
    assert_problem(client.get(f"/v1/models/{theirs.id}", headers=owner_headers), 404, "model")
    assert_problem(client.get(f"/v1/models/{mine.id}", headers=other_headers), 404)


def test_upload_model_chunked_over_the_limit_is_413(
    client: TestClient, owner_headers: dict[str, str], settings: Settings, sent: Sent
) -> None:
    """Without a Content-Length, the body is cut off as it crosses the limit."""
    part = b'--b\r\nContent-Disposition: form-data; name="file"; filename="t.pt"\r\n\r\n'
    body = part + b"0" * (settings.max_upload_bytes + 128 * 1024) + b"\r\n--b--\r\n"
    headers = {**owner_headers, "Content-Type": "multipart/form-data; boundary=b"}
    chunks = iter([body[: len(body) // 2], body[len(body) // 2 :]])
    assert_problem(client.post("/v1/models", content=chunks, headers=headers), 413, "upload")
    assert sent == []
