"""Submitting, listing, reading and cancelling jobs."""

from __future__ import annotations

import base64
import logging
import os
import socket
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from factories import (
    add_artifact,
    add_evaluation,
    add_event,
    add_metrics,
    make_dataset,
    make_job,
    make_model,
)
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from support import Sent, assert_problem

import store.queue
from api.app import create_app
from store.db.models import Job, utcnow
from store.db.session import session_scope
from store.queue import RUN_JOB
from store.settings import Settings

SPEC: dict[str, Any] = {
    "name": "plain",
    "student": {"arch": "fcos", "backbone": "resnet18"},
    "dataset": {"builtin": "shapes", "num_train": 8, "num_val": 4},
    "schedule": {"epochs": 1},
}
TEACHER = {"arch": "fcos", "backbone": "resnet50"}
# what a worker records for an uploaded detector (DetectorMeta) and for a bare backbone
TEACHER_META = {**TEACHER, "fpn_channels": 128, "num_classes": 3, "input_size": 128}


def job_count(db: Session) -> int:
    return db.scalar(select(func.count()).select_from(Job)) or 0


TEACHER_SPEC = {**SPEC, "student": TEACHER}  # the job that trained the teacher


def with_teacher(weights: dict[str, str]) -> dict[str, Any]:
    return {**SPEC, "teacher": {**TEACHER, "weights": weights}, "distill": {"method": "tid"}}


def with_backbone(weights: dict[str, str]) -> dict[str, Any]:
    return {**SPEC, "student": {**SPEC["student"], "weights_backbone": weights}}


def test_submit_job_is_202_with_location_and_queued_row(
    client: TestClient, owner_headers: dict[str, str], db: Session, sent: Sent
) -> None:
    response = client.post("/v1/jobs", json=SPEC, headers=owner_headers)
    assert response.status_code == 202, response.text
    body = response.json()
    assert response.headers["location"] == f"/v1/jobs/{body['id']}"
    assert (body["state"], body["method"], body["name"], body["attempt"]) == (
        "queued",
        "none",
        "plain",
        0,
    )
    assert body["max_attempts"] == 2  # from the settings
    assert body["spec"]["dataset"] == {
        "builtin": "shapes",
        "num_train": 8,
        "num_val": 4,
        "image_size": 128,
        "seed": 0,
    }
    assert body["created_at"].endswith("Z") and body["latest_metrics"] == {}
    job = db.get(Job, body["id"])
    assert job is not None and (job.owner, job.state) == ("alice", "queued")
    assert sent == [(RUN_JOB, (body["id"],))]


def test_a_job_on_several_nodes_is_not_sent_and_shows_why_it_waits(
    client: TestClient, owner_headers: dict[str, str], db: Session, sent: Sent
) -> None:
    spec = {**SPEC, "resources": {"nnodes": 2}}
    body = client.post("/v1/jobs", json=spec, headers=owner_headers).json()
    assert body["spec"]["resources"]["nnodes"] == 2 and body["waiting_reason"] is None
    assert sent == []  # the reconciler places it on workers all free at once
    job = db.get_one(Job, body["id"])
    assert job.nnodes == 2
    job.waiting_reason = "waiting for 2 workers; 1 idle"  # what a placement pass writes
    db.commit()
    shown = client.get(f"/v1/jobs/{body['id']}", headers=owner_headers).json()
    assert shown["waiting_reason"] == "waiting for 2 workers; 1 idle"
    (listed,) = client.get("/v1/jobs", headers=owner_headers).json()["data"]
    assert listed["waiting_reason"] == "waiting for 2 workers; 1 idle"


