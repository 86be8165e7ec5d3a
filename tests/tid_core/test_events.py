"""The event types of `events.jsonl`: lines as the trainer wrote them before the types existed
parse and write back unchanged, non-finite floats survive as strings, anything else is refused."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from pydantic import ValidationError

from tid_core.events import (
    COCO_STATS,
    EventWriter,
    StepEvent,
    as_record,
    parse_event,
)

METRICS = (
    '"AP": 1.5, "AP50": 4.0, "AP75": 0.5, "APs": 0.0, "APm": 2.0, "APl": null, "per_class": '
    '{"circle": 3.0, "square": null}, "backend": "faster-coco-eval", "num_images": 6, '
    '"num_detections": 600'
)
# one line of each type, as the trainer wrote them before the event types existed
LINES = [
    '{"type": "start", "time": 1796610469.714, "step": 0, "spec_hash": "a5", "resumed": false, '
    '"epoch": 0, "world_size": 1, "device": "cpu", "amp": false, "steps_per_epoch": 4, '
    '"total_steps": 8, "num_classes": 2, "class_names": ["circle", "square"]}',
    '{"type": "phase", "time": 1796610469.715, "step": 0, "phase": "train", "epoch": 0}',
    '{"type": "phase", "time": 1796610474.985, "step": 8, "phase": "export"}',
    '{"type": "step", "time": 1796610470.473, "step": 1, "epoch": 0, "total_steps": 8, '
    '"lr": 1e-05, "losses": {"loss": 3.69, "classification": 1.15, "tid_rest": 0.84}, '
    '"stats": {"tid_key_frac": 0.0, "data_wait": 0.025}}',
    '{"type": "checkpoint", "time": 1796610472.354, "step": 4, "epoch": 1, '
    '"path": "checkpoints/epoch_0001.pt", "bytes": 94254803, "sha256": "5a81"}',
    f'{{"type": "eval", "time": 1796610474.984, "step": 8, "epoch": 2, "metrics": {{{METRICS}}}}}',
    f'{{"type": "end", "time": 1796610475.25, "step": 8, "metrics": {{{METRICS}, "step": 8, '
    '"epoch": 2}, "artifacts": {"student.pt": {"bytes": 46977663, "sha256": "c1cb"}}}',
    '{"type": "error", "time": 1796610475.3, "step": -1, "message": "boom", '
    '"kind": "RuntimeError", "retryable": false, "traceback": "Traceback ..."}',
    '{"type": "interrupted", "time": 1796610475.4, "step": 3, "epoch": 0}',
]


@pytest.mark.parametrize("line", LINES, ids=lambda line: json.loads(line)["type"])
def test_a_line_of_the_format_so_far_parses_and_writes_back_unchanged(line: str) -> None:
    event = parse_event(line)
    assert event.type == json.loads(line)["type"]
    assert as_record(event) == json.loads(line)


def test_non_finite_floats_are_written_as_strings_and_read_back_as_floats(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    writer = EventWriter(path)
    event = StepEvent(
        step=2, epoch=0, total_steps=4, lr=0.1, losses={"loss": math.nan}, stats={"x": -math.inf}
    )
    writer.emit(event)
    writer.close()
    line = path.read_text()
    assert json.loads(line)["losses"] == {"loss": "nan"}  # valid JSON: no NaN token
    parsed = parse_event(line)
    assert isinstance(parsed, StepEvent)
    assert math.isnan(parsed.losses["loss"]) and parsed.stats["x"] == -math.inf


@pytest.mark.parametrize(
    "line",
    [
        "not json",
        "[1, 2]",
        '{"step": 1}',  # no type
        '{"type": "telemetry", "step": 1}',  # an unknown type
        '{"type": "interrupted", "step": 1}',  # a missing field
        '{"type": "interrupted", "step": 1.5, "epoch": 0}',  # a field of the wrong type
    ],
)
def test_a_line_that_is_no_event_is_refused(line: str) -> None:
    with pytest.raises(ValidationError):
        parse_event(line)


def test_the_coco_statistics_are_named_in_summarize_order() -> None:
    assert COCO_STATS == ("AP", "AP50", "AP75", "APs", "APm", "APl")
