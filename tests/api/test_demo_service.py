"""`tid demo` stops as soon as one of the service processes it started has died."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from api.client import Client
from api.demo import Service


def test_a_dead_service_process_stops_the_demo_naming_its_log(tmp_path: Path) -> None:
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    dead.wait()
    running = Service(Client("http://127.0.0.1:9", "key"), {"api": alive}, tmp_path)
    try:
        running.check()  # all alive: nothing to say
        running.procs["worker"] = dead
        with pytest.raises(SystemExit, match=r"the worker process exited \(3\); see .*worker\.log"):
            running.check()
    finally:
        alive.kill()
        alive.wait()