def test_submit_job_sends_task_after_commit(
    client: TestClient,
    owner_headers: dict[str, str],
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[str | None] = []

    def send(_: Settings, task: str, job_id: str) -> None:
        with session_scope(settings.database_url) as other:  # another connection
            seen.append(other.scalar(select(Job.state).where(Job.id == job_id)))

    monkeypatch.setattr(store.queue, "send", send)
    assert client.post("/v1/jobs", json=SPEC, headers=owner_headers).status_code == 202
    assert seen == ["queued"]


def test_submit_job_when_broker_is_down_is_still_202_and_logged(
    client: TestClient,
    owner_headers: dict[str, str],
    db: Session,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def send(*_: str) -> None:
        raise ConnectionError("broker down")

    monkeypatch.setattr(store.queue, "send", send)
    with caplog.at_level(logging.ERROR, logger="store.queue"):
        response = client.post("/v1/jobs", json=SPEC, headers=owner_headers)
    assert response.status_code == 202 and response.json()["state"] == "queued"
    assert job_count(db) == 1  # the reconciler re-sends it
    assert "could not send tid.run_job" in caplog.text


def test_submit_job_when_the_broker_does_not_answer_is_202_within_its_timeout(
    settings: Settings, owner_headers: dict[str, str], db: Session
) -> None:
    """A broker that accepts the connection and never answers (a failover, a dropped
    connection): the send gives up after `broker_timeout_seconds`, the job stays queued."""
    with socket.create_server(("127.0.0.1", 0)) as hole:  # the backlog accepts; nobody reads
        url = f"redis://127.0.0.1:{hole.getsockname()[1]}/0"
        stalled = settings.model_copy(update={"broker_url": url, "broker_timeout_seconds": 2})
        with TestClient(create_app(stalled)) as client:
            started = time.monotonic()
            response = client.post("/v1/jobs", json=SPEC, headers=owner_headers)
            took = time.monotonic() - started
    assert response.status_code == 202 and response.json()["state"] == "queued", response.text
    assert took < 2 + 3, took  # one try, plus the request's own work on a slow machine
    assert job_count(db) == 1  # the reconciler re-sends it


@pytest.mark.parametrize(
    ("minutes", "status"), [(30, 202), (60, 202), (61, 422)], ids=["under", "at", "over"]
)
def test_submit_job_may_ask_for_a_run_time_up_to_the_servers_limit(
    client: TestClient,
    owner_headers: dict[str, str],
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    minutes: int,
    status: int,
) -> None:
    monkeypatch.setattr(settings, "max_runtime_minutes", 60.0)
    body = {**SPEC, "schedule": {**SPEC["schedule"], "max_runtime_minutes": minutes}}
    response = client.post("/v1/jobs", json=body, headers=owner_headers)
    if status == 202:
        assert response.status_code == 202, response.text
        assert response.json()["spec"]["schedule"]["max_runtime_minutes"] == minutes
        return
    problem = assert_problem(response, 422, "max_runtime_minutes is 61", "limit of 60 minutes")
    assert problem["errors"][0]["loc"] == ["body", "schedule", "max_runtime_minutes"]


def test_submit_job_unknown_field_is_422_naming_it(
    client: TestClient, owner_headers: dict[str, str], db: Session, sent: Sent
) -> None:
    response = client.post("/v1/jobs", json={**SPEC, "colour": "red"}, headers=owner_headers)
    body = assert_problem(response, 422, "colour", "Extra inputs are not permitted")
    assert ["body", "colour"] in [e["loc"] for e in body["errors"]]
    assert job_count(db) == 0 and sent == []


def test_submit_job_method_without_teacher_is_422(
    client: TestClient, owner_headers: dict[str, str]
) -> None:
    response = client.post(
        "/v1/jobs", json={**SPEC, "distill": {"method": "tid"}}, headers=owner_headers
    )
    assert_problem(response, 422, 'method "tid" needs a teacher')


def test_submit_job_trainable_backbone_layers_without_backbone_weights_is_422(
    client: TestClient, owner_headers: dict[str, str]
) -> None:
    student = {"backbone": "resnet18", "trainable_backbone_layers": 2}
    response = client.post("/v1/jobs", json={**SPEC, "student": student}, headers=owner_headers)
    body = assert_problem(response, 422, "trainable_backbone_layers: only with weights_backbone")
    assert ["body", "student"] in [e["loc"] for e in body["errors"]]


@pytest.mark.parametrize(
    "raw",
    [
        b'{"dataset": {"builtin": "shapes"}, "distill": {"method": "none", "loss_weight": NaN}}',
        b'{"dataset": {"builtin": "shapes"}, "schedule": {"lr": Infinity}}',
    ],
    ids=["nan", "infinity"],
)
def test_submit_job_non_finite_number_is_422(
    client: TestClient, owner_headers: dict[str, str], raw: bytes
) -> None:
    headers = {**owner_headers, "Content-Type": "application/json"}
    assert_problem(client.post("/v1/jobs", content=raw, headers=headers), 422, "finite number")


def test_submit_job_malformed_json_is_422(
    client: TestClient, owner_headers: dict[str, str]
) -> None:
    headers = {**owner_headers, "Content-Type": "application/json"}
    response = client.post("/v1/jobs", content=b'{"dataset": ', headers=headers)
    assert_problem(response, 422, "JSON decode error")


def test_submit_job_idempotency_key_replays_the_same_job(
    client: TestClient, owner_headers: dict[str, str], db: Session, sent: Sent
) -> None:
    headers = {**owner_headers, "Idempotency-Key": "abc"}
    first = client.post("/v1/jobs", json=SPEC, headers=headers)
    # the same content with another key order and defaults spelled out is the same body
    same = {**SPEC, "distill": {"method": "none"}, "name": "plain"}
    again = client.post("/v1/jobs", json=same, headers=headers)
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["location"] == first.headers["location"]
    assert job_count(db) == 1 and len(sent) == 1


def test_submit_job_idempotency_key_with_another_body_is_422(
    client: TestClient, owner_headers: dict[str, str], db: Session
) -> None:
    headers = {**owner_headers, "Idempotency-Key": "abc"}
    assert client.post("/v1/jobs", json=SPEC, headers=headers).status_code == 202
    other = client.post("/v1/jobs", json={**SPEC, "name": "other"}, headers=headers)
    assert_problem(other, 422, "Idempotency-Key", "different body")
    assert job_count(db) == 1


def test_idempotency_keys_are_per_owner(
    client: TestClient, owner_headers: dict[str, str], other_headers: dict[str, str]
) -> None:
    ids = {
        client.post("/v1/jobs", json=SPEC, headers={**h, "Idempotency-Key": "k"}).json()["id"]
        for h in (owner_headers, other_headers)
    }
    assert len(ids) == 2


def test_list_jobs_pages_newest_first_with_cursor(
    client: TestClient, owner_headers: dict[str, str], db: Session
) -> None:
    now = utcnow()
    # two share a timestamp: the id breaks the tie, so no job is skipped or repeated
    times = [now - timedelta(seconds=s) for s in (5, 4, 4, 2, 1)]
    jobs = [make_job(db, owner="alice", state="queued", created_at=t) for t in times]
    make_job(db, owner="bob", state="queued")
    expected = [j.id for j in sorted(jobs, key=lambda j: (j.created_at, j.id), reverse=True)]

    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/jobs", params=params, headers=owner_headers)
        assert page.status_code == 200, page.text
        seen += [j["id"] for j in page.json()["data"]]
        pages += 1
        cursor = page.json()["next_cursor"]
        if cursor is None:
            break
    assert seen == expected and pages == 3


def test_list_jobs_filters_by_state(
    client: TestClient, owner_headers: dict[str, str], db: Session
) -> None:
    done = make_job(db, owner="alice", state="succeeded")
    make_job(db, owner="alice", state="queued")
    page = client.get("/v1/jobs", params={"state": "succeeded"}, headers=owner_headers).json()
    assert [j["id"] for j in page["data"]] == [done.id] and page["next_cursor"] is None


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"state": "sleeping"}, "state"),
        ({"limit": 0}, "limit"),
        ({"limit": 101}, "limit"),
        ({"cursor": "not-a-cursor"}, "invalid cursor"),
    ],
)
def test_list_jobs_bad_query_is_422(
    client: TestClient, owner_headers: dict[str, str], params: dict[str, Any], fragment: str
) -> None:
    assert_problem(client.get("/v1/jobs", params=params, headers=owner_headers), 422, fragment)


