"""The trainable unit: student + adapters + distillation loss, with the teacher held aside.

`Distiller` is what DDP wraps and the optimizer sees. The teacher is kept out of its modules
(not a parameter, not in `state_dict`, not in DDP), frozen and in eval mode; it runs without
grad on the student's own transformed batch inside the same forward. `build_models` builds the
one a JobSpec declares, its student initialised from a random stream of its own (`init_seed`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from tid_core.data.coco import CocoDetection
from tid_core.distill.capture import Adapters, Detector, StudentCapture, Targets, teacher_forward
from tid_core.distill.methods import DISTILL_METHODS
from tid_core.models import build_detector, load_backbone, load_checked
from tid_core.spec import JobSpec, ModelSpec, PathWeights, Weights


class Distiller(nn.Module):
    """forward(images, targets, distill_scale) -> (loss terms, statistics).

    Loss terms are the student's detection losses plus the method's distillation terms scaled
    by `distill_scale` (the loss weight with its warm-up ramp); they sum to the training loss.
    Statistics (e.g. TID's area fractions) are detached and for logging only.
    """

    def __init__(
        self,
        student: Detector,
        *,
        teacher: Detector | None = None,
        loss: nn.Module | None = None,
        levels: Sequence[int] = (0, 1, 2, 3, 4),
    ) -> None:
        super().__init__()
        if (teacher is None) != (loss is None):
            raise ValueError("a teacher needs a distillation loss and vice versa")
        self.student = student
        self.loss = loss
        self.levels = list(levels)
        self._teacher: tuple[Detector, ...] = ()
        self.adapters: Adapters | None = None
        self._capture: StudentCapture | None = None
        self.distill_terms: tuple[str, ...] = ()  # which loss terms are distillation's
        if teacher is not None:
            teacher.eval().requires_grad_(False)
            self._teacher = (teacher,)  # a tuple hides it from nn.Module registration
            self.adapters = Adapters(
                student_channels=student.backbone.out_channels,
                teacher_channels=teacher.backbone.out_channels,
                levels=len(self.levels),
            )
            self._capture = StudentCapture(student)

    @property
    def teacher(self) -> Detector | None:
        return self._teacher[0] if self._teacher else None

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def forward(
        self, images: list[Tensor], targets: Targets, distill_scale: float = 1.0
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        losses: dict[str, Tensor] = self.student(images, targets)
        if self.teacher is None or self.loss is None or self._capture is None:
            return losses, {}
        assert self.adapters is not None
        batch, resized_targets, student_out = self._capture.take()
        teacher_out = teacher_forward(self.teacher, batch)
        student_feats = self.adapters([student_out.features[lvl] for lvl in self.levels])
        distill, stats = self.loss(
            student_out.with_features(student_feats),
            teacher_out.with_features([teacher_out.features[lvl] for lvl in self.levels]),
            resized_targets,
        )
        losses.update({name: distill_scale * value for name, value in distill.items()})
        self.distill_terms = tuple(distill)
        return losses, stats


def _weights_path(weights: Weights, where: str) -> Path:
    if not isinstance(weights, PathWeights):
        raise ValueError(f"{where} {weights!r} is unresolved: the service maps ids to paths")
    return Path(weights.path)


def init_seed(seed: int, model: ModelSpec) -> int:
    """The seed of a student's random initialisation, from the job's seed and the model (arch,
    backbone, FPN width): two jobs of one seed but different models, a teacher's and its
    student's, never start from the same weights (under the one global seed a backbone starts
    the same whatever its FPN width)."""
    key = json.dumps([seed, model.arch, model.backbone, model.fpn_channels])
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")


def build_models(spec: JobSpec, train_ds: CocoDetection, input_size: int) -> Distiller:
    """The spec's student (from its backbone weights, if any), teacher and method's loss, for
    the classes of `train_ds`; on the CPU. The student's initialisation is `init_seed`'s own
    stream, which leaves the global random state as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed(spec.schedule.seed, spec.student))
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
    d = spec.distill
    loss = None if d.method == "none" else DISTILL_METHODS[d.method](d)
    return Distiller(student, teacher=teacher, loss=loss, levels=d.levels)
