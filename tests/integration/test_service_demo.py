"""`make demo`'s program (`tid demo`) on its quick budget: the whole service, then the table."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tid_core.models import load_student

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_service_demo_trains_chains_downloads_and_prints_table(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "TID_DATA_ROOT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    for key in ("TID_DATABASE_URL", "TID_BROKER_URL"):  # embedded defaults, whatever CI sets
        env.pop(key, None)
    proc = subprocess.run(
        [sys.executable, "-m", "cli.main", "demo", "--quick", "--port", str(port)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "teacher: succeeded" in out and "tid: succeeded" in out
    table = out.split("from the API:")[1].splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in table if line[:1].isalpha()}
    assert {"teacher", "none", "tid"} <= rows.keys()
    assert all(0.0 <= float(rows[name][0]) <= 100.0 for name in ("teacher", "none", "tid"))
    model, meta = load_student(tmp_path / "demo-tid-student.safetensors")
    assert meta.class_names[0] == "circle" and not model.training
    # its processes are gone: nothing listens on the demo's port any more
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
