"""The reconciler against the real file-system broker folder."""

from __future__ import annotations

from datetime import timedelta

from worker_support import MakeJob, queued_messages, read_job

from store.db.models import utcnow
from store.queue import RUN_JOB
from store.settings import Settings
from worker.reconcile import reconcile


def lost_job(make_job: MakeJob, *, attempt: int, **columns: object) -> str:
    """A running job whose worker stopped renewing its lease a minute ago."""
    return make_job(
        state="running",
        attempt=attempt,
        max_attempts=3,
        lease_owner="dead-worker",
        lease_expires=utcnow() - timedelta(minutes=1),
        **columns,
    )


def test_expired_lease_with_attempts_left_is_requeued_and_resent(
    settings: Settings, make_job: MakeJob
) -> None:
    job_id = lost_job(make_job, attempt=1)

    counts = reconcile(settings=settings)

    assert counts == {"requeued": 1, "failed": 0, "cancelled": 0, "resent": 0}
    job = read_job(settings, job_id)
    assert (job.state, job.lease_owner, job.lease_expires) == ("queued", None, None)
    assert queued_messages(settings) == [(RUN_JOB, (job_id,))]


def test_expired_lease_out_of_attempts_fails_with_reason(
    settings: Settings, make_job: MakeJob
) -> None:
    job_id = lost_job(make_job, attempt=3)

    counts = reconcile(settings=settings)

    assert counts["failed"] == 1
    job = read_job(settings, job_id)
    assert job.state == "failed"
    assert job.error == "worker dead-worker lost (lease expired) on attempt 3 of 3"
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

    assert reconcile(settings=settings) == {"requeued": 0, "failed": 0, "cancelled": 0, "resent": 0}
    assert read_job(settings, running).state == "running"
    assert read_job(settings, queued).state == "queued"
    assert queued_messages(settings) == []


def test_stale_queued_job_is_resent_once_per_period(settings: Settings, make_job: MakeJob) -> None:
    job_id = make_job(queued_at=utcnow() - timedelta(minutes=1))

    assert reconcile(settings=settings)["resent"] == 1
    assert reconcile(settings=settings)["resent"] == 0  # queued_at was bumped

    assert queued_messages(settings) == [(RUN_JOB, (job_id,))]
    assert read_job(settings, job_id).queued_at > utcnow() - timedelta(seconds=10)
