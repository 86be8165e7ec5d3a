"""Limits a shared service needs: per-owner quotas (429: full now), caps on what one request may
ask for (422: never as it is), each problem naming its setting; open event streams per owner,
counted over every API process."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from factories import make_dataset, make_job, make_model
from fastapi.testclient import TestClient
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session
from support import Sent, assert_problem
from test_datasets import BUILTIN, coco_entries, make_zip, upload
from test_model_uploads import WEIGHTS, post_model

import api.stream_leases
from api.problems import TooManyRequests
from api.quota import setting_name
from api.stream_leases import leased, open_stream
from store.db.models import Dataset, EventStream, Job, Model, utcnow
from store.db.session import session_scope
from store.settings import Settings

SPEC: dict[str, Any] = {"name": "job", "dataset": {"builtin": "shapes", "num_train": 100}}


def _with(spec: dict[str, Any], **sections: dict[str, Any]) -> dict[str, Any]:
    return {**spec, **{key: {**spec.get(key, {}), **value} for key, value in sections.items()}}


def _count(db: Session, table: type[Any]) -> int:
    db.expire_all()
    return db.scalar(select(func.count()).select_from(table)) or 0


@pytest.mark.parametrize(
    ("field", "spec", "limit", "message", "loc"),
    [
        (
            "max_nproc_per_node",
            _with(SPEC, resources={"nproc_per_node": 9}),
            8,
            "resources.nproc_per_node is 9, over this server's limit of 8",
            "'resources', 'nproc_per_node'",
        ),
        (
            "max_nnodes",
            _with(SPEC, resources={"nnodes": 3}),
            2,
            "resources.nnodes is 3, over this server's limit of 2",
            "'resources', 'nnodes'",
        ),
        (
            "max_num_workers",
            _with(SPEC, resources={"num_workers": 5}),
            4,
            "resources.num_workers is 5, over this server's limit of 4",
            "'resources', 'num_workers'",
        ),
        (
            "max_job_images",
            _with(SPEC, schedule={"epochs": 12}),
            1199,
            "training images (12 x 100), is 1200, over this server's limit of 1199",
            "'schedule', 'epochs'",
        ),
        (
            "max_builtin_images",
            _with(SPEC, dataset={"num_val": 28}),
            127,
            "num_train + num_val is 128, over this server's limit of 127",
            "'dataset', 'num_train'",
        ),
    ],
    ids=["nproc", "nnodes", "loader-workers", "job-size", "builtin-size"],
)
def test_a_job_over_a_server_cap_is_422_naming_the_cap_and_its_setting(
    client: TestClient,
    owner_headers: dict[str, str],
    db: Session,
    sent: Sent,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    field: str,
    spec: dict[str, Any],
    limit: int,
    message: str,
    loc: str,
) -> None:
    monkeypatch.setattr(settings, field, limit)
    response = client.post("/v1/jobs", json=spec, headers=owner_headers)
    assert_problem(response, 422, message, setting_name(field), loc)
    assert _count(db, Job) == 0 and sent == []
    monkeypatch.setattr(settings, field, limit + 1)  # at the cap it is accepted
    assert client.post("/v1/jobs", json=spec, headers=owner_headers).status_code == 202


def test_a_jobs_size_counts_a_registered_datasets_training_images(
    client: TestClient,
    owner_headers: dict[str, str],
    db: Session,
    sent: Sent,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(settings, "max_job_images", 10_000)
    dataset = make_dataset(db, owner="alice", num_train=1000, num_val=10)
    spec = {"name": "job", "dataset": {"id": dataset.id}, "schedule": {"epochs": 11}}
    response = client.post("/v1/jobs", json=spec, headers=owner_headers)
    assert_problem(response, 422, "(11 x 1000), is 11000", "TID_MAX_JOB_IMAGES")
    spec["schedule"] = {"epochs": 10}
    assert client.post("/v1/jobs", json=spec, headers=owner_headers).status_code == 202


def test_a_builtin_dataset_over_its_cap_is_422(
    client: TestClient,
    owner_headers: dict[str, str],
    db: Session,
    sent: Sent,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(settings, "max_builtin_images", 19)  # BUILTIN: 16 + 4
    response = client.post("/v1/datasets", json=BUILTIN, headers=owner_headers)
    assert_problem(response, 422, "num_train + num_val is 20", "TID_MAX_BUILTIN_IMAGES")
    assert _count(db, Dataset) == 0 and sent == []


def test_datasets_over_the_owners_quota_are_429_without_retry_after(
    client: TestClient,
    owner_headers: dict[str, str],
    other_headers: dict[str, str],
    db: Session,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every dataset counts, whatever its state; waiting frees none, so no Retry-After."""
    monkeypatch.setattr(settings, "max_datasets_per_owner", 2)
    make_dataset(db, owner="alice", state="failed")
    assert client.post("/v1/datasets", json=BUILTIN, headers=owner_headers).status_code == 202
    for response in (
        client.post("/v1/datasets", json=BUILTIN, headers=owner_headers),
        upload(client, owner_headers, make_zip(coco_entries())),
    ):
        assert_problem(response, 429, "2 datasets", "limit is 2", "TID_MAX_DATASETS_PER_OWNER")
        assert "retry-after" not in response.headers
    assert not settings.datasets_dir.exists()  # nothing unpacked
    assert client.post("/v1/datasets", json=BUILTIN, headers=other_headers).status_code == 202
    assert _count(db, Dataset) == 3


