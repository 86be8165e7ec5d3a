"""Prometheus `/metrics`: HTTP metrics of the API, and the service's state read from the database.

HTTP request counts and latencies come from prometheus-fastapi-instrumentator. The job series
are computed at scrape time from the database, the single source of truth, so every API
replica reports the same numbers and nothing is lost on restart:

- `tid_jobs{state}`: jobs by state; `tid_queue_depth`: jobs waiting for a worker;
- `tid_job_duration_seconds{state}`: histogram of finished jobs' run time (start to end);
- `tid_job_attempts_total`, `tid_job_handbacks_total`: attempts started, deploy hand-backs;
- `tid_expired_leases`: running jobs whose worker stopped renewing (the reconciler's to-do);
- `tid_database_up`: 0 when the database could not be read for this scrape.

Each series is an aggregate query: the database counts and sums, and a scrape reads a few rows
however many jobs have finished. With `TID_METRICS_TOKEN` set, /metrics wants that bearer token;
without it, /metrics is open and belongs behind a firewall.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable, Iterator
from typing import Annotated, Any

from fastapi import Depends, FastAPI
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_fastapi_instrumentator import Instrumentator
from pydantic import SecretStr
from sqlalchemy import ColumnElement, Float, case, func, select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from api.problems import Unauthorized
from store.db.models import FINAL_STATES, JOB_STATES, Job
from store.db.session import TRANSIENT_ERRORS, session_scope
from store.db.transitions import db_now
from store.settings import Settings

log = logging.getLogger(__name__)

DURATION_BUCKETS = (60.0, 300.0, 900.0, 1800.0, 3600.0, 3 * 3600.0, 6 * 3600.0, 24 * 3600.0)


class RunSeconds(FunctionElement[float]):
    """Seconds from one timestamp column to another, in SQL: SQLite and PostgreSQL spell
    timestamp arithmetic differently (the compilers below)."""

    type = Float()
    inherit_cache = True


@compiles(RunSeconds, "sqlite")
def _sqlite_seconds(element: RunSeconds, compiler: SQLCompiler, **kw: Any) -> str:
    start, end = (compiler.process(clause, **kw) for clause in element.clauses)
    return f"((julianday({end}) - julianday({start})) * 86400.0)"


@compiles(RunSeconds, "postgresql")
def _postgresql_seconds(element: RunSeconds, compiler: SQLCompiler, **kw: Any) -> str:
    start, end = (compiler.process(clause, **kw) for clause in element.clauses)
    return f"CAST(EXTRACT(EPOCH FROM ({end} - {start})) AS DOUBLE PRECISION)"


def _histogram_columns() -> list[ColumnElement[Any]]:
    """Count, sum and one cumulative count per bucket of finished jobs' run times."""
    seconds = RunSeconds(Job.started_at, Job.finished_at)
    return [
        func.count(),
        func.coalesce(func.sum(seconds), 0.0),
        *(func.sum(case((seconds <= bound, 1), else_=0)) for bound in DURATION_BUCKETS),
    ]


class ServiceCollector(Collector):
    """The job series, one short read-only session per scrape."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("tid_database_up", "1 if the database answered this scrape")
        try:
            families = list(self._from_database())
        except TRANSIENT_ERRORS as exc:
            log.warning("metrics: database unavailable: %s", exc)
            up.add_metric([], 0.0)
            yield up
            return
        up.add_metric([], 1.0)
        yield up
        yield from families

    def _from_database(self) -> Iterator[Metric]:
        with session_scope(self.settings.database_url) as session:
            counts = dict(
                session.execute(select(Job.state, func.count()).group_by(Job.state)).all()
            )
            attempts, handbacks = session.execute(
                select(
                    func.coalesce(func.sum(Job.attempt), 0),
                    func.coalesce(func.sum(Job.handbacks), 0),
                )
            ).one()
            expired = session.scalar(
                select(func.count())
                .select_from(Job)
                .where(Job.state == "running", Job.lease_expires < db_now(session))
            )
            histograms = {
                state: rest
                for state, *rest in session.execute(
                    select(Job.state, *_histogram_columns())
                    .where(
                        Job.state.in_(FINAL_STATES),
                        Job.started_at.is_not(None),
                        Job.finished_at.is_not(None),
                    )
                    .group_by(Job.state)
                )
            }
        jobs = GaugeMetricFamily("tid_jobs", "Jobs by state", labels=["state"])
        for state in JOB_STATES:
            jobs.add_metric([state], float(counts.get(state, 0)))
        yield jobs
        yield GaugeMetricFamily(
            "tid_queue_depth",
            "Jobs queued, waiting for a worker",
            value=float(counts.get("queued", 0)),
        )
        yield CounterMetricFamily(
            "tid_job_attempts", "Attempts started over all jobs", value=float(attempts)
        )
        yield CounterMetricFamily(
            "tid_job_handbacks", "Attempts handed back by a deploy", value=float(handbacks)
        )
        yield GaugeMetricFamily(
            "tid_expired_leases", "Running jobs whose lease expired", value=float(expired or 0)
        )
        durations = HistogramMetricFamily(
            "tid_job_duration_seconds", "Run time of finished jobs", labels=["state"]
        )
        for state in FINAL_STATES:
            count, total, *cumulative = histograms.get(
                state, [0, 0.0, *[0] * len(DURATION_BUCKETS)]
            )
            buckets = [
                (str(b), float(n)) for b, n in zip(DURATION_BUCKETS, cumulative, strict=True)
            ]
            durations.add_metric(
                [state], [*buckets, ("+Inf", float(count))], sum_value=float(total)
            )
        yield durations


_bearer = HTTPBearer(auto_error=False)


def _token_check(token: SecretStr) -> Callable[..., Awaitable[None]]:
    """A dependency that lets a scrape through only with `token` as its bearer token."""
    expected = token.get_secret_value().encode()

    async def check(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> None:
        given = credentials.credentials.encode() if credentials else b""
        if not secrets.compare_digest(given, expected):  # constant time: no guessing by timing
            raise Unauthorized("/metrics needs `Authorization: Bearer <TID_METRICS_TOKEN>`")

    return check


def install(app: FastAPI, settings: Settings) -> None:
    """Instrument `app` and serve `/metrics` from a registry of its own (one per app, so
    tests with several apps never mix their series)."""
    registry = CollectorRegistry()
    registry.register(ServiceCollector(settings))
    token = settings.metrics_token
    guard = [Depends(_token_check(token))] if token is not None else []
    Instrumentator(
        registry=registry,
        excluded_handlers=["/metrics"],
        should_exclude_streaming_duration=True,  # an SSE stream lasts as long as its job
    ).instrument(app).expose(app, include_in_schema=False, dependencies=guard)