def test_read_job_has_latest_metrics_of_last_step(
    client: TestClient, owner_headers: dict[str, str], db: Session
) -> None:
    job = make_job(db, owner="alice", state="running", step=20, total_steps=100)
    add_metrics(db, job, [(10, "loss", 2.0), (10, "lr", 0.01), (20, "loss", 1.5), (20, "lr", 0.02)])
    body = client.get(f"/v1/jobs/{job.id}", headers=owner_headers).json()
    assert body["latest_metrics"] == {"loss": 1.5, "lr": 0.02}
    assert (body["state"], body["step"], body["total_steps"]) == ("running", 20, 100)
    assert body["started_at"].endswith("Z") and body["finished_at"] is None


def test_best_ap_and_the_latest_evaluation_come_from_the_evaluations(
    client: TestClient, owner_headers: dict[str, str], db: Session
) -> None:
    job = make_job(db, owner="alice", state="running", step=20, total_steps=100)
    add_metrics(db, job, [(10, "loss", 2.0), (20, "loss", 1.5)])
    add_evaluation(db, job, step=10, ap=12.5)
    other = make_job(db, owner="alice")
    add_metrics(db, other, [(5, "loss", 3.0)])
    body = client.get(f"/v1/jobs/{job.id}", headers=owner_headers).json()
    assert body["best_ap"] == 12.5
    assert body["latest_metrics"] == {"loss": 1.5}  # the evaluation came before step 20

    add_evaluation(db, job, step=20, ap=9.0)  # lower than the best, logged last
    body = client.get(f"/v1/jobs/{job.id}", headers=owner_headers).json()
    assert body["best_ap"] == 12.5
    assert body["latest_metrics"] == {
        "loss": 1.5,
        "eval/AP": 9.0,
        "eval/AP50": 30.0,
        "eval/AP75": 10.0,
        "eval/APm": 5.0,
        "eval/APl": 20.0,
    }
    listed = client.get("/v1/jobs", headers=owner_headers).json()["data"]
    assert {j["id"]: j["best_ap"] for j in listed} == {job.id: 12.5, other.id: None}
    assert {j["id"]: j["latest_metrics"] for j in listed}[other.id] == {"loss": 3.0}


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", ""),
        ("GET", "/metrics"),
        ("GET", "/checkpoints"),
        ("GET", "/logs"),
        ("GET", "/events"),
        ("GET", "/artifacts/student.pt"),
        ("POST", "/cancel"),
    ],
)
def test_another_owners_job_is_404_everywhere(
    client: TestClient,
    other_headers: dict[str, str],
    db: Session,
    settings: Settings,
    method: str,
    path: str,
) -> None:
    job = make_job(db, owner="alice", state="queued")
    add_artifact(db, settings, job, name="student.pt", content=b"alice's weights")
    add_event(db, job, "state", {"state": "queued"})
    response = client.request(method, f"/v1/jobs/{job.id}{path}", headers=other_headers)
    assert_problem(response, 404, f"job {job.id} not found")
    assert b"alice's weights" not in response.content
    db.refresh(job)
    assert (job.state, job.cancel_requested) == ("queued", False)


