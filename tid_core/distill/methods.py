"""The distillation methods a spec can name (`DistillSpec.method`), as loss builders.

Every loss is called as loss(student outputs, teacher outputs, targets) on the distilled levels
and returns (loss terms, statistics): the terms sum into the training loss; the statistics are
detached figures for the logs (TID's area fractions). Method "none" has no loss and no entry.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from tid_core.distill.baselines import fitnet_loss, pkd_loss
from tid_core.distill.tid import TIDLoss
from tid_core.spec import DistillSpec


def _tid_loss(d: DistillSpec) -> TIDLoss:
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
        areas=d.areas,
    )


# FitNet and PKD are defined by their normalisation: they read no option
DISTILL_METHODS: dict[str, Callable[[DistillSpec], nn.Module]] = {
    "fitnet": lambda _: fitnet_loss(),
    "pkd": lambda _: pkd_loss(),
    "tid": _tid_loss,
}
