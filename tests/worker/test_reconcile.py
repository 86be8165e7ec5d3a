"""The reconciler against the real file-system broker folder."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, update
from worker_support import MakeJob, queued_messages, read_job

from store.db import transitions
from store.db.models import Dataset, Job, Model, new_id, utcnow
from store.db.session import session_scope
from store.queue import CHECK_MODEL, PREPARE_DATASET, RUN_JOB, enqueue, make_celery
from store.settings import Settings
from worker.reconcile import reconcile

NOTHING = {"requeued": 0, "failed": 0, "cancelled": 0, "resent": 0, "expired": 0, "placed": 0}


def lost_job(
    make_job: MakeJob, *, attempt: int, ago: timedelta = timedelta(minutes=1), **columns: object
) -> str:
    """A running job whose worker stopped renewing its lease `ago` (a minute ago)."""
    return make_job(
        state="running",
        attempt=attempt,
        max_attempts=3,
        lease_owner="dead-worker",
        lease_expires=utcnow() - ago,
        **columns,
    )


def test_expired_lease_with_attempts_left_is_requeued_and_resent(
    settings: Settings, make_job: MakeJob
) -> None:
    job_id = lost_job(make_job, attempt=1)

    counts = reconcile(settings=settings)

    assert counts == {**NOTHING, "requeued": 1}
    job = read_job(settings, job_id)
    assert (job.state, job.lease_owner, job.lease_expires) == ("queued", None, None)
    assert queued_messages(settings) == [(RUN_JOB, (job_id,))]


def test_expired_lease_out_of_attempts_fails_with_reason_once_its_worker_gave_up(
    settings: Settings, make_job: MakeJob
) -> None:
    """Not before its worker stopped retrying the write of the attempt's outcome (for
    TID_DB_RETRY_SECONDS): a run that finished while the database was away keeps its outcome."""
    retrying = lost_job(make_job, attempt=3, ago=timedelta(seconds=settings.db_retry_seconds - 30))
    job_id = lost_job(make_job, attempt=3, ago=timedelta(seconds=settings.db_retry_seconds + 1))

    counts = reconcile(settings=settings)

    assert counts["failed"] == 1
    job = read_job(settings, job_id)
    assert job.state == "failed"
    assert job.error == "worker dead-worker lost (lease expired) on attempt 3 of 3"
    assert read_job(settings, retrying).state == "running"
    assert queued_messages(settings) == []


def test_deploy_hand_backs_do_not_count_against_max_attempts(
    settings: Settings, make_job: MakeJob
) -> None:
    job_id = lost_job(make_job, attempt=4, handbacks=2)  # two failures, two deploys

    counts = reconcile(settings=settings)

    assert counts["requeued"] == 1
    assert read_job(settings, job_id).state == "queued"


def test_expired_lease_with_a_pending_cancel_is_cancelled(
    settings: Settings, make_job: MakeJob
) -> None:
    job_id = lost_job(make_job, attempt=1, cancel_requested=True)

    assert reconcile(settings=settings)["cancelled"] == 1
    assert read_job(settings, job_id).state == "cancelled"


def test_live_lease_and_fresh_queue_are_left_alone(settings: Settings, make_job: MakeJob) -> None:
    running = make_job(
        state="running", attempt=1, lease_owner="w", lease_expires=utcnow() + timedelta(minutes=1)
    )
    queued = make_job()

    assert reconcile(settings=settings) == NOTHING
    assert read_job(settings, running).state == "running"
    assert read_job(settings, queued).state == "queued"
    assert queued_messages(settings) == []


def sent(
    settings: Settings, kind: type[Job | Dataset | Model], row_id: str, ago: timedelta
) -> None:
    """Send the row's task as the API does, as if `ago` had passed since (the row waiting
    since before it)."""
    task = {Job: RUN_JOB, Dataset: PREPARE_DATASET, Model: CHECK_MODEL}[kind]
    assert enqueue(settings, task, row_id)
    at = utcnow() - ago
    with session_scope(settings.database_url) as session:
        row = session.get_one(kind, row_id)
        row.last_sent_at = at
        if isinstance(row, Job):
            row.queued_at = min(row.queued_at, at)
        else:
            row.created_at = min(row.created_at, at)


def broker_lost(settings: Settings, row_id: str = "") -> None:
    """The waiting messages for `row_id` (all: a restart of a broker without persistence) lost."""
    for message in (settings.broker_dir / "queue").glob("*.msg"):
        if row_id in message.read_text():  # its `argsrepr` header
            message.unlink()


def pending(settings: Settings, kind: type[Dataset | Model], **columns: Any) -> str:
    """A dataset or model waiting for its check (its files do not matter here)."""
    with session_scope(settings.database_url) as session:
        values: dict[str, Any] = {"id": new_id(), "owner": "alice", "name": "r", "path": "/x"}
        if kind is Dataset:
            values |= {"kind": "builtin", "source": {"builtin": "shapes"}}
        else:
            values |= {"sha256": "0" * 64, "bytes": 1}
        session.add(kind(**values, **columns))
    return str(values["id"])


def read(settings: Settings, kind: type[Dataset | Model], row_id: str) -> Dataset | Model:
    with session_scope(settings.database_url) as session:
        row = session.get_one(kind, row_id)
        session.expunge(row)
        return row


def test_a_queued_job_whose_message_waits_is_not_sent_again_however_long_it_waits(
    settings: Settings, make_job: MakeJob
) -> None:
    """A long GPU backlog: the message is in the queue, only slow to be taken."""
    job_id = make_job()
    sent(settings, Job, job_id, ago=timedelta(hours=30))

    for _ in range(20):
        assert reconcile(settings=settings) == NOTHING

    assert queued_messages(settings) == [(RUN_JOB, (job_id,))]
    assert read_job(settings, job_id).send_count == 1


def test_a_queued_job_whose_message_was_lost_is_sent_again_once(
    settings: Settings, make_job: MakeJob
) -> None:
    waiting = make_job()
    sent(settings, Job, waiting, ago=timedelta(minutes=5))
    lost = make_job()
    sent(settings, Job, lost, ago=timedelta(minutes=10))
    broker_lost(settings, lost)

    # one message missing: the oldest of the sends, which a FIFO queue hands out first
    assert reconcile(settings=settings)["resent"] == 1
    assert reconcile(settings=settings)["resent"] == 0

    assert sorted(queued_messages(settings)) == sorted([(RUN_JOB, (waiting,)), (RUN_JOB, (lost,))])
    assert read_job(settings, lost).send_count == 2
    assert read_job(settings, waiting).send_count == 1


def test_a_job_never_sent_is_sent_once_its_send_had_time(
    settings: Settings, make_job: MakeJob
) -> None:
    """The API died between its commit and its send, or the send failed; a job re-queued after a
    send counts as unsent again (here its worker died between the re-queue and the send)."""
    old = make_job(queued_at=utcnow() - timedelta(minutes=1))
    requeued = make_job(
        state="running",
        attempt=1,
        claim_token="t",
        last_sent_at=utcnow() - timedelta(hours=1),  # its first attempt's message
        send_count=1,
    )
    with session_scope(settings.database_url) as session:
        assert transitions.requeue(session, requeued, token="t", reason="retrying")
    with session_scope(settings.database_url) as session:
        session.get_one(Job, requeued).queued_at = utcnow() - timedelta(minutes=1)
    fresh = make_job()  # its send may still be under way
    settings = settings.model_copy(update={"requeue_after_seconds": 30})  # a slow machine's

    assert reconcile(settings=settings)["resent"] == 2
    assert reconcile(settings=settings)["resent"] == 0

    assert sorted(queued_messages(settings)) == sorted([(RUN_JOB, (old,)), (RUN_JOB, (requeued,))])
    assert read_job(settings, requeued).send_count == 2
    assert read_job(settings, fresh).last_sent_at is None


@pytest.mark.parametrize("kind", [Job, Dataset])
def test_a_row_sent_counts_as_sent_whatever_the_clock_of_the_host_that_inserted_it(
    settings: Settings, make_job: MakeJob, kind: type[Job | Dataset]
) -> None:
    """The API host's clock runs ahead of the database's: the row's `queued_at`/`created_at`
    (the host's) is later than its `last_sent_at` (the database's), and it still counts as sent,
    so it is not sent a second time (for a dataset: a second concurrent check)."""
    inserted = utcnow() - timedelta(minutes=1)
    if kind is Job:
        row_id, task = make_job(queued_at=inserted), RUN_JOB
    else:
        row_id, task = pending(settings, Dataset, created_at=inserted), PREPARE_DATASET
    assert enqueue(settings, task, row_id)
    with session_scope(settings.database_url) as session:
        sent_at = inserted - timedelta(seconds=30)
        session.execute(update(kind).where(kind.id == row_id).values(last_sent_at=sent_at))

    for _ in range(3):
        assert reconcile(settings=settings) == NOTHING

    assert queued_messages(settings) == [(task, (row_id,))]
    with session_scope(settings.database_url) as session:
        assert session.scalar(select(kind.send_count).where(kind.id == row_id)) == 1


def test_sends_again_are_bounded_per_pass(settings: Settings, make_job: MakeJob) -> None:
    bounded = settings.model_copy(update={"resend_per_pass": 3})
    for _ in range(5):
        make_job(queued_at=utcnow() - timedelta(minutes=1))
    for _ in range(4):
        sent(settings, Job, make_job(), ago=timedelta(minutes=1))
    broker_lost(settings)

    assert [reconcile(settings=bounded)["resent"] for _ in range(4)] == [3, 3, 3, 0]
    assert len(queued_messages(settings)) == 9


def test_a_pending_dataset_or_model_never_sent_is_sent(settings: Settings) -> None:
    created = {"created_at": utcnow() - timedelta(minutes=1)}
    dataset_id = pending(settings, Dataset, **created)
    model_id = pending(settings, Model, **created)

    assert reconcile(settings=settings) == {**NOTHING, "resent": 2}
    assert reconcile(settings=settings) == NOTHING

    assert sorted(queued_messages(settings)) == sorted(
        [(PREPARE_DATASET, (dataset_id,)), (CHECK_MODEL, (model_id,))]
    )


def test_a_lost_check_is_sent_again_only_after_the_visibility_window(settings: Settings) -> None:
    """Within the window its message may be with a worker, checking it: a duplicate would
    check it twice."""
    window = timedelta(seconds=settings.broker_visibility_seconds)
    dataset_id = pending(settings, Dataset)
    sent(settings, Dataset, dataset_id, ago=window - timedelta(minutes=1))
    model_id = pending(settings, Model)
    sent(settings, Model, model_id, ago=window + timedelta(minutes=1))
    broker_lost(settings)

    assert reconcile(settings=settings)["resent"] == 1
    assert queued_messages(settings) == [(CHECK_MODEL, (model_id,))]


def test_a_check_lost_too_often_or_pending_too_long_fails_with_the_reason(
    settings: Settings,
) -> None:
    window = timedelta(seconds=settings.broker_visibility_seconds)
    lost_often = pending(settings, Dataset, send_count=settings.check_max_sends - 1)
    sent(settings, Dataset, lost_often, ago=window * 2)  # its 5th send
    too_old = pending(
        settings,
        Model,
        created_at=utcnow() - timedelta(seconds=settings.check_max_pending_seconds + 1),
    )
    sent(settings, Model, too_old, ago=timedelta(minutes=1))
    broker_lost(settings)

    assert reconcile(settings=settings) == {**NOTHING, "expired": 2}

    dataset = read(settings, Dataset, lost_often)
    assert (dataset.state, dataset.error) == (
        "failed",
        "its check was sent 5 times and never ran (TID_CHECK_MAX_SENDS); please create it again",
    )
    model = read(settings, Model, too_old)
    assert (model.state, model.error) == (
        "failed",
        "no worker checked it within 86400 s (TID_CHECK_MAX_PENDING_SECONDS);"
        " please create it again",
    )
    assert queued_messages(settings) == []


def test_redis_gives_a_dead_workers_message_back_after_the_same_window(settings: Settings) -> None:
    redis = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    options = make_celery(redis).conf.broker_transport_options
    assert options["visibility_timeout"] == settings.broker_visibility_seconds == 7200