def test_teacher_job_must_be_the_callers_and_succeeded(
    client: TestClient, owner_headers: dict[str, str], db: Session
) -> None:
    running = make_job(db, owner="alice", state="running", spec=TEACHER_SPEC)
    foreign = make_job(db, owner="bob", state="succeeded", spec=TEACHER_SPEC)
    done = make_job(db, owner="alice", state="succeeded", spec=TEACHER_SPEC)
    response = client.post(
        "/v1/jobs", json=with_teacher({"job": running.id}), headers=owner_headers
    )
    body = assert_problem(response, 422, f"job {running.id} is running", "succeeded")
    assert body["errors"][0]["loc"] == ["body", "teacher", "weights", "job"]
    response = client.post(
        "/v1/jobs", json=with_teacher({"job": foreign.id}), headers=owner_headers
    )
    assert_problem(response, 422, f"job {foreign.id} not found")
    response = client.post("/v1/jobs", json=with_teacher({"job": done.id}), headers=owner_headers)
    assert response.status_code == 202, response.text
    assert response.json()["spec"]["teacher"]["weights"] == {"job": done.id}


def test_teacher_model_must_be_ready(
    client: TestClient, owner_headers: dict[str, str], db: Session
) -> None:
    pending = make_model(db, owner="alice", state="pending")
    ready = make_model(db, owner="alice", state="ready", meta=TEACHER_META)
    response = client.post(
        "/v1/jobs", json=with_teacher({"model": pending.id}), headers=owner_headers
    )
    assert_problem(response, 422, f"model {pending.id} is pending")
    response = client.post(
        "/v1/jobs", json=with_teacher({"model": ready.id}), headers=owner_headers
    )
    assert response.status_code == 202, response.text


