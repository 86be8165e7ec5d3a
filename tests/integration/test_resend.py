"""Re-sends against a real Redis (docs/RELIABILITY.md, fault 15): a backlog that nobody takes
does not grow the queue however many reconciler passes look at it, and messages the broker
lost are sent again once each, a bounded number a pass.

The time scale is shortened through the settings: a pass every 0.2 s, rows counted lost 5 s
after their send (a dataset's check after 3 s), so 20 s hold a hundred passes that each could
re-send every job, as five minutes of 1 s passes would with the defaults' proportions.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from conftest import Stack, running_stack
from servers import PrivateRedis, private_servers
from sqlalchemy import select

from store.db.models import Dataset, Job
from store.db.session import session_scope

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.faults]

JOBS = 50
NEVER_SENT = 5
PER_PASS = 20
SPEC = {
    "student": {"arch": "fcos", "backbone": "resnet18", "fpn_channels": 64},
    "dataset": {"builtin": "shapes", "num_train": 8, "num_val": 4, "image_size": 64},
    "resources": {"device": "cpu"},
}


@pytest.fixture
def backlog(tmp_path: Path) -> Iterator[tuple[Stack, PrivateRedis]]:
    """The API and the reconciler on private servers, and no worker: nothing is ever taken."""
    with (
        private_servers(tmp_path) as (pg, redis_server),
        running_stack(
            tmp_path,
            database_url=pg.url,
            broker_url=redis_server.url,
            TID_RECONCILE_SECONDS="0.2",
            TID_REQUEUE_AFTER_SECONDS="5",
            TID_BROKER_VISIBILITY_SECONDS="3",
            TID_CHECK_SECONDS="2",  # below it, as the settings require (no worker checks here)
            TID_RESEND_PER_PASS=str(PER_PASS),
            TID_MAX_ACTIVE_JOBS_PER_OWNER="0",
        ) as stack,
    ):
        yield stack, redis_server


def watch(count: Callable[[], Counter[str]], seconds: float) -> int:
    """The most messages any one row had in the queue, sampled every 0.2 s for `seconds`."""
    most = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        most = max(most, *count().values(), 0)
        time.sleep(0.2)
    return most


def test_a_backlog_keeps_one_message_per_job_and_lost_ones_are_sent_again_once(
    backlog: tuple[Stack, PrivateRedis],
) -> None:
    stack, redis_server = backlog
    settings = stack.settings
    jobs = [stack.client.submit({**SPEC, "name": f"j{i}"})["id"] for i in range(JOBS)]
    dataset = stack.client.create_dataset({"name": "d", "builtin": "shapes"})["id"]
    with session_scope(settings.database_url) as session:  # committed, the API gone before its send
        unsent = [Job(owner="alice", name="u", spec=SPEC, method="none") for _ in range(NEVER_SENT)]
        session.add_all(unsent)
        session.flush()
        jobs += [job.id for job in unsent]
    rows = [*jobs, dataset]
    broker = redis.Redis.from_url(redis_server.url)

    def messages() -> Counter[str]:
        """Messages per row in the queue (the rows' ids are in the messages' headers)."""
        queued = broker.lrange(settings.queue, 0, -1)
        return Counter(row for message in queued for row in rows if row.encode() in message)

    # a hundred passes and more, each finding every job sent more than 5 s ago
    assert watch(messages, 20) == 1
    assert messages() == dict.fromkeys(rows, 1)  # the never sent ones too, once

    # no persistence: every message is lost. The reconciler may re-send some before this test
    # could look at the queue; that all were lost shows in every row's second send, below
    redis_server.restart()
    deadline = time.monotonic() + 30
    while len(messages()) < len(rows):
        assert time.monotonic() < deadline, stack.log("reconciler")
        time.sleep(0.2)
    assert watch(messages, 5) == 1
    assert messages() == dict.fromkeys(rows, 1)

    with session_scope(settings.database_url) as session:
        assert set(session.scalars(select(Job.send_count).where(Job.id.in_(jobs)))) == {2}
        assert session.get_one(Dataset, dataset).send_count == 2
    log = (stack.logs / "reconciler.log").read_text()
    batches = [int(n) for n in re.findall(r"sending (\d+) message\(s\) again", log)]
    assert sum(batches) == NEVER_SENT + len(rows), log[-4000:]
    assert max(batches) == PER_PASS
