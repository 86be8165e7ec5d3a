"""The embedded mode's file-system broker: kombu's, with each message delivered whole, once.

kombu's filesystem transport creates a message file, locks it and then writes it; a consumer
moves files away without looking at the lock, so one that lists the folder in between takes an
empty message and dies on it ("Unrecoverable error: JSONDecodeError", kombu#1551: seen here,
`tid demo`'s only worker gone, the demo waiting for ever). And a consumer claims a message by
moving it to the system temp folder, which on another file system is a copy and a delete: two
workers can both copy one message, or one fails reading what the other deleted. Here a message
is written under a name no consumer takes and renamed into place, and a consumer claims it by
renaming it into the broker's own `processed` folder: renames within one file system are atomic.
Messages are named by the nanosecond, not kombu's millisecond, so they are taken in the order
they were sent.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from queue import Empty
from time import monotonic_ns
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils import json

TRANSPORT = f"{__name__}:Transport"  # Celery's `broker_transport` for `filesystem://` URLs
# kombu's JSON (it encodes what Celery's messages hold), typed
dumps: Callable[[Any], str] = json.dumps
loads: Callable[[str], Any] = json.loads


def transport_options(broker_dir: Path) -> dict[str, object]:
    """The broker's folders under `broker_dir` (created) and its polling, as kombu options."""
    folders = {name: broker_dir / name for name in ("queue", "processed", "control")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    return {
        "data_folder_in": str(folders["queue"]),
        "data_folder_out": str(folders["queue"]),
        "processed_folder": str(folders["processed"]),
        "control_folder": str(folders["control"]),  # else kombu writes ./control
        "store_processed": False,
        # a listing of a local folder is cheap: a worker sees a message, or its own shutdown,
        # within 0.2 s instead of kombu's 1 s
        "polling_interval": 0.2,
    }


class Channel(filesystem.Channel):
    # kombu's own filesystem Channel names `_put`'s argument differently from its base class
    def _put(self, queue: str, payload: Any, **_options: Any) -> None:  # type: ignore[override]
        """Write `payload` to a hidden file, then rename it to a message of `queue`."""
        folder = self.data_folder_out
        # kombu's name, with nanoseconds (padded): a listing sorts messages in the order sent
        name = f"{monotonic_ns():020d}_{uuid.uuid4()}.{queue}.msg"
        fd, partial = tempfile.mkstemp(prefix=".partial-", dir=folder)  # `_get` skips it
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(dumps(payload).encode())
            os.replace(partial, os.path.join(folder, name))
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.remove(partial)
            raise ChannelError(f"Cannot add message {name!r} to {folder}") from exc

    def _get(self, queue: str, timeout: float | None = None) -> Any:  # noqa: ARG002 (never waits)
        """The oldest message of `queue`, claimed by renaming it out of the queue folder."""
        wanted = f"{queue}.msg"
        claimed_dir = Path(self.processed_folder)
        claimed_dir.mkdir(parents=True, exist_ok=True)
        for name in sorted(os.listdir(self.data_folder_in)):
            if name.partition(".")[2] != wanted:
                continue
            claimed = claimed_dir / name
            try:
                os.rename(os.path.join(self.data_folder_in, name), claimed)
            except FileNotFoundError:
                continue  # another consumer claimed it first
            try:
                payload = claimed.read_bytes()
                if not self.store_processed:
                    claimed.unlink()
            except OSError as exc:
                raise ChannelError(f"Cannot read message {claimed}") from exc
            return loads(payload.decode())
        raise Empty()


class Transport(filesystem.Transport):
    Channel = Channel
