"""The worker's Celery app: `tid worker`, or `celery -A worker.celery_app worker -Q <queue> -c 1
--prefetch-multiplier 1`.

Built by `store.queue.make_celery`, so the API and the workers agree on broker, queue and task
names; the worker imports `worker.tasks` (the implementations) when it starts.
"""

from __future__ import annotations

import worker.shutdown  # noqa: F401  (hooks the worker's signals before the prefork pool forks)
from store.queue import make_celery
from store.settings import get_settings

settings = get_settings()
app = make_celery(settings)
app.conf.include = ["worker.tasks"]
