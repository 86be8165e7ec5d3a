"""Published feature-distillation baselines with TID's signature: FitNet and PKD.

Both are the unweighted mean over all locations of each distilled level, summed over levels:
FitNet on raw features (Romero et al.), PKD on per-channel standardised ones (Cao et al.).
With all region weights 1, TID's loss equals PKD's exactly, so TID's effect is its weighting.
"""

from __future__ import annotations

from torch import Tensor, nn

from tid_core.distill.capture import DetectorOutputs, Targets
from tid_core.distill.tid import feature_distance


class FeatureMSELoss(nn.Module):
    """Mean squared feature difference over all locations; `normalize` makes it PKD."""

    def __init__(self, *, name: str, normalize: bool) -> None:
        super().__init__()
        self.name = name
        self.normalize = normalize

    def forward(
        self,
        student: DetectorOutputs,
        teacher: DetectorOutputs,
        targets: Targets,  # noqa: ARG002 - same signature as TIDLoss
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Its one term, and no statistics."""
        levels = [
            feature_distance(fs, ft, normalize=self.normalize).mean()
            for fs, ft in zip(student.features, teacher.features, strict=True)
        ]
        return {self.name: sum(levels[1:], levels[0])}, {}


def fitnet_loss() -> FeatureMSELoss:
    return FeatureMSELoss(name="fitnet", normalize=False)


def pkd_loss() -> FeatureMSELoss:
    return FeatureMSELoss(name="pkd", normalize=True)
