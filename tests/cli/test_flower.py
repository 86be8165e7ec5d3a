"""`tid flower` serves Celery's Flower for the service's broker (the compose `monitor` profile),
behind basic auth wherever it listens beyond the loopback interface."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from cli.main import _is_loopback

CREDENTIALS = ("admin", "s3cret:with-colon")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _environment(tmp_path: Path, **env: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k != "TID_FLOWER_BASIC_AUTH"}
    return {**base, "TID_DATA_ROOT": str(tmp_path), **env}


@pytest.mark.slow
def test_flower_serves_its_dashboard_only_with_basic_auth(tmp_path: Path) -> None:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "flower", "--port", str(port)],
        env=_environment(tmp_path, TID_FLOWER_BASIC_AUTH=":".join(CREDENTIALS)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/healthcheck", timeout=2)
                break
            except httpx.HTTPError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
                time.sleep(0.3)
        assert (health.status_code, health.text) == (200, "OK")
        workers = f"http://127.0.0.1:{port}/workers"
        assert httpx.get(workers, timeout=10).status_code == 401
        assert httpx.get(workers, auth=("admin", "wrong"), timeout=10).status_code == 401
        assert httpx.get(workers, auth=CREDENTIALS, timeout=10).status_code == 200
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("credentials", [None, "no-password"])
def test_flower_refuses_to_listen_beyond_loopback_without_basic_auth(
    tmp_path: Path, credentials: str | None
) -> None:
    env = _environment(tmp_path, **({"TID_FLOWER_BASIC_AUTH": credentials} if credentials else {}))
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", "flower", "--address", "0.0.0.0", "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "TID_FLOWER_BASIC_AUTH" in result.stderr


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),  # every interface, to Flower
        ("10.0.0.5", False),
        ("flower.example", False),
    ],
)
def test_only_loopback_addresses_count_as_loopback(address: str, loopback: bool) -> None:
    assert _is_loopback(address) is loopback
