"""Task Integration Distillation (Su, Jian, Yu, arXiv 2404.01699), as docs/METHOD.md describes it.

DIEM (`task_significance`): each location gets a classification and a regression score from
the model's own head outputs against the ground truth; their product is the location's task
significance. LDAM (`split_areas`): key areas (teacher right, student right), weak areas
(teacher right, student not yet) and the rest. SFDM (`feature_distance` + `region_losses`):
a standardised feature loss, weighted per area, as a weighted mean over all locations.
`ground_truth_areas` is a control, not TID: the ground-truth foreground as the key area.
All functions are pure tensor maths: no files, ranks or specs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from tid_core.distill.capture import DetectorOutputs, Targets

HIGH, MID, LOW = 2.0, 1.5, 0.4  # DIEM's discrete task scores


def _best_anchor(outputs: DetectorOutputs) -> tuple[Tensor, Tensor]:
    """Per location: class probabilities [N, L, C] and box [N, L, 4] of its best-scoring anchor."""
    probs = outputs.cls_logits.detach().float().sigmoid()
    boxes = outputs.decoded_boxes()
    a = outputs.num_anchors
    if a == 1:  # FCOS: one prediction per location already
        return probs, boxes
    n, la, c = probs.shape
    probs = probs.view(n, la // a, a, c)
    boxes = boxes.view(n, la // a, a, 4)
    best = probs.amax(dim=-1).argmax(dim=-1, keepdim=True)  # [N, L, 1]
    probs = probs.gather(2, best[..., None].expand(-1, -1, 1, c)).squeeze(2)
    boxes = boxes.gather(2, best[..., None].expand(-1, -1, 1, 4)).squeeze(2)
    return probs, boxes


def _locations(outputs: DetectorOutputs) -> Tensor:
    """One anchor [L, 4] per head location (a view, no kernel): its anchors share a centre, and
    every image of a batch has the same anchors."""
    return outputs.anchors[0][:: outputs.num_anchors]


def _containing_gt(locations: Tensor, gt: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Per location: the smallest valid GT box [N, L] containing its centre (FCOS's rule for
    ambiguous locations), and whether there is one."""
    centres = (locations[..., :2] + locations[..., 2:]).float() / 2  # [L, 2]
    xy = centres[None, :, None, :]
    inside = (xy >= gt[:, None, :, :2]).all(-1) & (xy <= gt[:, None, :, 2:]).all(-1)
    area = (gt[..., 2:] - gt[..., :2]).prod(dim=-1)  # [N, G]
    areas = torch.where(inside & valid[:, None, :], area[:, None, :], torch.inf)
    smallest, index = areas.min(dim=-1)
    return index, smallest.isfinite()


