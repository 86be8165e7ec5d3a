"""TensorBoard scalars of a run, beside `events.jsonl`: `tensorboard --logdir RUN_DIR/tensorboard`.

The same numbers as the `step` and `eval` events (every loss term, lr, TID's area fractions,
COCO AP), for people who watch training in TensorBoard. Only the main process writes. A resumed
run purges what an interrupted one logged past its checkpoint, so each step appears once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter

from tid_core.events import COCO_STATS

FLUSH_SECONDS = 10  # live enough to watch; events.jsonl is the durable record


class ScalarLog:
    """Writes into `log_dir`; with `log_dir=None` (other ranks) it drops everything."""

    def __init__(self, log_dir: Path | None, *, purge_step: int | None = None) -> None:
        self._writer = (
            SummaryWriter(str(log_dir), purge_step=purge_step, flush_secs=FLUSH_SECONDS)
            if log_dir is not None
            else None
        )

    def step(
        self, step: int, *, losses: dict[str, float], stats: dict[str, float], lr: float
    ) -> None:
        if self._writer is None:
            return
        for name, value in losses.items():
            self._writer.add_scalar(f"loss/{name}", value, step)
        for name, value in stats.items():
            self._writer.add_scalar(f"stats/{name}", value, step)
        self._writer.add_scalar("lr", lr, step)

    def eval(self, step: int, metrics: dict[str, Any]) -> None:
        if self._writer is None:
            return
        for key in COCO_STATS:
            if isinstance(metrics.get(key), int | float):
                self._writer.add_scalar(f"eval/{key}", metrics[key], step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
