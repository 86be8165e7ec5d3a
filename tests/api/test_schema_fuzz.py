"""Schemathesis over the app's own OpenAPI schema: generated requests, valid and invalid, to
every operation must get no 5xx and only responses the schema declares (status, media type,
body, headers). Runs in-process on the test app; tasks are recorded by `sent`, not sent.

Half the ids in URLs are of rows the test inserted (the caller's job with an exported
student, events and metrics; its dataset and model; another owner's job), so the handlers
behind the 404 run too. The job is final, so its event stream ends after its rows."""

from __future__ import annotations

import hashlib

import hypothesis
import pytest
import schemathesis
from factories import add_artifact, add_event, add_metrics, make_dataset, make_job, make_model
from fastapi import FastAPI
from schemathesis import Case
from sqlalchemy.orm import Session
from support import Sent

from api.app import create_app
from store.db.models import ApiKey
from store.settings import Settings

JOB, OTHERS_JOB, DATASET, MODEL = "a" * 32, "b" * 32, "c" * 32, "d" * 32
PREFIX, SECRET = "fuzzfuzz", "s" * 43  # alice's key, stored as store.keys stores keys
SEEDED_SHARE = 0.5  # of the ids in URLs

CONFIG = schemathesis.Config.from_dict(
    {
        "auth": {"openapi": {"HTTPBearer": {"bearer": f"tid_{PREFIX}_{SECRET}"}}},
        "checks": {
            # Schema-valid is not always acceptable: a dataset path must exist under an allowed
            # root, an upload must be a COCO zip, a cursor one we issued. Those are 422s by design.
            "positive_data_acceptance": {"enabled": False},
            # An oversized invalid body is refused before it is parsed: 413 is a rejection too.
            "negative_data_rejection": {
                "expected-statuses": ["400", "401", "404", "405", "413", "422", "429"]
            },
        },
        # FastAPI ignores query parameters and headers it does not know, as most HTTP APIs do.
        "generation": {"allow-extra-parameters": False},
        "dictionaries": {
            "ids": {"values": [JOB, OTHERS_JOB, DATASET, MODEL]},
            "artifacts": {"values": ["student.pt", "student.safetensors"]},
        },
        "parameters": {
            **{
                f"path.{name}": {"dictionary": "ids", "probability": SEEDED_SHARE}
                for name in ("job_id", "dataset_id", "model_id")
            },
            "path.name": {"dictionary": "artifacts", "probability": SEEDED_SHARE},
        },
        "operations": [
            {
                # GET /v1/datasets/upload is read_dataset("upload") (a 404), so a 405 there
                # rightly allows GET, which the schema lists under /v1/datasets/{dataset_id}.
                "include-name": "POST /v1/datasets/upload",
                "checks": {"allow_header_conformance": {"enabled": False}},
            },
        ],
    }
)
# The schema does not depend on the settings; each test calls an app on its own test settings.
schema = schemathesis.openapi.from_dict(create_app(Settings()).openapi(), config=CONFIG)


@pytest.fixture
def app(settings: Settings, sent: Sent, db: Session) -> FastAPI:
    """One app per operation (its examples share the database), with the seeded rows."""
    db.add(
        ApiKey(owner="alice", prefix=PREFIX, key_hash=hashlib.sha256(SECRET.encode()).hexdigest())
    )
    job = make_job(db, owner="alice", id=JOB)
    add_artifact(db, settings, job, name="student.pt", content=b"weights" * 100)
    add_event(db, job, "state", {"state": "succeeded"})
    add_metrics(db, job, [(1, "loss", 1.0)])
    make_job(db, owner="bob", id=OTHERS_JOB)
    make_dataset(db, owner="alice", id=DATASET)
    make_model(db, owner="alice", id=MODEL)
    return create_app(settings)


@schema.parametrize()
@hypothesis.settings(
    max_examples=100,  # 1 to 2 minutes for all operations, one core (mostly generating them)
    deadline=None,
    derandomize=True,  # the same examples in every run: a CI failure reproduces locally
    suppress_health_check=list(hypothesis.HealthCheck),
)
def test_api_answers_every_generated_request_as_its_schema_says(case: Case, app: FastAPI) -> None:
    case.operation.schema.app = app  # checks that re-send a request (without the key...) use it
    case.call_and_validate(app=app)
