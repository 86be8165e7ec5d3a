"""The trainer as users run it: real processes (`python -m`, `torchrun`), real files, tiny sizes."""

from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from coco_folders import COCO_2017, with_split_names
from safetensors.torch import load_file

from tid_core.data.coco import CocoDetection
from tid_core.data.synthetic import generate_shapes
from tid_core.distill.distiller import build_models
from tid_core.events import read_events
from tid_core.models import DetectorMeta, build_detector, load_student, save_weights
from tid_core.run_lock import lock_run_dir
from tid_core.spec import JobSpec

pytestmark = pytest.mark.slow
NUM_CLASSES = 5
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data") / "shapes"
    return generate_shapes(root, num_train=16, num_val=6, image_size=64, seed=0)


def make_teacher(path: Path, *, num_classes: int = NUM_CLASSES, poison: bool = False) -> Path:
    torch.manual_seed(1)
    model = build_detector(
        arch="fcos", backbone="resnet18", num_classes=num_classes, fpn_channels=128, image_size=64
    )
    if poison:
        with torch.no_grad():
            model.backbone.fpn.layer_blocks[0][0].weight.fill_(float("nan"))
    meta = DetectorMeta(
        arch="fcos", backbone="resnet18", num_classes=num_classes, fpn_channels=128, input_size=64
    )
    save_weights(model, meta, path)
    return path


def teacher_block(weights: Path) -> dict[str, Any]:
    """The spec's teacher entry for weights written by `make_teacher`."""
    return {
        "arch": "fcos",
        "backbone": "resnet18",
        "fpn_channels": 128,
        "weights": {"path": str(weights)},
    }


def write_spec(tmp: Path, data: Path, **overrides: Any) -> Path:
    spec: dict[str, Any] = {
        "name": "tiny",
        "student": {"arch": "fcos", "backbone": "resnet18", "fpn_channels": 64},
        "dataset": {"path": str(data), "input_size": 64},
        "schedule": {"epochs": 2, "batch_size": 4, "warmup_iters": 2, "log_every": 1},
        "resources": {"num_workers": 0, "device": "cpu"},
    }
    for key, value in overrides.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp / "spec.json"
    path.write_text(json.dumps(spec))
    return path


def train_cmd(spec: Path, run_dir: Path, nproc: int = 1) -> list[str]:
    args = ["-m", "tid_core.train", "--spec", str(spec), "--run-dir", str(run_dir)]
    if nproc == 1:
        return [sys.executable, *args]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return [*launcher, f"--nproc-per-node={nproc}", *args]


