"""Gang placement and the worker registry (store.db.placement, store.db.workers): a job on
several nodes starts only on workers that are all free at once, oldest first, in one
transaction; on SQLite and, with `TID_TEST_POSTGRES_URL`, on PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from databases import POSTGRES, postgres_database
from sqlalchemy import select, update
from worker_support import tiny_spec

from store.db import placement, sends, transitions, workers
from store.db.migrate import upgrade
from store.db.models import Job, JobNode, Worker
from store.db.session import get_engine, session_scope
from store.settings import Settings
from worker import reconcile, runner
from worker.registry import checking

HEARTBEAT = 60.0  # workers stay alive however slow the test runs
LEASE = 30


@pytest.fixture(params=["sqlite"] + (["postgresql"] if POSTGRES else []))
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        url = Settings(data_root=tmp_path / "data").database_url
        upgrade(url)
        yield url
        return
    with postgres_database() as url:
        upgrade(url)
        yield Settings(database_url=url).database_url


def add_worker(url: str, name: str, *, gpus: int = 0, age: float = 0.0) -> None:
    """A registered worker, idle, whose last heartbeat is `age` seconds old."""
    with session_scope(url) as session:
        ids = [str(i) for i in range(gpus)]
        workers.register(session, name=name, queue=f"q.node.{name}", address=f"a-{name}", gpus=ids)
        session.flush()
        at = transitions.db_now(session) - timedelta(seconds=age)
        session.execute(update(Worker).where(Worker.name == name).values(heartbeat_at=at))


def add_job(url: str, *, nnodes: int, age: float = 0.0, **resources: Any) -> str:
    """A queued job queued `age` seconds ago (older jobs are placed first)."""
    spec = tiny_spec(resources={"nnodes": nnodes, **resources})
    with session_scope(url) as session:
        queued_at = transitions.db_now(session) - timedelta(seconds=age)
        job = Job(owner="alice", name="j", spec=spec, method="none", nnodes=nnodes)
        job.queued_at = queued_at
        session.add(job)
        session.flush()
        return job.id


def place(url: str) -> list[placement.Placed]:
    with session_scope(url) as session:
        return placement.place(session, heartbeat_seconds=HEARTBEAT, lease_seconds=LEASE)


def job(url: str, job_id: str) -> Job:
    with session_scope(url) as session:
        row = session.get_one(Job, job_id)
        session.expunge(row)
        return row


def busy(url: str) -> dict[str, str | None]:
    with session_scope(url) as session:
        return {w.name: w.job_id for w in session.scalars(select(Worker)) if w.state == "busy"}


def test_a_gang_is_placed_on_idle_workers_at_once(url: str) -> None:
    add_worker(url, "w1")
    add_worker(url, "w2")
    job_id = add_job(url, nnodes=2)

    (placed,) = place(url)

    claimed = job(url, job_id)
    assert (claimed.state, claimed.attempt, claimed.claim_token) == ("running", 1, placed.token)
    assert claimed.lease_owner == "w1" and claimed.waiting_reason is None
    assert placed.queues == ("q.node.w1", "q.node.w2")
    assert busy(url) == {"w1": job_id, "w2": job_id}
    with session_scope(url) as session:
        nodes = session.scalars(select(JobNode).order_by(JobNode.node_rank)).all()
        assert [(n.attempt, n.node_rank, n.worker, n.address) for n in nodes] == [
            (1, 0, "w1", "a-w1"),
            (1, 1, "w2", "a-w2"),
        ]
        assert all(n.lease_expires == claimed.lease_expires for n in nodes)
    assert place(url) == []  # nothing left to place


def test_a_gang_that_cannot_form_waits_with_a_reason_and_reserves_nothing(url: str) -> None:
    add_worker(url, "w1")
    add_worker(url, "gone", age=3 * HEARTBEAT + 5)  # its heartbeat is too old: not alive
    big = add_job(url, nnodes=2, age=60)

    assert place(url) == []
    waiting = job(url, big)
    assert (waiting.state, waiting.attempt) == ("queued", 0)
    assert waiting.waiting_reason == "waiting for 2 workers; 1 idle"
    assert busy(url) == {}

    add_worker(url, "w2")
    (placed,) = place(url)
    assert placed.job_id == big and job(url, big).waiting_reason is None


def test_the_oldest_gang_wins_and_a_younger_one_that_fits_goes_ahead(url: str) -> None:
    for name in ("w1", "w2", "w3"):
        add_worker(url, name)
    oldest = add_job(url, nnodes=4, age=300)  # cannot form: it waits
    older = add_job(url, nnodes=2, age=200)
    younger = add_job(url, nnodes=2, age=100)  # competes with `older` for the same workers

    placed = place(url)

    assert [p.job_id for p in placed] == [older]
    assert job(url, oldest).waiting_reason == "waiting for 4 workers; 3 idle"
    assert job(url, younger).waiting_reason == "waiting for 2 workers; 1 idle"
    assert set(busy(url).values()) == {older}

    with session_scope(url) as session:  # the older gang ends: its workers are free
        for name in busy(url):
            workers.release(session, name, older)
    assert [p.job_id for p in place(url)] == [younger]


def test_a_cuda_gang_needs_workers_with_enough_gpus(url: str) -> None:
    add_worker(url, "cpu")
    add_worker(url, "one", gpus=1)
    add_worker(url, "four", gpus=4)
    cuda = add_job(url, nnodes=2, nproc_per_node=2, device="cuda", age=10)
    cpu = add_job(url, nnodes=2, nproc_per_node=2, device="cpu")

    # the older CUDA gang cannot form; the CPU gang takes the worker without GPUs, then the one
    # with the fewest (a CPU job runs on any worker, as one of one node does)
    (placed,) = place(url)
    assert job(url, cuda).waiting_reason == "waiting for 2 workers with 2 GPUs; 1 idle"
    assert placed.job_id == cpu and placed.queues == ("q.node.cpu", "q.node.one")

    add_worker(url, "eight", gpus=8)
    (placed,) = place(url)
    assert placed.job_id == cuda
    assert placed.queues == ("q.node.four", "q.node.eight")  # the best fit first


def test_an_auto_gang_takes_gpu_workers_that_fit_else_cpu_workers(url: str) -> None:
    add_worker(url, "c1")
    add_worker(url, "c2")
    add_worker(url, "g1", gpus=1)
    first = add_job(url, nnodes=2, age=10, device="auto")  # one GPU worker is not a gang
    (placed,) = place(url)
    assert placed.job_id == first and placed.queues == ("q.node.c1", "q.node.c2")
    add_worker(url, "g2", gpus=1)
    second = add_job(url, nnodes=2, device="auto")
    (placed,) = place(url)
    assert placed.job_id == second and placed.queues == ("q.node.g1", "q.node.g2")


def test_a_lost_node_requeues_the_whole_gang_and_frees_its_workers(url: str) -> None:
    add_worker(url, "w1")
    add_worker(url, "w2")
    job_id = add_job(url, nnodes=2)
    (placed,) = place(url)
    with session_scope(url) as session:  # node 0 renews its lease and the job's; node 1 not
        assert transitions.renew_lease(session, job_id, token=placed.token, lease_seconds=LEASE)
        assert transitions.renew_node(
            session, job_id, token=placed.token, attempt=1, rank=0, lease_seconds=LEASE
        )
        transitions.end_node(session, job_id, attempt=1, rank=1, done=False)  # its trainer died
    with session_scope(url) as session:
        (lost,) = transitions.expired_leases(session)
        assert transitions.requeue_lost(session, lost, fail_after_seconds=0) == "queued"
    requeued = job(url, job_id)
    assert (requeued.state, requeued.attempt, requeued.last_sent_at) == ("queued", 1, None)
    with session_scope(url) as session:  # node 0's next renewal fails: it stops its trainer
        assert not transitions.renew_node(
            session, job_id, token=placed.token, attempt=1, rank=0, lease_seconds=LEASE
        )
        assert workers.release_stale(session) == ["w2"]  # its node is gone; w1's still runs
    with session_scope(url) as session:
        workers.release(session, "w1", job_id)  # node 0 ended
    (again,) = place(url)
    assert again.job_id == job_id and job(url, job_id).attempt == 2


def test_a_node_that_ended_well_holds_no_lease(url: str) -> None:
    add_worker(url, "w1")
    add_worker(url, "w2")
    job_id = add_job(url, nnodes=2)
    place(url)
    with session_scope(url) as session:
        transitions.end_node(session, job_id, attempt=1, rank=1, done=True)
        session.execute(update(JobNode).values(lease_expires=None))  # node 0 ended too
        session.execute(
            update(Job).values(lease_expires=transitions.db_now(session) + timedelta(seconds=60))
        )
    with session_scope(url) as session:
        assert transitions.expired_leases(session) == []


def test_a_gang_is_never_sent_on_the_service_queue(url: str) -> None:
    gang = add_job(url, nnodes=2, age=600)
    single = add_job(url, nnodes=1, age=600)
    with session_scope(url) as session:
        now = transitions.db_now(session)
        assert sends.never_sent(session, Job, before=now, limit=10) == [single]
        assert gang not in sends.never_sent(session, Job, before=now, limit=10)


def test_a_worker_reserved_for_a_gang_claims_no_job_of_one_node(url: str, tmp_path: Path) -> None:
    settings = Settings(data_root=tmp_path / "data", database_url=url, worker_name="w1")
    add_worker(url, "w1")
    add_worker(url, "w2")
    gang = add_job(url, nnodes=2, age=60)
    single = add_job(url, nnodes=1)
    with session_scope(url) as session:
        sends.record_sent(session, Job, single)
    place(url)  # w1 is reserved for the gang, then the single job's message reaches it

    runner.run_job(single, settings=settings)

    left = job(url, single)
    assert (left.state, left.attempt, left.last_sent_at) == ("queued", 0, None)  # sent again
    assert busy(url) == {"w1": gang, "w2": gang}


def test_a_claim_occupies_the_claiming_workers_row_if_it_has_one(url: str) -> None:
    add_worker(url, "w1")
    first, second = add_job(url, nnodes=1), add_job(url, nnodes=1)
    with session_scope(url) as session:
        assert workers.occupy(session, "w1", first) is True
        assert workers.occupy(session, "w1", second) is False  # busy
        assert workers.occupy(session, "unregistered", second) is None
    assert busy(url) == {"w1": first}
    with session_scope(url) as session:
        workers.release(session, "w1", second)  # not its job: nothing changes
        assert busy(url) == {"w1": first}
        workers.release(session, "w1", first)
    assert busy(url) == {}


def test_a_worker_reregistering_replaces_its_row(url: str) -> None:
    add_worker(url, "w1")
    with session_scope(url) as session:
        workers.occupy(session, "w1", "x" * 32)
    add_worker(url, "w1", gpus=2)
    with session_scope(url) as session:
        row = session.get_one(Worker, "w1")
        assert (row.state, row.job_id, row.device, row.gpus) == ("idle", None, "cuda", ["0", "1"])
        assert workers.heartbeat(session, "w1")
        workers.remove(session, "w1")
        assert not workers.heartbeat(session, "w1")


def test_a_worker_checking_a_dataset_is_not_reserved_for_a_gang(url: str, tmp_path: Path) -> None:
    add_worker(url, "w1")
    add_worker(url, "w2")
    job_id = add_job(url, nnodes=2)
    settings = Settings(data_root=tmp_path / "data", database_url=url, worker_name="w1")
    with checking(settings):
        assert place(url) == []
        assert job(url, job_id).waiting_reason == "waiting for 2 workers; 1 idle"
        with session_scope(url) as session:
            assert workers.release_stale(session) == []  # a check holds no node: not stale
    (placed,) = place(url)
    assert placed.workers == ("w1", "w2")


def test_a_gang_whose_node_cannot_be_sent_is_handed_back_at_once(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_worker(url, "w1")
    add_worker(url, "w2")
    job_id = add_job(url, nnodes=2)
    sent: list[tuple[str, int]] = []

    def send_node(_: Settings, queue: str, job: str, token: str, rank: int) -> bool:
        sent.append((queue, rank))
        return rank == 0  # the broker refuses node 1's

    monkeypatch.setattr(reconcile, "send_node", send_node)
    settings = Settings(data_root=tmp_path / "data", database_url=url, heartbeat_seconds=HEARTBEAT)

    assert reconcile._place(settings) == 1

    assert sent == [("q.node.w1", 0), ("q.node.w2", 1)]
    back = job(url, job_id)
    assert (back.state, back.attempt, back.handbacks) == ("queued", 1, 1)  # not a failure
    assert busy(url) == {}
    monkeypatch.setattr(reconcile, "send_node", lambda *_: True)
    assert reconcile._place(settings) == 1 and job(url, job_id).attempt == 2


@pytest.mark.skipif(not POSTGRES, reason="needs TID_TEST_POSTGRES_URL (.ci/run sets it)")
def test_placement_skips_a_worker_whose_row_another_transaction_holds() -> None:
    """PostgreSQL only: SQLite has no row locks."""
    with postgres_database() as database:
        upgrade(database)
        url = Settings(database_url=database).database_url
        for name in ("w1", "w2", "w3"):
            add_worker(url, name)
        job_id = add_job(url, nnodes=2)
        with get_engine(url).connect() as other:  # a worker claiming a job: it holds its row
            other.execute(select(Worker).where(Worker.name == "w1").with_for_update())
            (placed,) = place(url)
            other.rollback()
        assert placed.queues == ("q.node.w2", "q.node.w3") and placed.job_id == job_id
