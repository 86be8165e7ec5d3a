"""Alembic is the only way tables appear: the migrations must build exactly the models."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from store.db.models import Base
from store.db.session import get_engine
from store.settings import Settings


def test_migrations_at_head_match_the_models(settings: Settings) -> None:
    with get_engine(settings.database_url).connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