def run_train(spec: Path, run_dir: Path, nproc: int = 1) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        train_cmd(spec, run_dir, nproc), env=ENV, capture_output=True, text=True, timeout=300
    )


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def scalar_steps(run_dir: Path, tag: str) -> list[int]:
    """The steps of a TensorBoard scalar, over every event file of the run (purges applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = EventAccumulator(str(run_dir / "tensorboard"))
    log.Reload()
    return [s.step for s in log.Scalars(tag)]


def test_train_writes_every_artifact(tmp_path: Path, dataset: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_train(write_spec(tmp_path, dataset), run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]

    events = read_events(run_dir / "events.jsonl")
    types = [e["type"] for e in events]
    assert types[0] == "start" and types[-1] == "end"
    assert {"step", "checkpoint", "eval"} <= set(types)
    assert all("time" in e and "step" in e for e in events)
    start = events[0]
    assert start["total_steps"] == 2 * math.ceil(16 / 4) and start["resumed"] is False
    steps = [e for e in events if e["type"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, 9))
    assert {"loss", "classification", "bbox_regression", "bbox_ctrness"} <= set(steps[0]["losses"])
    assert steps[0]["lr"] > 0

    for ckpt in (e for e in events if e["type"] == "checkpoint"):
        path = run_dir / ckpt["path"]
        assert path.stat().st_size == ckpt["bytes"]
        assert sha256(path) == ckpt["sha256"]
    assert (run_dir / "checkpoints" / "last.pt").exists()

    assert scalar_steps(run_dir, "loss/loss") == list(range(1, 9))
    assert scalar_steps(run_dir, "lr") == list(range(1, 9))
    assert scalar_steps(run_dir, "eval/AP") == [4, 8]

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["backend"] == "faster-coco-eval"
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl", "per_class"} <= metrics.keys()
    assert metrics["step"] == 8
    end = events[-1]
    for name in ("student.pt", "student.safetensors"):
        assert end["artifacts"][name]["sha256"] == sha256(run_dir / name)

    model, meta = load_student(run_dir / "student.safetensors")
    assert meta.num_classes == NUM_CLASSES and meta.class_names[0] == "circle"
    assert meta.cat_ids == [1, 2, 3, 4, 5]
    out = model([torch.rand(3, 64, 64)])
    assert set(out[0]) == {"boxes", "scores", "labels"}
    pt_model, pt_meta = load_student(run_dir / "student.pt")
    assert pt_meta == meta
    for key, value in model.state_dict().items():
        assert torch.equal(value, pt_model.state_dict()[key])


def test_a_coco_2017_folder_trains_under_its_own_split_names(tmp_path: Path, dataset: Path) -> None:
    coco = with_split_names(dataset, tmp_path / "coco", COCO_2017)
    unnamed = run_train(write_spec(tmp_path, coco, schedule={"epochs": 1}), tmp_path / "unnamed")
    assert unnamed.returncode != 0
    assert "instances_train.json" in unnamed.stderr
    assert "this folder has the splits train2017, val2017" in unnamed.stderr

    splits = {"train_split": "train2017", "val_split": "val2017"}
    spec = write_spec(tmp_path, coco, dataset=splits, schedule={"epochs": 1})
    run_dir = tmp_path / "run"
    proc = run_train(spec, run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = read_events(run_dir / "events.jsonl")
    assert events[0]["total_steps"] == math.ceil(16 / 4) and events[-1]["type"] == "end"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["step"] == 4 and "AP" in metrics


def test_torchrun_two_processes_distills(tmp_path: Path, dataset: Path) -> None:
    teacher = make_teacher(tmp_path / "teacher.safetensors")
    spec = write_spec(
        tmp_path,
        dataset,
        # a pretrained backbone (the teacher's): frozen stem and BatchNorm under DDP
        student={"weights_backbone": {"path": str(teacher)}},
        teacher=teacher_block(teacher),
        distill={"method": "tid", "distill_warmup_iters": 2},
    )
    run_dir = tmp_path / "run"
    proc = run_train(spec, run_dir, nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = read_events(run_dir / "events.jsonl")
    assert events[0]["world_size"] == 2
    # 16 images over 2 ranks in batches of 4: 2 steps per epoch, 2 epochs
    assert events[0]["total_steps"] == 4
    steps = [e for e in events if e["type"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3, 4]
    assert {"tid_key", "tid_weak", "tid_rest"} <= set(steps[-1]["losses"])
    assert {"tid_key_frac", "tid_weak_frac"} <= set(steps[-1]["stats"])
    assert steps[-1]["losses"]["tid_rest"] > 0
    assert events[-1]["type"] == "end"
    for name in ("student.pt", "student.safetensors", "metrics.json"):
        assert (run_dir / name).exists()
    student, source = load_file(run_dir / "student.safetensors"), load_file(teacher)
    for frozen in ("conv1.weight", "layer1.0.bn1.running_mean", "layer4.0.bn1.running_var"):
        key = f"backbone.body.{frozen}"
        assert torch.equal(student[key], source[key]), key
    trained = "backbone.body.layer4.0.conv1.weight"
    assert not torch.equal(student[trained], source[trained])


def test_sigterm_checkpoints_and_rerun_resumes_to_the_uninterrupted_weights(
    tmp_path: Path, dataset: Path
) -> None:
    # batch 1: 16 steps per epoch, so the signal lands mid-epoch. A loader worker process: its
    # RNG a resumed run cannot restore (so the flips must come from the samples' own seeds), and
    # the SIGTERM goes to the trainer's whole process group, as a cancel or a deploy sends it
    # (so the worker must not be in that group, or its death kills the trainer uncheckpointed)
    # (a pretrained backbone too: what resumes is the model with frozen parts)
    backbone = make_teacher(tmp_path / "backbone.safetensors")
    spec = write_spec(
        tmp_path,
        dataset,
        student={"weights_backbone": {"path": str(backbone)}},
        schedule={"batch_size": 1, "eval_every": 0},
        resources={"num_workers": 1},
    )
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        train_cmd(spec, run_dir),
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    events_file = run_dir / "events.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if any(e["type"] == "step" and e["step"] >= 3 for e in read_events(events_file)):
            break
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=60) == 143, proc.stderr.read() if proc.stderr else ""

    first = read_events(events_file)
    assert first[-1]["type"] == "interrupted"
    stopped_at = first[-1]["step"]
    assert 3 <= stopped_at < 32
    assert first[-2]["type"] == "checkpoint" and first[-2]["step"] == stopped_at

    again = run_train(spec, run_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    second = read_events(events_file)[len(first) :]
    assert second[0]["type"] == "start" and second[0]["resumed"] is True
    assert second[0]["step"] == stopped_at
    steps = [e["step"] for e in second if e["type"] == "step"]
    assert steps[0] == stopped_at + 1  # continues, does not restart
    assert steps[-1] == 32 and second[-1]["type"] == "end"
    all_steps = [e["step"] for e in first + second if e["type"] == "step"]
    assert sorted(all_steps) == list(range(1, 33))  # every step exactly once
    assert scalar_steps(run_dir, "loss/loss") == list(range(1, 33))  # in TensorBoard too

    reference = run_train(spec, tmp_path / "uninterrupted")
    assert reference.returncode == 0, reference.stderr[-3000:]
    resumed = load_file(run_dir / "student.safetensors")
    expected = load_file(tmp_path / "uninterrupted" / "student.safetensors")
    assert resumed.keys() == expected.keys()
    assert all(torch.equal(resumed[name], expected[name]) for name in expected)


@pytest.mark.parametrize(("loss_weight", "warned"), [(None, False), (100.0, True)])
def test_a_distillation_job_reports_its_gradient_ratio_and_warns_when_far_off(
    tmp_path: Path, dataset: Path, loss_weight: float | None, warned: bool
) -> None:
    teacher = make_teacher(tmp_path / "teacher.safetensors")
    weight = {} if loss_weight is None else {"loss_weight": loss_weight}  # None: the default
    spec = write_spec(
        tmp_path,
        dataset,
        teacher=teacher_block(teacher),
        distill={"method": "tid", "distill_warmup_iters": 3, **weight},
        schedule={"epochs": 1},
    )
    run_dir = tmp_path / "run"
    proc = run_train(spec, run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = read_events(run_dir / "events.jsonl")
    [ratio] = [e for e in events if e["type"] == "grad_ratio"]
    assert (ratio["step"], ratio["steps"], ratio["method"]) == (4, 4, "tid")
    warnings = [e for e in events if e["type"] == "warning"]
    if not warned:
        assert 0.1 <= ratio["ratio"] <= 10 and warnings == []
        return
    [warning] = warnings
    assert ratio["ratio"] > 10 and warning["ratio"] == ratio["ratio"]
    assert "dominates the detection loss" in warning["message"]
    assert warning["message"] in proc.stderr  # logged too


def test_non_finite_loss_stops_with_error_event(tmp_path: Path, dataset: Path) -> None:
    teacher = make_teacher(tmp_path / "nan.pt", poison=True)
    spec = write_spec(
        tmp_path,
        dataset,
        teacher=teacher_block(teacher),
        distill={"method": "fitnet", "distill_warmup_iters": 0},
    )
    run_dir = tmp_path / "run"
    proc = run_train(spec, run_dir)
    assert proc.returncode == 1
    error = read_events(run_dir / "events.jsonl")[-1]
    assert error["type"] == "error" and error["step"] == 1
    assert error["message"].startswith("non-finite loss at step 1")
    assert not (run_dir / "student.safetensors").exists()


def test_teacher_with_wrong_class_count_fails_clearly(tmp_path: Path, dataset: Path) -> None:
    teacher = make_teacher(tmp_path / "teacher.safetensors", num_classes=3)
    spec = write_spec(
        tmp_path,
        dataset,
        teacher=teacher_block(teacher),
        distill={"method": "tid"},
    )
    run_dir = tmp_path / "run"
    proc = run_train(spec, run_dir)
    assert proc.returncode == 1
    error = read_events(run_dir / "events.jsonl")[-1]
    assert error["type"] == "error" and error["kind"] == "WeightsMismatchError"
    assert "num_classes=3" in error["message"] and "num_classes=5" in error["message"]


def test_a_teacher_and_a_student_of_one_seed_never_share_their_initial_weights(
    tmp_path: Path, dataset: Path
) -> None:
    # the bench's teacher (FPN 128) and student (FPN 64) at the same seed and backbone: under
    # one global seed their backbones started identical; now each model has its own stream
    train_ds = CocoDetection(dataset, "train", train=True)

    def backbone(fpn_channels: int) -> dict[str, torch.Tensor]:
        spec = write_spec(tmp_path, dataset, student={"fpn_channels": fpn_channels})
        job = JobSpec.model_validate_json(spec.read_text())
        state = torch.get_rng_state()
        body = build_models(job, train_ds, 64).student.backbone.body.state_dict()
        assert torch.equal(torch.get_rng_state(), state)  # the global stream is left alone
        return body

    teacher, student, again = backbone(128), backbone(64), backbone(64)
    drawn = [k for k, v in teacher.items() if v.dim() > 1]  # BatchNorm starts at 1 and 0
    assert drawn
    for key in drawn:
        assert not torch.equal(teacher[key], student[key]), key
    for key, value in student.items():  # the same spec starts from the same weights
        assert torch.equal(value, again[key]), key


def test_a_student_starts_from_its_backbone_weights(tmp_path: Path, dataset: Path) -> None:
    teacher = make_teacher(tmp_path / "teacher.safetensors")  # fcos/resnet18, FPN 128
    spec = json.loads(write_spec(tmp_path, dataset).read_text())
    spec["student"]["weights_backbone"] = {"path": str(teacher)}
    job = JobSpec.model_validate(spec)
    student = build_models(job, CocoDetection(dataset, "train", train=True), 64).student
    source, _ = load_student(teacher)
    loaded, expected = student.backbone.body.state_dict(), source.backbone.body.state_dict()
    assert loaded.keys() == {k for k in expected if not k.endswith("num_batches_tracked")}
    for key, value in loaded.items():
        assert torch.equal(value, expected[key]), key
    assert student.head.classification_head.cls_logits.weight.shape[0] == NUM_CLASSES
    trains = {n.split(".")[0]: p.requires_grad for n, p in student.backbone.body.named_parameters()}
    assert [trains[stage] for stage in ("layer1", "layer2", "layer4")] == [False, True, True]

    # the spec's trainable_backbone_layers reaches it: 1 trains layer4 only
    spec["student"]["trainable_backbone_layers"] = 1
    job = JobSpec.model_validate(spec)
    student = build_models(job, CocoDetection(dataset, "train", train=True), 64).student
    trains = {n.split(".")[0]: p.requires_grad for n, p in student.backbone.body.named_parameters()}
    assert [trains[stage] for stage in ("layer1", "layer3", "layer4")] == [False, False, True]
    del spec["student"]["trainable_backbone_layers"]

    spec["student"] |= {"backbone": "resnet34", "weights_backbone": {"path": str(teacher)}}
    run_dir = tmp_path / "run"
    (tmp_path / "resnet34.json").write_text(json.dumps(spec))
    assert run_train(tmp_path / "resnet34.json", run_dir).returncode == 1
    error = read_events(run_dir / "events.jsonl")[-1]
    assert error["type"] == "error" and error["kind"] == "WeightsMismatchError"
    assert "from a resnet18 detector but the spec declares resnet34" in error["message"]


def start_train(spec: Path, run_dir: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        train_cmd(spec, run_dir), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for_event(
    proc: subprocess.Popen[str], events_file: Path, match: Callable[[dict[str, Any]], bool]
) -> list[dict[str, Any]]:
    """Poll the events file until an event matches; returns the events up to that one."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        events = read_events(events_file)
        for i, event in enumerate(events):
            if match(event):
                return events[: i + 1]
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.01)
    pytest.fail(f"no matching event in {events_file}")


