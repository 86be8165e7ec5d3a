"""PostgreSQL for the tests that also run against it: the shared server of
`TID_TEST_POSTGRES_URL` (set by `.ci/run`), with a database of their own per test; the service
backends the integration tests run on; and a test's own SQLite database, copied from one
migrated once (tests/conftest.py)."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import make_url, text

from store.db.session import get_engine

POSTGRES = os.environ.get(
    "TID_TEST_POSTGRES_URL"
)  # e.g. postgresql://postgres@127.0.0.1:5432/postgres
REDIS = os.environ.get("TID_TEST_REDIS_URL")  # e.g. redis://127.0.0.1:6379
# the service stacks the integration tests run on (tests/integration/conftest.py)
BACKENDS = ["embedded"] + (["postgres-redis"] if POSTGRES and REDIS else [])
# a test about what the service does on any backend runs once: on PostgreSQL and Redis where
# they are configured (CI), else on the embedded ones
ANY_BACKEND = BACKENDS[-1:]


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """The URL of a new, empty database on the shared server, dropped afterwards."""
    import psycopg

    assert POSTGRES
    name = f"tid_it_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield POSTGRES.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(POSTGRES, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def copy_sqlite(template: Path, url: str) -> None:
    """A new SQLite database at `url` (`sqlite:///PATH`) holding what `template` holds: its
    schema, at its migration. SQLite's backup API copies what is committed, WAL included."""
    path = Path(str(make_url(url).database))
    path.parent.mkdir(parents=True, exist_ok=True)
    with (
        contextlib.closing(sqlite3.connect(template)) as source,
        contextlib.closing(sqlite3.connect(path)) as copy,
    ):
        source.backup(copy)


def rows(url: str, query: str) -> list[tuple[object, ...]]:
    """Every row `query` returns, as tuples."""
    with get_engine(url).connect() as conn:
        return [tuple(row) for row in conn.execute(text(query))]
