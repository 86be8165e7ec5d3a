"""`bench/api.py --profile`: how py-spy's stacks are charged to components, and that the
profiled run prints its breakdown (the shares themselves are not checked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.api import busy_shares

ROOT = Path(__file__).resolve().parents[2]
RUNPY = "_run_module_as_main (<frozen runpy>:198);Runner.run (asyncio/runners.py:118)"
POOL = "Thread._bootstrap (threading.py:1032);WorkerThread.run (anyio/_backends/_asyncio.py:986)"


def test_samples_go_to_the_deepest_non_stdlib_frame_and_waiting_is_skipped() -> None:
    raw = "\n".join(
        [
            f"{RUNPY} 50",  # the event loop waiting for I/O
            f"{POOL};Queue.get (queue.py:180);Condition.wait (threading.py:359) 40",  # idle pool
            # sqlite3 and json are the standard library: their time is their caller's
            f"{POOL};submit_job (api/routes/jobs.py:140);Session.commit (sqlalchemy/orm/"
            "session.py:2032);do_commit (sqlalchemy/engine/default.py:711);commit "
            "(sqlite3/dbapi2.py:1) 6",
            f"{RUNPY};run_in_threadpool (starlette/concurrency.py:34);run_sync (anyio/"
            "to_thread.py:65);Queue.put_nowait (queue.py:191);Condition.notify (threading.py:"
            "394) 3",
            f"{RUNPY};JSONResponse.render (starlette/responses.py:190);dumps (json/__init__"
            ".py:238) 1",
        ]
    )
    assert busy_shares(raw) == {
        "database (SQLAlchemy, sqlite3)": 0.6,
        "thread-pool hand-offs (anyio)": 0.3,
        "FastAPI, Starlette (routing, dependencies, responses)": 0.1,
    }


@pytest.mark.slow
def test_profile_run_prints_where_the_time_goes(tmp_path: Path) -> None:
    out = tmp_path / "api.json"
    done = subprocess.run(
        [sys.executable, "bench/api.py", "--quick", "--no-worker", "--profile", "--json", str(out)],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "where the service's CPU time goes" in done.stdout
    profile = json.loads(out.read_text())["profile"]
    assert set(profile) == {"post_jobs", "get_jobs"}
    for shares in profile.values():
        assert sum(shares.values()) == pytest.approx(1.0, abs=0.01)
