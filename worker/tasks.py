"""Celery tasks: thin wrappers that pass ids to `worker.runner` and `worker.resources`.

Each task re-reads its row and acts only if the row still asks for it, so a duplicate delivery
is a no-op. Only transient database errors are retried (with backoff); anything else is a bug
or a decided failure already written to the database.

A message whose task kills its worker comes back (`task_reject_on_worker_lost`), so each kind
of row bounds how often it is acted on: a job by its attempts (each claim is one, and the
reconciler fails it past `max_attempts`), a dataset or model check by its deliveries, counted
in the row (`worker.resources`: past `TID_CHECK_MAX_DELIVERIES` it fails).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

from celery import shared_task

from store.db.session import TRANSIENT_ERRORS
from store.queue import CHECK_MODEL, PREPARE_DATASET, RUN_JOB, RUN_NODE
from store.settings import get_settings
from worker import resources, runner
from worker.registry import checking
from worker.shutdown import shutdown_event

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])


def _task(name: str) -> Callable[[F], F]:
    """A task of every Celery app built here (`shared_task`), retried on transient database
    errors (typed: celery has no stubs)."""
    decorator: Callable[[F], F] = shared_task(
        name=name,
        autoretry_for=TRANSIENT_ERRORS,
        retry_backoff=2,
        retry_backoff_max=60,
        retry_jitter=True,
        max_retries=8,
    )
    return decorator


@_task(RUN_JOB)
def run_job(job_id: str) -> None:
    with shutdown_event() as shutdown:
        if shutdown.is_set():
            # A message that reaches a worker on its way out is dropped unclaimed: the job
            # stays queued and the reconciler sends it again. (Rejecting it with requeue
            # makes a solo-pool worker fetch it back in a tight loop until it is killed.)
            log.warning("job %s: not starting, this worker is shutting down", job_id)
            return
        runner.run_job(job_id, settings=get_settings(), shutdown=shutdown)


@_task(RUN_NODE)
def run_node(job_id: str, token: str, rank: int) -> None:
    # on a worker shutting down too: the node hands the whole job back at once
    with shutdown_event() as shutdown:
        runner.run_node(job_id, token, rank, settings=get_settings(), shutdown=shutdown)


@_task(PREPARE_DATASET)
def prepare_dataset(dataset_id: str) -> None:
    with checking(get_settings()):
        resources.prepare_dataset(dataset_id, settings=get_settings())


@_task(CHECK_MODEL)
def check_model(model_id: str) -> None:
    with checking(get_settings()):
        resources.check_model(model_id, settings=get_settings())
