"""`/metrics`: Prometheus series of the API's HTTP traffic and of the jobs in the database.

The job series are SQL aggregates whose spelling differs by dialect, so these tests run on
SQLite and, where `TID_TEST_POSTGRES_URL` is set (`.ci/run`), on PostgreSQL as well."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from databases import POSTGRES, postgres_database
from factories import make_job, make_settings
from fastapi.testclient import TestClient
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session
from support import Sent, assert_problem

from api.app import create_app
from api.metrics import ServiceCollector
from store.db.migrate import upgrade
from store.db.models import utcnow
from store.settings import Settings


@pytest.fixture(params=["sqlite"] + (["postgresql"] if POSTGRES else []))
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Settings]:
    with contextlib.ExitStack() as exits:
        settings = make_settings(tmp_path)
        if request.param == "postgresql":
            url = exits.enter_context(postgres_database())
            settings = Settings(**{**settings.model_dump(), "database_url": url})
        upgrade(settings.database_url)
        yield settings


def scrape(
    client: TestClient, headers: dict[str, str] | None = None
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def test_metrics_count_jobs_by_state_queue_attempts_and_durations(
    client: TestClient, db: Session
) -> None:
    make_job(db, owner="alice", state="queued")
    make_job(db, owner="bob", state="queued")
    make_job(db, owner="alice", state="running", lease_expires=utcnow() - timedelta(minutes=1))
    start = utcnow() - timedelta(minutes=10)
    make_job(db, owner="alice", state="succeeded", attempt=3, handbacks=1, started_at=start)
    make_job(db, owner="bob", state="failed", started_at=utcnow() - timedelta(hours=2))

    series = scrape(client)

    assert series[("tid_database_up", ())] == 1
    jobs = {s: series[("tid_jobs", (("state", s),))] for s in ("queued", "running", "succeeded")}
    assert jobs == {"queued": 2, "running": 1, "succeeded": 1}
    assert series[("tid_jobs", (("state", "cancelled"),))] == 0
    assert series[("tid_queue_depth", ())] == 2
    assert series[("tid_expired_leases", ())] == 1
    assert series[("tid_job_attempts_total", ())] == 1 + 3 + 1
    assert series[("tid_job_handbacks_total", ())] == 1
    ok = (("state", "succeeded"),)
    assert series[("tid_job_duration_seconds_count", ok)] == 1
    assert 599 < series[("tid_job_duration_seconds_sum", ok)] < 700
    assert series[("tid_job_duration_seconds_bucket", (("le", "300.0"), *ok))] == 0
    assert series[("tid_job_duration_seconds_bucket", (("le", "900.0"), *ok))] == 1
    failed = (("le", "3600.0"), ("state", "failed"))
    assert series[("tid_job_duration_seconds_bucket", failed)] == 0
    assert series[("tid_job_duration_seconds_bucket", (("le", "+Inf"), ("state", "failed")))] == 1
    assert series[("tid_job_duration_seconds_count", (("state", "cancelled"),))] == 0


def test_the_duration_histogram_counts_each_job_in_every_bucket_it_fits(
    client: TestClient, db: Session
) -> None:
    """The buckets are cumulative, as Prometheus wants them; jobs never started are left out."""
    end = utcnow()
    for minutes in (0.5, 4, 4, 20, 150):
        make_job(
            db,
            owner="alice",
            state="succeeded",
            started_at=end - timedelta(minutes=minutes),
            finished_at=end,
        )
    make_job(db, owner="alice", state="cancelled", started_at=None)  # cancelled while queued

    series = scrape(client)

    ok = (("state", "succeeded"),)
    buckets = {
        le: series[("tid_job_duration_seconds_bucket", (("le", le), *ok))]
        for le in ("60.0", "300.0", "900.0", "1800.0", "3600.0", "10800.0", "+Inf")
    }
    assert buckets == {
        "60.0": 1,
        "300.0": 3,
        "900.0": 3,
        "1800.0": 4,
        "3600.0": 4,
        "10800.0": 5,
        "+Inf": 5,
    }
    assert series[("tid_job_duration_seconds_count", ok)] == 5
    expected_sum = 60 * (0.5 + 4 + 4 + 20 + 150)
    assert series[("tid_job_duration_seconds_sum", ok)] == pytest.approx(expected_sum, abs=0.1)
    assert series[("tid_jobs", (("state", "cancelled"),))] == 1
    assert series[("tid_job_duration_seconds_count", (("state", "cancelled"),))] == 0


def test_metrics_with_a_token_want_it(settings: Settings, sent: Sent) -> None:
    token = "s3cret-token"
    guarded = Settings(**{**settings.model_dump(), "metrics_token": token})
    with TestClient(create_app(guarded)) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {token}"}):
            response = client.get("/metrics", headers=headers)
            assert_problem(response, 401, "TID_METRICS_TOKEN")
            assert response.headers["www-authenticate"] == "Bearer"
        series = scrape(client, {"Authorization": f"Bearer {token}"})
    assert series[("tid_database_up", ())] == 1


def test_metrics_count_http_requests_by_route_template(
    client: TestClient, owner_headers: dict[str, str]
) -> None:
    for _ in range(3):
        client.get("/v1/jobs", headers=owner_headers)
    client.get("/v1/jobs/0123", headers=owner_headers)  # a 404, counted under its template

    series = scrape(client)

    listed = (("handler", "/v1/jobs"), ("method", "GET"), ("status", "2xx"))
    assert series[("http_requests_total", listed)] == 3
    missing = (("handler", "/v1/jobs/{job_id}"), ("method", "GET"), ("status", "4xx"))
    assert series[("http_requests_total", missing)] == 1
    assert (
        "http_request_duration_seconds_count",
        (("handler", "/v1/jobs"), ("method", "GET")),
    ) in series


def test_metrics_without_the_database_still_answer(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def database_down(self: ServiceCollector) -> Iterator[Metric]:
        raise OperationalError("SELECT", {}, Exception("connection refused"))

    monkeypatch.setattr(ServiceCollector, "_from_database", database_down)
    series = scrape(client)
    assert series[("tid_database_up", ())] == 0
    assert not any(name == "tid_jobs" for name, _ in series)