def test_models_over_the_owners_quota_are_429(
    client: TestClient,
    owner_headers: dict[str, str],
    other_headers: dict[str, str],
    db: Session,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(settings, "max_models_per_owner", 1)
    make_model(db, owner="alice")
    response = post_model(client, owner_headers, "teacher.pt", WEIGHTS)
    assert_problem(response, 429, "1 models", "TID_MAX_MODELS_PER_OWNER")
    assert not settings.models_dir.exists()  # refused before a byte was written
    assert post_model(client, other_headers, "teacher.pt", WEIGHTS).status_code == 202


def test_uploads_past_the_owners_stored_bytes_are_429_and_leave_nothing(
    client: TestClient,
    owner_headers: dict[str, str],
    other_headers: dict[str, str],
    db: Session,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Uploaded models and unpacked dataset uploads share one budget; generated and registered
    datasets (no bytes of the service's) do not count."""
    entries = coco_entries()
    unpacked = sum(len(data) for data in entries.values())
    make_dataset(db, owner="alice")  # a generated one: no bytes
    make_model(db, owner="alice", bytes=1000)
    monkeypatch.setattr(settings, "max_stored_bytes_per_owner", 1000 + unpacked + len(WEIGHTS) - 1)

    first = upload(client, owner_headers, make_zip(entries))
    assert first.status_code == 202, first.text
    assert db.get(Dataset, first.json()["id"]).bytes == unpacked  # type: ignore[union-attr]
    response = post_model(client, owner_headers, "teacher.pt", WEIGHTS)
    assert_problem(response, 429, f"({len(WEIGHTS)} bytes)", "TID_MAX_STORED_BYTES_PER_OWNER")
    assert "retry-after" not in response.headers
    assert not settings.models_dir.exists()

    monkeypatch.setattr(settings, "max_stored_bytes_per_owner", 1000 + unpacked + unpacked - 1)
    response = upload(client, owner_headers, make_zip(entries))
    assert_problem(response, 429, f"({unpacked} bytes)", "TID_MAX_STORED_BYTES_PER_OWNER")
    assert [p.name for p in settings.datasets_dir.iterdir()] == [first.json()["id"]]
    assert _count(db, Dataset) == 2 and _count(db, Model) == 1
    assert upload(client, other_headers, make_zip(entries)).status_code == 202  # per owner


def test_zero_means_no_limit(
    client: TestClient,
    owner_headers: dict[str, str],
    db: Session,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for field in ("max_datasets_per_owner", "max_models_per_owner", "max_stored_bytes_per_owner"):
        monkeypatch.setattr(settings, field, 0)
    make_model(db, owner="alice", bytes=10**15)
    assert post_model(client, owner_headers, "teacher.pt", WEIGHTS).status_code == 202
    assert upload(client, owner_headers, make_zip(coco_entries())).status_code == 202


@pytest.mark.parametrize(
    "field",
    [
        "max_datasets_per_owner",
        "max_models_per_owner",
        "max_stored_bytes_per_owner",
        "max_event_streams_per_owner",
        "max_nproc_per_node",
        "max_nnodes",
        "max_num_workers",
        "max_job_images",
        "max_builtin_images",
    ],
)
def test_each_limit_reads_the_variable_its_problem_names(
    field: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(setting_name(field), "3")
    assert getattr(Settings(), field) == 3


# Open event streams


def test_streams_past_the_owners_limit_are_429_until_one_is_released(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(settings, "max_event_streams_per_owner", 2)
    with session_scope(settings.database_url) as session:  # a dead process's row, expired
        session.add(EventStream(owner="alice", expires_at=utcnow() - timedelta(seconds=1)))
    first = open_stream(settings, owner="alice")
    open_stream(settings, owner="alice")
    open_stream(settings, owner="bob")  # per owner
    with pytest.raises(TooManyRequests) as refused:
        open_stream(settings, owner="alice")
    assert "2 event streams open" in refused.value.detail
    assert "TID_MAX_EVENT_STREAMS_PER_OWNER" in refused.value.detail
    assert refused.value.headers == {"Retry-After": "30"}
    first.release()
    open_stream(settings, owner="alice")
    with session_scope(settings.database_url) as session:  # the expired row was cleared
        assert session.scalar(select(func.count()).select_from(EventStream)) == 3


async def _frames(count: int) -> AsyncIterator[str]:
    for i in range(count):
        yield f"frame {i}"


def test_a_stream_renews_its_lease_and_releases_it_at_the_end(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Renewal writes the row back even if an open that saw it expired removed it."""
    import anyio

    lease = open_stream(settings, owner="alice")
    with session_scope(settings.database_url) as session:
        session.execute(delete(EventStream))
    monkeypatch.setattr(api.stream_leases, "RENEW_SECONDS", 0.0)
    seen: list[int] = []

    async def consume() -> None:
        async for _ in leased(lease, _frames(2)):
            with session_scope(settings.database_url) as session:
                row = session.get(EventStream, lease.id)
                assert row is not None and row.expires_at > utcnow() + timedelta(seconds=50)
                seen.append(1)

    anyio.run(consume)
    assert seen == [1, 1]
    with session_scope(settings.database_url) as session:
        assert session.get(EventStream, lease.id) is None


def test_a_finished_stream_gives_its_slot_back(
    client: TestClient,
    owner_headers: dict[str, str],
    db: Session,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(settings, "max_event_streams_per_owner", 1)
    job = make_job(db, owner="alice", state="succeeded")
    for _ in range(3):  # one at a time: each ends with the final job, and frees its slot
        assert client.get(f"/v1/jobs/{job.id}/events", headers=owner_headers).status_code == 200
    assert _count(db, EventStream) == 0


@contextlib.contextmanager
def _api_process(settings: Settings, log: Path, **env: str) -> Iterator[str]:
    """`tid serve` on a free port: another API process, which shares nothing with the others
    but the database."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"
    variables = {
        "TID_DATA_ROOT": str(settings.data_root),
        "TID_DATABASE_URL": settings.database_url,
    }
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "serve", "--port", url.rsplit(":", 1)[1]],
            env={**os.environ, **variables, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{url}/healthz", timeout=2)
                break
            except httpx.HTTPError:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_open_streams_are_bounded_over_api_processes_and_freed_when_a_client_leaves(
    owner_headers: dict[str, str], db: Session, settings: Settings, tmp_path: Path
) -> None:
    """Two API processes on one database (as `uvicorn --workers 2` or two containers): a limit
    of 2 is 2 in all, not 2 each; a client that goes away frees its slot at once."""
    job = make_job(db, owner="alice", state="running")  # its streams stay open
    path = f"/v1/jobs/{job.id}/events"
    limit = {"TID_MAX_EVENT_STREAMS_PER_OWNER": "2"}
    with (
        _api_process(settings, tmp_path / "first.log", **limit) as first,
        _api_process(settings, tmp_path / "second.log", **limit) as second,
        httpx.Client(timeout=10) as a,
        httpx.Client(timeout=10) as b,
        a.stream("GET", first + path, headers=owner_headers) as on_first,
        contextlib.ExitStack() as streams,
    ):
        assert on_first.status_code == 200
        on_second = streams.enter_context(b.stream("GET", second + path, headers=owner_headers))
        assert on_second.status_code == 200
        refused = httpx.get(first + path, headers=owner_headers, timeout=10)
        assert_problem(refused, 429, "2 event streams open", "TID_MAX_EVENT_STREAMS_PER_OWNER")
        assert refused.headers["retry-after"] == "30"
        streams.close()  # the client on the second process goes away

        deadline = time.monotonic() + 10
        while _count(db, EventStream) > 1:
            assert time.monotonic() < deadline, "the closed stream's slot was not given back"
            time.sleep(0.05)
        with b.stream("GET", first + path, headers=owner_headers) as again:
            assert again.status_code == 200
