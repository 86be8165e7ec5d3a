"""A dataset or model check in a child process under memory and time limits.

An upload is input from anyone: an annotation file that needs more memory than the host has,
or weights that keep the loader busy for good, would kill or block the Celery pool child that
parsed it, and with `task_reject_on_worker_lost` the message would come back and do it again
to the next worker. So the pool child runs each check as `python -m worker.resource_check`,
which sets its own rlimits before it reads its request: address space (`TID_CHECK_MEMORY_MB`:
an allocation past it is a MemoryError in the check, not the OOM killer in the worker), CPU
time (`TID_CHECK_CPU_SECONDS`: SIGXCPU), no core files. The parent adds a wall-clock limit
(`TID_CHECK_SECONDS`) for a check that blocks (a FIFO, a dead mount). The request goes in on
stdin, the outcome comes back as JSON on stdout, and a limit hit is a failed outcome that
names its setting. Torch is imported here only, in the child.
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from store.settings import Settings
from tid_core.launch import set_parent_death_signal

if TYPE_CHECKING:
    from tid_core.data.coco import CocoDetection

OUT_OF_MEMORY = 3  # the child's exit code when the check raised MemoryError
# Threads reserve address space, which RLIMIT_AS counts: a stack each, and a malloc arena of
# 64 MiB each up to 8 per core; torch's thread pool alone would reserve GiBs on a big host.
# A check needs one thread.
CHILD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}
_STDERR_TAIL = 500  # characters of the child's last stderr line kept in an error


class Outcome(BaseModel):
    """`ready` with the row's columns to set, or `failed` with the reason."""

    state: Literal["ready", "failed"]
    error: str | None = None
    values: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def failed(cls, error: str) -> Outcome:
        return cls(state="failed", error=error)


class DatasetCheck(BaseModel):
    """Generate a builtin dataset, or check a registered/uploaded COCO folder; then count it.
    A registered folder (`roots`: the allowed dataset roots) may link into those roots; the
    others stay inside their own folder."""

    what: Literal["dataset"] = "dataset"
    kind: Literal["builtin", "path", "upload"]
    source: dict[str, Any]  # a builtin dataset's: the JobSpec form {"builtin": "shapes", ...}
    path: str
    splits: tuple[str, str]
    roots: list[str] = Field(default_factory=list)

    def run(self) -> Outcome:
        from tid_core.data.builtin import generate_builtin
        from tid_core.spec import BuiltinDataset

        try:
            root = Path(self.path)
            if self.kind == "builtin":
                generate_builtin(BuiltinDataset.model_validate(self.source), root)
            allowed = [root.resolve(), *(Path(r).resolve() for r in self.roots)]
            train = _checked_split(root, self.splits[0], allowed=allowed)
            val = _checked_split(root, self.splits[1], allowed=allowed)
            if train.class_names != val.class_names:
                raise ValueError(
                    f"train and val name different classes: {train.class_names} vs "
                    f"{val.class_names}"
                )
        except (OSError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
            return Outcome.failed(str(exc))
        counts = {"num_train": len(train), "num_val": len(val), "class_names": train.class_names}
        return Outcome(state="ready", values=counts)


class ModelCheck(BaseModel):
    """Load uploaded weights safely and strictly: a detector into the one its metadata
    declares (meta: arch, backbone, classes...), a file without tid metadata as the backbone it
    holds (meta: just `backbone`, for a student's `weights_backbone`)."""

    what: Literal["model"] = "model"
    path: str

    def run(self) -> Outcome:
        from tid_core.models import describe_weights

        try:
            meta = describe_weights(Path(self.path))
        except (OSError, ValueError) as exc:  # WeightsMismatchError is a ValueError
            return Outcome.failed(str(exc))
        return Outcome(state="ready", values={"meta": meta})


Check = Annotated[DatasetCheck | ModelCheck, Field(discriminator="what")]


def _checked_split(root: Path, split: str, *, allowed: list[Path]) -> CocoDetection:
    """The split, once each of its images exists and resolves under an allowed folder: a
    `file_name` with `..` or a symlink must not make the trainer read files outside them."""
    from tid_core.data.coco import CocoDetection

    ds = CocoDetection(root, split, train=False)
    paths = [ds.image_path(i) for i in range(len(ds))]
    outside = [p for p in paths if not any(p.resolve().is_relative_to(a) for a in allowed)]
    if outside:
        raise ValueError(
            f"{len(outside)} {split} image(s) resolve outside the dataset's allowed folders, "
            f"e.g. {outside[0]}"
        )
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} {split} image(s) missing, e.g. {missing[0]}")
    return ds


