"""Distiller on real tiny detectors: gradients, a frozen hidden teacher, one student forward."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from tid_core.distill.baselines import fitnet_loss
from tid_core.distill.capture import Detector, StudentCapture, teacher_forward
from tid_core.distill.distiller import Distiller
from tid_core.distill.methods import DISTILL_METHODS
from tid_core.models import build_detector
from tid_core.spec import METHODS as SPEC_METHODS
from tid_core.spec import DistillSpec

ARCHS = ["fcos", "retinanet"]
METHODS = ["tid", "fitnet", "pkd"]
DISTILL_TERMS = {
    "tid": {"tid_key", "tid_weak", "tid_rest"},
    "fitnet": {"fitnet"},
    "pkd": {"pkd"},
}
STUDENT_CHANNELS, TEACHER_CHANNELS = 64, 128  # fpn_channels must be >= 64


def make_loss(method: str, levels: tuple[int, ...] = (0, 1, 2, 3, 4)) -> nn.Module:
    """The method's loss with the spec's defaults, as the trainer builds it."""
    return DISTILL_METHODS[method](DistillSpec.model_validate({"method": method, "levels": levels}))


def detector(arch: str, channels: int, seed: int) -> Detector:
    torch.manual_seed(seed)
    return build_detector(
        arch=arch, backbone="resnet18", num_classes=3, fpn_channels=channels, image_size=64
    )


def batch() -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    gen = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 64, generator=gen) for _ in range(2)]
    targets = [
        {
            "boxes": torch.tensor([[4.0, 4.0, 30.0, 30.0], [30.0, 20.0, 60.0, 50.0]]),
            "labels": torch.tensor([1, 2]),
        },
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
    ]
    return images, targets


def distiller(arch: str, method: str) -> Distiller:
    student = detector(arch, STUDENT_CHANNELS, seed=0)
    teacher = detector(arch, TEACHER_CHANNELS, seed=1)
    return Distiller(student, teacher=teacher, loss=make_loss(method))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_distiller_backward_reaches_student_and_adapters_never_teacher(
    arch: str, method: str
) -> None:
    model = distiller(arch, method).train()
    teacher = model.teacher
    assert teacher is not None
    losses, _ = model(*batch(), 1.0)
    assert DISTILL_TERMS[method] <= losses.keys()
    assert {"classification", "bbox_regression"} <= losses.keys()
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()

    student_grads = {n: p.grad for n, p in model.student.named_parameters()}
    assert all(g is not None for g in student_grads.values())
    for part in ("student.backbone.body.", "student.backbone.fpn.", "student.head."):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(part)]
        assert grads
        assert sum(g.abs().sum() for g in grads if g is not None) > 0, part
    assert model.adapters is not None
    for conv in model.adapters.convs:
        assert isinstance(conv, nn.Conv2d)
        assert conv.weight.grad is not None
        assert conv.weight.grad.abs().sum() > 0
    for p in teacher.parameters():
        assert p.grad is None
        assert p.requires_grad is False


@pytest.mark.parametrize("arch", ARCHS)
def test_distiller_hides_teacher_from_parameters_state_dict_and_train_mode(arch: str) -> None:
    model = distiller(arch, "tid")
    teacher = model.teacher
    assert teacher is not None
    model.train()
    assert model.student.training
    assert not teacher.training
    assert not any(m.training for m in teacher.modules())
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not teacher_ids & {id(p) for p in model.parameters()}
    student_keys = {f"student.{k}" for k in model.student.state_dict()}
    adapter_keys = {f"adapters.{k}" for k in model.adapters.state_dict()}  # type: ignore[union-attr]
    assert set(model.state_dict()) == student_keys | adapter_keys
    teacher_tensors = {t.data_ptr() for t in teacher.state_dict().values()}
    assert not teacher_tensors & {t.data_ptr() for t in model.state_dict().values()}
    model.eval()
    model.train(True)
    assert not teacher.training


@pytest.mark.parametrize("arch", ARCHS)
def test_distiller_runs_student_forward_once_per_step(arch: str) -> None:
    model = distiller(arch, "tid").train()
    assert model.teacher is not None
    calls = {"student": 0, "teacher": 0}

    def counter(name: str) -> Callable[..., None]:
        def hook(*_args: object) -> None:
            calls[name] += 1

        return hook

    model.student.backbone.register_forward_hook(counter("student"))
    model.teacher.backbone.register_forward_hook(counter("teacher"))
    model(*batch(), 1.0)
    assert calls == {"student": 1, "teacher": 1}
    model(*batch(), 1.0)
    assert calls == {"student": 2, "teacher": 2}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_distill_scale_multiplies_distillation_terms_only(arch: str, method: str) -> None:
    model = distiller(arch, method).train()
    images, targets = batch()
    with torch.no_grad():
        one, _ = model(images, targets, 1.0)
        two, _ = model(images, targets, 2.0)
        zero, _ = model(images, targets, 0.0)
    for name in one:
        if name in DISTILL_TERMS[method]:
            torch.testing.assert_close(two[name], 2 * one[name])
            assert zero[name].item() == 0.0
        else:  # detection terms do not depend on the scale
            torch.testing.assert_close(two[name], one[name])
            torch.testing.assert_close(zero[name], one[name])
    assert sum(one[name].item() for name in DISTILL_TERMS[method]) > 0
    assert set(model.distill_terms) == DISTILL_TERMS[method]


def _freeze_batchnorm(model: nn.Module) -> None:
    """Eval-mode BatchNorm in a training student, so it computes what the eval teacher does."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eval()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_distillation_terms_are_zero_for_identical_student_and_teacher(
    arch: str, method: str
) -> None:
    teacher = detector(arch, STUDENT_CHANNELS, seed=1)
    student = detector(arch, STUDENT_CHANNELS, seed=2)
    student.load_state_dict(teacher.state_dict())
    model = Distiller(student, teacher=teacher, loss=make_loss(method)).train()
    assert model.adapters is not None
    assert all(isinstance(conv, nn.Identity) for conv in model.adapters.convs)
    # The teacher is in eval mode; with train-mode BatchNorm the student's features would use
    # batch statistics and differ. Freeze the student's BN so both compute the same function.
    _freeze_batchnorm(student)
    losses, _ = model(*batch(), 1.0)
    for name in DISTILL_TERMS[method]:
        assert losses[name].item() == pytest.approx(0.0, abs=1e-6), name
    assert losses["classification"].item() > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_tid_loss_is_zero_on_teacher_outputs_of_same_model_twice(arch: str) -> None:
    model = detector(arch, STUDENT_CHANNELS, seed=3).eval()
    images, targets = batch()
    transformed, resized = model.transform(images, targets)
    first = teacher_forward(model, transformed)
    second = teacher_forward(model, transformed)
    out, _ = make_loss("tid")(first, second, resized)
    assert all(v.item() == 0.0 for v in out.values())


