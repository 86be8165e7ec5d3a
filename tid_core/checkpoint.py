"""Training checkpoints of a run dir (for resume), written atomically; the student export lives
in models.

A checkpoint is a dict of state_dicts (distiller = student + adapters, optimizer, scheduler,
scaler) plus the progress, RNG states and the spec's hash. It is written to a temporary file in
the same folder, fsynced, then renamed over `last.pt`, so a crash or a full disk never leaves a
torn file: the previous checkpoint stays until the new one is complete. Each epoch's end also
keeps an immutable copy, `epoch_NNNN.pt`, the last KEEP_EPOCH_CHECKPOINTS of them.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import nn

KEEP_EPOCH_CHECKPOINTS = 2


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, run dir not writable); the previous one
    is intact because writes are atomic."""


@dataclass
class Progress:
    """Where the schedule stands: `epoch` is the current one, `batch` batches of it are done;
    `eval_due` says the evaluation of the epoch just finished has not completed yet."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    eval_due: bool = False


@dataclass
class TrainingState:
    """What a checkpoint saves and a resume restores. `model` is the distiller itself, not
    its DDP wrapper, so the keys do not depend on the world size."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    progress: Progress = field(default_factory=Progress)


@dataclass(frozen=True)
class SavedCheckpoint:
    """A written checkpoint file, in the fields of the `checkpoint` event that reports it."""

    path: str  # relative to the run dir
    bytes: int
    sha256: str


class CheckpointDir:
    """`checkpoints/` of a run dir: `last.pt`, which a resume reads, and the epoch copies (hard
    links to an epoch's `last.pt`: no extra bytes until `last.pt` is replaced). Checkpoints of
    another spec are refused: the spec's hash is saved in each and checked on resume."""

    def __init__(self, run_dir: Path, spec_hash: str) -> None:
        self.run_dir = run_dir
        self.folder = run_dir / "checkpoints"
        self.last = self.folder / "last.pt"
        self.spec_hash = spec_hash

    def remove_partial_writes(self) -> None:
        """Delete a killed writer's temporary files (of checkpoints, and of exports in the run
        dir); only while holding the run dir's lock."""
        for folder in (self.folder, self.run_dir):
            for stale in folder.glob(".*.tmp.*"):
                stale.unlink()

    def save(self, state: TrainingState, *, epoch_end: bool) -> SavedCheckpoint:
        """Replace `last.pt` with `state` (and, at an epoch's end, keep a copy of it)."""
        p = state.progress
        obj = {
            "model": state.model.state_dict(),
            "optimizer": state.optimizer.state_dict(),
            "scheduler": state.scheduler.state_dict(),
            "scaler": state.scaler.state_dict(),
            "rng": rng_state(),
            "progress": asdict(p),
            "spec_hash": self.spec_hash,
        }
        try:
            size = save_atomic(obj, self.last)
        except OSError as exc:
            raise CheckpointWriteError(
                exc.errno,
                f"cannot write checkpoint {self.last} at step {p.step}: "
                f"{exc.strerror or exc} (disk full or run dir not writable?); "
                "the previous checkpoint is kept",
            ) from exc
        path = self.last
        if epoch_end:
            path = self.folder / f"epoch_{p.epoch:04d}.pt"
            path.unlink(missing_ok=True)
            os.link(self.last, path)
            for old in sorted(self.folder.glob("epoch_*.pt"))[:-KEEP_EPOCH_CHECKPOINTS]:
                old.unlink()
        return SavedCheckpoint(str(path.relative_to(self.run_dir)), size, sha256_file(path))

    def resume(self, state: TrainingState) -> bool:
        """Load `last.pt` into `state`; False when there is none yet."""
        ckpt = load_checkpoint(self.last)
        if ckpt is None:
            return False
        if ckpt["spec_hash"] != self.spec_hash:
            raise ValueError(
                f"{self.last} was written for another spec "
                f"({ckpt['spec_hash'][:12]} != {self.spec_hash[:12]}); use a new run dir"
            )
        state.model.load_state_dict(ckpt["model"])
        state.optimizer.load_state_dict(ckpt["optimizer"])
        state.scheduler.load_state_dict(ckpt["scheduler"])
        state.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        state.progress = Progress(**ckpt["progress"])
        return True


def write_atomic(path: Path, write: Callable[[BinaryIO], object]) -> int:
    """Write a file atomically and durably: `write` fills a temporary file in the same folder
    (`.NAME.tmp.PID`), which is fsynced and renamed over `path`, and the folder is fsynced so
    that the rename outlives a crash. Every file the trainer hands on (checkpoints, exports)
    is written here. Returns the size in bytes; a failed write (disk full, unwritable folder)
    raises OSError and leaves `path` as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with tmp.open("wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path.stat().st_size


def save_atomic(obj: dict[str, Any], path: Path) -> int:
    """torch.save `obj` to `path` with `write_atomic`; returns the file size in bytes."""
    return write_atomic(path, lambda f: _torch_save(obj, f))


def _torch_save(obj: dict[str, Any], f: BinaryIO) -> None:
    try:
        torch.save(obj, f)
    except RuntimeError as exc:  # torch's writer hides the file's own error (ENOSPC...)
        if isinstance(exc.__context__, OSError):
            raise exc.__context__ from exc
        raise


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks (checkpoints are hundreds of MB)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """The checkpoint at `path`, or None if there is none. Only tensors and plain data load."""
    if not path.exists():
        return None
    obj: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    return obj


def rng_state() -> dict[str, Any]:
    np_state: tuple[Any, ...] = tuple(np.random.get_state(legacy=True))
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_pos": random.getstate()[2],
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(
        ("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0)
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
