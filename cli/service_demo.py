"""`make demo` / `tid demo`: the whole service end to end on embedded defaults.

Migrates the database (SQLite under `var/`), creates an API key, starts the API, one worker
and the reconciler as subprocesses on a file-system broker, generates the synthetic dataset
through the API, trains a teacher job, then a `none` and a `tid` student chained to that
teacher by job id, shows progress, downloads the TID student's weights, loads them and prints
the mAP table from the API. Processes are stopped on exit or Ctrl-C. Jobs are submitted with
idempotency keys derived from their specs, so a second run reuses finished jobs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cli.client import ApiError, Client
from cli.terminal import evaluation_table
from store.settings import get_settings
from tid_core import recipes
from tid_core.launch import terminate_with_parent

# how often the demo asks the API about its dataset and jobs: one small GET each, and a job's end
# is seen within half a second (a quick job lasts seconds)
POLL_SECONDS = 0.5


@dataclass
class Service:
    """The demo's client and the service processes it started."""

    client: Client
    procs: dict[str, subprocess.Popen[bytes]]
    logs: Path

    def check(self) -> None:
        """Stop at once when a service process has died: nothing would finish the job."""
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                log = self.logs / f"{name}.log"
                raise SystemExit(f"the {name} process exited ({proc.returncode}); see {log}")


@contextlib.contextmanager
def service(port: int) -> Iterator[Service]:
    """Start the API, one worker and the reconciler; stop them (and their children) on the
    way out."""
    from store.db.migrate import upgrade
    from store.db.session import session_scope
    from store.keys import create_key

    settings = get_settings()
    upgrade(settings.database_url)
    with session_scope(settings.database_url) as session:
        key = create_key(session, owner="demo")
    logs = settings.data_root / "demo-logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TID_DATA_ROOT": str(settings.data_root)}
    api_cmd = [sys.executable, "-m", "cli.main", "serve", "--port", str(port)]
    worker_cmd = [sys.executable, "-m", "cli.main", "worker"]
    reconciler_cmd = [sys.executable, "-m", "cli.main", "reconcile", "--loop"]
    commands = {"api": api_cmd, "worker": worker_cmd, "reconciler": reconciler_cmd}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name, cmd in commands.items():
            with (logs / f"{name}.log").open("ab") as out:  # the child keeps its own copy
                procs[name] = subprocess.Popen(
                    cmd,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=terminate_with_parent,  # a killed demo leaves no service behind
                )
        running = Service(Client(f"http://127.0.0.1:{port}", key), procs, logs)
        _wait_ready(running)
        print(f"API on {running.client.url}, worker started; logs in {logs}", flush=True)
        yield running
    finally:
        for proc in procs.values():  # the main process only, as `docker stop` does: the
            proc.terminate()  # worker hands a running job back and stops its pool itself
        for proc in procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _wait_ready(running: Service) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        running.check()
        with contextlib.suppress(Exception):
            if running.client.http.get("/readyz").status_code == 200:
                return
        time.sleep(POLL_SECONDS)
    raise SystemExit(f"the API did not become ready in 60 s; see {running.logs}")


def _dataset(running: Service, recipe: recipes.Recipe) -> str:
    client = running.client
    name = f"demo-shapes-{recipe.num_train}"
    for ds in client.request("GET", "/v1/datasets")["data"]:
        if ds["name"] == name and ds["state"] == "ready":
            return str(ds["id"])
    body = {
        "name": name,
        "builtin": "shapes",
        "num_train": recipe.num_train,
        "num_val": recipe.num_val,
        "image_size": recipe.image_size,
        "seed": 0,
    }
    ds = client.create_dataset(body)
    ds = client.wait(
        lambda: client.dataset(ds["id"]),
        done=lambda d: d["state"] != "pending",
        on_poll=lambda _: running.check(),
        interval=POLL_SECONDS,
    )
    if ds["state"] != "ready":
        raise SystemExit(f"dataset failed: {ds.get('error')}")
    print(f"dataset {name}: {ds['num_train']} train / {ds['num_val']} val images", flush=True)
    return str(ds["id"])


def _run(running: Service, label: str, spec: dict[str, Any]) -> dict[str, Any]:
    client = running.client
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
    job = client.submit(spec, idempotency_key=key)
    started = time.monotonic()
    shown: dict[str, Any] = {"state": "", "step": -20}

    def show(j: dict[str, Any]) -> None:
        running.check()
        step = int(j.get("step") or 0)
        if j["state"] != shown["state"] or step - shown["step"] >= 20:
            loss = (j.get("latest_metrics") or {}).get("loss")
            extra = f"  loss {loss:.3f}" if loss is not None else ""
            print(
                f"{label:>8}: {j['state']:<9} step {step}/{j.get('total_steps') or '?'}"
                f"{extra}  {time.monotonic() - started:.0f} s",
                flush=True,
            )
            shown.update(state=j["state"], step=step)

    job = client.wait_job(job["id"], on_poll=show, interval=POLL_SECONDS)
    if job["state"] != "succeeded":
        raise SystemExit(f"{label} {job['state']}: {job.get('error')}")
    return dict(job)


def run_demo(*, quick: bool, port: int) -> int:
    from tid_core.models import load_student

    settings = get_settings()
    with service(port) as running:
        client = running.client
        try:
            recipe = recipes.recipe(quick=quick)
            dataset_id = _dataset(running, recipe)
            dataset = {"id": dataset_id, "input_size": recipe.image_size}
            jobs = {"teacher": _run(running, "teacher", recipe.teacher_spec(dataset))}
            teacher_weights = {"job": jobs["teacher"]["id"]}
            for method in ("none", "tid"):
                spec = recipe.student_spec(dataset, method, teacher_weights)
                jobs[method] = _run(running, method, spec)
            out = settings.data_root / "demo-tid-student.safetensors"
            etag = client.download(jobs["tid"]["id"], "student.safetensors", out)
        except ApiError as exc:
            raise SystemExit(f"API error: {exc}") from exc
        digest = hashlib.sha256(out.read_bytes()).hexdigest()
        if digest != etag:
            raise SystemExit(f"downloaded weights do not match their ETag ({digest} != {etag})")
        _, meta = load_student(out)  # proves the downloaded weights load into a detector
        print(
            f"\nDownloaded {out} (sha256 {digest[:12]}...), loaded: {meta.arch}/"
            f"{meta.backbone}, classes {meta.class_names}",
            flush=True,
        )
        print("\nCOCO mAP on the synthetic val split (percent), from the API:\n")
        print(evaluation_table(client, {k: j["id"] for k, j in jobs.items()}), flush=True)
    return 0
