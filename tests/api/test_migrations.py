"""Alembic is the only way tables appear: the migrations must build exactly the models."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from factories import make_settings
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError

from store.db.migrate import alembic_config, upgrade
from store.db.models import Base
from store.db.session import get_engine
from store.settings import Settings


def test_migrations_at_head_match_the_models(settings: Settings) -> None:
    with get_engine(settings.database_url).connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []


def test_0003_keeps_map_only_in_evaluations_and_its_downgrade_restores_the_copies(
    tmp_path: Path,
) -> None:
    url = make_settings(tmp_path).database_url
    upgrade(url, "0002")
    now = "2026-12-01 08:00:00"
    with get_engine(url).begin() as conn:
        for job_id, best_ap in (("a" * 32, 12.5), ("b" * 32, None)):
            conn.execute(
                text(
                    "INSERT INTO jobs (id, owner, name, spec, method, state, attempt, handbacks,"
                    " max_attempts, cancel_requested, events_offset, step, best_ap, created_at,"
                    " queued_at, updated_at) VALUES (:id, 'alice', 'j', '{}', 'tid', 'succeeded',"
                    " 1, 0, 3, false, 0, 4, :best_ap, :now, :now, :now)"
                ),
                {"id": job_id, "best_ap": best_ap, "now": now},
            )
        conn.execute(
            text(
                "INSERT INTO evaluations (job_id, attempt, epoch, step, ap, ap50, ap75, aps, apm,"
                " apl, per_class, backend, created_at) VALUES (:job, 1, 1, 4, 12.5, 30.0, 10.0,"
                " NULL, 5.0, 20.0, '{}', 'faster-coco-eval', :now)"
            ),
            {"job": "a" * 32, "now": now},
        )
        rows = [(4, "loss", 1.0), (4, "eval/AP", 12.5), (4, "eval/AP50", 30.0)]
        rows += [(4, "eval/AP75", 11.0)]  # a value no evaluation holds (none should exist)
        for step, name, value in rows:
            conn.execute(
                text(
                    "INSERT INTO metrics (job_id, attempt, step, name, value, created_at)"
                    " VALUES (:job, 1, :step, :name, :value, :now)"
                ),
                {"job": "a" * 32, "step": step, "name": name, "value": value, "now": now},
            )

    def metrics() -> set[tuple[str, float]]:
        with get_engine(url).connect() as conn:
            return {(r.name, r.value) for r in conn.execute(text("SELECT * FROM metrics"))}

    upgrade(url)
    assert metrics() == {("loss", 1.0), ("eval/AP75", 11.0)}  # the copies went, the odd one stays
    with get_engine(url).connect() as conn:
        assert "best_ap" not in {c["name"] for c in inspect(conn).get_columns("jobs")}
        assert conn.execute(text("SELECT count(*) FROM evaluations")).scalar() == 1

    command.downgrade(alembic_config(url), "0002")
    assert metrics() == {
        ("loss", 1.0),
        ("eval/AP", 12.5),
        ("eval/AP50", 30.0),
        ("eval/AP75", 11.0),  # kept: not written again beside the evaluation's 10.0
        ("eval/APm", 5.0),
        ("eval/APl", 20.0),
    }
    with get_engine(url).connect() as conn:
        best = {r.id: r.best_ap for r in conn.execute(text("SELECT id, best_ap FROM jobs"))}
    assert best == {"a" * 32: 12.5, "b" * 32: None}


def test_0007_keeps_the_latest_attempts_row_per_step_and_name_and_makes_it_unique(
    empty_url: str,
) -> None:
    url = empty_url
    upgrade(url, "0003")  # rows as 0003 left them; 0004-0006 change neither jobs' nor metrics'
    now = "2026-12-01 08:00:00"
    a, b = "a" * 32, "b" * 32
    insert_metric = text(
        "INSERT INTO metrics (job_id, attempt, step, name, value, created_at)"
        " VALUES (:job, :attempt, :step, :name, :value, :now)"
    )
    with get_engine(url).begin() as conn:
        for job_id in (a, b):
            conn.execute(
                text(
                    "INSERT INTO jobs (id, owner, name, spec, method, state, attempt, handbacks,"
                    " max_attempts, cancel_requested, events_offset, step, created_at,"
                    " queued_at, updated_at) VALUES (:id, 'alice', 'j', '{}', 'tid', 'succeeded',"
                    " 2, 0, 3, false, 0, 3, :now, :now, :now)"
                ),
                {"id": job_id, "now": now},
            )
        rows = [(a, 1, step, "loss", float(step)) for step in (1, 2, 3)]
        rows += [(a, 2, 2, "loss", 20.0), (a, 2, 3, "loss", 30.0)]  # a resume logs them again
        rows += [(a, 2, 3, "loss", 31.0)]  # twice in one attempt (an orphan's row took its number)
        rows += [(a, 1, 3, "lr", 0.1), (b, 1, 3, "loss", 5.0)]  # another name, another job
        for job_id, attempt, step, name, value in rows:
            conn.execute(
                insert_metric,
                {"job": job_id, "attempt": attempt, "step": step, "name": name, "value": value}
                | {"now": now},
            )
    upgrade(url, "0006")

    def metrics() -> list[tuple[str, int, int, str, float]]:
        with get_engine(url).connect() as conn:
            rows = conn.execute(text("SELECT * FROM metrics ORDER BY id"))
            return [(r.job_id, r.attempt, r.step, r.name, r.value) for r in rows]

    def insert_again() -> None:
        with get_engine(url).begin() as conn:
            values = {"job": a, "attempt": 3, "step": 1, "name": "loss", "value": 0.5}
            conn.execute(insert_metric, values | {"now": now})

    upgrade(url, "0007")
    kept = [
        (a, 1, 1, "loss", 1.0),
        (a, 2, 2, "loss", 20.0),
        (a, 2, 3, "loss", 31.0),
        (a, 1, 3, "lr", 0.1),
        (b, 1, 3, "loss", 5.0),
    ]
    assert metrics() == kept
    with pytest.raises(IntegrityError):
        insert_again()

    command.downgrade(alembic_config(url), "0006")
    assert metrics() == kept
    insert_again()  # no key any more
    assert len(metrics()) == len(kept) + 1


def test_0004_records_the_send_of_each_waiting_row_and_its_downgrade_keeps_the_rows(
    empty_url: str,
) -> None:
    url = empty_url
    upgrade(url, "0003")
    queued, created = "2026-12-01 08:00:00", "2026-12-01 07:00:00"
    values = {"queued": queued, "created": created}
    with get_engine(url).begin() as conn:
        for job_id, state in (("a" * 32, "queued"), ("b" * 32, "succeeded")):
            conn.execute(
                text(
                    "INSERT INTO jobs (id, owner, name, spec, method, state, attempt, handbacks,"
                    " max_attempts, cancel_requested, events_offset, step, created_at,"
                    " queued_at, updated_at) VALUES (:id, 'alice', 'j', '{}', 'tid', :state,"
                    " 0, 0, 3, false, 0, 0, :created, :queued, :queued)"
                ),
                {"id": job_id, "state": state} | values,
            )
        for dataset_id, state in (("c" * 32, "pending"), ("d" * 32, "ready")):
            conn.execute(
                text(
                    "INSERT INTO datasets (id, owner, name, kind, source, path, state, created_at)"
                    " VALUES (:id, 'alice', 'd', 'builtin', '{}', '/x', :state, :created)"
                ),
                {"id": dataset_id, "state": state} | values,
            )
        conn.execute(
            text(
                "INSERT INTO models (id, owner, name, path, sha256, bytes, state, created_at)"
                " VALUES (:id, 'alice', 'm', '/x', :sha, 1, 'pending', :created)"
            ),
            {"id": "e" * 32, "sha": "0" * 64} | values,
        )

    def sends(table: str, since: str) -> dict[str, tuple[int, bool | None]]:
        """id -> (send_count, whether last_sent_at is the time the row began to wait)."""
        query = f"SELECT id, send_count, last_sent_at = {since} AS at FROM {table}"
        with get_engine(url).connect() as conn:
            return {
                r.id: (r.send_count, None if r.at is None else bool(r.at))
                for r in conn.execute(text(query))
            }

    upgrade(url, "0004")
    assert sends("jobs", "queued_at") == {"a" * 32: (1, True), "b" * 32: (0, None)}
    assert sends("datasets", "created_at") == {"c" * 32: (1, True), "d" * 32: (0, None)}
    assert sends("models", "created_at") == {"e" * 32: (1, True)}

    command.downgrade(alembic_config(url), "0003")
    with get_engine(url).connect() as conn:
        for table, count in (("jobs", 2), ("datasets", 2), ("models", 1)):
            columns = {c["name"] for c in inspect(conn).get_columns(table)}
            assert not columns & {"last_sent_at", "send_count"}
            assert conn.execute(text(f"SELECT count(*) FROM {table}")).scalar() == count


def test_0005_adds_claim_tokens_and_its_downgrade_keeps_the_jobs(empty_url: str) -> None:
    """Jobs claimed before 0005 have no token (NULL): a lost one is still re-queued, the
    reconciler matching it on its NULL token (tests/worker/test_reconcile.py's lost jobs)."""
    url = empty_url
    upgrade(url, "0004")
    now = "2026-12-01 08:00:00"
    with get_engine(url).begin() as conn:
        for job_id, state, owner in (("a" * 32, "running", "w-1"), ("b" * 32, "queued", None)):
            conn.execute(
                text(
                    "INSERT INTO jobs (id, owner, name, spec, method, state, attempt, handbacks,"
                    " max_attempts, cancel_requested, lease_owner, lease_expires, events_offset,"
                    " step, created_at, queued_at, updated_at) VALUES (:id, 'alice', 'j', '{}',"
                    " 'tid', :state, 1, 0, 3, false, :owner, :now, 0, 0, :now, :now, :now)"
                ),
                {"id": job_id, "state": state, "owner": owner, "now": now},
            )

    def jobs() -> dict[str, tuple[str, str | None]]:
        with get_engine(url).connect() as conn:
            rows = conn.execute(text("SELECT id, state, lease_owner FROM jobs"))
            return {r.id: (r.state, r.lease_owner) for r in rows}

    before = jobs()
    upgrade(url, "0005")
    with get_engine(url).connect() as conn:
        tokens = {r.id: r.claim_token for r in conn.execute(text("SELECT * FROM jobs"))}
    assert tokens == {"a" * 32: None, "b" * 32: None}
    assert jobs() == before

    command.downgrade(alembic_config(url), "0004")
    with get_engine(url).connect() as conn:
        assert "claim_token" not in {c["name"] for c in inspect(conn).get_columns("jobs")}
    assert jobs() == before
