"""The training step loop and COCO evaluation, as plain functions (torchvision's engine.py habit).

Knows nothing of specs or files: `train_one_epoch` reports through callbacks, `evaluate`
returns COCO results for the main process to score.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from tid_core import dist
from tid_core.evaluate import detections_to_coco


class NonFiniteLossError(FloatingPointError):
    """The training loss was NaN or infinite; the run must stop without saving this state."""

    def __init__(self, step: int, losses: dict[str, float]) -> None:
        terms = ", ".join(f"{k}={v:.4g}" for k, v in losses.items())
        super().__init__(f"non-finite loss at step {step}: {terms}")
        self.step = step


def lr_factor(iteration: int, *, warmup_iters: int, milestones: list[int], gamma: float) -> float:
    """Linear warm-up from 0.001 over `warmup_iters`, then x gamma at each milestone iteration."""
    warm = 1.0
    if iteration < warmup_iters:
        alpha = iteration / warmup_iters
        warm = 0.001 * (1 - alpha) + alpha
    return warm * gamma ** sum(iteration >= m for m in milestones)


def distill_ramp(step: int, *, loss_weight: float, warmup_iters: int) -> float:
    """TID's lambda(t): the distillation weight grows linearly from 0 over `warmup_iters`."""
    if warmup_iters <= 0:
        return loss_weight
    return loss_weight * min(1.0, step / warmup_iters)


class StopRequested(Exception):
    """SIGTERM/SIGINT stopped the run (all ranks agree): an evaluation is abandoned, training
    stops after the step's checkpoint."""


class StopFlag:
    """Set by SIGTERM/SIGINT; training stops at the next step boundary and evaluation at the
    next batch (all ranks agree). A signal during a checkpoint write only sets the flag, so the
    write always completes."""

    def __init__(self) -> None:
        self.requested = False

    def agreed(self, device: torch.device) -> bool:
        """True on every rank once any rank saw the signal (one tiny collective)."""
        local = torch.tensor([float(self.requested)], device=device)
        return bool(dist.all_reduce_mean(local).item() > 0)

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, _signum: int, _frame: Any) -> None:
        self.requested = True


@dataclass
class StepResult:
    """What one optimisation step reports (means over ranks)."""

    step: int
    losses: dict[str, float]
    stats: dict[str, float]
    lr: float
    stop: bool
    images: int = 0


def _to_device(
    batch: tuple[list[Tensor], list[dict[str, Tensor]]], device: torch.device
) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    images, targets = batch
    return (
        [img.to(device, non_blocking=True) for img in images],
        [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets],
    )


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    loader: Iterable[tuple[list[Tensor], list[dict[str, Tensor]]]],
    *,
    device: torch.device,
    start_step: int,
    distill_scale: Callable[[int], float],
    grad_clip: float,
    amp: bool,
    stop: StopFlag,
    probe: Callable[[int, dict[str, Tensor]], None] | None = None,
) -> Iterator[StepResult]:
    """Yield after every step. Loss terms, stats and the stop flag are all-reduced in one
    collective, so every rank sees the same values and stops (or fails) at the same step.
    `stats["data_wait"]` is the seconds the step waited for its batch: the loader's share of
    the step time, which tells whether more loader workers would help. `probe`, if given, sees
    each step's loss terms before the backward; it may take gradients of its own from the
    graph (keeping it) but must not write `.grad` (`tid_core.grad_guard`)."""
    model.train()
    step = start_step
    params = [p for p in model.parameters() if p.requires_grad]
    batches = iter(loader)
    while True:
        asked = time.perf_counter()
        batch = next(batches, None)
        if batch is None:
            return
        data_wait = time.perf_counter() - asked
        step += 1
        images, targets = _to_device(batch, device)
        with autocast(device, amp):
            losses, stats = model(images, targets, distill_scale(step))
        total = torch.stack([v.float() for v in losses.values()]).sum()
        names = [*losses, *stats, "data_wait"]
        local = torch.stack(
            [total.detach()]
            + [v.detach().float() for v in losses.values()]
            + [v.detach().float() for v in stats.values()]
            + [torch.tensor(data_wait, device=total.device)]
            + [torch.tensor(float(stop.requested), device=total.device)]
        )
        reduced = dist.all_reduce_mean(local).tolist()
        values = dict(zip(["loss", *names], reduced[:-1], strict=True))
        if not math.isfinite(reduced[0]):
            raise NonFiniteLossError(step, values)
        if probe is not None:
            probe(step, losses)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(total).backward()  # type: ignore[no-untyped-call]
        if grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        scaler.step(optimizer)
        scaler.update()
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        yield StepResult(
            step=step,
            losses={k: values[k] for k in ["loss", *losses]},
            stats={k: values[k] for k in [*stats, "data_wait"]},
            lr=lr,
            stop=reduced[-1] > 0,
            images=len(images) * dist.get_world_size(),
        )


@torch.inference_mode()
def evaluate(
    detector: nn.Module,
    loader: Iterable[tuple[list[Tensor], list[dict[str, Tensor]]]],
    *,
    device: torch.device,
    cat_ids: list[int],
    amp: bool,
    stop: StopFlag | None = None,
) -> list[dict[str, Any]] | None:
    """COCO result dicts for the whole val set on the main process (None on other ranks).

    Each rank predicts its shard; the main process merges them, dropping the duplicates that
    the distributed sampler pads with. Raises StopRequested when `stop` is set before a batch
    or after the last one: a cancelled job must not first sit through a long evaluation.
    """
    was_training = detector.training
    detector.eval()
    results: dict[int, list[dict[str, Any]]] = {}
    for batch in loader:
        if stop is not None and stop.agreed(device):
            detector.train(was_training)
            raise StopRequested("stopped during evaluation")
        images, targets = _to_device(batch, device)
        with autocast(device, amp):
            outputs = detector(images)
        ids = [int(t["image_id"]) for t in targets]
        for image_id, out in zip(ids, outputs, strict=True):
            results[image_id] = detections_to_coco([out], [image_id], cat_ids)
    detector.train(was_training)
    if stop is not None and stop.agreed(device):
        raise StopRequested("stopped during evaluation")
    gathered = dist.gather_to_main(results)
    if not dist.is_main_process():
        return None
    merged: dict[int, list[dict[str, Any]]] = {}
    for part in gathered:
        merged.update(part)
    return [det for image_id in sorted(merged) for det in merged[image_id]]
