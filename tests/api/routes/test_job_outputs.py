"""What a job produces, read back through the API: metrics, checkpoints, logs, the event
stream and the exported student."""

from __future__ import annotations

import hashlib
import json
import threading
from typing import Any

import pytest
from factories import add_artifact, add_evaluation, add_event, add_metrics, make_job
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session
from support import assert_problem

import api.routes.jobs
from store.db.models import Checkpoint
from store.db.session import session_scope
from store.db.transitions import finish
from store.settings import Settings

WEIGHTS = bytes(range(256)) * 4


def parse_sse(text: str) -> list[dict[str, Any]]:
    """Frames of an event stream; comment lines (keep-alives) become {"comment": ...}."""
    frames: list[dict[str, Any]] = []
    for block in text.split("\n\n"):
        if not block:
            continue
        if block.startswith(":"):
            frames.append({"comment": block[1:].strip()})
            continue
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        frames.append(
            {"id": int(fields["id"]), "event": fields["event"], "data": json.loads(fields["data"])}
        )
    return frames


EVAL_POINTS = ["eval/AP", "eval/AP50", "eval/AP75", "eval/APm", "eval/APl"]  # APs is None


def test_metrics_lists_points_in_order_with_filters_and_evaluations(
    client: TestClient, owner_headers: dict[str, str], db: Session
) -> None:
    job = make_job(db, owner="alice")
    add_metrics(db, job, [(1, "loss", 3.0), (1, "lr", 0.1), (2, "loss", 2.0)])
    add_evaluation(db, job, step=2, ap=12.5)
    url = f"/v1/jobs/{job.id}/metrics"
    body = client.get(url, headers=owner_headers).json()
    assert [(m["step"], m["name"], m["value"]) for m in body["data"]] == [
        (1, "loss", 3.0),
        (1, "lr", 0.1),
        (2, "loss", 2.0),
        (2, "eval/AP", 12.5),  # the evaluation's statistics, as points
        (2, "eval/AP50", 30.0),
        (2, "eval/AP75", 10.0),
        (2, "eval/APm", 5.0),
        (2, "eval/APl", 20.0),
    ]
    assert body["data"][0]["attempt"] == 1
    [evaluation] = body["evaluations"]
    assert (evaluation["ap"], evaluation["aps"], evaluation["per_class"]) == (
        12.5,
        None,
        {"circle": 14.0},
    )

    losses = client.get(url, params={"name": "loss"}, headers=owner_headers).json()["data"]
    assert [m["value"] for m in losses] == [3.0, 2.0]
    ap = client.get(url, params={"name": "eval/AP"}, headers=owner_headers).json()["data"]
    assert [(m["step"], m["value"]) for m in ap] == [(2, 12.5)]
    after = client.get(url, params={"after_id": body["data"][1]["id"]}, headers=owner_headers)
    assert [m["name"] for m in after.json()["data"]] == ["loss", *EVAL_POINTS]


def test_metric_points_page_in_logging_order_with_evaluations_between_steps(
    client: TestClient, owner_headers: dict[str, str], db: Session
) -> None:
    """An evaluation's points come after the steps logged before it, pages of any size see
    each point once, and an evaluation ingested after a page was read still comes later."""
    job = make_job(db, owner="alice")
    add_metrics(db, job, [(1, "loss", 3.0), (2, "loss", 2.0)])
    add_evaluation(db, job, step=2, ap=12.5)
    add_metrics(db, job, [(3, "loss", 1.0), (4, "loss", 0.5)])
    url = f"/v1/jobs/{job.id}/metrics"
    expected = [
        (1, "loss"),
        (2, "loss"),
        *[(2, name) for name in EVAL_POINTS],
        (3, "loss"),
        (4, "loss"),
    ]
    whole = client.get(url, headers=owner_headers).json()["data"]
    assert [(m["step"], m["name"]) for m in whole] == expected
    for limit in (1, 2, 4):
        seen: list[dict[str, Any]] = []
        while page := client.get(
            url,
            params={"after_id": seen[-1]["id"] if seen else 0, "limit": limit},
            headers=owner_headers,
        ).json()["data"]:
            seen += page
        assert seen == whole, limit

    add_evaluation(db, job, step=4, ap=14.0)  # the next evaluation, after a client's last read
    newer = client.get(url, params={"after_id": whole[-1]["id"]}, headers=owner_headers).json()
    assert [(m["step"], m["name"]) for m in newer["data"]] == [(4, n) for n in EVAL_POINTS]


