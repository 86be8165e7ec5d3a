"""PostgreSQL connections with every wait bounded, so a server that stops answering (a failover,
a half-open connection, a firewall that drops packets) is an error in seconds, not a hang.

The server bounds what it does (`statement_timeout`, `lock_timeout`), TCP keepalives and
`tcp_user_timeout` notice a peer that is gone, and libpq's `connect_timeout` bounds the start-up.
None of them helps when the connection is alive but nothing answers (a stalled proxy, a
frozen server): libpq then waits forever for a reply, so the connection itself gives up after
the statement timeout and a margin, and closes (the pool then drops it).
"""

from __future__ import annotations

from typing import Any, TypeVar

import psycopg
from psycopg.abc import PQGen

from store.settings import Settings

T = TypeVar("T")

# past the statement timeout: the server cancels a slow statement itself, and says why
ANSWER_MARGIN_SECONDS = 5.0
PSYCOPG_WAIT_INTERVAL = 0.1  # psycopg's own default: how often a wait looks for Ctrl-C


def answer_seconds(settings: Settings) -> float:
    """How long a connection waits for any reply before it gives the server up."""
    return settings.db_statement_timeout_seconds + ANSWER_MARGIN_SECONDS


def connect_args(settings: Settings) -> dict[str, Any]:
    """libpq parameters bounding the start-up, each statement and a silent peer."""
    statement_ms = round(settings.db_statement_timeout_seconds * 1000)
    idle, interval, probes = settings.keepalive
    return {
        "connect_timeout": settings.db_connect_timeout_seconds,
        "options": f"-c statement_timeout={statement_ms} -c lock_timeout={statement_ms}",
        "keepalives": 1,
        "keepalives_idle": idle,
        "keepalives_interval": interval,
        "keepalives_count": probes,
        # unacknowledged data (a peer gone mid-statement) gives up as a silent idle peer does
        "tcp_user_timeout": (idle + interval * probes) * 1000,
    }


class AnsweringConnection(psycopg.Connection[Any]):
    """A psycopg connection whose every wait for the server ends after `answer_seconds`."""

    answer_seconds: float | None = None  # set right after connecting

    def wait(
        self, gen: PQGen[T], interval: float = PSYCOPG_WAIT_INTERVAL, timeout: float | None = None
    ) -> T:
        bound = self.answer_seconds if timeout is None else timeout
        try:
            return super().wait(gen, interval, bound)
        except psycopg.errors._WaitTimeout:  # psycopg's own, converted as its callers do
            # a reply may still be on its way: the connection's state is unknown, so it goes
            self.close()
            raise psycopg.OperationalError(
                f"the database did not answer within {bound:g} s; connection closed"
            ) from None


def connect(settings: Settings, cargs: Any, cparams: Any) -> AnsweringConnection:
    """For SQLAlchemy's `do_connect` event: the connection it would make, bounded."""
    conn = AnsweringConnection.connect(*cargs, **cparams)
    conn.answer_seconds = answer_seconds(settings)
    return conn
