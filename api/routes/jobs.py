"""Jobs: submit a JobSpec, follow it (state, metrics, checkpoints, logs, live events), cancel it,
download the distilled student. The submit path checks every id and path the spec names, so a
job that is queued can be run by a worker without asking the user anything again.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Header, Path, Query, Response
from fastapi.responses import FileResponse, PlainTextResponse, StreamingResponse
from sqlalchemy import and_, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api import evaluations
from api.deps import CurrentOwner, IdPath, SessionDep, SettingsDep, get_owned
from api.problems import Conflict, NotFound, Unprocessable, responses
from api.quota import check_active_jobs, check_job_caps
from api.schemas import (
    CheckpointPublic,
    CheckpointsPublic,
    EvaluationPublic,
    JobPublic,
    JobsPublic,
    MetricsPublic,
)
from api.spec_references import checked_spec
from api.storage import check_range, etag_matches, tail_lines
from api.stream_leases import leased, open_stream
from store.db.models import (
    FINAL_STATES,
    JOB_STATES,
    Artifact,
    Checkpoint,
    Evaluation,
    IdempotencyKey,
    Job,
    JobEvent,
    Metric,
)
from store.db.session import session_scope
from store.db.transitions import request_cancel
from store.queue import RUN_JOB, enqueue
from store.settings import Settings
from tid_core.spec import JobSpec

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=responses(401, 422))

POLL_SECONDS = 0.5  # how often an event stream looks for new rows
KEEPALIVE_SECONDS = 15.0  # a comment line keeps proxies from closing a quiet stream
EVENTS_BATCH = 500
LATEST_ROWS = 64  # a step logs a few dozen scalars at most
MAX_METRICS = 10_000
MAX_ROW_ID = 2**63 - 1  # BIGINT: a larger cursor id is a 422, not an overflow in the driver
PRINTABLE = r"^[^\x00-\x1f]+$"  # PostgreSQL refuses NUL in text: a 422 here, not a 500 there
DERIVED = {"best_ap", "latest_metrics"}  # JobPublic's fields that are no column of `jobs`


def _latest_metrics(session: Session, job: Job, latest: Evaluation | None) -> dict[str, float]:
    """The metrics of the job's last logged step: its metric rows, and the `eval/AP`... of its
    newest evaluation (`latest`) when that was logged last."""
    rows = session.execute(
        select(Metric.attempt, Metric.step, Metric.name, Metric.value)
        .where(Metric.job_id == job.id)
        .order_by(Metric.id.desc())
        .limit(LATEST_ROWS)
    ).all()
    newest = (rows[0].attempt, rows[0].step) if rows else None
    if latest is not None and (newest is None or newest <= (latest.attempt, latest.step)):
        step, evaluated = latest.step, evaluations.stat_points(latest)
    elif newest is not None:
        step, evaluated = newest[1], {}
    else:
        return {}
    return {name: value for _, at, name, value in reversed(rows) if at == step} | evaluated


def _public(session: Session, jobs: list[Job]) -> list[JobPublic]:
    """The jobs as clients see them, with what is derived from their evaluations (one query for
    all of them)."""
    maps = evaluations.summaries(session, [job.id for job in jobs])
    public = []
    for job in jobs:
        summary = maps.get(job.id, evaluations.NOT_EVALUATED)
        columns = {name: getattr(job, name) for name in JobPublic.model_fields.keys() - DERIVED}
        public.append(
            JobPublic(
                **columns,
                best_ap=summary.best_ap,
                latest_metrics=_latest_metrics(session, job, summary.latest),
            )
        )
    return public


def _replayed(session: Session, *, owner: str, key: str, request_hash: str) -> Job | None:
    """The job an earlier request with this Idempotency-Key created, if it had the same body."""
    row = session.get(IdempotencyKey, (owner, key))
    if row is None:
        return None
    if row.request_hash != request_hash:
        raise Unprocessable(
            f"Idempotency-Key {key!r} was already used with a different body",
            loc=("header", "Idempotency-Key"),
        )
    return session.get(Job, row.job_id)


def _create_job(
    session: Session,
    settings: Settings,
    spec: JobSpec,
    *,
    owner: str,
    key: str | None,
    request_hash: str,
) -> Job:
    """Insert and commit the job (with its idempotency key), then send its task."""
    job = Job(
        owner=owner,
        name=spec.name,
        spec=checked_spec(session, settings, spec, owner=owner).model_dump(mode="json"),
        method=spec.distill.method,
        max_attempts=spec.resources.max_attempts or settings.max_attempts,
        nnodes=spec.resources.nnodes,
    )
    session.add(job)
    session.flush()
    if key:
        session.add(IdempotencyKey(owner=owner, key=key, request_hash=request_hash, job_id=job.id))
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        earlier = (
            _replayed(session, owner=owner, key=key, request_hash=request_hash) if key else None
        )
        if earlier is None:
            raise
        return earlier  # a concurrent request with the same key committed first
    if job.nnodes == 1:  # if it is lost, the reconciler re-sends queued jobs
        enqueue(settings, RUN_JOB, job.id)
    # else the reconciler places it on workers that are all free at once (store.db.placement)
    return job


@router.post("", status_code=202, responses=responses(400, 413, 429))
def submit_job(
    *,
    session: SessionDep,
    owner: CurrentOwner,
    settings: SettingsDep,
    spec: JobSpec,
    response: Response,
    idempotency_key: Annotated[str | None, Header(min_length=1, max_length=256)] = None,
) -> JobPublic:
    """Queue a job. A repeated Idempotency-Key with the same job (equal `spec_hash`) answers
    with the job it created (no new row, and no quota check); with another job it is a 422."""
    request_hash = spec.spec_hash()
    job = None
    if idempotency_key:
        job = _replayed(session, owner=owner, key=idempotency_key, request_hash=request_hash)
    if job is None:
        check_job_caps(session, settings, spec, owner=owner)
        check_active_jobs(session, settings, owner=owner)
        job = _create_job(
            session, settings, spec, owner=owner, key=idempotency_key, request_hash=request_hash
        )
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return _public(session, [job])[0]


def _encode_cursor(job: Job) -> str:
    raw = f"{job.created_at.isoformat()}|{job.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        at, job_id = raw.split("|", 1)
        when = datetime.fromisoformat(at)
        if when.tzinfo is None:  # cursors we issue always carry the UTC offset
            raise ValueError("cursor time without a timezone")
        if not (job_id.isascii() and job_id.isalnum()):  # ids are hex: no NUL for the driver
            raise ValueError("cursor id is not a job id")
        return when, job_id
    except ValueError as exc:  # bad base64, bad UTF-8, no separator or a bad time
        raise Unprocessable("invalid cursor", loc=("query", "cursor")) from exc


@router.get("")
def list_jobs(
    *,
    session: SessionDep,
    owner: CurrentOwner,
    state: Annotated[
        str | None, Query(max_length=16, pattern=f"^({'|'.join(JOB_STATES)})$")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> JobsPublic:
    """The caller's jobs, newest first; `next_cursor` fetches the next page."""
    query = select(Job).where(Job.owner == owner)
    if state:
        query = query.where(Job.state == state)
    if cursor:
        at, last_id = _decode_cursor(cursor)
        query = query.where(or_(Job.created_at < at, and_(Job.created_at == at, Job.id < last_id)))
    jobs = list(
        session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1))
    )
    next_cursor = _encode_cursor(jobs[limit - 1]) if len(jobs) > limit else None
    return JobsPublic(data=_public(session, jobs[:limit]), next_cursor=next_cursor)


