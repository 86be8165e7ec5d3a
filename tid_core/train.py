"""`python -m tid_core.train --spec SPEC.json --run-dir DIR` (also under torchrun).

Reads top to bottom like torchvision's reference script: spec -> distributed init -> data ->
models -> optimizer -> resume -> epoch loop -> export. Only rank 0 writes files. Into DIR:
`events.jsonl`, `checkpoints/last.pt` (+ one immutable file per epoch), `student.pt`,
`student.safetensors`, `metrics.json`. Re-running on the same DIR resumes from `last.pt`.
Exit codes: 0 done, 1 failed (an `error` event says why; `retryable` tells whether another
attempt may succeed), 143 stopped by SIGTERM/SIGINT (an `interrupted` event; the checkpoint it
resumes from is on disk), 75 another trainer still held the run dir (nothing was written).
"""

from __future__ import annotations

# isort: off
import tid_core.cpu_threads  # noqa: F401 - sets OpenMP's threads and wait policy before torch loads it

# isort: on
import argparse
import json
import logging
import math
import os
import sys
import traceback
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tid_core import dist
from tid_core.checkpoint import CheckpointDir, TrainingState, write_atomic
from tid_core.data.builtin import generate_builtin
from tid_core.data.coco import CocoDetection, build_loader
from tid_core.distill.distiller import build_models
from tid_core.engine import (
    NonFiniteLossError,
    StopFlag,
    StopRequested,
    distill_ramp,
    evaluate,
    lr_factor,
    train_one_epoch,
)
from tid_core.evaluate import DEFAULT_BACKEND, coco_metrics
from tid_core.events import (
    CheckpointEvent,
    EndEvent,
    ErrorEvent,
    EvalEvent,
    EventWriter,
    InterruptedEvent,
    PhaseEvent,
    StartEvent,
    StepEvent,
)
from tid_core.grad_guard import GradRatioProbe
from tid_core.models import DetectorMeta, export_student
from tid_core.run_lock import RunDirLocked, lock_run_dir
from tid_core.shared_run_dir import check_shared_run_dir
from tid_core.spec import BuiltinDataset, IdDataset, JobSpec
from tid_core.tensorboard_log import ScalarLog

log = logging.getLogger("tid_core.train")
EXIT_INTERRUPTED = 143
EXIT_RUN_DIR_BUSY = 75  # EX_TEMPFAIL
# failures another attempt may not repeat: a lost peer or network, not a bug or bad input
RETRYABLE_ERRORS = (torch.distributed.DistError, ConnectionError, TimeoutError)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train a detector, optionally with distillation.")
    parser.add_argument("--spec", type=Path, required=True, help="JobSpec JSON file")
    parser.add_argument("--run-dir", type=Path, required=True, help="output (and resume) folder")
    parser.add_argument(
        "--lock-timeout",
        type=float,
        default=300.0,
        help="seconds to wait for an earlier trainer of the same run dir to exit",
    )
    return parser


def resolve_dataset(spec: JobSpec, run_dir: Path) -> tuple[Path, str, str]:
    """The dataset folder and its training and validation split names; the builtin generator
    writes into the run dir (rank 0, once)."""
    ds = spec.dataset
    if isinstance(ds, IdDataset):
        raise ValueError(f"dataset id {ds.id!r} is unresolved: the service maps ids to paths")
    if isinstance(ds, BuiltinDataset):
        root = run_dir / "dataset"
        if dist.is_main_process():
            generate_builtin(ds, root)
        dist.barrier()
        return root, ds.train_split, ds.val_split
    return Path(ds.path), ds.train_split, ds.val_split


