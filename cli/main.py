"""`tid`: run the service (serve, worker, db, keys) and use it over REST (submit, status, download).

Server commands read the `TID_*` settings; client commands talk HTTP only (`TID_URL`,
`TID_API_KEY`). Nothing here imports torch at import time: the worker and the demo import it
when they run.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import logging
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from cli.client import ApiError, Client
from store.settings import Settings, get_settings
from tid_core.spec import TRAIN_SPLIT, VAL_SPLIT

app = typer.Typer(no_args_is_help=True, help=__doc__)
db_app = typer.Typer(no_args_is_help=True, help="Database schema (Alembic).")
keys_app = typer.Typer(no_args_is_help=True, help="API keys.")
app.add_typer(db_app, name="db")
app.add_typer(keys_app, name="keys")


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the database to this code's schema."""
    from store.db.migrate import upgrade
    from store.db.session import TRANSIENT_ERRORS

    settings = get_settings()
    try:
        upgrade(settings.database_url)
    except TRANSIENT_ERRORS as exc:  # unreachable, or not answering within the TID_DB_* bounds
        _fail(exc)
    typer.echo(f"database at head: {settings.database_url.split('@')[-1]}")


@keys_app.command("create")
def keys_create(
    owner: Annotated[str, typer.Option(help="who the key belongs to")],
    expires_in: Annotated[
        float | None,
        typer.Option(
            min=0, max=36500, help="days until it expires, fractions allowed (default: never)"
        ),
    ] = None,
) -> None:
    """Create an API key for OWNER and print it (it is stored hashed: copy it now)."""
    from store.db.models import utcnow
    from store.db.session import session_scope
    from store.keys import create_key

    expires_at = None if expires_in is None else utcnow() + timedelta(days=expires_in)
    with session_scope(get_settings().database_url) as session:
        key = create_key(session, owner=owner, expires_at=expires_at)
    typer.echo(key)


def _when(at: datetime | None) -> str:
    return "-" if at is None else f"{at:%Y-%m-%d %H:%M}"


@keys_app.command("list")
def keys_list(
    owner: Annotated[str | None, typer.Option(help="only this owner's keys")] = None,
) -> None:
    """Every API key, oldest first (times UTC), without its secret: the prefix tells which key
    one holds (`tid_<prefix>_...`)."""
    from store.db.session import session_scope
    from store.keys import list_keys

    with session_scope(get_settings().database_url) as session:
        keys = list_keys(session, owner=owner)
    typer.echo(f"{'id':<34}{'prefix':<10}{'owner':<20}{'created':<18}{'expires':<18}revoked")
    for key in keys:
        typer.echo(
            f"{key.id:<34}{key.prefix:<10}{key.owner[:19]:<20}{_when(key.created_at):<18}"
            f"{_when(key.expires_at):<18}{_when(key.revoked_at)}"
        )


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="the key's id (`tid keys list`)")],
) -> None:
    """Revoke an API key: every request with it is a 401 from now on."""
    from store.db.session import session_scope
    from store.keys import revoke_key

    with session_scope(get_settings().database_url) as session:
        key = revoke_key(session, key_id)
    if key is None:
        _fail(LookupError(f"no API key {key_id!r}"))
    typer.echo(f"revoked {key.id} of {key.owner} at {_when(key.revoked_at)} UTC")


