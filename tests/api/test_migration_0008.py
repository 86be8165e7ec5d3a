"""Migration 0008 (key expiry, dataset bytes, event-stream leases) keeps every key and dataset
row, up and down, on SQLite and, with `TID_TEST_POSTGRES_URL`, on PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from databases import POSTGRES, postgres_database
from factories import make_settings
from sqlalchemy import inspect, text

from store.db.migrate import alembic_config, upgrade
from store.db.session import get_engine

NOW = "2026-12-01 08:00:00"


@pytest.fixture(params=["sqlite"] + (["postgresql"] if POSTGRES else []))
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield make_settings(tmp_path).database_url
        return
    with postgres_database() as url:
        yield url


def _rows(url: str, query: str) -> list[tuple[object, ...]]:
    with get_engine(url).connect() as conn:
        return [tuple(row) for row in conn.execute(text(query))]


def test_0008_adds_its_columns_and_table_and_its_downgrade_keeps_the_rows(url: str) -> None:
    upgrade(url, "0007")
    with get_engine(url).begin() as conn:
        conn.execute(
            text(
                "INSERT INTO api_keys (id, owner, prefix, key_hash, created_at, revoked_at)"
                " VALUES (:id, 'alice', 'abcdefgh', :hash, :now, NULL)"
            ),
            {"id": "k" * 32, "hash": "0" * 64, "now": NOW},
        )
        conn.execute(
            text(
                "INSERT INTO datasets (id, owner, name, kind, source, path, state, created_at)"
                " VALUES (:id, 'alice', 'ds', 'upload', '{}', '/d', 'ready', :now)"
            ),
            {"id": "d" * 32, "now": NOW},
        )

    upgrade(url, "0008")
    assert _rows(url, "SELECT id, owner, expires_at FROM api_keys") == [("k" * 32, "alice", None)]
    assert _rows(url, "SELECT id, bytes FROM datasets") == [("d" * 32, None)]
    with get_engine(url).begin() as conn:
        conn.execute(text("UPDATE api_keys SET expires_at = :now"), {"now": NOW})
        conn.execute(text("UPDATE datasets SET bytes = 5000000000"))  # past 32 bits
        conn.execute(
            text("INSERT INTO event_streams (id, owner, expires_at) VALUES (:id, 'alice', :now)"),
            {"id": "s" * 32, "now": NOW},
        )
    assert _rows(url, "SELECT bytes FROM datasets") == [(5_000_000_000,)]
    assert _rows(url, "SELECT owner FROM event_streams") == [("alice",)]

    command.downgrade(alembic_config(url), "0007")
    assert _rows(url, "SELECT id, owner, prefix FROM api_keys") == [("k" * 32, "alice", "abcdefgh")]
    assert _rows(url, "SELECT id, name FROM datasets") == [("d" * 32, "ds")]
    with get_engine(url).connect() as conn:
        schema = inspect(conn)
        assert "event_streams" not in schema.get_table_names()
        assert "expires_at" not in {c["name"] for c in schema.get_columns("api_keys")}
        assert "bytes" not in {c["name"] for c in schema.get_columns("datasets")}