@router.get("/{job_id}", responses=responses(404))
def read_job(*, session: SessionDep, owner: CurrentOwner, job_id: IdPath) -> JobPublic:
    return _public(session, [get_owned(session, Job, job_id, owner=owner)])[0]


@router.get("/{job_id}/metrics", responses=responses(404))
def read_job_metrics(
    *,
    session: SessionDep,
    owner: CurrentOwner,
    job_id: IdPath,
    name: Annotated[str | None, Query(max_length=64, pattern=PRINTABLE)] = None,
    after_id: Annotated[int, Query(ge=0, le=MAX_ROW_ID)] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_METRICS)] = MAX_METRICS,
) -> MetricsPublic:
    """Metric points in logging order (page with `after_id`), and every evaluation."""
    job = get_owned(session, Job, job_id, owner=owner)
    points, evaluated = evaluations.metric_points(
        session, job.id, name=name, after_id=after_id, limit=limit
    )
    return MetricsPublic(
        data=points, evaluations=[EvaluationPublic.model_validate(e) for e in evaluated]
    )


@router.get("/{job_id}/checkpoints", responses=responses(404))
def list_job_checkpoints(
    *, session: SessionDep, owner: CurrentOwner, job_id: IdPath
) -> CheckpointsPublic:
    job = get_owned(session, Job, job_id, owner=owner)
    rows = session.scalars(
        select(Checkpoint).where(Checkpoint.job_id == job.id).order_by(Checkpoint.id)
    )
    return CheckpointsPublic(data=[CheckpointPublic.model_validate(r) for r in rows])


@router.get("/{job_id}/logs", response_class=PlainTextResponse, responses=responses(404))
def read_job_logs(
    *,
    session: SessionDep,
    owner: CurrentOwner,
    settings: SettingsDep,
    job_id: IdPath,
    tail: Annotated[int, Query(ge=1, le=100_000)] = 200,
) -> PlainTextResponse:
    """The trainer log's last lines (empty until the job has started)."""
    job = get_owned(session, Job, job_id, owner=owner)
    return PlainTextResponse(tail_lines(settings.jobs_dir / job.id / "train.log", tail))