def test_a_trainer_waits_for_the_run_dir_and_gives_up_with_75_writing_nothing(
    tmp_path: Path, dataset: Path
) -> None:
    run_dir = tmp_path / "run"
    held = lock_run_dir(run_dir, timeout=0)  # an earlier attempt still running
    try:
        cmd = [*train_cmd(write_spec(tmp_path, dataset), run_dir), "--lock-timeout", "1"]
        proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120)
    finally:
        held.close()
    assert proc.returncode == 75, proc.stderr[-2000:]
    assert f"{run_dir} is still in use by another trainer (pid {os.getpid()})" in proc.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]


def test_sigterm_during_evaluation_abandons_it_and_the_rerun_evaluates_first(
    tmp_path: Path, dataset: Path
) -> None:
    # batch 1: 16 steps per epoch and 6 evaluation batches, each a point where the stop lands
    spec = write_spec(tmp_path, dataset, schedule={"batch_size": 1})
    run_dir = tmp_path / "run"
    events_file = run_dir / "events.jsonl"
    proc = start_train(spec, run_dir)
    wait_for_event(proc, events_file, lambda e: e["type"] == "phase" and e["phase"] == "eval")
    proc.send_signal(signal.SIGSTOP)  # hold it inside the evaluation while the signal arrives
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGCONT)
    assert proc.wait(timeout=60) == 143

    first = read_events(events_file)
    assert [e["type"] for e in first[-3:]] == ["checkpoint", "phase", "interrupted"]
    assert first[-3]["path"] == "checkpoints/epoch_0001.pt" and first[-3]["step"] == 16
    assert "eval" not in {e["type"] for e in first}  # abandoned, not finished first

    again = run_train(spec, run_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    second = read_events(events_file)[len(first) :]
    assert second[0]["type"] == "start" and second[0]["resumed"] is True
    assert [e["epoch"] for e in second if e["type"] == "eval"] == [1, 2]
    assert second[2]["type"] == "eval"  # the missed evaluation comes before any training
    assert next(e["step"] for e in second if e["type"] == "step") == 17


def test_checkpoint_write_failure_fails_clearly_and_keeps_the_previous_checkpoint(
    tmp_path: Path, dataset: Path
) -> None:
    spec = write_spec(tmp_path, dataset, schedule={"eval_every": 0})
    run_dir = tmp_path / "run"
    events_file = run_dir / "events.jsonl"
    proc = start_train(spec, run_dir)
    (*_, saved) = wait_for_event(proc, events_file, lambda e: e["type"] == "checkpoint")
    # from now on every write past 1 MB fails (EFBIG), as a full disk fails with ENOSPC
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    assert proc.wait(timeout=120) == 1

    error = read_events(events_file)[-1]
    assert error["type"] == "error" and error["kind"] == "CheckpointWriteError"
    assert error["retryable"] is False
    last = run_dir / "checkpoints" / "last.pt"
    assert error["message"] == (
        f"[Errno 27] cannot write checkpoint {last} at step 8: File too large "
        "(disk full or run dir not writable?); the previous checkpoint is kept"
    )
    assert sha256(last) == saved["sha256"]  # the epoch-1 checkpoint, untouched
    assert not list(last.parent.glob(".*.tmp.*"))  # no half-written file left behind