def test_teacher_weights_must_hold_the_declared_detector(
    client: TestClient, owner_headers: dict[str, str], db: Session
) -> None:
    narrow = make_job(db, owner="alice", spec={**SPEC, "student": {**TEACHER, "fpn_channels": 64}})
    response = client.post("/v1/jobs", json=with_teacher({"job": narrow.id}), headers=owner_headers)
    body = assert_problem(response, 422, f"job {narrow.id} has fpn_channels=64", "128")
    assert body["errors"][0]["loc"] == ["body", "teacher", "weights", "job"]
    bare = make_model(db, owner="alice", meta={"backbone": "resnet50"})
    response = client.post("/v1/jobs", json=with_teacher({"model": bare.id}), headers=owner_headers)
    assert_problem(response, 422, "resnet50 backbone, not a detector", "weights_backbone")
    assert job_count(db) == 1  # the teacher job only


def test_student_weights_backbone_from_a_job_or_model_of_that_backbone(
    client: TestClient, owner_headers: dict[str, str], db: Session
) -> None:
    """Any detector or bare backbone of the student's backbone; arch and width may differ."""
    retina = make_job(db, owner="alice", spec={**SPEC, "student": {"arch": "retinanet"}})
    bare = make_model(db, owner="alice", meta={"backbone": "resnet18"})
    for weights in ({"job": retina.id}, {"model": bare.id}):
        response = client.post("/v1/jobs", json=with_backbone(weights), headers=owner_headers)
        assert response.status_code == 202, response.text
        assert response.json()["spec"]["student"]["weights_backbone"] == weights

    r50 = make_job(db, owner="alice", spec=TEACHER_SPEC)
    response = client.post("/v1/jobs", json=with_backbone({"job": r50.id}), headers=owner_headers)
    body = assert_problem(response, 422, "backbone='resnet50'", "student declares")
    assert body["errors"][0]["loc"] == ["body", "student", "weights_backbone", "job"]
    pending = make_model(db, owner="alice", state="pending")
    response = client.post(
        "/v1/jobs", json=with_backbone({"model": pending.id}), headers=owner_headers
    )
    assert_problem(response, 422, f"model {pending.id} is pending")
    response = client.post("/v1/jobs", json=with_backbone({"path": "/x.pt"}), headers=owner_headers)
    body = assert_problem(response, 422, "student.weights_backbone by server path", "/v1/models")
    assert body["errors"][0]["loc"] == ["body", "student", "weights_backbone", "path"]


def test_teacher_weights_by_path_are_422(
    client: TestClient, owner_headers: dict[str, str], db: Session
) -> None:
    response = client.post(
        "/v1/jobs", json=with_teacher({"path": "/etc/passwd"}), headers=owner_headers
    )
    assert_problem(response, 422, "POST /v1/models")
    assert job_count(db) == 0