@router.post("/{job_id}/cancel", status_code=202, responses=responses(404, 409))
def cancel_job(*, session: SessionDep, owner: CurrentOwner, job_id: IdPath) -> JobPublic:
    """A queued job is cancelled at once; a running one when its worker sees the flag."""
    job = get_owned(session, Job, job_id, owner=owner)
    applied = request_cancel(session, job.id)
    session.refresh(job)
    if not applied:
        raise Conflict(f"job {job.id} is already {job.state}")
    return _public(session, [job])[0]


def _poll_events(database_url: str, job_id: str, after: int) -> tuple[bool, list[Any]]:
    """(job is final, event rows after `after`), read in one short session of its own."""
    with session_scope(database_url) as session:
        state = session.scalar(select(Job.state).where(Job.id == job_id))
        rows = session.execute(
            select(JobEvent.id, JobEvent.type, JobEvent.attempt, JobEvent.data)
            .where(JobEvent.job_id == job_id, JobEvent.id > after)
            .order_by(JobEvent.id)
            .limit(EVENTS_BATCH)
        ).all()
    return state is None or state in FINAL_STATES, list(rows)


async def _event_stream(database_url: str, job_id: str, after: int) -> AsyncIterator[str]:
    """SSE frames until the job is final and every row is sent; no connection is held between
    polls (each runs in a worker thread with its own session). Each frame's data is the event
    with the attempt that wrote it, so a client can tell an earlier attempt's history apart."""
    quiet_since = time.monotonic()
    while True:
        final, rows = await anyio.to_thread.run_sync(_poll_events, database_url, job_id, after)
        for row_id, kind, attempt, data in rows:
            frame = json.dumps({**data, "attempt": attempt})
            yield f"id: {row_id}\nevent: {kind}\ndata: {frame}\n\n"
            after = row_id
        if final and len(rows) < EVENTS_BATCH:
            return
        if rows:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= KEEPALIVE_SECONDS:
            yield ": keep-alive\n\n"
            quiet_since = time.monotonic()
        if len(rows) < EVENTS_BATCH:
            await anyio.sleep(POLL_SECONDS)


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}, **responses(404, 429)},
)
def stream_job_events(
    *,
    session: SessionDep,
    owner: CurrentOwner,
    settings: SettingsDep,
    job_id: IdPath,
    last_event_id: Annotated[int | None, Query(ge=0, le=MAX_ROW_ID)] = None,
    last_event_id_header: Annotated[
        int | None, Header(alias="Last-Event-ID", ge=0, le=MAX_ROW_ID)
    ] = None,
) -> StreamingResponse:
    """Server-Sent Events of the job's event rows; resumes after `Last-Event-ID`. Each open
    stream counts against the owner's TID_MAX_EVENT_STREAMS_PER_OWNER (429 above it)."""
    job = get_owned(session, Job, job_id, owner=owner)
    after = last_event_id_header if last_event_id_header is not None else last_event_id or 0
    lease = open_stream(settings, owner=owner)
    return StreamingResponse(
        leased(lease, _event_stream(settings.database_url, job.id, after)),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.get(
    "/{job_id}/artifacts/{name}",
    response_class=FileResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}},
        206: {"content": {"application/octet-stream": {}}},
        304: {},
        **responses(400, 404, 416),
    },
)
def download_artifact(
    *,
    session: SessionDep,
    owner: CurrentOwner,
    settings: SettingsDep,
    job_id: IdPath,
    name: Annotated[str, Path(max_length=64, pattern=r"^[A-Za-z0-9._\-]+$")],
    if_none_match: Annotated[str | None, Header(max_length=1024)] = None,
    range_header: Annotated[str | None, Header(alias="Range", max_length=1024)] = None,
) -> Response:
    """`student.pt` or `student.safetensors` of a finished job; ETag is the sha256, and
    If-None-Match and Range requests are honoured."""
    job = get_owned(session, Job, job_id, owner=owner)
    artifact = session.scalar(
        select(Artifact).where(Artifact.job_id == job.id, Artifact.name == name)
    )
    if artifact is None:
        raise NotFound(f"job {job.id} has no artifact {name!r} (yet)")
    etag = f'"{artifact.sha256}"'
    if if_none_match and etag_matches(if_none_match, etag):
        return Response(status_code=304, headers={"ETag": etag})
    path = settings.jobs_dir / job.id / artifact.path
    if not path.is_file():
        raise NotFound(f"artifact {name!r} of job {job.id} is missing on disk")
    stat = path.stat()
    if range_header is not None:  # an empty one is malformed too
        check_range(range_header, stat.st_size)
    return FileResponse(
        path,
        filename=name,
        media_type="application/octet-stream",
        headers={"ETag": etag},
        stat_result=stat,
    )
