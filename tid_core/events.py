"""`events.jsonl`: the trainer's only output channel besides files.

One JSON object per line with `type`, `time` (UNIX seconds) and `step`; the worker tails it
into the database. Lines are flushed as written so a reader sees them at once; a line is
either whole or absent for a reader that splits on newlines.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, TextIO

EVENT_TYPES = ("start", "phase", "step", "eval", "checkpoint", "end", "error", "interrupted")


def _finite(value: Any) -> Any:
    """JSON has no NaN/Infinity: non-finite floats become strings so a reader never chokes."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


class EventWriter:
    """Appends events to `path`; a writer with `path=None` drops them (non-main ranks)."""

    def __init__(self, path: Path | None) -> None:
        self._file: TextIO | None = None
        if path is not None:
            torn = path.exists() and path.stat().st_size > 0 and not _ends_with_newline(path)
            self._file = path.open("a", encoding="utf-8")
            if torn:  # a killed run left half a line: end it so our first event stays whole
                self._file.write("\n")

    def emit(self, type_: str, *, step: int, durable: bool = False, **fields: Any) -> None:
        if type_ not in EVENT_TYPES:
            raise ValueError(f"unknown event type {type_!r}; expected one of {EVENT_TYPES}")
        if self._file is None:
            return
        record = {"type": type_, "time": round(time.time(), 3), "step": step, **fields}
        self._file.write(json.dumps(_finite(record), sort_keys=False) + "\n")
        self._file.flush()
        if durable:
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def read_events(path: Path) -> list[dict[str, Any]]:
    """All complete events of a file (a trailing partial line is ignored)."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    events = []
    for line in lines[:-1]:
        try:
            events.append(json.loads(line))
        except ValueError:  # the torn tail of a killed run
            continue
    return events
