"""The Celery app as every process sees it: broker, queue and task names, and sending a task
(no task code, no torch).

The API sends tasks by name (`send_task`) after its transaction commits; `worker.celery_app`
registers the implementations on an app built by the same function. The reconciler is not a
Celery task but a loop process (`tid reconcile --loop`), so it runs even when every worker is
busy training.

Tasks are sent only after the rows they name are committed, and a failed send never turns a
written row into an error response. Each send the broker accepts is recorded in its row, so
that the reconciler can send again what may be lost (`store.db.sends`): a message never sent,
or missing from the queue.
"""

from __future__ import annotations

import logging
import socket
from functools import lru_cache

from celery import Celery
from kombu.exceptions import ChannelError
from sqlalchemy.orm import Session

from store import filesystem_broker
from store.db import sends
from store.db.models import Dataset, Job, Model
from store.db.session import TRANSIENT_ERRORS, session_scope
from store.settings import Settings

RUN_JOB = "tid.run_job"
RUN_NODE = "tid.run_node"  # one node of a job on several: sent to the worker's own queue
PREPARE_DATASET = "tid.prepare_dataset"
CHECK_MODEL = "tid.check_model"
# the row each task is sent for, where its sends are recorded
ROW_OF_TASK: dict[str, sends.Waiting] = {RUN_JOB: Job, PREPARE_DATASET: Dataset, CHECK_MODEL: Model}
TASK_FOR_ROW = {row: task for task, row in ROW_OF_TASK.items()}

log = logging.getLogger(__name__)


def _redis_options(settings: Settings) -> dict[str, object]:
    """Every Redis wait bounded: without a socket timeout a send to a broker that accepts the
    connection and never answers hangs its caller (an API request) for good."""
    idle, interval, probes = settings.keepalive
    return {
        # the reconciler re-sends a dataset's or model's check only this long after its last
        # send: before it, its message may be with a worker (checking), and were that worker
        # dead, Redis would give the message to another one
        "visibility_timeout": settings.broker_visibility_seconds,
        "socket_connect_timeout": settings.broker_timeout_seconds,
        "socket_timeout": settings.broker_timeout_seconds,
        "socket_keepalive": True,
        "socket_keepalive_options": {
            socket.TCP_KEEPIDLE: idle,
            socket.TCP_KEEPINTVL: interval,
            socket.TCP_KEEPCNT: probes,
        },
    }


def make_celery(settings: Settings) -> Celery:
    app = Celery("tid", broker=settings.broker_url)
    options: dict[str, object] = {}
    if settings.broker_url.startswith("filesystem://"):
        app.conf.broker_transport = filesystem_broker.TRANSPORT  # whole messages, each once
        options = filesystem_broker.transport_options(settings.broker_dir)
    elif settings.broker_url.startswith(("redis://", "rediss://")):
        options = _redis_options(settings)
    app.conf.update(
        broker_transport_options=options,
        broker_connection_timeout=settings.broker_timeout_seconds,
        broker_connection_retry_on_startup=True,
        # one try, bounded by the broker timeout (the caller may be an API request; redis-py
        # itself reconnects once after a broker restart): Celery's retries made it four
        task_publish_retry=False,
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


def node_queue(settings: Settings, worker: str) -> str:
    """The queue of the worker `worker` alone (it also consumes the service queue)."""
    return f"{settings.queue}.node.{worker}"


def send_node(settings: Settings, queue: str, job_id: str, token: str, rank: int) -> bool:
    """Send RUN_NODE for one node of a placed job to its worker's queue; False (and logged)
    when the broker refused it (the node's lease then runs out, and the reconciler re-queues
    the job)."""
    try:
        _cached(settings.model_dump_json()).send_task(
            RUN_NODE, args=[job_id, token, rank], queue=queue
        )
    except Exception:
        log.exception("could not send %s(%s, node %d) to %s", RUN_NODE, job_id, rank, queue)
        return False
    return True


def enqueue(settings: Settings, task: str, resource_id: str) -> bool:
    """Send `task` for a committed row and record the send in it; False (and logged) when the
    broker refused it or did not answer within `broker_timeout_seconds`, and nothing recorded.
    A send that could not be recorded (the database away) is only sent again: a duplicate,
    which the task ignores."""
    try:
        send(settings, task, resource_id)
    except Exception:
        log.exception("could not send %s(%s) to the task queue", task, resource_id)
        return False
    try:
        with session_scope(settings.database_url) as session:
            sends.record_sent(session, ROW_OF_TASK[task], resource_id)
    except TRANSIENT_ERRORS as exc:
        log.warning("sent %s(%s); the database did not record it: %s", task, resource_id, exc)
    return True


def queue_length(settings: Settings) -> int | None:
    """How many messages wait in the service queue (not those workers hold); None when the
    broker cannot say (down, or not answering within `broker_timeout_seconds`)."""
    try:
        with _cached(settings.model_dump_json()).connection_for_write() as conn:
            declared = conn.default_channel.queue_declare(queue=settings.queue, passive=True)
    except ChannelError:  # Redis keeps no empty list: an empty queue does not exist
        return 0
    except Exception as exc:
        log.warning("could not count the messages in the task queue: %s", exc)
        return None
    return int(declared.message_count)


def commit_and_enqueue(
    session: Session, settings: Settings, row: Dataset | Model, task: str
) -> None:
    """Insert a pending dataset or model, commit, then queue the worker task that checks it (a
    failed send leaves it pending: the reconciler sends it again)."""
    session.add(row)
    session.commit()
    enqueue(settings, task, row.id)
