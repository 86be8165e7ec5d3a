"""REST API on loopback: throughput and latency of POST /v1/jobs and GET /v1/jobs/{id} against
a bare FastAPI app that echoes the same JSON, and submit -> running latency with an idle worker.

Each app is one uvicorn process started by the same command line (uvicorn's defaults, as `tid
serve` runs it); the service runs on a fresh SQLite data root with the file-system broker and no
worker, so a submitted job stays queued. The load is an httpx asyncio loop keeping
`--concurrency` requests in flight; the four endpoints take turns in alternating rounds, req/s
is the median of rounds and p50/p99 are over every round's requests. Then one worker starts and
a tiny job is submitted `--latency-runs` times (cancelled as soon as it runs, to spare the CPU).

    python bench/api.py [--quick] [--no-worker] [--profile] [--json FILE]

`--profile` then samples the service process with py-spy (every thread) under each jobs
endpoint's load and prints where its CPU time goes, by the package doing the work.

The service is set up through its CLI (`tid db upgrade`, `tid keys create`), not by importing
`api`: run as `python bench/api.py`, this folder comes first on sys.path and this very file
would stand in for the `api` package.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from bench import harness

HOST = "127.0.0.1"
FINAL = ("succeeded", "failed", "cancelled")


def tiny_spec(name: str) -> dict[str, Any]:
    """A job that is quick to start: ResNet18-FPN64 on 16 builtin shapes images of 64 px."""
    return {
        "name": name,
        "student": {"arch": "fcos", "backbone": "resnet18", "fpn_channels": 64},
        "dataset": {"builtin": "shapes", "num_train": 16, "num_val": 4, "image_size": 64},
        "schedule": {"epochs": 2, "batch_size": 4, "warmup_iters": 2, "log_every": 1},
        "resources": {"num_workers": 0, "device": "cpu"},
    }


def create_bare_app() -> FastAPI:
    """The floor: FastAPI and uvicorn alone, taking and returning the same JSON as the jobs
    routes, with sync handlers like theirs (both run in the thread pool)."""
    app = FastAPI()
    store: dict[str, dict[str, Any]] = {}

    @app.get("/healthz")
    def read_health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/echo", status_code=202)
    def create_echo(body: dict[str, Any]) -> dict[str, Any]:
        item_id = uuid.uuid4().hex
        store[item_id] = {"id": item_id, "state": "queued", "spec": body}
        return store[item_id]

    @app.get("/echo/{item_id}")
    def read_echo(item_id: str) -> dict[str, Any]:
        return store[item_id]  # the load asks only for ids it created

    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


class Processes:
    """The processes this benchmark started, each in a session of its own, and their logs."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs = env, logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *args: str) -> None:
        with (self.logs / f"{name}.log").open("ab") as out:
            self.procs[name] = subprocess.Popen(
                [sys.executable, *args],
                cwd=harness.ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def run(self, *args: str) -> str:
        """A short command to its end; its stdout."""
        done = subprocess.run(
            [sys.executable, *args],
            cwd=harness.ROOT,
            env=self.env,
            capture_output=True,
            timeout=120,
        )
        if done.returncode:
            raise RuntimeError(f"{' '.join(args)} failed:\n{done.stderr.decode()[-2000:]}")
        return done.stdout.decode()

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def check(self, name: str) -> None:
        if self.procs[name].poll() is not None:
            raise RuntimeError(f"{name} exited:\n{self.log(name)[-2000:]}")

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.terminate()  # the main process only, as `docker stop` does (docs/RELIABILITY.md)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)


@contextlib.contextmanager
def processes(tmp: Path) -> Iterator[Processes]:
    """Processes that see a private data root under `tmp` with the embedded defaults (SQLite,
    file-system broker) and this checkout's code; all stopped at the end."""
    env = harness.child_env(
        TID_DATA_ROOT=str(tmp / "data"),
        TID_DATABASE_URL="",  # the embedded defaults under the data root
        TID_BROKER_URL="",
        TID_CANCEL_GRACE_SECONDS="5",
        # a load test submits hundreds of jobs as one owner: measure the API, not its quota
        TID_MAX_ACTIVE_JOBS_PER_OWNER="0",
    )
    procs = Processes(env, tmp)
    try:
        yield procs
    finally:
        procs.stop_all()


@dataclass
class Server:
    url: str
    pid: int


def serve(procs: Processes, name: str, app: str) -> Server:
    """Start `app` (a factory) under uvicorn; returns once it answers /healthz."""
    port = free_port()
    procs.start(name, "-m", "uvicorn", "--factory", app, "--host", HOST, "--port", str(port))
    url = f"http://{HOST}:{port}"
    deadline = time.monotonic() + 60
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return Server(url, procs.procs[name].pid)
        procs.check(name)
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not answer within 60 s:\n{procs.log(name)[-2000:]}")
        time.sleep(0.2)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


Request = Callable[[httpx.AsyncClient, int], Awaitable[httpx.Response]]


@dataclass
class Endpoint:
    """One endpoint under load, and what its rounds measured."""

    name: str
    server: Server
    client: httpx.AsyncClient
    request: Request  # the i-th call
    status: int
    rates: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    client_cpu: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)

    async def load(self, *, requests: int, concurrency: int) -> None:
        """`requests` calls with at most `concurrency` in flight. Besides req/s and latency
        it records the CPU seconds per request of the server and of this load generator,
        which hardly depend on what else runs on the machine."""
        indices = iter(range(requests))  # shared: each index is taken by one caller

        async def caller() -> None:
            for i in indices:
                start = time.perf_counter()
                response = await self.request(self.client, i)
                self.latencies.append(time.perf_counter() - start)
                if response.status_code != self.status:
                    raise RuntimeError(f"{self.name}: {response.status_code} {response.text}")

        cpu, client_cpu = cpu_seconds(self.server.pid), time.process_time()
        start = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        self.rates.append(requests / (time.perf_counter() - start))
        self.cpu.append((cpu_seconds(self.server.pid) - cpu) / requests)
        self.client_cpu.append((time.process_time() - client_cpu) / requests)

    def figures(self) -> dict[str, float]:
        """Medians of rounds; percentiles over every round's requests."""
        return {
            "rps": round(statistics.median(self.rates), 1),
            "p50_ms": round(1000 * statistics.median(self.latencies), 2),
            "p99_ms": round(1000 * statistics.quantiles(self.latencies, n=100)[98], 2),
            "cpu_ms": round(1000 * statistics.median(self.cpu), 3),
            "client_cpu_ms": round(1000 * statistics.median(self.client_cpu), 3),
        }


