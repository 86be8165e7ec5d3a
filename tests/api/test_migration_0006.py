"""Migration 0006 (delivery counters on datasets and models) keeps every row, up and down, on
SQLite and, with `TID_TEST_POSTGRES_URL`, on PostgreSQL."""

from __future__ import annotations

from alembic import command
from sqlalchemy import inspect, text

from store.db.migrate import alembic_config, upgrade
from store.db.session import get_engine

NOW = "2026-12-01 08:00:00"


def _rows(empty_url: str, table: str, *columns: str) -> list[tuple[object, ...]]:
    with get_engine(empty_url).connect() as conn:
        query = f"SELECT {', '.join(columns)} FROM {table} ORDER BY id"
        return [tuple(row) for row in conn.execute(text(query))]


def test_0006_counts_no_delivery_yet_and_its_downgrade_keeps_the_rows(empty_url: str) -> None:
    upgrade(empty_url, "0005")
    with get_engine(empty_url).begin() as conn:
        for id_, state in (("a" * 32, "pending"), ("b" * 32, "ready")):
            conn.execute(
                text(
                    "INSERT INTO datasets (id, owner, name, kind, source, path, state,"
                    " created_at) VALUES (:id, 'alice', 'd', 'upload', '{}', '/d', :state, :now)"
                ),
                {"id": id_, "state": state, "now": NOW},
            )
            conn.execute(
                text(
                    "INSERT INTO models (id, owner, name, path, sha256, bytes, state, created_at)"
                    " VALUES (:id, 'alice', 'm', '/m', :sha, 1, :state, :now)"
                ),
                {"id": id_, "sha": "0" * 64, "state": state, "now": NOW},
            )

    upgrade(empty_url, "0006")
    for table in ("datasets", "models"):
        assert _rows(empty_url, table, "id", "state", "deliveries") == [
            ("a" * 32, "pending", 0),
            ("b" * 32, "ready", 0),
        ]

    command.downgrade(alembic_config(empty_url), "0005")
    with get_engine(empty_url).connect() as conn:
        for table in ("datasets", "models"):
            assert "deliveries" not in {c["name"] for c in inspect(conn).get_columns(table)}
    for table in ("datasets", "models"):
        assert _rows(empty_url, table, "id", "state") == [
            ("a" * 32, "pending"),
            ("b" * 32, "ready"),
        ]
