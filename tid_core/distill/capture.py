"""Reading a detector's intermediate outputs: hooks on the student, a direct pass for the teacher.

The student's FPN features, head outputs, anchors and resized targets are recorded by forward
hooks during the one forward that also computes its detection loss (no second student pass).
The teacher runs its backbone and head directly on the student's transformed batch, so both see
the same pixels and their FPN grids align.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from torchvision.models.detection._utils import BoxCoder, BoxLinearCoder
from torchvision.models.detection.image_list import ImageList

Detector = Any  # torchvision's FCOS | RetinaNet; torchvision ships no type information
Targets = list[dict[str, Tensor]]


@dataclass
class DetectorOutputs:
    """One forward of a one-stage detector, as the distillation losses need it.

    `cls_logits` [N, sum_l H_l*W_l*A, C] and `bbox_regression` [N, sum_l H_l*W_l*A, 4] are the
    head outputs in torchvision's order (level, then y, x, anchor); `anchors` are per image
    [sum_l H_l*W_l*A, 4]; `features` are the FPN levels [N, C, H_l, W_l].
    """

    features: list[Tensor]
    cls_logits: Tensor
    bbox_regression: Tensor
    anchors: list[Tensor]
    num_anchors: int
    box_coder: BoxCoder | BoxLinearCoder
    level_shapes: list[tuple[int, int]]  # (H_l, W_l) of every FPN level, distilled or not

    def decoded_boxes(self) -> Tensor:
        """Boxes [N, sum H*W*A, 4] (xyxy, in the transformed image) from the box coder."""
        anchors = torch.stack(self.anchors)
        rel = self.bbox_regression.detach().float()
        if isinstance(self.box_coder, BoxLinearCoder):
            boxes: Tensor = self.box_coder.decode(rel, anchors)
            return boxes
        flat: Tensor = self.box_coder.decode_single(rel.reshape(-1, 4), anchors.reshape(-1, 4))
        return flat.reshape(rel.shape)

    def with_features(self, features: list[Tensor]) -> DetectorOutputs:
        return DetectorOutputs(
            features,
            self.cls_logits,
            self.bbox_regression,
            self.anchors,
            self.num_anchors,
            self.box_coder,
            self.level_shapes,
        )


class StudentCapture:
    """Forward hooks that record what `DetectorOutputs` needs during the student's own forward.

    Call `take()` once after each forward: it returns the records and clears them, so no tensor
    outlives its step.
    """

    def __init__(self, model: Detector) -> None:
        self._model = model
        self._store: dict[str, Any] = {}
        self._handles: list[RemovableHandle] = [
            model.transform.register_forward_hook(self._keep("transform")),
            model.backbone.register_forward_hook(self._keep("features")),
            model.head.register_forward_hook(self._keep("head")),
            model.anchor_generator.register_forward_hook(self._keep("anchors")),
        ]

    def _keep(self, key: str) -> Any:
        def hook(module: nn.Module, _inputs: Any, output: Any) -> None:
            if module.training:  # eval forwards have nothing to distill
                self._store[key] = output

        return hook

    def take(self) -> tuple[ImageList, Targets, DetectorOutputs]:
        store, self._store = self._store, {}
        missing = {"transform", "features", "head", "anchors"} - store.keys()
        if missing:
            raise RuntimeError(f"student forward did not run {sorted(missing)}; was it called?")
        images, targets = store["transform"]
        head = store["head"]
        features = list(store["features"].values())
        outputs = DetectorOutputs(
            features=features,
            cls_logits=head["cls_logits"],
            bbox_regression=head["bbox_regression"],
            anchors=store["anchors"],
            num_anchors=self._model.anchor_generator.num_anchors_per_location()[0],
            box_coder=self._model.box_coder,
            level_shapes=[(f.shape[-2], f.shape[-1]) for f in features],
        )
        return images, targets, outputs

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@torch.no_grad()
def teacher_forward(teacher: Detector, images: ImageList) -> DetectorOutputs:
    """Run a frozen teacher's backbone and head on an already transformed batch."""
    features = list(teacher.backbone(images.tensors).values())
    head = teacher.head(features)
    return DetectorOutputs(
        features=features,
        cls_logits=head["cls_logits"],
        bbox_regression=head["bbox_regression"],
        anchors=teacher.anchor_generator(images, features),
        num_anchors=teacher.anchor_generator.num_anchors_per_location()[0],
        box_coder=teacher.box_coder,
        level_shapes=[(f.shape[-2], f.shape[-1]) for f in features],
    )


class Adapters(nn.Module):
    """A 1x1 conv per distilled level mapping student channels to the teacher's (if they differ)."""

    def __init__(self, *, student_channels: int, teacher_channels: int, levels: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(student_channels, teacher_channels, kernel_size=1)
            if student_channels != teacher_channels
            else nn.Identity()
            for _ in range(levels)
        )

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        return [conv(f) for conv, f in zip(self.convs, features, strict=True)]