def test_dataset_id_must_be_the_callers_and_ready(
    client: TestClient, owner_headers: dict[str, str], db: Session
) -> None:
    pending = make_dataset(db, owner="alice", state="pending")
    foreign = make_dataset(db, owner="bob", state="ready")
    ready = make_dataset(db, owner="alice", state="ready")
    spec = {**SPEC, "dataset": {"id": pending.id}}
    assert_problem(client.post("/v1/jobs", json=spec, headers=owner_headers), 422, pending.id)
    spec = {**SPEC, "dataset": {"id": foreign.id}}
    body = assert_problem(
        client.post("/v1/jobs", json=spec, headers=owner_headers), 422, "not found"
    )
    assert body["errors"][0]["loc"] == ["body", "dataset", "id"]
    spec = {**SPEC, "dataset": {"id": ready.id, "input_size": 64}}
    assert client.post("/v1/jobs", json=spec, headers=owner_headers).status_code == 202


def test_dataset_path_is_pinned_to_its_real_folder_under_a_root(
    client: TestClient, owner_headers: dict[str, str], settings: Settings
) -> None:
    root = settings.dataset_roots[0]
    (root / "coco").mkdir()
    spec = {**SPEC, "dataset": {"path": f"{root}/sub/../coco"}}
    (root / "sub").mkdir()
    response = client.post("/v1/jobs", json=spec, headers=owner_headers)
    assert response.status_code == 202, response.text
    assert response.json()["spec"]["dataset"]["path"] == str((root / "coco").resolve())


def outside_paths(settings: Settings, tmp_path: Path) -> list[str]:
    """Three ways to name a folder outside the allowed root: plainly, by `..`, by a link."""
    root = settings.dataset_roots[0]
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, root / "link")
    return [str(outside), f"{root}/../outside", f"{root}/link"]


def test_dataset_path_outside_the_roots_is_422(
    client: TestClient, owner_headers: dict[str, str], settings: Settings, tmp_path: Path
) -> None:
    for path in outside_paths(settings, tmp_path):
        spec = {**SPEC, "dataset": {"path": path}}
        response = client.post("/v1/jobs", json=spec, headers=owner_headers)
        assert_problem(response, 422, "not under an allowed root")


def test_cancel_queued_job_cancels_it(
    client: TestClient, owner_headers: dict[str, str], db: Session
) -> None:
    job = make_job(db, owner="alice", state="queued")
    response = client.post(f"/v1/jobs/{job.id}/cancel", headers=owner_headers)
    assert response.status_code == 202, response.text
    body = response.json()
    assert (body["state"], body["cancel_requested"]) == ("cancelled", True)
    assert body["finished_at"] is not None


def test_cancel_running_job_flags_it_for_the_worker(
    client: TestClient, owner_headers: dict[str, str], db: Session
) -> None:
    job = make_job(db, owner="alice", state="running")
    body = client.post(f"/v1/jobs/{job.id}/cancel", headers=owner_headers).json()
    assert (body["state"], body["cancel_requested"]) == ("running", True)


def test_cancel_final_job_is_409(
    client: TestClient, owner_headers: dict[str, str], db: Session
) -> None:
    job = make_job(db, owner="alice", state="succeeded")
    response = client.post(f"/v1/jobs/{job.id}/cancel", headers=owner_headers)
    assert_problem(response, 409, "already succeeded")


def test_list_jobs_cursor_without_timezone_is_422(
    client: TestClient, owner_headers: dict[str, str]
) -> None:
    naive = base64.urlsafe_b64encode(b"2024-01-01T00:00:00|x").decode().rstrip("=")
    response = client.get("/v1/jobs", params={"cursor": naive}, headers=owner_headers)
    assert_problem(response, 422, "invalid cursor")


