"""The application as a whole: start-up check, auth, problem+json everywhere, body limits."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from factories import make_settings
from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlalchemy.orm import Session
from support import Sent, assert_problem

from api.app import create_app
from api.problems import PROBLEM_JSON
from store.db.migrate import NotMigratedError, upgrade
from store.db.models import ApiKey, utcnow
from store.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_app_refuses_to_start_on_unmigrated_database(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path))
    with pytest.raises(NotMigratedError, match="tid db upgrade"), TestClient(app):
        pass


def test_a_worker_starts_without_importing_torch(tmp_path: Path) -> None:
    """A worker's trainer runs in its own process, so a worker starts (and a deploy rolls) in
    about a second instead of six. The worker imports tid_core inside the functions that need
    it, which the import contracts (pyproject.toml) cannot tell from a module-level import: this
    runs what a worker imports when it starts."""
    code = "import worker.celery_app, worker.tasks, sys; assert 'torch' not in sys.modules"
    env = {**os.environ, "TID_DATA_ROOT": str(tmp_path)}  # the broker's folders: not in ROOT
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=False
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


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/datasets"])
def test_json_nested_100000_deep_is_400_problem(
    owner_headers: dict[str, str], settings: Settings, sent: Sent, path: str
) -> None:
    roomy = settings.model_copy(update={"max_json_bytes": 1 << 20})  # under the size limit
    headers = {**owner_headers, "Content-Type": "application/json"}
    with TestClient(create_app(roomy)) as client:
        for body in (b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 100_000 + b"1" + b"}" * 100_000):
            response = client.post(path, content=body, headers=headers)
            assert_problem(response, 400, "JSON body nested too deeply")


def test_wrong_method_is_405_allowing_every_method_of_the_path(
    client: TestClient, owner_headers: dict[str, str]
) -> None:
    # GET and POST /v1/jobs are two routes: Starlette alone would name only the first one's
    response = client.request("OPTIONS", "/v1/jobs", headers=owner_headers)
    assert_problem(response, 405, "Method Not Allowed")
    assert response.headers["allow"] == "GET, POST"
    response = client.put("/v1/models", headers=owner_headers)
    assert_problem(response, 405)
    assert response.headers["allow"] == "GET, POST"


def _operations(schema: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{method.upper()} {path}", operation)
        for path, item in schema["paths"].items()
        for method, operation in item.items()
    ]


def test_openapi_documents_every_error_as_problem_json(settings: Settings) -> None:
    schema = create_app(settings).openapi()
    for name, operation in _operations(schema):
        responses = operation["responses"]
        if operation.get("security"):
            assert "401" in responses, name
        if operation.get("parameters") or operation.get("requestBody"):
            assert "422" in responses, name
        for status, response in responses.items():
            if int(status) >= 400:
                assert list(response["content"]) == [PROBLEM_JSON], (name, status)
                body = response["content"][PROBLEM_JSON]["schema"]
                assert body == {"$ref": "#/components/schemas/Problem"}, (name, status)
    problem = schema["components"]["schemas"]["Problem"]
    assert problem["required"] == ["type", "title", "status", "detail", "instance"]
    assert "HTTPValidationError" not in schema["components"]["schemas"]


def _unbounded(schema: dict[str, Any], defs: dict[str, Any], where: str) -> list[str]:
    """Where a request value can be as large as the client likes (uploaded files are capped
    by `max_upload_bytes` instead)."""
    if "$ref" in schema:
        return _unbounded(defs[schema["$ref"].rsplit("/", 1)[-1]], defs, where)
    found = []
    for key in ("anyOf", "oneOf", "allOf"):
        for i, option in enumerate(schema.get(key, [])):
            found += _unbounded(option, defs, f"{where}.{key}[{i}]")
    kind = schema.get("type")
    if "enum" in schema or "const" in schema or kind in ("boolean", "null"):
        return found
    if kind in ("integer", "number"):
        has_min = "minimum" in schema or "exclusiveMinimum" in schema
        has_max = "maximum" in schema or "exclusiveMaximum" in schema
        if not (has_min and has_max):
            found.append(where)
    elif kind == "string" and "maxLength" not in schema and "contentMediaType" not in schema:
        found.append(where)
    elif kind == "array":
        if "maxItems" not in schema:
            found.append(where)
        items = schema.get("items") or {}
        found += _unbounded(items, defs, f"{where}[]")
        for i, item in enumerate(schema.get("prefixItems", [])):
            found += _unbounded(item, defs, f"{where}[{i}]")
    elif kind == "object":
        for prop, sub in schema.get("properties", {}).items():
            found += _unbounded(sub, defs, f"{where}.{prop}")
        if schema.get("additionalProperties", False) is not False:
            found.append(f"{where}.*")
    return found


def test_every_request_value_in_the_openapi_schema_is_bounded(settings: Settings) -> None:
    schema = create_app(settings).openapi()
    defs = schema["components"]["schemas"]
    found = []
    for name, operation in _operations(schema):
        for parameter in operation.get("parameters", []):
            where = f"{name} {parameter['in']}.{parameter['name']}"
            found += _unbounded(parameter["schema"], defs, where)
        for media in operation.get("requestBody", {}).get("content", {}).values():
            found += _unbounded(media["schema"], defs, f"{name} body")
    assert found == []
