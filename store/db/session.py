"""Engines and sessions. SQLite gets WAL and a busy timeout so the API and workers can share it;
PostgreSQL gets bounded waits everywhere (`store.db.postgres`, `TID_DB_*` settings), so a
database that stops answering is a transient error in seconds, never a hang."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session, sessionmaker

from store.settings import get_settings

# The database is down, restarting, unreachable or not answering (every connection of the pool
# waiting on it): worth retrying, unlike a bug or a bad row.
TRANSIENT_ERRORS = (OperationalError, InterfaceError, PoolTimeoutError)


@lru_cache(maxsize=8)
def get_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(conn: Any, _record: Any) -> None:
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return _postgres_engine(url)


def _postgres_engine(url: str) -> Engine:
    """Bounded waits (the process's `TID_DB_*` settings); parameters in the URL's query win."""
    from store.db import postgres  # psycopg is loaded only where PostgreSQL is used

    settings = get_settings()
    given = make_url(url).query
    args = {k: v for k, v in postgres.connect_args(settings).items() if k not in given}
    engine = create_engine(
        url,
        connect_args=args,
        pool_pre_ping=True,
        pool_size=10,
        max_overflow=10,
        pool_timeout=settings.db_connect_timeout_seconds,
    )

    @event.listens_for(engine, "do_connect")
    def _connect(_dialect: Any, _record: Any, cargs: Any, cparams: Any) -> Any:
        return postgres.connect(settings, cargs, cparams)

    return engine


@lru_cache(maxsize=8)
def get_sessionmaker(url: str) -> sessionmaker[Session]:
    return sessionmaker(get_engine(url), expire_on_commit=False)


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = get_sessionmaker(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
