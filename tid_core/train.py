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

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tid_core import dist
from tid_core.checkpoint import (
    load_checkpoint,
    rng_state,
    save_atomic,
    set_rng_state,
    sha256_file,
)
from tid_core.data.coco import CocoDetection, build_loader
from tid_core.data.synthetic import generate_shapes
from tid_core.distill.baselines import fitnet_loss, pkd_loss
from tid_core.distill.distiller import Distiller
from tid_core.distill.tid import TIDLoss
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
from tid_core.events import EventWriter
from tid_core.models import (
    DetectorMeta,
    build_detector,
    load_backbone,
    load_checked,
    save_weights,
)
from tid_core.rundir import RunDirLocked, lock_run_dir
from tid_core.scalars import ScalarLog
from tid_core.spec import BuiltinDataset, DistillSpec, IdDataset, JobSpec, PathWeights, Weights

log = logging.getLogger("tid_core.train")
EXIT_INTERRUPTED = 143
EXIT_RUN_DIR_BUSY = 75  # EX_TEMPFAIL
# failures another attempt may not repeat: a lost peer or network, not a bug or bad input
RETRYABLE_ERRORS: tuple[type[BaseException], ...] = (
    torch.distributed.DistError,
    ConnectionError,
    TimeoutError,
)
KEEP_EPOCH_CHECKPOINTS = 2


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
            generate_shapes(
                root,
                num_train=ds.num_train,
                num_val=ds.num_val,
                image_size=ds.image_size,
                seed=ds.seed,
            )
        dist.barrier()
        return root, ds.train_split, ds.val_split
    return Path(ds.path), ds.train_split, ds.val_split


def build_distill_loss(d: DistillSpec) -> nn.Module | None:
    if d.method == "none":
        return None
    if d.method == "fitnet":
        return fitnet_loss()
    if d.method == "pkd":
        return pkd_loss()
    return TIDLoss(
        levels=d.levels,
        tasks=d.tasks,
        weak_areas=d.weak_areas,
        alpha=d.alpha,
        beta=d.beta,
        gamma=d.gamma,
        pos_iou=d.pos_iou,
        neg_iou=d.neg_iou,
        p_min=d.p_min,
        cls_match=d.cls_match,
        tau_key=d.tau_key,
        tau_weak=d.tau_weak,
        normalize=d.normalize,
    )


def _weights_path(weights: Weights, where: str) -> Path:
    if not isinstance(weights, PathWeights):
        raise ValueError(f"{where} {weights!r} is unresolved: the service maps ids to paths")
    return Path(weights.path)


def build_models(spec: JobSpec, train_ds: CocoDetection, input_size: int) -> Distiller:
    student = build_detector(
        arch=spec.student.arch,
        backbone=spec.student.backbone,
        num_classes=train_ds.num_classes,
        fpn_channels=spec.student.fpn_channels,
        image_size=input_size,
    )
    if spec.student.weights_backbone is not None:
        path = _weights_path(spec.student.weights_backbone, "student.weights_backbone")
        load_backbone(
            student,
            path,
            backbone=spec.student.backbone,
            trainable_layers=spec.student.trainable_layers,
        )
    if spec.teacher is None:
        return Distiller(student)
    teacher = load_checked(
        _weights_path(spec.teacher.weights, "teacher.weights"),
        arch=spec.teacher.arch,
        backbone=spec.teacher.backbone,
        num_classes=train_ds.num_classes,
        fpn_channels=spec.teacher.fpn_channels,
        image_size=input_size,
        class_names=train_ds.class_names,
    )
    return Distiller(
        student, teacher=teacher, loss=build_distill_loss(spec.distill), levels=spec.distill.levels
    )


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError('resources.device is "cuda" but no CUDA device is available')
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    torch.cuda.set_device(dist.local_rank())
    return torch.device("cuda", dist.local_rank())


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