def train(
    spec: JobSpec, run_dir: Path, device: torch.device, events: EventWriter, stop: StopFlag
) -> int:
    """One run: build, resume, train and evaluate, export. The exit code; failures raise."""
    s, d = spec.schedule, spec.distill
    is_main = dist.is_main_process()
    checkpoints = CheckpointDir(run_dir, spec.spec_hash())
    if is_main:  # a killed writer's leftovers (we hold the run dir's lock)
        checkpoints.remove_partial_writes()
    torch.manual_seed(s.seed)

    root, train_split, val_split = resolve_dataset(spec, run_dir)
    train_ds = CocoDetection(root, train_split, train=True)
    val_ds = CocoDetection(root, val_split, train=False)
    world = dist.get_world_size()
    loader_args = {"num_workers": spec.resources.num_workers, "rank": dist.get_rank()}
    loader_args |= {"batch_size": s.batch_size, "seed": s.seed, "world_size": world}
    train_loader = build_loader(train_ds, train=True, **loader_args)
    val_loader = build_loader(val_ds, train=False, **loader_args)
    steps_per_epoch = math.ceil(math.ceil(len(train_ds) / world) / s.batch_size)
    total_steps = steps_per_epoch * s.epochs

    distiller = build_models(spec, train_ds, spec.dataset.input_size).to(device)
    if distiller.teacher is not None:
        distiller.teacher.to(device)
    student = distiller.student
    model: nn.Module = distiller
    if dist.is_distributed():
        ids = [device.index] if device.type == "cuda" else None
        model = DistributedDataParallel(distiller, device_ids=ids)
    params = [p for p in distiller.parameters() if p.requires_grad]
    if s.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(
            params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay
        )
    else:
        optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    milestones = [m * steps_per_epoch for m in s.lr_milestones]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda it: lr_factor(
            it, warmup_iters=s.warmup_iters, milestones=milestones, gamma=s.lr_gamma
        ),
    )
    amp = s.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    state = TrainingState(distiller, optimizer, scheduler, scaler)
    distill_scale = partial(
        distill_ramp, loss_weight=d.loss_weight, warmup_iters=d.distill_warmup_iters
    )
    probe = None  # the gradient-ratio guard, on the main process (the others train as usual)
    if is_main and distiller.loss is not None:
        probe = GradRatioProbe(
            distiller,
            method=d.method,
            distill_scale=distill_scale,
            loss_weight=d.loss_weight,
            scaler=scaler,
            total_steps=total_steps,
        )

    resumed = checkpoints.resume(state)
    p = state.progress
    purge = p.step + 1 if resumed else None
    scalars = ScalarLog(run_dir / "tensorboard" if is_main else None, purge_step=purge)
    events.emit(
        StartEvent(
            step=p.step,
            spec_hash=checkpoints.spec_hash,
            resumed=resumed,
            epoch=p.epoch,
            world_size=world,
            device=str(device),
            amp=amp,
            steps_per_epoch=steps_per_epoch,
            total_steps=total_steps,
            num_classes=train_ds.num_classes,
            class_names=train_ds.class_names,
        )
    )
    log.info("%s at step %d of %d", "resumed" if resumed else "started", p.step, total_steps)

    def save_checkpoint(*, epoch_end: bool) -> None:
        """The main process writes the checkpoint and its event; every rank waits for them."""
        if is_main:
            saved = checkpoints.save(state, epoch_end=epoch_end)
            events.emit(CheckpointEvent(step=p.step, epoch=p.epoch, **asdict(saved)), durable=True)
        dist.barrier()

    metrics: dict[str, Any] | None = None
    try:
        # each evaluation follows its epoch's checkpoint (a resume from it evaluates first); a
        # resume after the last one, before the export, evaluates again for the export's metrics
        while p.epoch < s.epochs or p.eval_due or metrics is None:
            if p.eval_due or p.epoch >= s.epochs:
                events.emit(PhaseEvent(step=p.step, phase="eval", epoch=p.epoch))
                preds = evaluate(
                    student, val_loader, device=device, cat_ids=val_ds.cat_ids, amp=amp, stop=stop
                )
                metrics = {}
                if preds is not None:  # on the main process, from every rank
                    metrics = coco_metrics(val_ds.ann_file, preds, backend=DEFAULT_BACKEND)
                    events.emit(EvalEvent(step=p.step, epoch=p.epoch, metrics=metrics))
                    scalars.eval(p.step, metrics)
                    log.info("epoch %d: AP %.2f AP50 %.2f", p.epoch, metrics["AP"], metrics["AP50"])
                dist.barrier()
                p.eval_due = False
                continue
            events.emit(PhaseEvent(step=p.step, phase="train", epoch=p.epoch))
            train_loader.sampler.set_epoch(p.epoch, start_batch=p.batch)  # type: ignore[attr-defined]
            for result in train_one_epoch(
                model,
                optimizer,
                scheduler,
                scaler,
                train_loader,
                device=device,
                start_step=p.step,
                distill_scale=distill_scale,
                grad_clip=s.grad_clip,
                amp=amp,
                stop=stop,
                probe=probe,
            ):
                p.step, p.batch = result.step, p.batch + 1
                if p.step % s.log_every == 0 or p.step == 1 or result.stop:
                    events.emit(
                        StepEvent(
                            step=p.step,
                            epoch=p.epoch,
                            total_steps=total_steps,
                            lr=result.lr,
                            losses=result.losses,
                            stats=result.stats,
                        )
                    )
                    scalars.step(p.step, losses=result.losses, stats=result.stats, lr=result.lr)
                if probe is not None:
                    probe.report(events, p.step)
                if result.stop or (s.checkpoint_every and p.step % s.checkpoint_every == 0):
                    save_checkpoint(epoch_end=False)
                if result.stop:
                    raise StopRequested("stopped during training")
            p.epoch, p.batch = p.epoch + 1, 0
            p.eval_due = p.epoch == s.epochs or bool(s.eval_every and p.epoch % s.eval_every == 0)
            save_checkpoint(epoch_end=True)
    except StopRequested:
        events.emit(InterruptedEvent(step=p.step, epoch=p.epoch), durable=True)
        return EXIT_INTERRUPTED
    finally:
        scalars.close()

    events.emit(PhaseEvent(step=p.step, phase="export"))
    if is_main:
        st = spec.student
        meta = DetectorMeta(
            arch=st.arch,
            backbone=st.backbone,
            num_classes=train_ds.num_classes,
            fpn_channels=st.fpn_channels,
            input_size=spec.dataset.input_size,
            class_names=train_ds.class_names,
            cat_ids=train_ds.cat_ids,
            spec_hash=checkpoints.spec_hash,
        )
        artifacts = export_student(student, meta, run_dir)
        final = {**metrics, "step": p.step, "epoch": p.epoch}
        summary = json.dumps(final, indent=2).encode()
        write_atomic(run_dir / "metrics.json", lambda f: f.write(summary))
        events.emit(EndEvent(step=p.step, metrics=final, artifacts=artifacts), durable=True)
    dist.barrier()
    return 0


