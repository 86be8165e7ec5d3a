"""Alembic is the only way tables appear: the migrations must build exactly the models."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from factories import make_settings
from sqlalchemy import inspect, text

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
