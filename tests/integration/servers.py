"""Private PostgreSQL and Redis servers that a fault test may stop and restart, and a relay
that makes one stop answering.

The shared servers on 127.0.0.1 belong to every test (and to CI's other runs), so a test that
restarts "the database" or "the broker" starts its own from Debian's binaries on a free port.
Redis runs without persistence, as the compose file's and CI's do: a restart loses every
message, which is the fault the reconciler has to repair.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import glob
import os
import select
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from prerequisites import missing

PG_BINS = sorted(glob.glob("/usr/lib/postgresql/*/bin"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_port(port: int, *, host: str = "127.0.0.1", timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection((host, port), 1):
            return
        assert time.monotonic() < deadline, f"nothing listens on port {port}"
        time.sleep(0.05)


AS_POSTGRES = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def _pg_tool(tool: str, *args: str) -> None:
    """A PostgreSQL server binary (as the `postgres` user when run as root)."""
    subprocess.run(
        [*AS_POSTGRES, str(Path(PG_BINS[-1]) / tool), *args],
        check=True,
        capture_output=True,
        timeout=60,
    )


def _owned_temp_dir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="tid-pg-"))
    if AS_POSTGRES:
        shutil.chown(path, "postgres")
    return path


@functools.cache
def _initdb_template() -> Path:
    """A new cluster's data folder, made once per test process: each server starts from a
    copy of it (`initdb` takes seconds, the copy of its 40 MB a fraction of one)."""
    folder = _owned_temp_dir()
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    _pg_tool("initdb", "-D", str(folder / "data"), "-A", "trust", "-U", "postgres")
    return folder / "data"


class PrivatePostgres:
    """A cluster of its own (a copy of `initdb`'s) run by `pg_ctl` in a temporary folder,
    listening on `host` (another address than loopback: trusted from that address's subnet)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        if not PG_BINS:
            missing("PostgreSQL server binaries not installed (/usr/lib/postgresql/*/bin)")
        self.port = free_port()
        self.host = host
        self.dir = _owned_temp_dir()
        # -a keeps the owner (the server's user) and the 0700 mode, both of which the server checks
        subprocess.run(
            ["cp", "-a", str(_initdb_template()), str(self.dir / "data")], check=True, timeout=60
        )
        if host != "127.0.0.1":
            with (self.dir / "data" / "pg_hba.conf").open("a") as hba:
                hba.write("host all all samenet trust\n")
        self.start()
        self.url = f"postgresql://postgres@{host}:{self.port}/postgres"

    def start(self) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses={self.host} -c fsync=off"
        data, log = str(self.dir / "data"), str(self.dir / "server.log")
        _pg_tool("pg_ctl", "-D", data, "-o", options, "-l", log, "-w", "start")

    def stop(self) -> None:
        """A fast shutdown: every connection is terminated, as in a real restart."""
        _pg_tool("pg_ctl", "-D", str(self.dir / "data"), "-m", "fast", "-w", "stop")

    def close(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivateRedis:
    """`redis-server` without persistence on a free port of `host`."""

    def __init__(self, log: Path, host: str = "127.0.0.1") -> None:
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            missing("redis-server is not installed")
        self.port = free_port()
        self.log = log
        self.host = host
        self.url = f"redis://{host}:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        assert self.binary
        args = ["--port", str(self.port), "--bind", self.host, "--save", "", "--appendonly"]
        if self.host != "127.0.0.1":  # no password: only the test's hosts reach that address
            args = ["--protected-mode", "no", *args]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [self.binary, *args, "no"], stdout=out, stderr=subprocess.STDOUT
            )
        _wait_port(self.port, host=self.host)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


@contextlib.contextmanager
def private_servers(
    tmp_path: Path, host: str = "127.0.0.1"
) -> Iterator[tuple[PrivatePostgres, PrivateRedis]]:
    pg = PrivatePostgres(host)
    try:
        redis = PrivateRedis(tmp_path / "redis.log", host)
        try:
            yield pg, redis
        finally:
            redis.stop()
    finally:
        pg.close()


class StallingRelay:
    """A TCP relay to `127.0.0.1:port` that can stop forwarding without closing anything: a
    database or broker that stops answering (a failover, a half-open connection, a firewall
    that drops packets). Stalled, it reads nothing on either side and accepts no connection,
    so clients see connections that open (the kernel's backlog) and writes that never get a
    reply; resumed, everything held is forwarded."""

    POLL_SECONDS = 0.05
    CHUNK = 1 << 16

    def __init__(self, port: int) -> None:
        self.target = port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.server.getsockname()[1]
        self.peers: dict[socket.socket, socket.socket] = {}
        self.stalled = threading.Event()
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._run, name="relay", daemon=True)
        self.thread.start()

    def url(self, url: str) -> str:
        """`url` (of the server on `port`) through the relay."""
        return url.replace(f":{self.target}/", f":{self.port}/")

    def _accept(self) -> None:
        client, _ = self.server.accept()
        client.settimeout(5)  # a client that stops reading cannot block the relay for good
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
        except OSError:
            client.close()
            return
        self.peers[client], self.peers[upstream] = upstream, client

    def _drop(self, sock: socket.socket) -> None:
        peer = self.peers.pop(sock, None)
        sock.close()
        if peer is not None:
            self.peers.pop(peer, None)
            peer.close()

    def _run(self) -> None:
        """Until closed: forward what is readable, unless stalled (then only wait)."""
        while not self.closed.is_set():
            if self.stalled.is_set():
                self.closed.wait(self.POLL_SECONDS)
                continue
            readable, _, _ = select.select([self.server, *self.peers], [], [], self.POLL_SECONDS)
            for sock in readable:
                if sock is self.server:
                    self._accept()
                elif sock in self.peers:
                    try:
                        data = sock.recv(self.CHUNK)
                        if data:
                            self.peers[sock].sendall(data)
                            continue
                    except OSError:
                        pass
                    self._drop(sock)

    def stall(self) -> None:
        self.stalled.set()

    def resume(self) -> None:
        self.stalled.clear()

    def close(self) -> None:
        self.closed.set()
        self.thread.join()
        for sock in list(self.peers):
            self._drop(sock)
        self.server.close()


@contextlib.contextmanager
def stalling_relay(port: int) -> Iterator[StallingRelay]:
    relay = StallingRelay(port)
    try:
        yield relay
    finally:
        relay.close()
