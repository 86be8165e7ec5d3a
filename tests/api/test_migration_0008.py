"""Migration 0008 (key expiry, dataset bytes, event-stream leases) keeps every key and dataset
row, up and down, on SQLite and, with `TID_TEST_POSTGRES_URL`, on PostgreSQL."""

from __future__ import annotations

from alembic import command
from databases import rows
from sqlalchemy import inspect, text

from store.db.migrate import alembic_config, upgrade
from store.db.session import get_engine

NOW = "2026-12-01 08:00:00"


def test_0008_adds_its_columns_and_table_and_its_downgrade_keeps_therows(empty_url: str) -> None:
    upgrade(empty_url, "0007")
    with get_engine(empty_url).begin() as conn:
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

    upgrade(empty_url, "0008")
    assert rows(empty_url, "SELECT id, owner, expires_at FROM api_keys") == [
        ("k" * 32, "alice", None)
    ]
    assert rows(empty_url, "SELECT id, bytes FROM datasets") == [("d" * 32, None)]
    with get_engine(empty_url).begin() as conn:
        conn.execute(text("UPDATE api_keys SET expires_at = :now"), {"now": NOW})
        conn.execute(text("UPDATE datasets SET bytes = 5000000000"))  # past 32 bits
        conn.execute(
            text("INSERT INTO event_streams (id, owner, expires_at) VALUES (:id, 'alice', :now)"),
            {"id": "s" * 32, "now": NOW},
        )
    assert rows(empty_url, "SELECT bytes FROM datasets") == [(5_000_000_000,)]
    assert rows(empty_url, "SELECT owner FROM event_streams") == [("alice",)]

    command.downgrade(alembic_config(empty_url), "0007")
    assert rows(empty_url, "SELECT id, owner, prefix FROM api_keys") == [
        ("k" * 32, "alice", "abcdefgh")
    ]
    assert rows(empty_url, "SELECT id, name FROM datasets") == [("d" * 32, "ds")]
    with get_engine(empty_url).connect() as conn:
        schema = inspect(conn)
        assert "event_streams" not in schema.get_table_names()
        assert "expires_at" not in {c["name"] for c in schema.get_columns("api_keys")}
        assert "bytes" not in {c["name"] for c in schema.get_columns("datasets")}
