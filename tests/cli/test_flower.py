"""`tid flower` serves Celery's Flower for the service's broker (the compose `monitor` profile)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow


def test_flower_serves_its_dashboard_for_the_service_broker(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "flower", "--port", str(port)],
        env={**os.environ, "TID_DATA_ROOT": str(tmp_path)},
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
        assert httpx.get(f"http://127.0.0.1:{port}/workers", timeout=10).status_code == 200
    finally:
        proc.kill()
        proc.wait()
