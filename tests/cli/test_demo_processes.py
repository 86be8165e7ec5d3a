"""`tid demo` and its service processes: the demo stops when one of them has died, and they
stop when the demo has died."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from processes import alive

from cli.client import Client
from cli.service_demo import Service


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


STARTER = """
import subprocess, sys, time
from tid_core.launch import terminate_with_parent
child = subprocess.Popen(
    [sys.executable, "-c", "import time; time.sleep(60)"],
    start_new_session=True, preexec_fn=terminate_with_parent,
)
print(child.pid, flush=True)
time.sleep(60)
"""


def test_a_service_process_stops_when_the_demo_is_killed() -> None:
    """The demo starts its services in sessions of their own (Ctrl-C reaches the demo only);
    SIGKILL leaves it no time to stop them, so each asks the kernel for SIGTERM instead."""
    starter = subprocess.Popen([sys.executable, "-c", STARTER], stdout=subprocess.PIPE, text=True)
    assert starter.stdout is not None
    child = int(starter.stdout.readline())
    try:
        starter.kill()
        starter.wait()
        deadline = time.monotonic() + 10
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(child), "a service process outlived the demo that started it"
    finally:
        if alive(child):
            os.kill(child, signal.SIGKILL)
