"""The trainable unit: student + adapters + distillation loss, with the teacher held aside.

`Distiller` is what DDP wraps and the optimizer sees. The teacher is kept out of its modules
(not a parameter, not in `state_dict`, not in DDP), frozen and in eval mode; it runs without
grad on the student's own transformed batch inside the same forward.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from tid_core.distill.capture import Adapters, Detector, StudentCapture, Targets, teacher_forward
from tid_core.distill.tid import TIDLoss


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
        distill = self.loss(
            student_out.with_features(student_feats),
            teacher_out.with_features([teacher_out.features[lvl] for lvl in self.levels]),
            resized_targets,
        )
        losses.update({name: distill_scale * value for name, value in distill.items()})
        self.distill_terms = tuple(distill)
        stats = dict(self.loss.last_stats) if isinstance(self.loss, TIDLoss) else {}
        return losses, stats