def main(argv: list[str] | None = None) -> int:
    """The process around `train`: the run dir's lock, signals, the error event, exit codes."""
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if dist.local_rank() == 0 else logging.WARNING,
        format=f"%(asctime)s rank{os.environ.get('RANK', '0')} %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    dist.die_with_launcher()
    stop = StopFlag()
    stop.install()
    lock = None
    if os.environ.get("RANK", "0") == "0":  # the one process that writes into the run dir
        try:
            lock = lock_run_dir(args.run_dir, timeout=args.lock_timeout)
        except RunDirLocked as exc:
            log.error("%s", exc)
            return EXIT_RUN_DIR_BUSY
    events = None
    try:
        spec = JobSpec.model_validate_json(args.spec.read_text())
        device = dist.pick_device(spec.resources.device)
        dist.init_distributed(device)
        check_shared_run_dir(args.run_dir)
        events = EventWriter(args.run_dir / "events.jsonl" if dist.is_main_process() else None)
        return train(spec, args.run_dir, device, events, stop)
    except Exception as exc:
        step = exc.step if isinstance(exc, NonFiniteLossError) else -1
        log.error("training failed: %s", exc)
        if dist.is_main_process():
            writer = events or EventWriter(args.run_dir / "events.jsonl")
            writer.emit(
                ErrorEvent(
                    step=step,
                    message=str(exc),
                    kind=type(exc).__name__,
                    retryable=isinstance(exc, RETRYABLE_ERRORS),
                    traceback=traceback.format_exc(limit=8),
                ),
                durable=True,
            )
        return 1
    finally:
        if events is not None:
            events.close()
        dist.cleanup()
        if lock is not None:
            lock.close()


if __name__ == "__main__":
    sys.exit(main())
