"""`events.jsonl`: the trainer's only output channel besides files, and the types of its lines.

One JSON object per line, `type` naming one of the event models below, with `time` (UNIX
seconds) and `step`. The models are the contract between the trainer, which builds them, and
the worker, which parses each line with `parse_event` and turns it into rows; they import no
torch (an import-linter contract), so the worker and the API read them without the trainer.
Lines are flushed as written so a reader sees them at once; a line is either whole or absent
for a reader that splits on newlines. JSON has no NaN/Infinity: non-finite floats are written
as strings ("nan", "inf", "-inf"), which float fields read back as floats.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Annotated, Any, Final, Literal, TextIO

from pydantic import BaseModel, Field, TypeAdapter


class CocoStats(BaseModel):
    """COCO's box AP summary in percent, in the order of its summarize() stats; None where
    COCO has no ground truth (e.g. no small objects)."""

    AP: float | None
    AP50: float | None
    AP75: float | None
    APs: float | None
    APm: float | None
    APl: float | None


# The names of the COCO statistics, everywhere: events, metrics.json, TensorBoard (`eval/AP`),
# the REST API's `eval/AP` points; in lower case, the `evaluations` table's columns and the API's
# evaluation fields.
COCO_STATS: Final = tuple(CocoStats.model_fields)


class EvalMetrics(CocoStats):
    """What `tid_core.evaluate.coco_metrics` measures on the validation split."""

    per_class: dict[str, float | None]  # AP per class name
    backend: str
    num_images: int
    num_detections: int


class FinalMetrics(EvalMetrics):
    """`metrics.json`: the last evaluation, with where training ended."""

    step: int
    epoch: int


class ArtifactFile(BaseModel):
    bytes: int
    sha256: str


def _now() -> float:
    return round(time.time(), 3)


class _Event(BaseModel):
    """The fields every event has. A reader ignores fields it does not know (a newer trainer's)."""

    type: str
    time: float = Field(default_factory=_now)
    step: int


class StartEvent(_Event):
    """An attempt began (fresh, or `resumed` from its checkpoint at `step`)."""

    type: Literal["start"] = "start"
    spec_hash: str
    resumed: bool
    epoch: int
    world_size: int
    device: str
    amp: bool
    steps_per_epoch: int
    total_steps: int
    num_classes: int
    class_names: list[str]


class PhaseEvent(_Event):
    type: Literal["phase"] = "phase"
    phase: Literal["train", "eval", "export"]
    epoch: int | None = Field(default=None, exclude_if=lambda epoch: epoch is None)  # export: none


class StepEvent(_Event):
    """One optimisation step (every `log_every`): means over ranks."""

    type: Literal["step"] = "step"
    epoch: int
    total_steps: int
    lr: float
    losses: dict[str, float]  # `loss` (their sum) and each term
    stats: dict[str, float]  # figures for the logs: TID's area fractions, data_wait


class EvalEvent(_Event):
    type: Literal["eval"] = "eval"
    epoch: int
    metrics: EvalMetrics


class CheckpointEvent(_Event):
    """A checkpoint file is on disk (written before its event: the event never lies)."""

    type: Literal["checkpoint"] = "checkpoint"
    epoch: int
    path: str  # relative to the run dir
    bytes: int
    sha256: str


class GradRatioEvent(_Event):
    """‖∇ distillation‖ / ‖∇ detection‖ on the student, at the full loss weight, over the first
    `steps` steps of a distillation job (`tid_core.grad_guard`)."""

    type: Literal["grad_ratio"] = "grad_ratio"
    method: str
    ratio: float
    steps: int
    helpful_range: tuple[float, float]


class WarningEvent(_Event):
    """Something a person should look at while training goes on (the dashboard shows it): the
    gradient ratio far outside the range where the benchmark saw distillation help."""

    type: Literal["warning"] = "warning"
    message: str
    method: str
    ratio: float
    helpful_range: tuple[float, float]


class EndEvent(_Event):
    type: Literal["end"] = "end"
    metrics: FinalMetrics
    artifacts: dict[str, ArtifactFile]  # by file name: student.pt, student.safetensors


class ErrorEvent(_Event):
    """The run failed (`step` -1 when not at a step); `retryable`: another attempt may not."""

    type: Literal["error"] = "error"
    message: str
    kind: str  # the exception's class name
    retryable: bool
    traceback: str


class InterruptedEvent(_Event):
    """SIGTERM/SIGINT stopped the run after its checkpoint at `step`."""

    type: Literal["interrupted"] = "interrupted"
    epoch: int


Event = Annotated[
    StartEvent
    | PhaseEvent
    | StepEvent
    | EvalEvent
    | CheckpointEvent
    | GradRatioEvent
    | WarningEvent
    | EndEvent
    | ErrorEvent
    | InterruptedEvent,
    Field(discriminator="type"),
]
_EVENT: TypeAdapter[Event] = TypeAdapter(Event)


def parse_event(line: str | bytes) -> Event:
    """One line of `events.jsonl` as its event. Raises pydantic's ValidationError (a
    ValueError) for anything else: not JSON, not an object, an unknown `type`, a missing field
    or one of the wrong type."""
    return _EVENT.validate_json(line)


def as_record(event: Event) -> dict[str, Any]:
    """The event as the JSON object its line holds (non-finite floats as strings)."""
    record: dict[str, Any] = _finite(event.model_dump())
    return record


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

    def emit(self, event: Event, *, durable: bool = False) -> None:
        """Append `event`; `durable` also fsyncs it (the events a resume or the worker's
        outcome relies on: checkpoints, the end, an error)."""
        if self._file is None:
            return
        self._file.write(json.dumps(as_record(event)) + "\n")
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
    """All complete lines of a file as JSON objects (a trailing partial line is ignored): for
    tools and tests that read a run dir as it is."""
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
