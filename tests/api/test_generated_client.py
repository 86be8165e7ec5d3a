"""A client generated from the OpenAPI schema the way a new user makes one (openapi-python-client):
the generator must take the schema without a warning, since it drops every response it cannot
type, and the client must parse the API's answers, problems included, into its typed models."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from factories import make_settings
from fastapi.testclient import TestClient

from api.app import create_app

PACKAGE = "tid_generated_client"
JOB_OPERATIONS = (  # the generated modules, named by FastAPI's operation ids
    "submit_job_v1_jobs_post",
    "read_job_v1_jobs_job_id_get",
    "list_jobs_v1_jobs_get",
    "cancel_job_v1_jobs_job_id_cancel_post",
)


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Generates the client package once for the module and makes it importable."""
    root = tmp_path_factory.mktemp("generated")
    schema = root / "openapi.json"
    schema.write_text(json.dumps(create_app(make_settings(root)).openapi()))
    config = root / "config.yaml"
    config.write_text("post_hooks: []\n")  # its ruff fix-and-format pass: seconds, not tested
    command = [sys.executable, "-m", "openapi_python_client", "generate", "--meta", "none"]
    result = subprocess.run(
        [*command, "--path", schema, "--output-path", root / PACKAGE, "--config", config],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "warning" not in output.lower() and "invalid" not in output.lower(), output
    sys.path.insert(0, str(root))
    yield
    sys.path.remove(str(root))
    for name in [name for name in sys.modules if name.partition(".")[0] == PACKAGE]:
        del sys.modules[name]


def _module(name: str) -> Any:
    return importlib.import_module(f"{PACKAGE}.{name}")


def _api_client(client: TestClient, headers: dict[str, str]) -> Any:
    """The generated client on the test app: it takes any httpx-style client."""
    client.headers.update(headers)
    return _module("client").Client(base_url=str(client.base_url)).set_httpx_client(client)


def test_a_422_parses_into_the_typed_problem(
    generated: None, client: TestClient, owner_headers: dict[str, str]
) -> None:
    models, types = _module("models"), _module("types")
    submit = _module("api.jobs.submit_job_v1_jobs_post")
    api = _api_client(client, owner_headers)
    shapes = models.BuiltinDataset.from_dict({"builtin": "shapes"})  # an enum or a literal

    response = submit.sync_detailed(client=api, body=models.JobSpec(name="x" * 200, dataset=shapes))
    problem = response.parsed
    assert response.status_code == 422 and isinstance(problem, models.Problem), response.content
    assert problem.status == 422 and problem.type_ == "about:blank"
    [error] = problem.errors
    assert isinstance(error, models.ProblemFieldError)
    assert error.loc == ["body", "name"] and error.type_ == "string_too_long"
    assert problem.additional_properties == {} and error.additional_properties == {}

    # a domain error's item has no pydantic `type`: the model leaves it unset, not None
    unknown = models.JobSpec(dataset=models.IdDataset(id="nosuch"))
    problem = submit.sync(client=api, body=unknown)
    assert isinstance(problem, models.Problem) and problem.status == 422
    [error] = problem.errors
    assert error.loc == ["body", "dataset", "id"] and isinstance(error.type_, types.Unset)


def test_a_job_is_submitted_read_listed_and_cancelled_with_typed_models(
    generated: None, client: TestClient, owner_headers: dict[str, str]
) -> None:
    models = _module("models")
    jobs = {name: _module(f"api.jobs.{name}") for name in JOB_OPERATIONS}
    api = _api_client(client, owner_headers)
    shapes = models.BuiltinDataset.from_dict({"builtin": "shapes"})
    spec = models.JobSpec(name="generated", dataset=shapes)

    job = jobs["submit_job_v1_jobs_post"].sync(client=api, body=spec)
    assert isinstance(job, models.JobPublic) and job.state == "queued"
    read = jobs["read_job_v1_jobs_job_id_get"].sync(client=api, job_id=job.id)
    assert isinstance(read, models.JobPublic) and read.id == job.id
    listed = jobs["list_jobs_v1_jobs_get"].sync(client=api)
    assert isinstance(listed, models.JobsPublic) and [j.id for j in listed.data] == [job.id]
    cancel = jobs["cancel_job_v1_jobs_job_id_cancel_post"]
    cancelled = cancel.sync(client=api, job_id=job.id)
    assert isinstance(cancelled, models.JobPublic) and cancelled.state == "cancelled"

    again = cancel.sync(client=api, job_id=job.id)
    assert isinstance(again, models.Problem) and again.status == 409
    missing = jobs["read_job_v1_jobs_job_id_get"].sync(client=api, job_id="nosuch")
    assert isinstance(missing, models.Problem) and missing.status == 404