async def measure_load(
    service: Server, bare: Server, key: str, args: argparse.Namespace
) -> dict[str, dict[str, float]]:
    """Warm up each endpoint, then time them in rounds whose order alternates."""
    limits = httpx.Limits(max_connections=args.concurrency)
    auth = {"Authorization": f"Bearer {key}"}
    spec = tiny_spec("bench")
    async with (
        httpx.AsyncClient(base_url=service.url, headers=auth, limits=limits, timeout=60) as svc,
        httpx.AsyncClient(base_url=bare.url, limits=limits, timeout=60) as echo,
    ):
        job_ids = [(await svc.post("/v1/jobs", json=spec)).json()["id"] for _ in range(16)]
        echo_ids = [(await echo.post("/echo", json=spec)).json()["id"] for _ in range(16)]
        endpoints = [
            Endpoint("post_jobs", service, svc, lambda c, _: c.post("/v1/jobs", json=spec), 202),
            Endpoint("post_bare", bare, echo, lambda c, _: c.post("/echo", json=spec), 202),
            Endpoint(
                "get_jobs", service, svc, lambda c, i: c.get(f"/v1/jobs/{job_ids[i % 16]}"), 200
            ),
            Endpoint("get_bare", bare, echo, lambda c, i: c.get(f"/echo/{echo_ids[i % 16]}"), 200),
        ]
        for endpoint in endpoints:  # warm-up: connections, caches, the thread pool
            await endpoint.load(requests=args.concurrency * 4, concurrency=args.concurrency)
            endpoint.rates, endpoint.latencies = [], []
            endpoint.cpu, endpoint.client_cpu = [], []
        for round_ in range(args.rounds):
            for endpoint in endpoints if round_ % 2 == 0 else endpoints[::-1]:
                await endpoint.load(requests=args.requests, concurrency=args.concurrency)
    return {e.name: e.figures() for e in endpoints}


# the package that does the work -> what it does for a request
COMPONENTS = {
    "uvicorn": "HTTP server (uvicorn, httptools)",
    "httptools": "HTTP server (uvicorn, httptools)",
    "uvloop": "HTTP server (uvicorn, httptools)",
    "fastapi": "FastAPI, Starlette (routing, dependencies, responses)",
    "starlette": "FastAPI, Starlette (routing, dependencies, responses)",
    "anyio": "thread-pool hand-offs (anyio)",
    "prometheus_fastapi_instrumentator": "metrics middleware (Prometheus)",
    "prometheus_client": "metrics middleware (Prometheus)",
    "sqlalchemy": "database (SQLAlchemy, sqlite3)",
    "pydantic": "validation, serialisation (pydantic)",
    "pydantic_core": "validation, serialisation (pydantic)",
    "kombu": "broker send (Celery, kombu)",
    "celery": "broker send (Celery, kombu)",
    "vine": "broker send (Celery, kombu)",
    "api": "service code (api/, tid_core/)",
    "tid_core": "service code (api/, tid_core/)",
}
# leaves where a thread waits: pool threads for work, the event loop for I/O
IDLE_LEAVES = ("Condition.wait (threading.py", "Runner.run (asyncio/runners.py")