def test_checkpoints_are_listed_oldest_first(
    client: TestClient, owner_headers: dict[str, str], db: Session
) -> None:
    job = make_job(db, owner="alice")
    for epoch in (0, 1):
        db.add(
            Checkpoint(
                job_id=job.id,
                attempt=1,
                epoch=epoch,
                step=10 * (epoch + 1),
                path=f"checkpoints/epoch{epoch}.pt",
                sha256=str(epoch) * 64,
                bytes=100,
            )
        )
    db.commit()
    body = client.get(f"/v1/jobs/{job.id}/checkpoints", headers=owner_headers).json()
    assert [(c["epoch"], c["step"], c["path"]) for c in body["data"]] == [
        (0, 10, "checkpoints/epoch0.pt"),
        (1, 20, "checkpoints/epoch1.pt"),
    ]
    assert body["data"][1]["sha256"] == "1" * 64


def test_logs_tail_returns_the_last_lines_as_text(
    client: TestClient, owner_headers: dict[str, str], db: Session, settings: Settings
) -> None:
    job = make_job(db, owner="alice", state="queued")
    url = f"/v1/jobs/{job.id}/logs"
    empty = client.get(url, headers=owner_headers)
    assert (empty.status_code, empty.text) == (200, "")
    log = settings.jobs_dir / job.id / "train.log"
    log.parent.mkdir(parents=True)
    log.write_text("".join(f"line {i} " + "x" * 200 + "\n" for i in range(2000)))  # > 64 KiB
    tail = client.get(url, params={"tail": 3}, headers=owner_headers)
    assert tail.headers["content-type"].startswith("text/plain")
    assert [line.split()[:2] for line in tail.text.splitlines()] == [
        ["line", "1997"],
        ["line", "1998"],
        ["line", "1999"],
    ]


def test_artifact_download_has_sha256_etag(
    client: TestClient, owner_headers: dict[str, str], db: Session, settings: Settings
) -> None:
    job = make_job(db, owner="alice")
    add_artifact(db, settings, job, name="student.safetensors", content=WEIGHTS)
    response = client.get(f"/v1/jobs/{job.id}/artifacts/student.safetensors", headers=owner_headers)
    assert response.status_code == 200
    assert response.content == WEIGHTS
    assert response.headers["etag"] == f'"{hashlib.sha256(WEIGHTS).hexdigest()}"'
    assert response.headers["accept-ranges"] == "bytes"
    assert 'filename="student.safetensors"' in response.headers["content-disposition"]


def test_artifact_if_none_match_is_304(
    client: TestClient, owner_headers: dict[str, str], db: Session, settings: Settings
) -> None:
    job = make_job(db, owner="alice")
    add_artifact(db, settings, job, name="student.pt", content=WEIGHTS)
    etag = f'"{hashlib.sha256(WEIGHTS).hexdigest()}"'
    url = f"/v1/jobs/{job.id}/artifacts/student.pt"
    response = client.get(url, headers={**owner_headers, "If-None-Match": f'"other", {etag}'})
    assert (response.status_code, response.content) == (304, b"")
    assert response.headers["etag"] == etag
    assert client.get(url, headers={**owner_headers, "If-None-Match": '"other"'}).status_code == 200


def test_artifact_range_request_is_206(
    client: TestClient, owner_headers: dict[str, str], db: Session, settings: Settings
) -> None:
    job = make_job(db, owner="alice")
    add_artifact(db, settings, job, name="student.pt", content=WEIGHTS)
    url = f"/v1/jobs/{job.id}/artifacts/student.pt"
    response = client.get(url, headers={**owner_headers, "Range": "bytes=0-9"})
    assert response.status_code == 206
    assert response.content == WEIGHTS[:10]
    assert response.headers["content-range"] == f"bytes 0-9/{len(WEIGHTS)}"
    resumed = client.get(url, headers={**owner_headers, "Range": "bytes=1000-"})
    assert (resumed.status_code, resumed.content) == (206, WEIGHTS[1000:])


@pytest.mark.parametrize(
    ("header", "status"), [("bytes=5000-6000", 416), ("pages=1-2", 400), ("", 400)]
)
def test_artifact_bad_range_is_a_problem(
    client: TestClient,
    owner_headers: dict[str, str],
    db: Session,
    settings: Settings,
    header: str,
    status: int,
) -> None:
    job = make_job(db, owner="alice")
    add_artifact(db, settings, job, name="student.pt", content=WEIGHTS)
    response = client.get(
        f"/v1/jobs/{job.id}/artifacts/student.pt", headers={**owner_headers, "Range": header}
    )
    assert_problem(response, status, "Range")


