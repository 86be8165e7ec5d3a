"""At most `max_event_streams_per_owner` open event streams (SSE) per owner, over every API
process.

A stream is cheap for the client and not for the server: a request slot for as long as the job
runs, and a database poll twice a second. The count lives in the database, not in a process's
memory, because the API may run as several processes (`uvicorn --workers`, several containers)
that share nothing else: an in-process counter would allow the limit per process. The database
is there in every deployment (Redis is not: the embedded broker is a folder), and a stream
polls it anyway.

Each open stream holds a row of `event_streams` with an expiry: inserted before the stream
starts, renewed while it streams, deleted when it ends however it ends (the client goes away,
the job is final). The row of a stream whose process died (killed, a lost host) stops counting
at its expiry. Expiries are the API hosts' clocks: hosts whose clocks disagree by more than
`LEASE_SECONDS - RENEW_SECONDS` may miscount each other's streams.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta

import anyio
from sqlalchemy import delete, func, select

from api.problems import TooManyRequests
from api.quota import setting_name
from store.db.models import EventStream, new_id, utcnow
from store.db.session import TRANSIENT_ERRORS, session_scope
from store.settings import Settings

LEASE_SECONDS = 60.0
# a stream renews at its next frame once this is due; frames come at least every keep-alive
# (15 s), so a live stream's row never expires
RENEW_SECONDS = 20.0
RETRY_AFTER_SECONDS = 30  # until another stream of the owner's may have ended


@dataclass
class StreamLease:
    """One open stream's row."""

    database_url: str
    owner: str
    id: str = field(default_factory=new_id)
    renewed: float = field(default_factory=time.monotonic)

    def renew(self) -> None:
        """Push the expiry back (and write the row again if an open that saw it expired took
        it away)."""
        expires_at = utcnow() + timedelta(seconds=LEASE_SECONDS)
        with session_scope(self.database_url) as session:
            session.merge(EventStream(id=self.id, owner=self.owner, expires_at=expires_at))
        self.renewed = time.monotonic()

    def release(self) -> None:
        with session_scope(self.database_url) as session:
            session.execute(delete(EventStream).where(EventStream.id == self.id))


def open_stream(settings: Settings, *, owner: str) -> StreamLease:
    """The lease of a new stream of `owner`'s; 429 when that would be more than the limit.

    The row is committed before the count, so two opens racing each other both count both:
    at worst both are refused, never both let past the limit."""
    lease = StreamLease(settings.database_url, owner)
    now = utcnow()
    with session_scope(settings.database_url) as session:
        session.execute(
            delete(EventStream).where(EventStream.owner == owner, EventStream.expires_at <= now)
        )
        session.add(
            EventStream(id=lease.id, owner=owner, expires_at=now + timedelta(seconds=LEASE_SECONDS))
        )
    limit = settings.max_event_streams_per_owner
    if limit == 0:
        return lease
    with session_scope(settings.database_url) as session:
        open_streams = session.scalar(
            select(func.count())
            .select_from(EventStream)
            .where(EventStream.owner == owner, EventStream.expires_at > now)
        )
    if open_streams is not None and open_streams > limit:
        lease.release()
        raise TooManyRequests(
            f"you have {open_streams - 1} event streams open and the limit is {limit} "
            f"({setting_name('max_event_streams_per_owner')}): close one",
            retry_after=RETRY_AFTER_SECONDS,
        )
    return lease


async def leased(lease: StreamLease, frames: AsyncIterator[str]) -> AsyncIterator[str]:
    """`frames`, the lease renewed while they flow and released when they end, however they
    end (the client's disconnect cancels this generator)."""
    try:
        async for frame in frames:
            if time.monotonic() - lease.renewed >= RENEW_SECONDS:
                await anyio.to_thread.run_sync(lease.renew)
            yield frame
    finally:
        # a cancelled stream still gives its row back; with the database away, its expiry does
        with anyio.CancelScope(shield=True), contextlib.suppress(*TRANSIENT_ERRORS):
            await anyio.to_thread.run_sync(lease.release)