def test_every_method_the_spec_names_has_a_loss_but_none() -> None:
    assert set(DISTILL_METHODS) == set(SPEC_METHODS) - {"none"}
    model = detector("fcos", STUDENT_CHANNELS, seed=3).eval()
    images, targets = batch()
    transformed, resized = model.transform(images, targets)
    outputs = teacher_forward(model, transformed)
    for method in DISTILL_METHODS:
        terms, stats = make_loss(method)(outputs, outputs, resized)
        assert set(terms) == DISTILL_TERMS[method]
        assert set(stats) == ({"tid_key_frac", "tid_weak_frac"} if method == "tid" else set())


def test_distiller_without_teacher_returns_detection_losses_only() -> None:
    student = detector("fcos", STUDENT_CHANNELS, seed=0)
    model = Distiller(student).train()
    assert model.teacher is None
    assert model.adapters is None
    losses, stats = model(*batch(), 1.0)
    assert set(losses) == {"classification", "bbox_regression", "bbox_ctrness"}
    assert stats == {}


def test_distiller_rejects_teacher_without_loss_and_loss_without_teacher() -> None:
    student = detector("fcos", STUDENT_CHANNELS, seed=0)
    with pytest.raises(ValueError, match="a teacher needs a distillation loss"):
        Distiller(student, teacher=detector("fcos", STUDENT_CHANNELS, seed=1))
    with pytest.raises(ValueError, match="a teacher needs a distillation loss"):
        Distiller(student, loss=fitnet_loss())


@pytest.mark.parametrize("cls_match", ["box", "point"])
@pytest.mark.parametrize("arch", ARCHS)
def test_tid_distiller_reports_area_fractions_as_stats(arch: str, cls_match: str) -> None:
    loss = DISTILL_METHODS["tid"](
        DistillSpec.model_validate({"method": "tid", "cls_match": cls_match})
    )
    student = detector(arch, STUDENT_CHANNELS, seed=0)
    model = Distiller(student, teacher=detector(arch, TEACHER_CHANNELS, seed=1), loss=loss)
    losses, stats = model.train()(*batch(), 1.0)
    assert all(torch.isfinite(v) for v in losses.values())
    assert set(stats) == {"tid_key_frac", "tid_weak_frac"}
    assert all(0.0 <= v.item() <= 1.0 for v in stats.values())
    assert not any(v.requires_grad for v in stats.values())


def test_student_capture_take_clears_its_records() -> None:
    student = detector("fcos", STUDENT_CHANNELS, seed=0).train()
    capture = StudentCapture(student)
    student(*batch())
    _, resized, outputs = capture.take()
    assert len(outputs.features) == 5
    assert outputs.level_shapes == [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]
    assert outputs.cls_logits.shape == (2, 64 + 16 + 4 + 1 + 1, 3)
    assert len(resized) == 2
    with pytest.raises(RuntimeError, match="was it called"):
        capture.take()
    capture.remove()
    student(*batch())
    with pytest.raises(RuntimeError, match="was it called"):
        capture.take()


@pytest.mark.parametrize("method", METHODS)
def test_distiller_on_a_subset_of_levels_adapts_only_those(method: str) -> None:
    student = detector("fcos", STUDENT_CHANNELS, seed=0)
    teacher = detector("fcos", TEACHER_CHANNELS, seed=1)
    loss = make_loss(method, levels=(1, 3))
    model = Distiller(student, teacher=teacher, loss=loss, levels=(1, 3)).train()
    assert model.adapters is not None
    assert len(model.adapters.convs) == 2
    losses, _ = model(*batch(), 1.0)
    assert all(torch.isfinite(losses[name]) for name in DISTILL_TERMS[method])
    assert sum(losses[name].item() for name in DISTILL_TERMS[method]) > 0