def busy_shares(raw: str) -> dict[str, float]:
    """py-spy's raw stacks -> each component's share of the samples that were not waiting.
    A sample counts for the deepest frame outside the standard library (json, queue,
    threading and sqlite3 work for whoever called them)."""
    counts: dict[str, int] = {}
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if not stack or frames[-1].startswith(IDLE_LEAVES):
            continue
        owner = "other"
        for frame in reversed(frames):
            path = frame.rpartition(" (")[2].removesuffix(")").rsplit(":", 1)[0]
            package = path.split("/")[0].removesuffix(".py")
            if not path.startswith("<") and package not in sys.stdlib_module_names:
                owner = COMPONENTS.get(package, "other")
                break
        counts[owner] = counts.get(owner, 0) + int(count)
    total = sum(counts.values()) or 1
    return {k: round(v / total, 3) for k, v in sorted(counts.items(), key=lambda kv: -kv[1])}


async def profile_service(
    service: Server, key: str, args: argparse.Namespace, tmp: Path
) -> dict[str, dict[str, float]]:
    """Each jobs endpoint under the same load as above while py-spy samples the service."""
    py_spy = shutil.which(
        "py-spy", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    )
    if py_spy is None:
        raise SystemExit("--profile needs py-spy (pip install py-spy; it is in the dev extras)")
    limits = httpx.Limits(max_connections=args.concurrency)
    auth = {"Authorization": f"Bearer {key}"}
    spec = tiny_spec("profile")
    shares = {}
    async with httpx.AsyncClient(
        base_url=service.url, headers=auth, limits=limits, timeout=60
    ) as svc:
        job_ids = [(await svc.post("/v1/jobs", json=spec)).json()["id"] for _ in range(16)]
        endpoints = [
            Endpoint("post_jobs", service, svc, lambda c, _: c.post("/v1/jobs", json=spec), 202),
            Endpoint(
                "get_jobs", service, svc, lambda c, i: c.get(f"/v1/jobs/{job_ids[i % 16]}"), 200
            ),
        ]
        for endpoint in endpoints:
            out = tmp / f"profile-{endpoint.name}.txt"
            record = [py_spy, "record", "--pid", str(service.pid), "--rate", "200"]
            spy = subprocess.Popen(
                [*record, "--gil", "--nonblocking", "--format", "raw", "--output", str(out)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            await asyncio.sleep(1.0)  # attached
            await endpoint.load(requests=args.requests, concurrency=args.concurrency)
            spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            _, err = spy.communicate(timeout=60)
            if not out.exists():
                raise RuntimeError(f"py-spy wrote no profile: {err.decode()[-2000:]}")
            shares[endpoint.name] = busy_shares(out.read_text())
    return shares


def print_profile(shares: dict[str, dict[str, float]]) -> None:
    print("\nwhere the service's CPU time goes (py-spy samples holding the GIL, every thread)")
    components = list(dict.fromkeys(k for endpoint in shares.values() for k in endpoint))
    print(f"{'component':<56}{'POST':>8}{'GET':>8}")
    for component in components:
        post, get = (shares[e].get(component, 0.0) for e in ("post_jobs", "get_jobs"))
        print(f"{component:<56}{post:>8.1%}{get:>8.1%}")


def wait_worker_ready(procs: Processes, name: str) -> None:
    deadline = time.monotonic() + 120
    while " ready." not in procs.log(name):
        procs.check(name)
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} not ready within 120 s:\n{procs.log(name)[-2000:]}")
        time.sleep(0.2)


def submit_to_running(service: str, key: str, *, runs: int) -> list[dict[str, float]]:
    """Submit a tiny job `runs` times to an idle worker; per run the seconds from sending the
    POST to seeing the job running (client), and from `created_at` to `started_at` (server)."""
    samples = []
    with httpx.Client(base_url=service, headers={"Authorization": f"Bearer {key}"}) as client:
        for i in range(runs):
            start = time.perf_counter()
            job = client.post("/v1/jobs", json=tiny_spec(f"latency-{i}")).raise_for_status().json()
            deadline = time.monotonic() + 120
            while job["state"] == "queued":
                if time.monotonic() > deadline:
                    raise RuntimeError(f"job {job['id']} still queued after 120 s")
                time.sleep(0.01)
                job = client.get(f"/v1/jobs/{job['id']}").raise_for_status().json()
            seen = time.perf_counter() - start
            if job["state"] == "running":
                client.post(f"/v1/jobs/{job['id']}/cancel").raise_for_status()
            while job["state"] not in FINAL:  # the worker is idle again before the next run
                time.sleep(0.2)
                job = client.get(f"/v1/jobs/{job['id']}").raise_for_status().json()
            created, started = (
                datetime.fromisoformat(job[k]) for k in ("created_at", "started_at")
            )
            samples.append(
                {"client_s": round(seen, 3), "server_s": (started - created).total_seconds()}
            )
    return samples


def measure(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp, processes(Path(tmp)) as procs:
        procs.run("-m", "cli.main", "db", "upgrade")
        key = procs.run("-m", "cli.main", "keys", "create", "--owner", "bench").split()[-1]
        service = serve(procs, "api", "api.app:create_app")
        bare = serve(procs, "bare", "bench.api:create_bare_app")
        samples: list[dict[str, float]] = []
        if args.latency_runs:  # first, so the worker never sees the load's queued jobs
            procs.start("worker", "-m", "cli.main", "worker")
            wait_worker_ready(procs, "worker")
            samples = submit_to_running(service.url, key, runs=args.latency_runs)
            procs.stop("worker")
        figures = asyncio.run(measure_load(service, bare, key, args))
        profile = (
            asyncio.run(profile_service(service, key, args, Path(tmp))) if args.profile else None
        )
    result: dict[str, Any] = {
        f"{endpoint}_{k}": v for endpoint, values in figures.items() for k, v in values.items()
    }
    if profile:
        result["profile"] = profile
    for method in ("post", "get"):
        ours, floor = figures[f"{method}_jobs"], figures[f"{method}_bare"]
        result[f"{method}_rps_ratio"] = round(ours["rps"] / floor["rps"], 3)
        result[f"{method}_p50_ratio"] = round(ours["p50_ms"] / floor["p50_ms"], 2)
        result[f"{method}_cpu_ratio"] = round(ours["cpu_ms"] / floor["cpu_ms"], 2)
    for side in ("client", "server"):
        values = [sample[f"{side}_s"] for sample in samples]
        key_name = "submit_to_running_s" if side == "client" else "submit_to_running_server_s"
        result[key_name] = round(statistics.median(values), 3) if values else None
    result["submit_to_running_samples"] = samples
    result["config"] = {
        k: v for k, v in vars(args).items() if k not in {"json", "quick", "profile"}
    } | {"cpus": len(os.sched_getaffinity(0))}
    return result


LABELS = {
    "post_jobs": "POST /v1/jobs",
    "post_bare": "POST bare echo",
    "get_jobs": "GET /v1/jobs/{id}",
    "get_bare": "GET bare echo",
}


def print_table(result: dict[str, Any]) -> None:
    cfg = result["config"]
    print(
        f"loopback, {cfg['concurrency']} requests in flight, {cfg['requests']} requests per round, "
        f"median of {cfg['rounds']} alternating rounds (p50/p99 over all), {cfg['cpus']} CPUs"
    )
    print(
        f"{'endpoint':<20}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'CPU ms/req: server':>20}"
        f"{'client':>8}{'vs bare: req/s':>16}{'CPU':>7}"
    )
    for name, label in LABELS.items():
        method, who = name.split("_")
        ratios = (
            f"{result[f'{method}_rps_ratio']:>16.3f}{result[f'{method}_cpu_ratio']:>7.2f}"
            if who == "jobs"
            else ""
        )
        print(
            f"{label:<20}{result[f'{name}_rps']:>9.1f}{result[f'{name}_p50_ms']:>9.2f}"
            f"{result[f'{name}_p99_ms']:>9.2f}{result[f'{name}_cpu_ms']:>20.3f}"
            f"{result[f'{name}_client_cpu_ms']:>8.3f}{ratios}"
        )
    if result["submit_to_running_s"] is None:
        print("submit -> running: skipped (--no-worker)")
    else:
        print(
            f"submit -> running, idle worker, median of "
            f"{len(result['submit_to_running_samples'])}: "
            f"{result['submit_to_running_s']:.3f} s seen by the client, "
            f"{result['submit_to_running_server_s']:.3f} s created_at -> started_at"
        )
    if "profile" in result:
        print_profile(result["profile"])


def main(argv: list[str] | None = None) -> int:
    parser = harness.parser("REST API vs bare FastAPI, side by side.")
    parser.add_argument("--requests", type=int, default=1000, help="per endpoint and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--latency-runs", type=int, default=5, help="submit -> running samples")
    parser.add_argument(
        "--no-worker", dest="latency_runs", action="store_const", const=0, help="skip them"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="then sample the service with py-spy (where time goes)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.rounds = 100, 2
        args.latency_runs = min(args.latency_runs, 1)
    harness.report(measure(args), print_table, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