def test_artifact_not_exported_yet_is_404(
    client: TestClient, owner_headers: dict[str, str], db: Session
) -> None:
    job = make_job(db, owner="alice", state="running")
    response = client.get(f"/v1/jobs/{job.id}/artifacts/student.pt", headers=owner_headers)
    assert_problem(response, 404, "no artifact 'student.pt'")


def test_events_stream_every_row_of_a_final_job_and_resume(
    client: TestClient, owner_headers: dict[str, str], db: Session
) -> None:
    job = make_job(db, owner="alice", state="succeeded")
    rows = [
        add_event(db, job, "state", {"state": "running"}),
        add_event(db, job, "progress", {"step": 5, "total_steps": 10}),
        add_event(db, job, "state", {"state": "succeeded"}, attempt=2),
    ]
    other = make_job(db, owner="alice")
    add_event(db, other, "state", {"state": "running"})
    url = f"/v1/jobs/{job.id}/events"
    response = client.get(url, headers=owner_headers)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    frames = parse_sse(response.text)
    assert [(f["id"], f["event"]) for f in frames] == [(r.id, r.type) for r in rows]
    assert frames[1]["data"] == {"step": 5, "total_steps": 10, "attempt": 1}
    assert frames[2]["data"] == {"state": "succeeded", "attempt": 2}  # the row's own attempt

    resumed = client.get(url, headers={**owner_headers, "Last-Event-ID": str(rows[0].id)})
    assert [f["id"] for f in parse_sse(resumed.text)] == [rows[1].id, rows[2].id]
    by_query = client.get(url, params={"last_event_id": rows[1].id}, headers=owner_headers)
    assert [f["id"] for f in parse_sse(by_query.text)] == [rows[2].id]


def test_events_stream_follows_a_running_job_until_final(
    client: TestClient,
    owner_headers: dict[str, str],
    db: Session,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(api.routes.jobs, "POLL_SECONDS", 0.05)
    monkeypatch.setattr(api.routes.jobs, "KEEPALIVE_SECONDS", 0.1)
    job = make_job(db, owner="alice", state="running", lease_owner="w1", claim_token="t1")
    first = add_event(db, job, "progress", {"step": 1})

    def worker_finishes() -> None:
        with session_scope(settings.database_url) as session:
            assert finish(session, job.id, token="t1", state="succeeded")

    timer = threading.Timer(0.4, worker_finishes)
    timer.start()
    try:
        response = client.get(f"/v1/jobs/{job.id}/events", headers=owner_headers)
    finally:
        timer.join()
    frames = parse_sse(response.text)
    events = [f for f in frames if "id" in f]
    assert [(f["event"], f["data"]) for f in events] == [
        ("progress", {"step": 1, "attempt": 1}),
        ("state", {"state": "succeeded", "attempt": 1}),
    ]
    assert events[0]["id"] == first.id
    assert {"comment": "keep-alive"} in frames  # sent while the stream was quiet


@pytest.mark.parametrize(
    ("path", "params", "headers", "loc"),
    [
        ("/metrics", {"after_id": 2**63}, {}, ["query", "after_id"]),
        ("/metrics", {"name": "loss\x00"}, {}, ["query", "name"]),
        ("/events", {"last_event_id": 2**63}, {}, ["query", "last_event_id"]),
        ("/events", {}, {"Last-Event-ID": str(2**63)}, ["header", "Last-Event-ID"]),
    ],
    ids=["after-id", "nul-name", "last-event-id", "last-event-id-header"],
)
def test_cursor_beyond_bigint_or_nul_in_a_filter_is_422(
    client: TestClient,
    owner_headers: dict[str, str],
    db: Session,
    path: str,
    params: dict[str, Any],
    headers: dict[str, str],
    loc: list[str],
) -> None:
    """The driver cannot bind them (SQLite: OverflowError; PostgreSQL: NUL in text): a 500
    or a broken stream unless refused at the edge."""
    job = make_job(db, owner="alice")
    response = client.get(
        f"/v1/jobs/{job.id}{path}", params=params, headers={**owner_headers, **headers}
    )
    body = assert_problem(response, 422)
    assert body["errors"][0]["loc"] == loc
