"""The Celery app as both sides see it: broker, queue and task names (no task code, no torch).

The API sends tasks by name (`send_task`) after its transaction commits; `worker.celery_app`
registers the implementations on an app built by the same function.
"""

from __future__ import annotations

from functools import lru_cache

from celery import Celery

from api.settings import Settings

RUN_JOB = "tid.run_job"
RECONCILE = "tid.reconcile"
PREPARE_DATASET = "tid.prepare_dataset"
CHECK_MODEL = "tid.check_model"


def make_celery(settings: Settings) -> Celery:
    app = Celery("tid", broker=settings.broker_url)
    options = {}
    if settings.broker_url.startswith("filesystem://"):
        queue_dir = settings.broker_dir / "queue"
        processed = settings.broker_dir / "processed"
        queue_dir.mkdir(parents=True, exist_ok=True)
        processed.mkdir(parents=True, exist_ok=True)
        options = {
            "data_folder_in": str(queue_dir),
            "data_folder_out": str(queue_dir),
            "processed_folder": str(processed),
            "store_processed": False,
        }
    app.conf.update(
        broker_transport_options=options,
        broker_connection_retry_on_startup=True,
        task_default_queue=settings.queue,
        task_acks_late=True,  # the DB claim makes a redelivered message a no-op
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,  # the database is the result store
        worker_hijack_root_logger=False,
        beat_schedule={
            "reconcile": {"task": RECONCILE, "schedule": settings.reconcile_seconds},
        },
    )
    return app


@lru_cache(maxsize=4)
def _cached(settings_json: str) -> Celery:
    return make_celery(Settings.model_validate_json(settings_json))


def send(settings: Settings, task: str, *args: str) -> None:
    """Send a task by name to the service queue (call after the DB transaction commits)."""
    _cached(settings.model_dump_json()).send_task(task, args=list(args), queue=settings.queue)