def test_submit_job_over_the_active_quota_is_429_with_retry_after(
    client: TestClient,
    owner_headers: dict[str, str],
    db: Session,
    sent: Sent,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(settings, "max_active_jobs_per_owner", 2)
    make_job(db, owner="alice", state="queued")
    make_job(db, owner="alice", state="running")
    make_job(db, owner="alice", state="succeeded")  # final jobs do not count
    response = client.post("/v1/jobs", json=SPEC, headers=owner_headers)
    assert_problem(response, 429, "2 jobs queued or running", "the limit is 2")
    assert response.headers["retry-after"] == "60"
    assert job_count(db) == 3 and sent == []


def test_active_quota_is_per_owner_and_frees_up_when_a_job_ends(
    client: TestClient,
    owner_headers: dict[str, str],
    other_headers: dict[str, str],
    db: Session,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(settings, "max_active_jobs_per_owner", 1)
    first = client.post("/v1/jobs", json=SPEC, headers=owner_headers)
    assert first.status_code == 202, first.text
    assert client.post("/v1/jobs", json=SPEC, headers=other_headers).status_code == 202
    assert_problem(client.post("/v1/jobs", json=SPEC, headers=owner_headers), 429)
    assert client.post(f"/v1/jobs/{first.json()['id']}/cancel", headers=owner_headers).is_success
    assert client.post("/v1/jobs", json=SPEC, headers=owner_headers).status_code == 202


def test_idempotent_replay_at_the_quota_replays_instead_of_429(
    client: TestClient,
    owner_headers: dict[str, str],
    db: Session,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(settings, "max_active_jobs_per_owner", 1)
    headers = {**owner_headers, "Idempotency-Key": "once"}
    first = client.post("/v1/jobs", json=SPEC, headers=headers)
    again = client.post("/v1/jobs", json=SPEC, headers=headers)
    assert first.status_code == again.status_code == 202, again.text
    assert again.json()["id"] == first.json()["id"] and job_count(db) == 1
    other_key = {**owner_headers, "Idempotency-Key": "twice"}
    assert_problem(client.post("/v1/jobs", json=SPEC, headers=other_key), 429, "limit is 1")


def test_active_quota_zero_means_unlimited(
    client: TestClient,
    owner_headers: dict[str, str],
    db: Session,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(settings, "max_active_jobs_per_owner", 0)
    for _ in range(25):  # above the default of 20
        make_job(db, owner="alice", state="queued")
    assert client.post("/v1/jobs", json=SPEC, headers=owner_headers).status_code == 202


def test_max_active_jobs_per_owner_reads_its_env_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert Settings().max_active_jobs_per_owner == 20
    monkeypatch.setenv("TID_MAX_ACTIVE_JOBS_PER_OWNER", "3")
    assert Settings().max_active_jobs_per_owner == 3
    monkeypatch.setenv("TID_MAX_ACTIVE_JOBS_PER_OWNER", "-1")
    with pytest.raises(ValueError, match="max_active_jobs_per_owner"):
        Settings()


@pytest.mark.parametrize(
    "path",
    [
        "/v1/jobs/" + "a" * 65,
        "/v1/jobs/a%00b",
        "/v1/jobs/a%20b/metrics",
        "/v1/datasets/" + "a" * 65,
        "/v1/models/a%00b",
    ],
    ids=["long-job", "nul-job", "space-job", "long-dataset", "nul-model"],
)
def test_malformed_id_in_the_url_is_422_before_any_lookup(
    client: TestClient, owner_headers: dict[str, str], path: str
) -> None:
    body = assert_problem(client.get(path, headers=owner_headers), 422)
    assert body["errors"][0]["loc"][0] == "path"


def test_list_jobs_cursor_with_a_nul_in_its_id_is_422(
    client: TestClient, owner_headers: dict[str, str]
) -> None:
    raw = b"2024-01-01T00:00:00+00:00|ab\x00cd"
    cursor = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    response = client.get("/v1/jobs", params={"cursor": cursor}, headers=owner_headers)
    assert_problem(response, 422, "invalid cursor")
