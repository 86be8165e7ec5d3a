"""API fixtures: a migrated SQLite database (a copy of one migrated once) and data root per test,
an app on them, API keys for two owners, and the tasks the API sends (recorded instead of
reaching a broker: the workers have their own tests)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from databases import POSTGRES, copy_sqlite, postgres_database
from factories import make_settings
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session
from support import Sent

import store.queue
from api.app import create_app
from store.db.session import get_sessionmaker, session_scope
from store.keys import create_key
from store.settings import Settings


@pytest.fixture
def settings(tmp_path: Path, migrated_sqlite: Path) -> Settings:
    settings = make_settings(tmp_path)
    copy_sqlite(migrated_sqlite, settings.database_url)
    return settings


@pytest.fixture
def db(settings: Settings) -> Iterator[Session]:
    """A session of the test's own, for factories and for reading back what the API wrote."""
    session = get_sessionmaker(settings.database_url)()
    yield session
    session.close()


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> Sent:
    calls: Sent = []

    def record(settings: Settings, task: str, *args: str) -> None:
        calls.append((task, args))

    monkeypatch.setattr(store.queue, "send", record)
    return calls


@pytest.fixture
def client(settings: Settings, sent: Sent) -> Iterator[TestClient]:
    app = create_app(settings)
    with TestClient(app) as client:
        yield client


def _headers(settings: Settings, owner: str) -> dict[str, str]:
    with session_scope(settings.database_url) as session:
        key = create_key(session, owner=owner)
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def owner_headers(settings: Settings) -> dict[str, str]:
    return _headers(settings, "alice")


@pytest.fixture
def other_headers(settings: Settings) -> dict[str, str]:
    return _headers(settings, "bob")


@pytest.fixture(params=["sqlite"] + (["postgresql"] if POSTGRES else []))
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database: SQLite, and PostgreSQL where `TID_TEST_POSTGRES_URL` is set."""
    if request.param == "sqlite":
        yield make_settings(tmp_path).database_url
        return
    with postgres_database() as url:
        yield url
