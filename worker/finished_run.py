"""Whether a run dir holds a run that trained to its end: its last event is a whole `end`
event, and the files it exported are there.

A finished attempt whose outcome never reached the database (its worker was cut off from it,
or died, after the trainer exited) leaves such a run dir; the attempt after it records the
outcome instead of training again.
"""

from __future__ import annotations

import os
from pathlib import Path

from tid_core.events import EndEvent, parse_event
from worker.ingest import EVENTS_FILE

TAIL_BYTES = 1 << 20  # far more than one event line: an `end` event with 80 classes' APs is ~5 KB


def finished_run(run_dir: Path) -> EndEvent | None:
    """The run's `end` event if it is the last event of `events.jsonl` and every export it
    names has its size; None if the run has not ended (or ended and trained again since)."""
    try:
        with (run_dir / EVENTS_FILE).open("rb") as f:
            start = max(0, f.seek(0, os.SEEK_END) - TAIL_BYTES)
            f.seek(start)
            tail = f.read()
    except FileNotFoundError:
        return None
    if not tail.endswith(b"\n"):  # nothing yet, or a torn line: a trainer died writing it
        return None
    lines = tail[:-1].rsplit(b"\n", 1)
    if len(lines) == 1 and start > 0:  # the tail read starts inside the last line
        return None
    try:
        event = parse_event(lines[-1])
    except ValueError:  # pydantic's ValidationError: not an event
        return None
    if not isinstance(event, EndEvent):
        return None
    for name, export in event.artifacts.items():
        path = run_dir / name
        if not path.is_file() or path.stat().st_size != export.bytes:
            return None
    return event
