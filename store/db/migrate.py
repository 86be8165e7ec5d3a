"""Alembic, driven from code: `tid db upgrade` and the API's start-up check."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from store.db.session import get_engine

MIGRATIONS = Path(__file__).parent / "migrations"


class NotMigratedError(RuntimeError):
    """The database schema is missing or older than this code."""


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def head_revision(url: str) -> str | None:
    return ScriptDirectory.from_config(alembic_config(url)).get_current_head()


def current_revision(url: str) -> str | None:
    with get_engine(url).connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def check_migrated(url: str) -> None:
    """Raise NotMigratedError with the command to run when the schema is not at head."""
    current, head = current_revision(url), head_revision(url)
    if current != head:
        raise NotMigratedError(
            f"database {url.split('@')[-1]} is at revision {current or 'none'}, this code needs "
            f"{head}: run `tid db upgrade` first"
        )
