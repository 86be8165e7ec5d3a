"""The worker's Celery app: `tid worker`, or `celery -A worker.celery_app worker -Q <queue> -c 1
--prefetch-multiplier 1`.

Built by `store.queue.make_celery`, so the API and the workers agree on broker, queue and task
names; the worker imports `worker.tasks` (the implementations) when it starts. Each worker also
consumes a queue of its own (the nodes of jobs on several workers are sent there) and keeps its
row in the registry while it runs (worker.registry).
"""

from __future__ import annotations

from typing import Any

from celery import signals

import worker.shutdown  # noqa: F401  (hooks the worker's signals before the prefork pool forks)
from store.db.session import get_engine
from store.queue import make_celery, node_queue
from store.settings import get_settings
from worker.registry import Registration, fix_worker_name

fix_worker_name()  # the pool's children inherit it
get_settings.cache_clear()  # settings read before it (the CLI's) lack the name
settings = get_settings()
app = make_celery(settings)
app.conf.include = ["worker.tasks"]
registration = Registration(settings)


def _consume_own_queue(instance: Any, **_: Any) -> None:
    """Celery's documented way to a queue per worker: added before the consumer starts."""
    instance.app.amqp.queues.select_add(node_queue(settings, settings.worker_name))


def _register(**_: Any) -> None:
    registration.start()


def _unregister(**_: Any) -> None:
    registration.stop()


def _own_connections(**_: Any) -> None:
    """A pool child forked after the main process connected (its heartbeat) drops the
    inherited connections without closing them, which would close the parent's."""
    get_engine(settings.database_url).dispose(close=False)


signals.celeryd_after_setup.connect(_consume_own_queue)
signals.worker_ready.connect(_register)
signals.worker_shutdown.connect(_unregister)
signals.worker_process_init.connect(_own_connections)
