"""Distillation overhead: each method's train step / (student-only step + teacher no-grad forward).

All steps go through the trainer's own `train_one_epoch` (same autocast, scaler, clipping and
host syncs) on one real synthetic batch, measured round-robin in one process; each ratio is
taken within a round and the median over rounds reported with its range, so the drift between
rounds (large on shared GPUs and CPUs) cancels. Each round's steps are timed by the host clock
between device syncs: `train_one_epoch` syncs every step (loss all-reduce and finite check), so
that is the step time a job pays. A ratio of 1.00 means distillation costs nothing beyond
running the teacher.

    python bench/overhead.py [--quick] [--device cuda] [--json FILE]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench import harness
from tid_core.data.coco import CocoDetection, collate_detection
from tid_core.data.synthetic import generate_shapes
from tid_core.distill.capture import Detector, teacher_forward
from tid_core.distill.distiller import Distiller
from tid_core.distill.methods import DISTILL_METHODS
from tid_core.engine import StopFlag, autocast, train_one_epoch
from tid_core.models import build_detector
from tid_core.spec import DistillSpec, Method

Batch = tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]


METHODS: tuple[Method, ...] = ("fitnet", "pkd", "tid")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_stepper(
    distiller: Distiller, batch: Batch, device: torch.device, amp: bool
) -> Callable[[int], float]:
    """A function that runs n trainer steps on `batch` and returns seconds per step."""
    params = [p for p in distiller.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    scaler = torch.amp.GradScaler("cuda", enabled=amp and device.type == "cuda")
    step = 0

    def run(n: int) -> float:
        nonlocal step
        sync(device)
        start = time.perf_counter()
        for result in train_one_epoch(
            distiller,
            optimizer,
            scheduler,
            scaler,
            itertools.repeat(batch, n),
            device=device,
            start_step=step,
            distill_scale=lambda _: 0.5,
            grad_clip=10.0,
            amp=amp,
            stop=StopFlag(),
        ):
            step = result.step
        sync(device)
        return (time.perf_counter() - start) / n

    return run


def make_teacher_pass(
    distiller: Distiller, teacher: torch.nn.Module, batch: Batch, device: torch.device, amp: bool
) -> Callable[[int], float]:
    images = [img.to(device) for img in batch[0]]
    with torch.no_grad():
        transformed, _ = distiller.student.transform(images)

    def run(n: int) -> float:
        sync(device)
        start = time.perf_counter()
        for _ in range(n):
            with autocast(device, amp):
                teacher_forward(teacher, transformed)
        sync(device)
        return (time.perf_counter() - start) / n

    return run


# ops that only allocate or relabel memory (no kernel): a tensor's metadata, not its values
_NO_KERNEL = frozenset({"empty", "empty_strided", "empty_like", "new_empty", "_unsafe_view"})


@functools.cache
def _computes(name: str) -> bool:
    """Whether an aten op writes values (a kernel on a GPU): not a view (its schema returns an
    alias it does not write), an in-place view or a bare allocation."""
    op = name.removeprefix("aten::")
    packet = getattr(torch.ops.aten, op, None)
    if packet is None or op in _NO_KERNEL:
        return packet is None
    overload = getattr(packet, packet.overloads()[0])
    returns = overload._schema.returns
    view = bool(returns) and all(
        r.alias_info is not None and not r.alias_info.is_write for r in returns
    )
    return not view and torch.Tag.inplace_view not in overload.tags


def count_ops(run: Callable[[int], float], device: torch.device) -> int:
    """Kernels one step launches: counted by the profiler on a GPU; on a CPU, the aten ops that
    compute (leaf ops that are not views or allocations), which a GPU would launch one kernel
    each for. A clock-free measure of what a launch-bound GPU pays per step."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        run(1)
    events = prof.events()
    if device.type == "cuda":
        return sum(1 for e in events if e.device_type == torch.profiler.DeviceType.CUDA)
    return sum(
        1
        for e in events
        if e.name.startswith("aten::")
        and _computes(e.name)
        and not any(c.name.startswith("aten::") for c in e.cpu_children)
    )