def run(check: DatasetCheck | ModelCheck, settings: Settings) -> Outcome:
    """The check's outcome, from a child process under the settings' limits."""
    argv = [sys.executable, "-m", "worker.resource_check"]
    argv += ["--memory-mb", str(settings.check_memory_mb)]
    argv += ["--cpu-seconds", str(settings.check_cpu_seconds)]
    try:
        done = subprocess.run(
            argv,
            input=check.model_dump_json(),
            capture_output=True,
            text=True,
            errors="replace",
            timeout=settings.check_seconds,
            env={**os.environ, **CHILD_ENV},
            # set before exec, so that no part of the child's life (its interpreter's start-up
            # included) outlives the pool child that waits for it
            preexec_fn=functools.partial(set_parent_death_signal, signal.SIGKILL),
        )
    except subprocess.TimeoutExpired:  # the child was killed
        return Outcome.failed(
            f"the check ran past its time limit of {settings.check_seconds:g} s (TID_CHECK_SECONDS)"
        )
    if done.returncode == 0:
        try:
            return Outcome.model_validate_json(done.stdout)
        except ValidationError:
            pass  # reported below as a check that died, with its stderr
    if done.returncode == OUT_OF_MEMORY:
        return Outcome.failed(
            f"the check ran out of memory: it needs more than {settings.check_memory_mb} MiB "
            "(TID_CHECK_MEMORY_MB)"
        )
    if done.returncode == -signal.SIGXCPU:
        return Outcome.failed(
            f"the check used more than its {settings.check_cpu_seconds} s of CPU time "
            "(TID_CHECK_CPU_SECONDS)"
        )
    how = (
        f"signal {signal.Signals(-done.returncode).name}"
        if done.returncode < 0
        else f"exit code {done.returncode}"
    )
    last = next((line for line in reversed(done.stderr.splitlines()) if line.strip()), "")
    return Outcome.failed(
        f"the check died ({how}) under its limits of {settings.check_memory_mb} MiB "
        f"(TID_CHECK_MEMORY_MB) and {settings.check_cpu_seconds} s of CPU time "
        f"(TID_CHECK_CPU_SECONDS): {last[-_STDERR_TAIL:] or 'no output'}"
    )


def _limit(memory_mb: int, cpu_seconds: int) -> None:
    """This process's limits, before it reads any input. CPU: SIGXCPU at the limit (its default
    action ends the process), SIGKILL a few seconds later should it be caught."""
    memory = memory_mb << 20
    _lower(resource.RLIMIT_AS, memory, memory)
    _lower(resource.RLIMIT_CPU, cpu_seconds, cpu_seconds + 5)
    _lower(resource.RLIMIT_CORE, 0, 0)


def _lower(which: int, soft: int, hard: int) -> None:
    """Set a limit, never above the hard limit this process inherited (a container's, say):
    only root may raise that, and a check must not fail for asking."""
    _, inherited = resource.getrlimit(which)
    if inherited != resource.RLIM_INFINITY:
        soft, hard = min(soft, inherited), min(hard, inherited)
    resource.setrlimit(which, (soft, hard))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--memory-mb", type=int, required=True)
    parser.add_argument("--cpu-seconds", type=int, required=True)
    args = parser.parse_args()
    _limit(args.memory_mb, args.cpu_seconds)
    check: DatasetCheck | ModelCheck = TypeAdapter(Check).validate_json(sys.stdin.buffer.read())
    try:
        outcome = check.run()
    except MemoryError:
        raise SystemExit(OUT_OF_MEMORY) from None
    sys.stdout.write(outcome.model_dump_json())


if __name__ == "__main__":
    main()
