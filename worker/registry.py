"""This worker's row in the registry (store.db.workers), kept from its main process.

`tid worker` (Celery) writes the row when it is ready, heartbeats from a thread every
`TID_HEARTBEAT_SECONDS` and removes the row when it stops. The name is fixed in the main
process before the pool starts, so the pool's children (which run the tasks and name the worker
in claims and nodes) name it the same.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.engine import make_url

from store.db import workers
from store.db.session import TRANSIENT_ERRORS, session_scope
from store.queue import node_queue
from store.settings import Settings
from tid_core.launch import route_source

log = logging.getLogger(__name__)


def fix_worker_name() -> None:
    """Name this worker process once, for itself and the pool children it forks (which inherit
    the environment): `TID_WORKER_NAME`, else hostname-pid of the main process."""
    os.environ.setdefault("TID_WORKER_NAME", f"{socket.gethostname()}-{os.getpid()}")


def route_address(settings: Settings) -> str:
    """`TID_WORKER_ADDRESS`, else the address this host sends from toward the database, else
    toward the broker: the address of the network the service's hosts share."""
    if settings.worker_address:
        return settings.worker_address
    for url in (settings.database_url, settings.broker_url):
        host = make_url(url).host if "://" in url else None
        address = route_source(host) if host else None
        if address is not None:
            return address
    return "127.0.0.1"  # an embedded service: every worker is on this host


@contextmanager
def checking(settings: Settings) -> Iterator[None]:
    """This worker is busy with a dataset's or model's check meanwhile, so that no gang is
    placed on it to wait behind the check (one placed just before still waits: its node's
    lease may run out, and the gang is placed again)."""
    try:
        with session_scope(settings.database_url) as session:
            workers.occupy(session, settings.worker_name, None)
    except TRANSIENT_ERRORS as exc:  # the check needs the database too: it will retry
        log.warning("worker %s: could not mark itself busy: %s", settings.worker_name, exc)
    try:
        yield
    finally:
        try:
            with session_scope(settings.database_url) as session:
                workers.release(session, settings.worker_name, None)
        except TRANSIENT_ERRORS as exc:
            log.warning("worker %s: could not mark itself idle: %s", settings.worker_name, exc)


class Registration:
    """The row of this worker while it runs: written, heartbeated on a thread, removed."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.name = settings.worker_name
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)

    def _register(self) -> None:
        with session_scope(self.settings.database_url) as session:
            workers.register(
                session,
                name=self.name,
                queue=node_queue(self.settings, self.name),
                address=route_address(self.settings),
                gpus=self.settings.gpu_ids,
            )

    def start(self) -> None:
        try:
            self._register()
        except TRANSIENT_ERRORS as exc:  # the heartbeat registers once the database is back
            log.warning("worker %s: could not register: %s", self.name, exc)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_seconds):
            try:
                with session_scope(self.settings.database_url) as session:
                    known = workers.heartbeat(session, self.name)
                if not known:
                    self._register()
            except TRANSIENT_ERRORS as exc:  # alive again with the database
                log.warning("worker %s: heartbeat not written: %s", self.name, exc)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        try:
            with session_scope(self.settings.database_url) as session:
                workers.remove(session, self.name)
        except TRANSIENT_ERRORS as exc:  # its heartbeat ages: it counts as gone soon
            log.warning("worker %s: could not remove its row: %s", self.name, exc)