def measure(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = generate_shapes(
            Path(tmp) / "shapes",
            num_train=args.batch_size,
            num_val=1,
            image_size=args.image_size,
            seed=0,
        )
        dataset = CocoDetection(root, "train", train=False)
        batch = collate_detection([dataset[i] for i in range(args.batch_size)])
    build = {"num_classes": dataset.num_classes, "image_size": args.image_size}
    teacher = build_detector(
        arch="fcos", backbone=args.teacher, fpn_channels=args.teacher_fpn, **build
    ).to(device)

    def student() -> Detector:
        torch.manual_seed(0)
        return build_detector(
            arch="fcos", backbone=args.student, fpn_channels=args.student_fpn, **build
        )

    alone = Distiller(student()).to(device)
    runners: dict[str, Callable[[int], float]] = {
        "student": make_stepper(alone, batch, device, args.amp),
        "teacher_fwd": make_teacher_pass(alone, teacher, batch, device, args.amp),
    }
    for method in METHODS:  # each method with the spec's default options
        loss = DISTILL_METHODS[method](DistillSpec(method=method))
        distiller = Distiller(student(), teacher=teacher, loss=loss).to(device)
        runners[method] = make_stepper(distiller, batch, device, args.amp)
    for run in runners.values():  # warm-up: allocator, cudnn autotuning, first-call costs
        run(args.warmup)
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, run in runners.items():
            samples[name].append(run(args.steps))
    result = ratios(samples)
    result.update({f"{name}_ops": count_ops(run, device) for name, run in runners.items()})
    result["config"] = {k: v for k, v in vars(args).items() if k not in {"json", "quick"}} | {
        "torch": torch.__version__,
        "device_name": device_name(device),
    }
    return result


def ratios(samples: dict[str, list[float]]) -> dict[str, Any]:
    """Each method's ratio within each round (its step over that round's student step plus
    teacher forward), then the median and range over rounds: pairing within a round cancels
    the drift between rounds that a ratio of medians would keep."""
    base = [s + t for s, t in zip(samples["student"], samples["teacher_fwd"], strict=True)]
    result: dict[str, Any] = {}
    for m in METHODS:
        per_round = [x / b for x, b in zip(samples[m], base, strict=True)]
        result[f"{m}_ratio"] = round(statistics.median(per_round), 3)
        result[f"{m}_ratio_range"] = [round(min(per_round), 3), round(max(per_round), 3)]
    result.update(
        {f"{name}_ms": round(1000 * statistics.median(v), 2) for name, v in samples.items()}
    )
    return result


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return str(torch.cuda.get_device_name(device))
    return f"cpu ({torch.get_num_threads()} threads)"


def print_table(result: dict[str, Any]) -> None:
    cfg = result["config"]
    print(
        f"FCOS {cfg['teacher']}-FPN{cfg['teacher_fpn']} -> {cfg['student']}-FPN{cfg['student_fpn']}"
        f", batch {cfg['batch_size']} x {cfg['image_size']} px, {cfg['device_name']}, "
        f"AMP {'on' if cfg['amp'] and cfg['device'].startswith('cuda') else 'off'}"
    )
    print(f"{'step':<14}{'ms':>10}{'ratio':>10}{'rounds':>16}{'kernels':>10}{'extra':>8}")
    base = result["student_ms"] + result["teacher_fwd_ms"]
    base_ops = result["student_ops"] + result["teacher_fwd_ops"]
    for label, name in (("student only", "student"), ("teacher fwd", "teacher_fwd")):
        print(f"{label:<14}{result[f'{name}_ms']:>10.1f}{'':>26}{result[f'{name}_ops']:>10}")
    print(f"{'sum':<14}{base:>10.1f}{1.0:>10.3f}{'':>16}{base_ops:>10}")
    for m in METHODS:
        lo, hi = result[f"{m}_ratio_range"]
        ops = result[f"{m}_ops"]
        print(
            f"{m:<14}{result[f'{m}_ms']:>10.1f}{result[f'{m}_ratio']:>10.3f}"
            f"{f'{lo:.3f}-{hi:.3f}':>16}{ops:>10}{ops - base_ops:>+8}"
        )
    print(f"(ms: medians over {cfg['rounds']} rounds; ratio: median of the per-round ratios)")
    kernels = "kernels launched" if cfg["device"].startswith("cuda") else "aten ops that compute"
    print(f"(kernels: {kernels} in one step; extra: beyond student step + teacher forward)")


def main(argv: list[str] | None = None) -> int:
    parser = harness.parser("Distillation step overhead, side by side.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--teacher", default="resnet50")
    parser.add_argument("--teacher-fpn", type=int, default=256)
    parser.add_argument("--student", default="resnet18")
    parser.add_argument("--student-fpn", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-amp", dest="amp", action="store_false")
    args = parser.parse_args(argv)
    if args.quick:
        args.teacher, args.teacher_fpn, args.student_fpn = "resnet18", 128, 64
        args.batch_size, args.image_size, args.steps, args.rounds, args.warmup = 2, 64, 2, 2, 1
    result = measure(args)
    harness.report(result, print_table, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
