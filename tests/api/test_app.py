"""The application as a whole: start-up check, auth, problem+json everywhere, body limits."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from factories import make_settings
from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlalchemy.orm import Session
from support import assert_problem

from api.app import create_app
from api.db.migrate import NotMigratedError, upgrade
from api.db.models import ApiKey, utcnow
from api.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_app_refuses_to_start_on_unmigrated_database(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path))
    with pytest.raises(NotMigratedError, match="tid db upgrade"), TestClient(app):
        pass


def test_import_api_app_does_not_import_torch() -> None:
    code = "import api.app, sys; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer tid_AAAAAAAA_wrong"},
        {"Authorization": "Bearer not-a-key"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
    ],
    ids=["missing", "unknown", "malformed", "not-bearer"],
)
def test_request_without_valid_key_is_401(client: TestClient, headers: dict[str, str]) -> None:
    response = client.get("/v1/jobs", headers=headers)
    assert_problem(response, 401, "API key")
    assert response.headers["www-authenticate"] == "Bearer"


def test_tampered_secret_is_401(client: TestClient, owner_headers: dict[str, str]) -> None:
    tampered = owner_headers["Authorization"][:-2] + "xx"
    assert_problem(client.get("/v1/jobs", headers={"Authorization": tampered}), 401)


def test_revoked_key_is_401(client: TestClient, db: Session, owner_headers: dict[str, str]) -> None:
    assert client.get("/v1/jobs", headers=owner_headers).status_code == 200
    db.execute(update(ApiKey).values(revoked_at=utcnow()))
    db.commit()
    assert_problem(client.get("/v1/jobs", headers=owner_headers), 401, "revoked")


def test_unknown_route_and_method_are_problems(
    client: TestClient, owner_headers: dict[str, str]
) -> None:
    assert_problem(client.get("/v1/nothing", headers=owner_headers), 404)
    assert_problem(client.delete("/v1/jobs", headers=owner_headers), 405)


def test_json_body_over_the_limit_is_413(
    client: TestClient, owner_headers: dict[str, str], settings: Settings
) -> None:
    big = b'{"name": "' + b"x" * settings.max_json_bytes + b'"}'
    headers = {**owner_headers, "Content-Type": "application/json"}
    assert_problem(client.post("/v1/jobs", content=big, headers=headers), 413, "larger than")
    # without a Content-Length (chunked), the body is cut off as it crosses the limit
    chunked = client.post("/v1/jobs", content=iter([big[:9000], big[9000:]]), headers=headers)
    assert_problem(chunked, 413, "larger than")


def test_healthz_and_readyz_are_200(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json() == {"status": "ok"}


def test_readyz_is_503_when_the_broker_folder_is_gone(
    client: TestClient, settings: Settings
) -> None:
    (settings.broker_dir / "queue").rmdir()
    assert_problem(client.get("/readyz"), 503, "broker")


def test_readyz_is_503_when_redis_is_unreachable(tmp_path: Path) -> None:
    settings = make_settings(tmp_path).model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    upgrade(settings.database_url)
    with TestClient(create_app(settings)) as client:
        assert_problem(client.get("/readyz"), 503, "broker unreachable")
