"""Which run dirs hold a run trained to its end (hand-written events, no training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tid_core.events import EndEvent, FinalMetrics, PhaseEvent, StartEvent, as_record
from worker.finished_run import TAIL_BYTES, finished_run
from worker.ingest import EVENTS_FILE

STATS = {"AP": 1.0, "AP50": 2.0, "AP75": 0.5, "APs": None, "APm": 1.0, "APl": 1.5}
METRICS = FinalMetrics(
    **STATS, per_class={}, backend="b", num_images=4, num_detections=9, step=8, epoch=2
)
START = StartEvent(
    step=0,
    total_steps=8,
    resumed=False,
    spec_hash="f" * 64,
    epoch=0,
    world_size=1,
    device="cpu",
    amp=False,
    steps_per_epoch=4,
    num_classes=1,
    class_names=["circle"],
)
EXPORTS = {"student.pt": b"weights", "student.safetensors": b"tensors!"}


def end_event() -> EndEvent:
    return EndEvent.model_validate(
        {
            "step": 8,
            "metrics": METRICS.model_dump(),
            "artifacts": {n: {"bytes": len(b), "sha256": "0" * 64} for n, b in EXPORTS.items()},
        }
    )


def write(run_dir: Path, *lines: str, exports: dict[str, bytes] = EXPORTS) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / EVENTS_FILE).write_text("".join(lines))
    for name, data in exports.items():
        (run_dir / name).write_bytes(data)


def line(event: StartEvent | PhaseEvent | EndEvent) -> str:
    return json.dumps(as_record(event)) + "\n"


def test_a_run_whose_last_event_is_its_end_is_finished(tmp_path: Path) -> None:
    write(tmp_path, line(START), line(PhaseEvent(step=8, phase="export")), line(end_event()))

    end = finished_run(tmp_path)

    assert end is not None and end.metrics.step == 8


def test_a_run_trained_further_after_its_end_is_not_finished(tmp_path: Path) -> None:
    write(tmp_path, line(START), line(end_event()), line(START))  # an attempt started since

    assert finished_run(tmp_path) is None


@pytest.mark.parametrize(
    "lines",
    [
        [],  # no event yet
        [line(end_event()), line(START)[:-1]],  # a torn line after the end: its writer died
        [line(end_event())[:-1]],  # a torn end
    ],
)
def test_no_end_or_a_torn_last_line_is_not_finished(tmp_path: Path, lines: list[str]) -> None:
    write(tmp_path, *lines)

    assert finished_run(tmp_path) is None


def test_an_end_whose_exports_are_missing_or_cut_is_not_finished(tmp_path: Path) -> None:
    write(tmp_path, line(end_event()), exports={"student.pt": EXPORTS["student.pt"]})
    assert finished_run(tmp_path) is None

    write(tmp_path, line(end_event()), exports={**EXPORTS, "student.pt": b"weigh"})
    assert finished_run(tmp_path) is None


def test_only_the_tail_of_a_long_events_file_is_read(tmp_path: Path) -> None:
    steps = line(PhaseEvent(step=1, phase="train")) * (2 * TAIL_BYTES // 60)
    write(tmp_path, line(START), steps, line(end_event()))

    assert finished_run(tmp_path) is not None