@app.command()
def serve(host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the REST API (refuses to start on an un-migrated database)."""
    import uvicorn

    uvicorn.run("api.app:create_app", factory=True, host=host, port=port)


@app.command()
def worker(concurrency: int = 1) -> None:
    """Run a Celery worker that trains jobs (one at a time per GPU: keep concurrency 1)."""
    from worker.celery_app import app as celery

    settings = get_settings()
    argv = ["worker", "-Q", settings.queue, "-c", str(concurrency), "--prefetch-multiplier", "1"]
    celery.worker_main([*argv, "-l", "INFO"])


def _is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:  # a host name, or "" (every interface)
        return False


@app.command()
def flower(
    port: Annotated[int, typer.Option(help="where Flower listens")] = 5555,
    address: str = "127.0.0.1",
) -> None:
    """Celery's Flower dashboard: the service queue, its workers and their tasks.

    Flower can revoke tasks and stop workers, so anywhere but a loopback address it runs only
    behind HTTP basic auth, TID_FLOWER_BASIC_AUTH (`user:password`)."""
    settings = get_settings()
    argv = ["flower", f"--port={port}", f"--address={address}"]
    if settings.flower_basic_auth is not None:
        credentials = settings.flower_basic_auth.get_secret_value()
        user, _, password = credentials.partition(":")
        if not (user and password) or "," in credentials:  # Flower splits its list on commas
            _fail(ValueError("TID_FLOWER_BASIC_AUTH must be `user:password`, without commas"))
        argv.append(f"--basic-auth={credentials}")  # an argument in this process, not in `ps`
    elif not _is_loopback(address):
        _fail(ValueError(f"Flower on {address!r} needs TID_FLOWER_BASIC_AUTH=user:password"))
    from store.queue import make_celery

    make_celery(settings).start(argv)


RECONCILE_MAX_BACKOFF_SECONDS = 300.0


def reconcile_loop(settings: Settings, *, passes: int | None = None) -> None:
    """`tid reconcile --loop`: a pass every TID_RECONCILE_SECONDS, `passes` times (None: for
    ever). No exception ends it: a dead reconciler would leave lost jobs lost for good. A
    database outage is waited out at the usual pace; any other failure (a bug, a row it cannot
    handle) is logged with its traceback, and the passes after it back off, doubling up to
    RECONCILE_MAX_BACKOFF_SECONDS, until one succeeds."""
    from store.db.session import TRANSIENT_ERRORS
    from worker.reconcile import reconcile as reconcile_once

    log = logging.getLogger("tid.reconcile")
    failures = 0
    for _ in itertools.repeat(None) if passes is None else range(passes):
        delay = settings.reconcile_seconds
        try:
            reconcile_once(settings=settings)
            failures = 0
        except TRANSIENT_ERRORS as exc:  # the database is restarting: the next pass catches up
            log.warning("database unavailable: %s", exc)
        except Exception:
            failures += 1
            delay = max(delay, min(delay * 2 ** min(failures, 16), RECONCILE_MAX_BACKOFF_SECONDS))
            log.exception("reconcile pass failed; the next one in %.0f s", delay)
        time.sleep(delay)


@app.command()
def reconcile(
    loop: Annotated[bool, typer.Option(help="repeat every TID_RECONCILE_SECONDS")] = False,
) -> None:
    """Re-queue jobs whose worker was lost; send what was never sent and re-send messages the
    broker lost (jobs, datasets and models); fail checks that never finish."""
    settings = get_settings()
    if not loop:
        from worker.reconcile import reconcile as reconcile_once

        typer.echo(json.dumps(reconcile_once(settings=settings)))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    reconcile_loop(settings)


def _client() -> Client:
    return Client()


def _fail(exc: Exception) -> NoReturn:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(1)


def _summary(job: dict[str, Any]) -> str:
    ap = job.get("best_ap")
    best = f"  best AP {ap:.1f}" if ap is not None else ""
    return f"{job['id']} {job['state']}  step {job.get('step', 0)}/{job.get('total_steps')}{best}"


def _follow(client: Client, job_id: str) -> None:
    """Live progress until the job is final (stderr: stdout keeps only what scripts read)."""
    from rich.console import Console

    from cli.terminal import watch as follow

    job = follow(client, job_id, console=Console(stderr=True))
    typer.echo(_summary(job), err=True)
    if job["state"] != "succeeded":
        _fail(RuntimeError(f"job {job['state']}: {job.get('error')}"))


@app.command()
def submit(
    spec: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="JobSpec JSON")],
    wait: Annotated[bool, typer.Option(help="follow the job until it is final")] = False,
) -> None:
    """Submit a job; prints its id (then, with --wait, its live progress)."""
    client = _client()
    try:
        job = client.submit(json.loads(spec.read_text()))
        typer.echo(job["id"])
        if wait:
            _follow(client, job["id"])
    except (ApiError, OSError, ValueError) as exc:
        _fail(exc)


def _upload(file: Path, form: dict[str, str], *, wait: bool, post: str, fetch: str) -> None:
    """Upload; print the new id, and with `wait` the worker's verdict (exit 1 if failed)."""
    client = _client()
    try:
        row = client.upload(post, file, form)
        typer.echo(row["id"])
        if wait:
            path = f"{fetch}/{row['id']}"
            row = client.wait(
                lambda: client.request("GET", path), done=lambda r: r["state"] != "pending"
            )
            typer.echo(json.dumps(row, indent=2), err=True)
            if row["state"] != "ready":
                _fail(RuntimeError(f"{row['state']}: {row.get('error')}"))
    except (ApiError, OSError, TimeoutError) as exc:
        _fail(exc)


Wait = Annotated[bool, typer.Option(help="wait for a worker's check; exit 1 if it fails")]
Upload = Annotated[Path, typer.Argument(exists=True, dir_okay=False)]


@app.command("upload-model")
def upload_model(
    file: Upload,
    name: Annotated[str, typer.Option(help="a name to list it by")],
    wait: Wait = False,
) -> None:
    """Upload weights (.pt, .pth, .safetensors): a detector to use as a teacher, or a backbone
    (torchvision's ImageNet file) for a student's weights_backbone; prints the model id."""
    _upload(file, {"name": name}, wait=wait, post="/v1/models", fetch="/v1/models")


@app.command("upload-dataset")
def upload_dataset(
    file: Upload,
    name: Annotated[str, typer.Option(help="a name to list it by")],
    train_split: Annotated[str, typer.Option(help="e.g. train2017")] = TRAIN_SPLIT,
    val_split: Annotated[str, typer.Option(help="e.g. val2017")] = VAL_SPLIT,
    wait: Wait = False,
) -> None:
    """Upload a .zip of a COCO folder (annotations/instances_<split>.json, <split>/ images);
    prints the dataset id."""
    form = {"name": name, "train_split": train_split, "val_split": val_split}
    _upload(file, form, wait=wait, post="/v1/datasets/upload", fetch="/v1/datasets")


@app.command()
def watch(job_id: str) -> None:
    """A job's live progress bar (step, ETA, loss, last AP) until it is final."""
    try:
        _follow(_client(), job_id)
    except ApiError as exc:
        _fail(exc)


@app.command("ls")
def list_jobs(
    state: Annotated[str | None, typer.Option(help="only jobs in this state")] = None,
    limit: Annotated[int, typer.Option(min=1, max=100)] = 20,
) -> None:
    """Your jobs, newest first."""
    try:
        jobs = _client().jobs(state=state, limit=limit)["data"]
    except ApiError as exc:
        _fail(exc)
        return
    head = f"{'id':<34}{'name':<24}{'method':<8}{'state':<11}{'nodes':>6}{'step':>12}{'best AP':>9}"
    typer.echo(head)
    for job in jobs:
        ap = f"{job['best_ap']:.1f}" if job.get("best_ap") is not None else "-"
        step = f"{job.get('step', 0)}/{job.get('total_steps') or '?'}"
        resources = job["spec"].get("resources", {})  # nodes x processes each
        nodes = f"{resources.get('nnodes', 1)}x{resources.get('nproc_per_node', 1)}"
        typer.echo(
            f"{job['id']:<34}{job['name'][:23]:<24}{job['method']:<8}{job['state']:<11}"
            f"{nodes:>6}{step:>12}{ap:>9}"
        )
        if job.get("waiting_reason"):  # a job on several nodes whose workers are not all free
            typer.echo(f"{'':<34}{job['waiting_reason']}")


@app.command()
def logs(job_id: str, tail: Annotated[int, typer.Option(min=1)] = 200) -> None:
    """The last lines of a job's trainer log."""
    try:
        typer.echo(_client().logs(job_id, tail=tail), nl=False)
    except ApiError as exc:
        _fail(exc)


@app.command()
def cancel(job_id: str) -> None:
    """Cancel a job (a running one stops at its next step; its checkpoints are kept)."""
    try:
        typer.echo(_summary(_client().cancel(job_id)))
    except ApiError as exc:
        _fail(exc)


@app.command()
def compare(job_ids: list[str]) -> None:
    """A COCO mAP table of jobs' last evaluations (e.g. a teacher, `none` and `tid`)."""
    from cli.terminal import evaluation_table

    client = _client()
    try:
        labels = {f"{client.job(i)['method']}:{i[:5]}": i for i in job_ids}
        typer.echo(evaluation_table(client, labels))
    except ApiError as exc:
        _fail(exc)


@app.command()
def status(job_id: str) -> None:
    """Print a job's state and progress as JSON."""
    try:
        typer.echo(json.dumps(_client().job(job_id), indent=2))
    except ApiError as exc:
        _fail(exc)


@app.command()
def download(
    job_id: str,
    output: Annotated[Path, typer.Option("-o", "--output", help="file to write")],
    name: Annotated[str, typer.Option(help="student.safetensors or student.pt")] = (
        "student.safetensors"
    ),
) -> None:
    """Download a finished job's student weights (the ETag is checked against the bytes)."""
    import hashlib

    try:
        etag = _client().download(job_id, name, output)
    except (ApiError, OSError) as exc:
        _fail(exc)
        return
    digest = hashlib.sha256(output.read_bytes()).hexdigest()
    if etag and digest != etag:
        _fail(RuntimeError(f"download corrupted: sha256 {digest} != ETag {etag}"))
    typer.echo(f"{output} ({output.stat().st_size} bytes, sha256 {digest})")


@app.command()
def tensorboard(
    job_id: str,
    port: Annotated[int, typer.Option(help="where TensorBoard listens")] = 6006,
    host: str = "127.0.0.1",
) -> None:
    """Serve a job's TensorBoard scalars (run it where TID_DATA_ROOT is: the worker image)."""
    import os
    import re

    if not re.fullmatch(r"[0-9a-f]{32}", job_id):
        _fail(ValueError(f"not a job id: {job_id!r}"))
    log_dir = get_settings().jobs_dir / job_id / "tensorboard"
    if not log_dir.is_dir():
        _fail(FileNotFoundError(f"no TensorBoard files for job {job_id} under {log_dir.parent}"))
    cmd = [sys.executable, "-m", "tensorboard.main", "--logdir", str(log_dir)]
    os.execv(sys.executable, [*cmd, "--host", host, "--port", str(port)])


@app.command()
def demo(
    quick: Annotated[bool, typer.Option(help="tiny budget (a smoke test)")] = False,
    port: int = 8765,
) -> None:
    """The whole service on embedded defaults: API + worker, a teacher and two students."""
    from cli.service_demo import run_demo

    sys.exit(run_demo(quick=quick, port=port))


if __name__ == "__main__":
    app()