def _pairwise_iou(boxes: Tensor, gt: Tensor) -> Tensor:
    """IoU [N, L, G] between boxes [N, L, 4] and gt [N, G, 4] (xyxy)."""
    lt = torch.maximum(boxes[:, :, None, :2], gt[:, None, :, :2])
    rb = torch.minimum(boxes[:, :, None, 2:], gt[:, None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=-1)
    area_b = (boxes[..., 2:] - boxes[..., :2]).clamp(min=0).prod(dim=-1)
    area_g = (gt[..., 2:] - gt[..., :2]).clamp(min=0).prod(dim=-1)
    union = area_b[:, :, None] + area_g[:, None, :] - inter
    return inter / union.clamp(min=1e-6)


def _padded_targets(targets: Targets) -> tuple[Tensor, Tensor]:
    """GT boxes [N, G, 4] and labels [N, G] padded to the largest G (at least 1) with label -1."""
    boxes = pad_sequence([t["boxes"].float() for t in targets], batch_first=True)
    labels = pad_sequence([t["labels"] for t in targets], batch_first=True, padding_value=-1)
    if boxes.shape[1] == 0:  # no GT in the whole batch
        return boxes.new_zeros(len(targets), 1, 4), labels.new_full((len(targets), 1), -1)
    return boxes, labels


@torch.no_grad()
def task_significance(
    outputs: Sequence[DetectorOutputs],
    targets: Targets,
    *,
    tasks: Sequence[str] = ("cls", "reg"),
    pos_iou: float = 0.5,
    neg_iou: float = 0.4,
    p_min: float = 0.05,
    cls_match: str = "box",
) -> Tensor:
    """DIEM: task significance [M, N, L] of every head location (L = sum_l H_l*W_l) for each of
    M detectors' outputs on the same batch (TIDLoss: teacher and student, in one batched pass
    for half the kernel launches; they share their FPN grids, so their locations).

    Regression score: 2.0 / 1.5 / 0.4 as the location's box has IoU >= pos_iou, in between, or
    <= neg_iou with its best-matching GT box. Classification score: 2.0 if the predicted class
    is the matched GT's class with p >= 0.5, 1.5 if so with p_min <= p < 0.5, 0.4 otherwise
    (and 0.4 where there is no object). `cls_match` says which GT that is: "box", the one the
    location's box overlaps best, no object where IoU <= neg_iou (so a right class needs a
    roughly right box too); "point", the smallest GT box containing the location's centre, no
    object outside every box (the class judged on its own). The two are multiplied; with one
    task only, that score is squared so the thresholds keep their meaning on the same
    {0.16 .. 4} scale.
    """
    m = len(outputs)
    best = [_best_anchor(o) for o in outputs]
    probs = torch.cat([p for p, _ in best])  # [M*N, L, C]: the M batches one after another
    boxes = torch.cat([b for _, b in best])
    gt_boxes, gt_labels = _padded_targets(targets)
    gt_boxes, gt_labels = torch.cat([gt_boxes] * m), torch.cat([gt_labels] * m)
    valid = gt_labels >= 0
    iou = _pairwise_iou(boxes, gt_boxes).masked_fill(~valid[:, None, :], -1.0)
    best_iou, best_gt = iou.max(dim=-1)  # [M*N, L]
    best_iou = best_iou.clamp(min=0.0)

    def level(hi: Tensor, mid: Tensor) -> Tensor:
        return torch.where(hi, HIGH, torch.where(mid, MID, LOW))

    score_r = level(best_iou >= pos_iou, best_iou > neg_iou)
    if cls_match == "box":
        cls_gt, has_object = best_gt, best_iou > neg_iou
    elif cls_match == "point":
        cls_gt, has_object = _containing_gt(_locations(outputs[0]), gt_boxes, valid)
    else:
        raise ValueError(f"cls_match must be 'box' or 'point', got {cls_match!r}")
    label = gt_labels.gather(1, cls_gt).clamp(min=0)  # [M*N, L]; padding only where no object
    p_label = probs.gather(-1, label[..., None]).squeeze(-1)
    right = (probs.argmax(dim=-1) == label) & has_object
    score_c = level(right & (p_label >= 0.5), right & (p_label >= p_min))
    if set(tasks) == {"cls", "reg"}:
        score = score_c * score_r
    elif tuple(tasks) == ("cls",):
        score = score_c**2
    elif tuple(tasks) == ("reg",):
        score = score_r**2
    else:
        raise ValueError(f"tasks must be a non-empty subset of ['cls', 'reg'], got {list(tasks)}")
    return score.view(m, -1, score.shape[-1])


def split_areas(
    score_t: Tensor,
    score_s: Tensor,
    *,
    tau_key: float,
    tau_weak: float,
    weak_areas: bool = True,
) -> tuple[Tensor, Tensor]:
    """LDAM: boolean masks (key, weak) from teacher and student significance; rest = neither.

    Teacher-significant locations (score_t >= tau_key) are weak where the teacher leads the
    student by at least tau_weak, key otherwise. Without weak areas all of them are key.
    """
    significant = score_t >= tau_key
    weak = (
        significant & (score_t - score_s >= tau_weak)
        if weak_areas
        else torch.zeros_like(significant)
    )
    return significant & ~weak, weak


def ground_truth_areas(outputs: DetectorOutputs, targets: Targets) -> Tensor:
    """The control's key area [N, L]: every location whose centre lies inside a GT box, however
    right or wrong either model is there (PKD weighted by the foreground, to tell what task
    significance adds to foreground weighting)."""
    gt_boxes, gt_labels = _padded_targets(targets)
    return _containing_gt(_locations(outputs), gt_boxes, gt_labels >= 0)[1]


def feature_distance(f_s: Tensor, f_t: Tensor, *, normalize: bool, eps: float = 1e-6) -> Tensor:
    """Per-location distance [N, H, W]: mean over channels of the squared difference.

    With `normalize`, each map is standardised per channel over (N, H, W) first (PKD), which
    makes the loss scale-free; eps guards the variance of tiny levels.
    """
    f_s, f_t = f_s.float(), f_t.float()
    if normalize:
        f_s, f_t = _standardise(f_s, eps), _standardise(f_t, eps)
    return (f_s - f_t).pow(2).mean(dim=1)


def _standardise(f: Tensor, eps: float) -> Tensor:
    var, mean = torch.var_mean(f, dim=(0, 2, 3), keepdim=True, correction=0)  # one pass
    return (f - mean) * (var + eps).rsqrt()


def region_losses(distances: Sequence[Tensor], regions: Tensor) -> Tensor:
    """SFDM: per region r, sum_l (1/N_l) sum_{i in r at level l} d_l(i), as a vector [R].

    `distances` are per level [N, H_l, W_l]; `regions` [R, N, sum_l H_l*W_l] holds each
    region's 0/1 mask over the levels' locations, in the same order. Each level is normalised
    by its total number of locations, never by the region's size: per-region means put a whole
    level's weight on a handful of locations (docs/METHOD.md#region-weights). All regions and
    levels in one product and one sum: a few kernels in all, whatever the number of levels (not
    a matmul, which autocast would run in half precision).
    """
    scale = torch.cat([d.new_full((d[0].numel(),), 1.0 / d.numel()) for d in distances])
    flat = torch.cat([d.flatten(1) for d in distances], dim=1) * scale  # [N, sum_l H_l*W_l]
    return (regions * flat).sum(dim=(1, 2))


class TIDLoss(nn.Module):
    """The TID feature loss on the distilled levels: terms tid_key, tid_weak, tid_rest, and
    the key and weak areas' shares of all locations as statistics. `areas="ground_truth"`
    takes the key area from the GT boxes instead (no weak area; the same distance and weights)."""

    def __init__(
        self,
        *,
        levels: Sequence[int],
        tasks: Sequence[str],
        weak_areas: bool,
        alpha: float,
        beta: float,
        gamma: float,
        pos_iou: float,
        neg_iou: float,
        p_min: float,
        cls_match: str,
        tau_key: float,
        tau_weak: float,
        normalize: bool,
        areas: str,
    ) -> None:
        super().__init__()
        if areas not in ("significance", "ground_truth"):
            raise ValueError(f"areas must be 'significance' or 'ground_truth', got {areas!r}")
        self.areas = areas
        self.levels = list(levels)
        self.tasks = tuple(tasks)
        self.weak_areas = weak_areas
        self.weights = {"tid_key": alpha, "tid_weak": beta, "tid_rest": gamma}
        self.iou = (pos_iou, neg_iou)
        self.p_min = p_min
        self.cls_match = cls_match
        self.tau = (tau_key, tau_weak)
        self.normalize = normalize

    def area_masks(
        self, student: DetectorOutputs, teacher: DetectorOutputs, targets: Targets
    ) -> tuple[Tensor, Tensor]:
        """(key, weak) masks [N, L] over all head locations."""
        if self.areas == "ground_truth":
            key = ground_truth_areas(teacher, targets)
            return key, torch.zeros_like(key)
        score_t, score_s = task_significance(
            [teacher, student],
            targets,
            tasks=self.tasks,
            pos_iou=self.iou[0],
            neg_iou=self.iou[1],
            p_min=self.p_min,
            cls_match=self.cls_match,
        )
        return split_areas(
            score_t, score_s, tau_key=self.tau[0], tau_weak=self.tau[1], weak_areas=self.weak_areas
        )

    def forward(
        self, student: DetectorOutputs, teacher: DetectorOutputs, targets: Targets
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """`student.features` / `teacher.features` hold the distilled levels only (adapted)."""
        key, weak = self.area_masks(student, teacher, targets)
        regions = torch.stack([key, weak, ~(key | weak)]).float()  # [3, N, L]
        fractions = regions.mean(dim=(1, 2))
        if self.levels != list(range(len(teacher.level_shapes))):  # the distilled levels' only
            parts = torch.split(regions, [h * w for h, w in teacher.level_shapes], dim=2)
            regions = torch.cat([parts[lvl] for lvl in self.levels], dim=2)
        distances = [
            feature_distance(fs, ft, normalize=self.normalize)
            for fs, ft in zip(student.features, teacher.features, strict=True)
        ]
        losses = region_losses(distances, regions)
        terms = {
            name: weight * loss
            for (name, weight), loss in zip(self.weights.items(), losses.unbind(), strict=True)
        }
        return terms, {"tid_key_frac": fractions[0], "tid_weak_frac": fractions[1]}
