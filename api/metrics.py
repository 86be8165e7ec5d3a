"""Prometheus `/metrics`: HTTP metrics of the API, and the service's state read from the database.

HTTP request counts and latencies come from prometheus-fastapi-instrumentator. The job series
are computed at scrape time from the database, the single source of truth, so every API
replica reports the same numbers and nothing is lost on restart:

- `tid_jobs{state}`: jobs by state; `tid_queue_depth`: jobs waiting for a worker;
- `tid_job_duration_seconds{state}`: histogram of finished jobs' run time (start to end);
- `tid_job_attempts_total`, `tid_job_handbacks_total`: attempts started, deploy hand-backs;
- `tid_expired_leases`: running jobs whose worker stopped renewing (the reconciler's to-do);
- `tid_database_up`: 0 when the database could not be read for this scrape.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_fastapi_instrumentator import Instrumentator
from sqlalchemy import func, select

from store.db.models import FINAL_STATES, JOB_STATES, Job, utcnow
from store.db.session import TRANSIENT_ERRORS, session_scope
from store.settings import Settings

log = logging.getLogger(__name__)

DURATION_BUCKETS = (60.0, 300.0, 900.0, 1800.0, 3600.0, 3 * 3600.0, 6 * 3600.0, 24 * 3600.0)


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
                .where(Job.state == "running", Job.lease_expires < utcnow())
            )
            finished = session.execute(
                select(Job.state, Job.started_at, Job.finished_at).where(
                    Job.state.in_(FINAL_STATES),
                    Job.started_at.is_not(None),
                    Job.finished_at.is_not(None),
                )
            ).all()
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
            seconds = [
                (end - start).total_seconds()
                for s, start, end in finished
                if s == state and start is not None and end is not None
            ]
            buckets = [(str(b), float(sum(v <= b for v in seconds))) for b in DURATION_BUCKETS]
            durations.add_metric(
                [state], [*buckets, ("+Inf", float(len(seconds)))], sum_value=sum(seconds)
            )
        yield durations


def install(app: FastAPI, settings: Settings) -> None:
    """Instrument `app` and serve `/metrics` from a registry of its own (one per app, so
    tests with several apps never mix their series)."""
    registry = CollectorRegistry()
    registry.register(ServiceCollector(settings))
    Instrumentator(
        registry=registry,
        excluded_handlers=["/metrics"],
        should_exclude_streaming_duration=True,  # an SSE stream lasts as long as its job
    ).instrument(app).expose(app, include_in_schema=False)
