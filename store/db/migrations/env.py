"""Alembic environment: URL from the config set by store.db.migrate, metadata from the models."""

from __future__ import annotations

from alembic import context

from store.db.models import Base
from store.db.session import get_engine

config = context.config
url = config.get_main_option("sqlalchemy.url")
assert url, "store.db.migrate sets sqlalchemy.url"

with get_engine(url).connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=True,  # SQLite ALTER TABLE support
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()
