"""`tid tensorboard ID` serves the TensorBoard files the trainer wrote into the job's run dir."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tid_core.tensorboard_log import ScalarLog


def tid(data_root: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "TID_DATA_ROOT": str(data_root)}
    return subprocess.Popen(
        [sys.executable, "-m", "cli.main", "tensorboard", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_tensorboard_of_an_unknown_job_fails_clearly(tmp_path: Path) -> None:
    proc = tid(tmp_path, "0" * 32)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert f"no TensorBoard files for job {'0' * 32}" in err


def test_tensorboard_refuses_what_is_not_a_job_id(tmp_path: Path) -> None:
    proc = tid(tmp_path, "../../etc")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "not a job id" in err


@pytest.mark.slow
def test_tensorboard_serves_the_jobs_scalars(tmp_path: Path) -> None:
    job_id = "a" * 32
    log = ScalarLog(tmp_path / "jobs" / job_id / "tensorboard")
    log.step(1, losses={"loss": 2.5}, stats={}, lr=0.01)
    log.close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = tid(tmp_path, job_id, "--port", str(port))
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                tags = httpx.get(f"http://127.0.0.1:{port}/data/plugin/scalars/tags", timeout=2)
                if tags.status_code == 200 and tags.json():
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
            time.sleep(0.3)
        assert {"loss/loss", "lr"} <= set(tags.json()["."])
    finally:
        proc.kill()
        proc.wait()
