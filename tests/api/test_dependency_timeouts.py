"""A PostgreSQL that accepts connections and then never answers is an error in seconds: the
connect timeout bounds the start-up, the client's own bound every later reply
(store/db/postgres.py). The whole service against such servers: tests/integration/test_faults.py.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import text

from store.db import session as db_session
from store.db.session import TRANSIENT_ERRORS, get_engine
from store.settings import Settings

SSL_REQUEST, GSSENC_REQUEST = 80877103, 80877104


def _read_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("client gone")
        data += chunk
    return data


@contextlib.contextmanager
def mute_postgres(*, handshake: bool) -> Iterator[int]:
    """A port where a "server" accepts connections and, with `handshake`, lets the client log
    in (no SSL, no password) before it stops answering; without, it never says a word."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = server.accept()
                held.append(conn)
                if handshake:
                    with contextlib.suppress(OSError, ConnectionError):
                        while True:  # SSL and GSS requests are refused, the start-up accepted
                            (length,) = struct.unpack("!I", _read_exactly(conn, 4))
                            (code,) = struct.unpack("!I", _read_exactly(conn, length - 4)[:4])
                            if code not in (SSL_REQUEST, GSSENC_REQUEST):
                                break
                            conn.sendall(b"N")
                        ok = b"R" + struct.pack("!II", 8, 0)  # AuthenticationOk
                        conn.sendall(ok + b"Z" + struct.pack("!I", 5) + b"I")  # ReadyForQuery

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        server.close()
        for conn in held:
            conn.close()


def test_a_database_that_never_answers_the_start_up_fails_within_the_connect_timeout() -> None:
    """`tid db upgrade` against it hung for good; the URL's own connect_timeout wins."""
    with mute_postgres(handshake=False) as port:
        url = f"postgresql+psycopg://tid@127.0.0.1:{port}/tid?connect_timeout=2"
        started = time.monotonic()
        with pytest.raises(TRANSIENT_ERRORS), get_engine(url).connect():
            pass
    assert time.monotonic() - started < 2 + 2


def test_a_database_that_stops_answering_after_the_login_fails_within_its_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Connected, then silent (a stalled proxy, a frozen server): no server-side timeout can
    help, so the client gives the reply up after the statement timeout + 5 s."""
    settings = Settings(db_statement_timeout_seconds=1)
    monkeypatch.setattr(db_session, "get_settings", lambda: settings)
    with mute_postgres(handshake=True) as port:
        url = f"postgresql+psycopg://tid@127.0.0.1:{port}/tid"
        started = time.monotonic()
        # the dialect's first queries on a new connection already wait for a reply
        with (
            pytest.raises(TRANSIENT_ERRORS, match="did not answer within 6 s"),
            get_engine(url).connect() as conn,
        ):
            conn.execute(text("SELECT 1"))
    assert time.monotonic() - started < 6 + 3
