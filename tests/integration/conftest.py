"""A real service stack per test: API (uvicorn), Celery worker(s) and the reconciler as processes.

Two backends: `embedded` (SQLite + file-system broker, always) and `postgres-redis` (the real
servers on 127.0.0.1, when `TID_TEST_POSTGRES_URL` and `TID_TEST_REDIS_URL` are set, as
`.ci/run` does). Each stack gets its own database / Redis db and queue, so runs never mix.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from databases import BACKENDS, REDIS, postgres_database

from cli.client import Client
from store.db.migrate import upgrade
from store.db.session import session_scope
from store.keys import create_key
from store.settings import Settings


def _stacks(pid: int) -> str:
    """The Python stacks of a hung process and its children (py-spy, a dev dependency)."""
    spy = Path(sys.executable).with_name("py-spy")
    try:
        dump = subprocess.run(
            [str(spy), "dump", "--subprocesses", "--pid", str(pid)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"(no stack: {exc})"
    return dump.stdout or dump.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Stack:
    """A running service; `env` is what its processes see."""

    settings: Settings
    env: dict[str, str]
    client: Client
    logs: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, *args: str, **env: str) -> subprocess.Popen[bytes]:
        """`tid ARGS...` as process `name`; `env` overrides the stack's environment."""
        with (self.logs / f"{name}.log").open("ab") as out:  # the child keeps its own copy
            proc = subprocess.Popen(
                [sys.executable, "-m", "cli.main", *args],
                env={**self.env, **env},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs[name] = proc
        return proc

    def start_worker(self, name: str) -> subprocess.Popen[bytes]:
        return self.start(name, "worker")

    def stop(self, *names: str, sig: int = signal.SIGTERM, timeout: float = 60) -> None:
        """Signal every named process at once, then wait; a process still running after
        `timeout` is killed, with a warning (a hang on shutdown is a defect to see). SIGKILL
        goes to the whole process group (a lost machine); other signals to the main process
        only, as `docker stop` does: a worker stops its pool and its running job itself."""
        procs = {name: self.procs.pop(name) for name in names}
        send = os.killpg if sig == signal.SIGKILL else os.kill
        for proc in procs.values():
            with contextlib.suppress(ProcessLookupError):
                send(proc.pid, sig)
        deadline = time.monotonic() + timeout
        for name, proc in procs.items():
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                stacks = _stacks(proc.pid)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                warnings.warn(
                    f"{name} ignored signal {sig} for {timeout} s: killed; it hung in\n{stacks}",
                    stacklevel=2,
                )

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")[-4000:]


TIMINGS = {  # short, so lost workers and lost messages are noticed within seconds
    "TID_LEASE_SECONDS": "5",
    "TID_RECONCILE_SECONDS": "1",
    "TID_REQUEUE_AFTER_SECONDS": "5",
    "TID_CANCEL_GRACE_SECONDS": "5",
}


@contextlib.contextmanager
def running_stack(
    tmp_path: Path, *, database_url: str = "", broker_url: str = "", **env_overrides: str
) -> Iterator[Stack]:
    """Migrate the database, make a key for `alice`, start the API and the reconciler (workers
    are the test's to start), and stop every process at the end."""
    env = {
        **os.environ,
        "TID_DATA_ROOT": str(tmp_path / "data"),
        "TID_QUEUE": f"tid-{uuid.uuid4().hex[:8]}",
        **TIMINGS,
        "OMP_NUM_THREADS": "1",
        **({"TID_DATABASE_URL": database_url} if database_url else {}),
        **({"TID_BROKER_URL": broker_url} if broker_url else {}),
        **env_overrides,
    }
    settings = Settings(
        **{k.removeprefix("TID_").lower(): v for k, v in env.items() if k.startswith("TID_")}
    )
    upgrade(settings.database_url)
    with session_scope(settings.database_url) as session:
        key = create_key(session, owner="alice")
    port = _free_port()
    logs = tmp_path / "logs"
    logs.mkdir(exist_ok=True)
    client = Client(f"http://127.0.0.1:{port}", key, timeout=30)
    stack = Stack(settings, env, client, logs)
    try:
        stack.start("api", "serve", "--port", str(port))
        stack.start("reconciler", "reconcile", "--loop")
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(Exception):
                if client.http.get("/readyz").status_code == 200:
                    break
            assert time.monotonic() < deadline, stack.log("api")
            time.sleep(0.3)
        yield stack
    finally:
        stack.stop(*stack.procs)
        client.http.close()


@pytest.fixture(params=BACKENDS)
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    with contextlib.ExitStack() as exits:
        urls = {}
        if request.param == "postgres-redis":
            assert REDIS
            urls["database_url"] = exits.enter_context(postgres_database())
            urls["broker_url"] = f"{REDIS.rstrip('/')}/{int(uuid.uuid4().int % 15) + 1}"
        yield exits.enter_context(running_stack(tmp_path, **urls))
