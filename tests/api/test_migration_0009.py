"""Migration 0009 (workers, job_nodes, jobs.nnodes and waiting_reason) keeps every job row, up
and down, on SQLite and, with `TID_TEST_POSTGRES_URL`, on PostgreSQL: the jobs there before it
ran on one node."""

from __future__ import annotations

from alembic import command
from databases import rows
from sqlalchemy import inspect, text

from store.db.migrate import alembic_config, upgrade
from store.db.session import get_engine

NOW = "2026-12-01 08:00:00"


def test_0009_adds_its_tables_and_columns_and_its_downgrade_keeps_the_jobs(empty_url: str) -> None:
    upgrade(empty_url, "0008")
    with get_engine(empty_url).begin() as conn:
        conn.execute(
            text(
                "INSERT INTO jobs (id, owner, name, spec, method, state, attempt, handbacks,"
                " max_attempts, cancel_requested, events_offset, step, send_count, created_at,"
                " queued_at, updated_at) VALUES (:id, 'alice', 'j', '{}', 'none', 'running', 1,"
                " 0, 3, false, 0, 4, 1, :now, :now, :now)"
            ),
            {"id": "a" * 32, "now": NOW},
        )

    upgrade(empty_url, "0009")
    assert rows(empty_url, "SELECT id, nnodes, waiting_reason FROM jobs") == [("a" * 32, 1, None)]
    with get_engine(empty_url).begin() as conn:
        conn.execute(text("UPDATE jobs SET nnodes = 2, waiting_reason = 'waiting'"))
        conn.execute(
            text(
                "INSERT INTO workers (name, queue, address, device, gpus, state, job_id,"
                " heartbeat_at, started_at) VALUES ('w1', 'tid.node.w1', '10.0.0.2', 'cuda',"
                " '[\"0\", \"1\"]', 'busy', :job, :now, :now)"
            ),
            {"job": "a" * 32, "now": NOW},
        )
        conn.execute(
            text(
                "INSERT INTO job_nodes (job_id, attempt, node_rank, worker, address,"
                " lease_expires) VALUES (:job, 1, 0, 'w1', '10.0.0.2', :now)"
            ),
            {"job": "a" * 32, "now": NOW},
        )
    assert rows(empty_url, "SELECT name, state, job_id FROM workers") == [("w1", "busy", "a" * 32)]
    assert rows(empty_url, "SELECT job_id, attempt, node_rank, worker FROM job_nodes") == [
        ("a" * 32, 1, 0, "w1")
    ]

    command.downgrade(alembic_config(empty_url), "0008")
    assert rows(empty_url, "SELECT id, state, attempt FROM jobs") == [("a" * 32, "running", 1)]
    with get_engine(empty_url).connect() as conn:
        schema = inspect(conn)
        assert not {"workers", "job_nodes"} & set(schema.get_table_names())
        columns = {c["name"] for c in schema.get_columns("jobs")}
        assert not {"nnodes", "waiting_reason"} & columns