class Run:
    """One training run in one run dir: owns the state that checkpoints save and restore."""

    def __init__(self, spec: JobSpec, run_dir: Path, device: torch.device) -> None:
        self.spec, self.run_dir, self.device = spec, run_dir, device
        self.spec_hash = spec.spec_hash()
        self.ckpt_dir = run_dir / "checkpoints"
        main = dist.is_main_process()
        self.events = EventWriter(run_dir / "events.jsonl" if main else None)
        self.amp = spec.schedule.amp and device.type == "cuda"
        self.progress = Progress()
        self.scalars = ScalarLog(None)  # opened by `run`, once it knows where it resumes

    def setup(self) -> None:
        spec, s = self.spec, self.spec.schedule
        if dist.is_main_process():  # a killed writer's leftovers (we hold the run dir's lock)
            for stale in self.ckpt_dir.glob(".*.tmp.*"):
                stale.unlink()
        torch.manual_seed(s.seed)
        root, train_split, val_split = resolve_dataset(spec, self.run_dir)
        input_size = spec.dataset.input_size
        self.train_ds = CocoDetection(root, train_split, train=True)
        self.val_ds = CocoDetection(root, val_split, train=False)
        rank, world = dist.get_rank(), dist.get_world_size()
        loader_args = {"num_workers": spec.resources.num_workers, "rank": rank}
        self.train_loader = build_loader(
            self.train_ds,
            batch_size=s.batch_size,
            train=True,
            seed=s.seed,
            world_size=world,
            **loader_args,
        )
        self.val_loader = build_loader(
            self.val_ds,
            batch_size=s.batch_size,
            train=False,
            seed=s.seed,
            world_size=world,
            **loader_args,
        )
        self.steps_per_epoch = math.ceil(math.ceil(len(self.train_ds) / world) / s.batch_size)
        self.total_steps = self.steps_per_epoch * s.epochs
        self.distiller = build_models(spec, self.train_ds, input_size).to(self.device)
        if self.distiller.teacher is not None:
            self.distiller.teacher.to(self.device)
        self.model: nn.Module = self.distiller
        if dist.is_distributed():
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.distiller, device_ids=ids)
        params = [p for p in self.distiller.parameters() if p.requires_grad]
        if s.optimizer == "sgd":
            self.optimizer: torch.optim.Optimizer = torch.optim.SGD(
                params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay
            )
        else:
            self.optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
        milestones = [m * self.steps_per_epoch for m in s.lr_milestones]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda it: lr_factor(
                it, warmup_iters=s.warmup_iters, milestones=milestones, gamma=s.lr_gamma
            ),
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)

    # --- checkpoints -------------------------------------------------------------------------

    def resume(self) -> bool:
        ckpt = load_checkpoint(self.ckpt_dir / "last.pt")
        if ckpt is None:
            return False
        if ckpt["spec_hash"] != self.spec_hash:
            raise ValueError(
                f"{self.ckpt_dir / 'last.pt'} was written for another spec "
                f"({ckpt['spec_hash'][:12]} != {self.spec_hash[:12]}); use a new run dir"
            )
        self.distiller.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        self.progress = Progress(**ckpt["progress"])
        return True

    def save_checkpoint(self, *, epoch_end: bool) -> None:
        if dist.is_main_process():
            p = self.progress
            state = {
                "model": self.distiller.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rng": rng_state(),
                "progress": dataclasses.asdict(p),
                "spec_hash": self.spec_hash,
            }
            last = self.ckpt_dir / "last.pt"
            try:
                size = save_atomic(state, last)
            except OSError as exc:
                raise CheckpointWriteError(
                    exc.errno,
                    f"cannot write checkpoint {last} at step {p.step}: "
                    f"{exc.strerror or exc} (disk full or run dir not writable?); "
                    "the previous checkpoint is kept",
                ) from exc
            path = last
            if epoch_end:  # an immutable copy per epoch (a hard link: no extra bytes until
                path = self.ckpt_dir / f"epoch_{p.epoch:04d}.pt"  # last.pt is replaced)
                path.unlink(missing_ok=True)
                os.link(last, path)
                for old in sorted(self.ckpt_dir.glob("epoch_*.pt"))[:-KEEP_EPOCH_CHECKPOINTS]:
                    old.unlink()
            self.events.emit(
                "checkpoint",
                step=p.step,
                durable=True,
                epoch=p.epoch,
                path=str(path.relative_to(self.run_dir)),
                bytes=size,
                sha256=sha256_file(path),
            )
        dist.barrier()

    # --- loop --------------------------------------------------------------------------------

    def run(self, stop: StopFlag) -> int:
        resumed = self.resume()
        if dist.is_main_process():
            purge = self.progress.step + 1 if resumed else None
            self.scalars = ScalarLog(self.run_dir / "tensorboard", purge_step=purge)
        self.events.emit(
            "start",
            step=self.progress.step,
            spec_hash=self.spec_hash,
            resumed=resumed,
            epoch=self.progress.epoch,
            world_size=dist.get_world_size(),
            device=str(self.device),
            amp=self.amp,
            steps_per_epoch=self.steps_per_epoch,
            total_steps=self.total_steps,
            num_classes=self.train_ds.num_classes,
            class_names=self.train_ds.class_names,
        )
        log.info(
            "%s at step %d of %d",
            "resumed" if resumed else "started",
            self.progress.step,
            self.total_steps,
        )
        try:
            metrics = self._train(stop)
        except StopRequested:
            self.events.emit(
                "interrupted", step=self.progress.step, epoch=self.progress.epoch, durable=True
            )
            return EXIT_INTERRUPTED
        if metrics is None:
            return EXIT_INTERRUPTED
        self.events.emit("phase", step=self.progress.step, phase="export")
        self.export(metrics)
        return 0

    def _train(self, stop: StopFlag) -> dict[str, Any] | None:
        """Epochs with their evaluations; the final metrics, or None when stopped mid-epoch
        (after a checkpoint). Raises StopRequested when stopped during an evaluation."""
        s, d = self.spec.schedule, self.spec.distill
        p = self.progress
        metrics: dict[str, Any] | None = None
        while True:
            if p.eval_due:  # also after a resume from an epoch-end checkpoint
                metrics = self.evaluate(stop)
                p.eval_due = False
            if p.epoch >= s.epochs:
                break
            self.events.emit("phase", step=p.step, phase="train", epoch=p.epoch)
            self.train_loader.sampler.set_epoch(p.epoch, start_batch=p.batch)  # type: ignore[attr-defined]
            for result in train_one_epoch(
                self.model,
                self.optimizer,
                self.scheduler,
                self.scaler,
                self.train_loader,
                device=self.device,
                start_step=p.step,
                distill_scale=lambda st: distill_ramp(
                    st, loss_weight=d.loss_weight, warmup_iters=d.distill_warmup_iters
                ),
                grad_clip=s.grad_clip,
                amp=self.amp,
                stop=stop,
            ):
                p.step, p.batch = result.step, p.batch + 1
                if result.step % s.log_every == 0 or result.step == 1 or result.stop:
                    self.events.emit(
                        "step",
                        step=result.step,
                        epoch=p.epoch,
                        total_steps=self.total_steps,
                        lr=result.lr,
                        losses=result.losses,
                        stats=result.stats,
                    )
                    self.scalars.step(
                        result.step, losses=result.losses, stats=result.stats, lr=result.lr
                    )
                if result.stop:
                    self.save_checkpoint(epoch_end=False)
                    self.events.emit("interrupted", step=p.step, epoch=p.epoch, durable=True)
                    return None
                if s.checkpoint_every and result.step % s.checkpoint_every == 0:
                    self.save_checkpoint(epoch_end=False)
            p.epoch, p.batch = p.epoch + 1, 0
            p.eval_due = p.epoch == s.epochs or bool(s.eval_every and p.epoch % s.eval_every == 0)
            self.save_checkpoint(epoch_end=True)
        if metrics is None:  # resumed after the last evaluation, before the export
            metrics = self.evaluate(stop)
        return metrics

    def evaluate(self, stop: StopFlag) -> dict[str, Any]:
        self.events.emit("phase", step=self.progress.step, phase="eval", epoch=self.progress.epoch)
        preds = evaluate(
            self.distiller.student,
            self.val_loader,
            device=self.device,
            cat_ids=self.val_ds.cat_ids,
            amp=self.amp,
            stop=stop,
        )
        metrics: dict[str, Any] = {}
        if preds is not None:
            metrics = coco_metrics(self.val_ds.ann_file, preds, backend=DEFAULT_BACKEND)
            self.events.emit(
                "eval", step=self.progress.step, epoch=self.progress.epoch, metrics=metrics
            )
            self.scalars.eval(self.progress.step, metrics)
            log.info(
                "epoch %d: AP %.2f AP50 %.2f", self.progress.epoch, metrics["AP"], metrics["AP50"]
            )
        dist.barrier()
        return metrics

    def export(self, metrics: dict[str, Any]) -> None:
        if dist.is_main_process():
            st = self.spec.student
            meta = DetectorMeta(
                arch=st.arch,
                backbone=st.backbone,
                num_classes=self.train_ds.num_classes,
                fpn_channels=st.fpn_channels,
                input_size=self.spec.dataset.input_size,
                class_names=self.train_ds.class_names,
                cat_ids=self.train_ds.cat_ids,
                spec_hash=self.spec_hash,
            )
            artifacts = {}
            for name in ("student.pt", "student.safetensors"):
                path = self.run_dir / name
                save_weights(self.distiller.student, meta, path)
                artifacts[name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
            final = {**metrics, "step": self.progress.step, "epoch": self.progress.epoch}
            tmp = self.run_dir / "metrics.json.tmp"
            tmp.write_text(json.dumps(final, indent=2))
            tmp.replace(self.run_dir / "metrics.json")
            self.events.emit(
                "end", step=self.progress.step, durable=True, metrics=final, artifacts=artifacts
            )
        dist.barrier()


def main(argv: list[str] | None = None) -> int:
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
    run: Run | None = None
    try:
        spec = JobSpec.model_validate_json(args.spec.read_text())
        device = pick_device(spec.resources.device)
        dist.init_distributed(device)
        run = Run(spec, args.run_dir, device)
        events = run.events
        run.setup()
        return run.run(stop)
    except Exception as exc:
        step = exc.step if isinstance(exc, NonFiniteLossError) else None
        log.error("training failed: %s", exc)
        if dist.is_main_process():
            writer = events or EventWriter(args.run_dir / "events.jsonl")
            writer.emit(
                "error",
                step=step if step is not None else -1,
                durable=True,
                message=str(exc),
                kind=type(exc).__name__,
                retryable=isinstance(exc, RETRYABLE_ERRORS),
                traceback=traceback.format_exc(limit=8),
            )
        return 1
    finally:
        if events is not None:
            events.close()
        if run is not None:
            run.scalars.close()
        dist.cleanup()
        if lock is not None:
            lock.close()


if __name__ == "__main__":
    sys.exit(main())
