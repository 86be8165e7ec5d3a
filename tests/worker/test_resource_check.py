"""A dataset check in its child process: past its memory, CPU or wall-clock limit, or killed,
the dataset fails with a reason that names the limit, and the caller lives on."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from poison_inputs import check_memory_limit_mb, write_memory_bomb
from test_resources import SHAPES, add_dataset, read

from store.db.models import Dataset
from store.settings import Settings
from worker.resources import prepare_dataset

pytestmark = pytest.mark.slow  # each check starts a Python that imports torch


def prepare(settings: Settings, dataset_id: str, **limits: float) -> Dataset:
    prepare_dataset(dataset_id, settings=settings.model_copy(update=limits))
    row: Dataset = read(settings, Dataset, dataset_id)
    return row


def check_children() -> list[int]:
    """This process's children (of any of its threads) that run a check."""
    pids = [int(pid) for task in Path("/proc/self/task").iterdir() for pid in _children(task)]
    return [pid for pid in pids if b"worker.resource_check" in _cmdline(pid)]


def _children(task: Path) -> list[str]:
    with contextlib.suppress(OSError):
        return (task / "children").read_text().split()
    return []


def _cmdline(pid: int) -> bytes:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    return b""


@contextlib.contextmanager
def blocking_annotations(folder: Path) -> Iterator[None]:
    """Annotation files that are FIFOs nobody writes: reading one blocks (a dead mount). After
    60 s (only a check without a wall-clock limit still waits) the FIFO is opened for writing
    and closed, so the reader gets an empty file instead of waiting for good."""
    annotations = folder / "annotations"
    annotations.mkdir(parents=True)
    fifos = [annotations / f"instances_{split}.json" for split in ("train", "val")]
    for fifo in fifos:
        os.mkfifo(fifo)

    def release() -> None:
        for fifo in fifos:
            with contextlib.suppress(OSError):  # ENXIO: no reader (any more)
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

    timer = threading.Timer(60, release)
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def test_a_check_past_its_memory_limit_fails_naming_it(settings: Settings, tmp_path: Path) -> None:
    limit = check_memory_limit_mb()
    write_memory_bomb(tmp_path / "bomb" / "annotations", "train")
    dataset_id = add_dataset(settings, kind="upload", path=tmp_path / "bomb", source={})

    row = prepare(settings, dataset_id, check_memory_mb=limit)

    assert row.state == "failed"
    assert row.error == (
        f"the check ran out of memory: it needs more than {limit} MiB (TID_CHECK_MEMORY_MB)"
    )


def test_a_check_past_its_cpu_limit_fails_naming_it(settings: Settings) -> None:
    """Generating 2000 images takes ~40 s of CPU: far past 2 s, wherever it is stopped."""
    source = {**SHAPES, "num_train": 2000, "image_size": 256}
    dataset_id = add_dataset(
        settings, kind="builtin", path=settings.datasets_dir / "a", source=source
    )

    row = prepare(settings, dataset_id, check_cpu_seconds=2)

    assert (row.state, row.error) == (
        "failed",
        "the check used more than its 2 s of CPU time (TID_CHECK_CPU_SECONDS)",
    )


def test_a_check_that_blocks_fails_at_its_wall_clock_limit(
    settings: Settings, tmp_path: Path
) -> None:
    with blocking_annotations(tmp_path / "d"):
        dataset_id = add_dataset(settings, kind="upload", path=tmp_path / "d", source={})
        started = time.monotonic()
        row = prepare(settings, dataset_id, check_seconds=5)

    assert (row.state, row.error) == (
        "failed",
        "the check ran past its time limit of 5 s (TID_CHECK_SECONDS)",
    )
    assert time.monotonic() - started < 30
    assert check_children() == []  # killed, and waited for


def test_a_check_killed_from_outside_fails_naming_the_signal(
    settings: Settings, tmp_path: Path
) -> None:
    """The OOM killer's way: SIGKILL, no MemoryError."""
    with blocking_annotations(tmp_path / "d"):
        dataset_id = add_dataset(settings, kind="upload", path=tmp_path / "d", source={})
        checking = threading.Thread(target=prepare, args=(settings, dataset_id))
        checking.start()
        deadline = time.monotonic() + 60
        while not (children := check_children()):
            assert time.monotonic() < deadline, "no check process started"
            time.sleep(0.05)
        os.kill(children[0], signal.SIGKILL)
        checking.join(timeout=60)

    row = read(settings, Dataset, dataset_id)
    assert row.state == "failed"
    assert row.error.startswith(
        "the check died (signal SIGKILL) under its limits of 16384 MiB (TID_CHECK_MEMORY_MB) "
        "and 3600 s of CPU time (TID_CHECK_CPU_SECONDS): "
    )
