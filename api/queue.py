"""The Celery app as both sides see it: broker, queue and task names (no task code, no torch).

The API sends tasks by name (`send_task`) after its transaction commits; `worker.celery_app`
registers the implementations on an app built by the same function. The reconciler is not a
Celery task but a loop process (`tid reconcile --loop`), so it runs even when every worker is
busy training.
"""

from __future__ import annotations

from functools import lru_cache

from celery import Celery

from api import filesystem_broker
from api.settings import Settings

RUN_JOB = "tid.run_job"
PREPARE_DATASET = "tid.prepare_dataset"
CHECK_MODEL = "tid.check_model"


def make_celery(settings: Settings) -> Celery:
    app = Celery("tid", broker=settings.broker_url)
    options: dict[str, object] = {}
    if settings.broker_url.startswith("filesystem://"):
        app.conf.broker_transport = filesystem_broker.TRANSPORT  # whole messages, each once
        options = filesystem_broker.transport_options(settings.broker_dir)
    app.conf.update(
        broker_transport_options=options,
        broker_connection_retry_on_startup=True,
        task_default_queue=settings.queue,
        task_acks_late=True,  # the DB claim makes a redelivered message a no-op
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,  # the database is the result store
        worker_hijack_root_logger=False,
    )
    return app


@lru_cache(maxsize=4)
def _cached(settings_json: str) -> Celery:
    return make_celery(Settings.model_validate_json(settings_json))


def send(settings: Settings, task: str, *args: str) -> None:
    """Send a task by name to the service queue (call after the DB transaction commits)."""
    _cached(settings.model_dump_json()).send_task(task, args=list(args), queue=settings.queue)
