"""TID maths (DIEM, LDAM, SFDM) on hand-built head outputs with known answers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor
from torchvision.models.detection._utils import BoxCoder, BoxLinearCoder

from tid_core.distill.baselines import pkd_loss
from tid_core.distill.capture import DetectorOutputs
from tid_core.distill.methods import DISTILL_METHODS
from tid_core.distill.tid import (
    TIDLoss,
    feature_distance,
    ground_truth_areas,
    region_losses,
    split_areas,
    task_significance,
)
from tid_core.spec import DistillSpec

NUM_CLASSES = 3
GT = [0.0, 0.0, 10.0, 10.0]  # area 100, label 1
GT_LABEL = 1
# Predicted boxes with exact IoU against GT (every coordinate is exact in float32).
IOU_1 = [0.0, 0.0, 10.0, 10.0]
IOU_050 = [0.0, 0.0, 10.0, 5.0]  # 50 / 100
IOU_045 = [0.0, 0.0, 10.0, 4.5]  # 45 / 100
IOU_040 = [0.0, 0.0, 10.0, 4.0]  # 40 / 100
IOU_0 = [20.0, 20.0, 30.0, 30.0]
# An anchor of power-of-two size, so encode/decode with BoxLinearCoder are exact.
ANCHOR = [0.0, 0.0, 16.0, 16.0]
BIG = 12.0  # logit of "certainly not this class": p = 6e-6


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def probs_row(cls: int, p: float, *, other: tuple[int, float] | None = None) -> list[float]:
    """Class logits with class `cls` at probability p, all others ~0 (or `other` at its p)."""
    row = [-BIG] * NUM_CLASSES
    row[cls] = logit(p)
    if other is not None:
        row[other[0]] = logit(other[1])
    return row


def make_outputs(
    boxes: list[list[list[float]]],
    logits: list[list[list[float]]],
    *,
    level_shapes: list[tuple[int, int]] | None = None,
    features: list[Tensor] | None = None,
    anchors: list[list[float]] | None = None,
) -> DetectorOutputs:
    """FCOS-style outputs (one anchor per location) whose decoded boxes are exactly `boxes`;
    every location's anchor is ANCHOR (centre 8, 8) unless `anchors` gives one per location."""
    wanted = torch.tensor(boxes)  # [N, L, 4]
    n, locs, _ = wanted.shape
    per_location = torch.tensor(anchors) if anchors is not None else torch.tensor(ANCHOR)
    anchors_t = per_location.expand(n, locs, 4).clone()
    coder = BoxLinearCoder(normalize_by_size=True)
    rel = coder.encode(anchors_t, wanted)
    out = DetectorOutputs(
        features=features or [],
        cls_logits=torch.tensor(logits),
        bbox_regression=rel,
        anchors=list(anchors_t),
        num_anchors=1,
        box_coder=coder,
        level_shapes=level_shapes or [(1, locs)],
    )
    assert torch.equal(out.decoded_boxes(), wanted)  # the construction itself is exact
    return out


def one_gt(n: int = 1) -> list[dict[str, Tensor]]:
    return [{"boxes": torch.tensor([GT]), "labels": torch.tensor([GT_LABEL])} for _ in range(n)]


def no_gt() -> dict[str, Tensor]:
    return {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}


# (box, class logits, expected score_c, expected score_r) against GT with label 1.
CASES: list[tuple[str, list[float], list[float], float, float]] = [
    ("perfect box, right class p=0.9", IOU_1, probs_row(1, 0.9), 2.0, 2.0),
    ("mid box, right class p=0.9", IOU_045, probs_row(1, 0.9), 2.0, 1.5),
    ("perfect box, right class p=0.3", IOU_1, probs_row(1, 0.3), 1.5, 2.0),
    ("mid box, right class p=0.3", IOU_045, probs_row(1, 0.3), 1.5, 1.5),
    ("perfect box, wrong class argmax", IOU_1, probs_row(2, 0.9, other=(1, 0.3)), 0.4, 2.0),
    ("perfect box, right class p=0.01 < p_min", IOU_1, probs_row(1, 0.01), 0.4, 2.0),
    ("IoU exactly 0.4 = neg_iou", IOU_040, probs_row(1, 0.9), 0.4, 0.4),
    ("no overlap", IOU_0, probs_row(1, 0.9), 0.4, 0.4),
    ("IoU exactly 0.5 = pos_iou", IOU_050, probs_row(1, 0.9), 2.0, 2.0),
    ("mid box, p below p_min", IOU_045, probs_row(1, 0.01), 0.4, 1.5),
    ("perfect box, p exactly 0.5", IOU_1, probs_row(1, 0.5), 2.0, 2.0),
]


def case_outputs() -> DetectorOutputs:
    return make_outputs([[c[1] for c in CASES]], [[c[2] for c in CASES]])


def test_task_significance_is_product_of_hand_computed_task_scores() -> None:
    score = task_significance([case_outputs()], one_gt())[0]
    expected = torch.tensor([[c[3] * c[4] for c in CASES]])
    # 4, 3, 3, 2.25, 0.8, 0.8, 0.16, 0.16, 4, 0.6, 4
    assert expected[0, :10].tolist() == pytest.approx(
        [4.0, 3.0, 3.0, 2.25, 0.8, 0.8, 0.16, 0.16, 4.0, 0.6]
    )
    torch.testing.assert_close(score, expected)


def test_task_significance_cls_only_is_cls_score_squared() -> None:
    score = task_significance([case_outputs()], one_gt(), tasks=("cls",))[0]
    torch.testing.assert_close(score, torch.tensor([[c[3] ** 2 for c in CASES]]))


def test_task_significance_reg_only_is_reg_score_squared() -> None:
    score = task_significance([case_outputs()], one_gt(), tasks=("reg",))[0]
    torch.testing.assert_close(score, torch.tensor([[c[4] ** 2 for c in CASES]]))


def test_task_significance_task_order_does_not_matter() -> None:
    both = task_significance([case_outputs()], one_gt(), tasks=("cls", "reg"))[0]
    reordered = task_significance([case_outputs()], one_gt(), tasks=("reg", "cls"))[0]
    torch.testing.assert_close(both, reordered)


@pytest.mark.parametrize("tasks", [(), ("box",), ("cls", "box")])
def test_task_significance_rejects_unknown_tasks(tasks: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="tasks must be a non-empty subset"):
        task_significance([case_outputs()], one_gt(), tasks=tasks)


def test_task_significance_custom_thresholds_move_the_levels() -> None:
    # pos_iou 0.45 makes the mid box high; p_min 0.005 makes p=0.01 count as right (mid).
    score = task_significance([case_outputs()], one_gt(), pos_iou=0.45, p_min=0.005)[0]
    assert score[0, 1].item() == pytest.approx(4.0)  # mid box now 2.0 * 2.0
    assert score[0, 5].item() == pytest.approx(3.0)  # p=0.01 now 1.5 * 2.0


def test_task_significance_matches_each_location_to_its_best_gt() -> None:
    far_gt = [32.0, 32.0, 48.0, 48.0]  # label 2
    targets = [
        {"boxes": torch.tensor([GT, far_gt]), "labels": torch.tensor([1, 2])},
    ]
    boxes = [[IOU_1, far_gt, far_gt, IOU_045]]
    logits = [[probs_row(1, 0.9), probs_row(2, 0.9), probs_row(1, 0.9), probs_row(2, 0.9)]]
    score = task_significance([make_outputs(boxes, logits)], targets)[0]
    # far_gt box with class 1 is the wrong class for its matched GT (label 2): 0.4 * 2.0.
    # The mid box matches GT (label 1), so predicting class 2 is wrong: 0.4 * 1.5.
    torch.testing.assert_close(score, torch.tensor([[4.0, 4.0, 0.8, 0.6]]))


def test_task_significance_is_lowest_everywhere_on_image_without_gt() -> None:
    boxes = [[IOU_1, IOU_045, IOU_0]] * 2
    logits = [[probs_row(1, 0.9), probs_row(1, 0.3), probs_row(0, 0.9)]] * 2
    score = task_significance([make_outputs(boxes, logits)], [one_gt()[0], no_gt()])[0]
    torch.testing.assert_close(score[0], torch.tensor([4.0, 2.25, 0.16]))
    torch.testing.assert_close(score[1], torch.full((3,), 0.16))


def test_task_significance_is_lowest_everywhere_when_batch_has_no_gt() -> None:
    boxes = [[IOU_1, IOU_045]]
    logits = [[probs_row(1, 0.9), probs_row(1, 0.3)]]
    score = task_significance([make_outputs(boxes, logits)], [no_gt()])[0]
    torch.testing.assert_close(score, torch.full((1, 2), 0.16))


def test_task_significance_takes_highest_scoring_anchor_of_each_location() -> None:
    # RetinaNet style: A=3 anchors per location, BoxCoder (exp/log, so not bit-exact).
    coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
    a = 3
    # location 0: anchor 2 has the best score and a perfect box -> 4.0
    # location 1: anchor 0 has the perfect box, anchor 1 the best score but no overlap -> 0.16
    # location 2: anchor 0 right class p=0.3 perfect box; anchor 1 wrong class p=0.9 -> 0.8
    boxes = [
        [IOU_0, IOU_045, IOU_1],
        [IOU_1, IOU_0, IOU_045],
        [IOU_1, IOU_1, IOU_0],
    ]
    logits = [
        [probs_row(1, 0.1), probs_row(1, 0.3), probs_row(1, 0.9)],
        [probs_row(1, 0.3), probs_row(1, 0.9), probs_row(1, 0.1)],
        [probs_row(1, 0.3), probs_row(2, 0.9), probs_row(1, 0.1)],
    ]
    anchors = torch.tensor([[0.0, 0.0, 16.0, 16.0], [2.0, 2.0, 10.0, 12.0], [0.0, 4.0, 8.0, 8.0]])
    anchors = anchors.repeat(3, 1)  # [L*A, 4]
    wanted = torch.tensor(boxes).reshape(-1, 4)
    outputs = DetectorOutputs(
        features=[],
        cls_logits=torch.tensor(logits).reshape(1, 3 * a, NUM_CLASSES),
        bbox_regression=coder.encode_single(wanted, anchors)[None],
        anchors=[anchors],
        num_anchors=a,
        box_coder=coder,
        level_shapes=[(1, 3)],
    )
    torch.testing.assert_close(outputs.decoded_boxes()[0], wanted, atol=1e-4, rtol=0)
    score = task_significance([outputs], one_gt())[0]
    torch.testing.assert_close(score, torch.tensor([[4.0, 0.16, 0.8]]))


def test_task_significance_ignores_gradients_of_head_outputs() -> None:
    outputs = case_outputs()
    outputs.cls_logits.requires_grad_(True)
    score = task_significance([outputs], one_gt())[0]
    assert not score.requires_grad


# ---- LDAM: split_areas -------------------------------------------------------------------------

# teacher, student, expected area with the paper's starting thresholds (tau_key 2.25, tau_weak 0.9;
# docs/METHOD.md#thresholds)
TID_MD = {"tau_key": 2.25, "tau_weak": 0.9}
AREA_CASES: list[tuple[float, float, str]] = [
    (4.0, 4.0, "key"),  # both right
    (4.0, 3.0, "weak"),  # difference 1.0 >= 0.9
    (4.0, 3.125, "key"),  # difference 0.875 < 0.9
    (4.0, 0.16, "weak"),
    (3.0, 2.25, "key"),  # difference 0.75
    (3.0, 0.8, "weak"),
    (2.25, 2.25, "key"),  # teacher exactly at tau_key is significant
    (2.25, 0.8, "weak"),  # difference 1.45
    (0.8, 0.16, "rest"),  # teacher below tau_key: never key or weak
    (0.16, 4.0, "rest"),
    (3.0, 4.0, "key"),  # student ahead of the teacher
]


def test_split_areas_gives_hand_computed_key_and_weak_masks() -> None:
    score_t = torch.tensor([[c[0] for c in AREA_CASES]])
    score_s = torch.tensor([[c[1] for c in AREA_CASES]])
    key, weak = split_areas(score_t, score_s, **TID_MD)
    assert key.tolist() == [[c[2] == "key" for c in AREA_CASES]]
    assert weak.tolist() == [[c[2] == "weak" for c in AREA_CASES]]
    assert not (key & weak).any()


# the spec's tuned defaults (tau_key 0.8, tau_weak 0.6): right on one task is significant
DEFAULT_CASES: list[tuple[float, float, str]] = [
    (0.8, 0.8, "key"),  # teacher right on one task (2.0 x 0.4), the student too
    (0.8, 0.16, "weak"),  # ... the student on neither: a 0.64 lead
    (0.6, 0.16, "rest"),  # teacher only mid on one task (1.5 x 0.4)
    (3.0, 2.25, "weak"),  # a 0.75 lead is weak now
    (4.0, 3.5, "key"),  # a 0.5 lead is not
    (2.25, 0.8, "weak"),
    (0.16, 4.0, "rest"),
]


def test_split_areas_with_the_spec_defaults() -> None:
    spec = DistillSpec()
    score_t = torch.tensor([[c[0] for c in DEFAULT_CASES]])
    score_s = torch.tensor([[c[1] for c in DEFAULT_CASES]])
    key, weak = split_areas(score_t, score_s, tau_key=spec.tau_key, tau_weak=spec.tau_weak)
    assert key.tolist() == [[c[2] == "key" for c in DEFAULT_CASES]]
    assert weak.tolist() == [[c[2] == "weak" for c in DEFAULT_CASES]]


def test_split_areas_thresholds_are_inclusive() -> None:
    score_t = torch.tensor([[2.0, 2.0, 1.9375]])
    score_s = torch.tensor([[1.5, 1.5625, 0.0]])
    # tau_key 2.0: 2.0 counts, 1.9375 does not; tau_weak 0.5: a 0.5 difference is weak.
    key, weak = split_areas(score_t, score_s, tau_key=2.0, tau_weak=0.5)
    assert key.tolist() == [[False, True, False]]
    assert weak.tolist() == [[True, False, False]]


def test_split_areas_without_weak_areas_puts_all_significant_locations_in_key() -> None:
    score_t = torch.tensor([[c[0] for c in AREA_CASES]])
    score_s = torch.tensor([[c[1] for c in AREA_CASES]])
    key, weak = split_areas(score_t, score_s, **TID_MD, weak_areas=False)
    assert key.tolist() == [[c[0] >= 2.25 for c in AREA_CASES]]
    assert weak.dtype == torch.bool
    assert not weak.any()


def test_point_match_scores_the_class_without_looking_at_the_box() -> None:
    # Every case's location centre (8, 8) lies inside GT, so the class alone decides: the
    # boxes at IoU 0.4 and 0 with the right class p=0.9 now count as right (2.0).
    score = task_significance([case_outputs()], one_gt(), tasks=("cls",), cls_match="point")[0]
    expected_c = [2.0, 2.0, 1.5, 1.5, 0.4, 0.4, 2.0, 2.0, 2.0, 0.4, 2.0]
    torch.testing.assert_close(score, torch.tensor([[c**2 for c in expected_c]]))
    # the regression score is the same under both matches
    for match in ("box", "point"):
        reg = task_significance([case_outputs()], one_gt(), tasks=("reg",), cls_match=match)[0]
        torch.testing.assert_close(reg, torch.tensor([[c[4] ** 2 for c in CASES]]))


def test_point_match_outside_every_gt_is_no_object_even_with_a_perfect_box() -> None:
    outside = [32.0, 32.0, 48.0, 48.0]  # centre (40, 40), not in GT
    outputs = make_outputs([[IOU_1, IOU_1]], [[probs_row(1, 0.9)] * 2], anchors=[ANCHOR, outside])
    box = task_significance([outputs], one_gt(), cls_match="box")[0]
    point = task_significance([outputs], one_gt(), cls_match="point")[0]
    torch.testing.assert_close(box, torch.tensor([[4.0, 4.0]]))
    torch.testing.assert_close(point, torch.tensor([[4.0, 0.8]]))  # 0.4 * 2.0


def test_point_match_takes_the_smallest_gt_containing_the_centre() -> None:
    inner, outer = [4.0, 4.0, 12.0, 12.0], [0.0, 0.0, 32.0, 32.0]  # both contain (8, 8)
    targets = [{"boxes": torch.tensor([outer, inner]), "labels": torch.tensor([2, 1])}]
    logits = [[probs_row(1, 0.9), probs_row(2, 0.9)]]
    outputs = make_outputs([[IOU_0, IOU_0]], logits)
    score = task_significance([outputs], targets, tasks=("cls",), cls_match="point")[0]
    torch.testing.assert_close(score, torch.tensor([[4.0, 0.16]]))  # inner's label 1 is right


def test_point_match_without_gt_is_lowest_everywhere() -> None:
    outputs = make_outputs([[IOU_1, IOU_0]], [[probs_row(1, 0.9)] * 2])
    score = task_significance([outputs], [no_gt()], cls_match="point")[0]
    torch.testing.assert_close(score, torch.full((1, 2), 0.16))


def test_task_significance_rejects_unknown_cls_match() -> None:
    with pytest.raises(ValueError, match="cls_match must be 'box' or 'point'"):
        task_significance([case_outputs()], one_gt(), cls_match="centre")


# ---- ablations: one task only changes the areas ------------------------------------------------


def test_cls_only_keeps_right_class_bad_box_student_location_in_key() -> None:
    # teacher: perfect box, right class p=0.9 at both locations.
    # student loc 0: right class p=0.9 but mid box (IoU 0.45); loc 1: perfect box, wrong class.
    teacher = make_outputs([[IOU_1, IOU_1]], [[probs_row(1, 0.9), probs_row(1, 0.9)]])
    student = make_outputs([[IOU_045, IOU_1]], [[probs_row(1, 0.9), probs_row(2, 0.9)]])
    masks = {}
    for tasks in [("cls", "reg"), ("cls",), ("reg",)]:
        score_t, score_s = task_significance([teacher, student], one_gt(), tasks=tasks)
        key, weak = split_areas(score_t, score_s, **TID_MD)
        masks[tasks] = (key.tolist(), weak.tolist())
    # both tasks: student scores 3 and 0.8 vs teacher 4 -> both weak
    assert masks[("cls", "reg")] == ([[False, False]], [[True, True]])
    # cls only: student 4 (right class) and 0.16 -> key, weak
    assert masks[("cls",)] == ([[True, False]], [[False, True]])
    # reg only: student 2.25 (mid box) and 4 (perfect box) -> weak, key
    assert masks[("reg",)] == ([[False, True]], [[True, False]])


def test_reg_only_makes_teacher_right_box_wrong_class_location_key() -> None:
    teacher = make_outputs([[IOU_1]], [[probs_row(2, 0.9)]])  # wrong class, perfect box
    student = make_outputs([[IOU_1]], [[probs_row(2, 0.9)]])
    for tasks, expected_key in [(("cls", "reg"), False), (("reg",), True), (("cls",), False)]:
        score_t, score_s = task_significance([teacher, student], one_gt(), tasks=tasks)
        key, weak = split_areas(score_t, score_s, **TID_MD)
        assert key.item() is expected_key, tasks
        assert not weak.any()


# ---- SFDM: feature_distance, region_losses ------------------------------------------------------


def test_feature_distance_without_normalize_is_channel_mean_of_squared_difference() -> None:
    f_s = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]])  # [1, 2, 1, 2]
    f_t = torch.tensor([[[[0.0, 0.0]], [[1.0, 1.0]]]])
    d = feature_distance(f_s, f_t, normalize=False)
    # loc 0: (1^2 + 2^2) / 2 = 2.5; loc 1: (2^2 + 3^2) / 2 = 6.5
    assert d.shape == (1, 1, 2)
    assert d.tolist() == [[[2.5, 6.5]]]


def test_feature_distance_with_normalize_standardises_each_channel() -> None:
    f_s = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]])  # channels -> [-1, 1] and [-1, 1]
    f_t = torch.tensor([[[[0.0, 4.0]], [[5.0, 1.0]]]])  # channels -> [-1, 1] and [1, -1]
    d = feature_distance(f_s, f_t, normalize=True, eps=0.0)
    # loc 0: (0^2 + (-2)^2) / 2 = 2; loc 1: (0^2 + 2^2) / 2 = 2
    torch.testing.assert_close(d, torch.tensor([[[2.0, 2.0]]]))


def test_feature_distance_standardises_over_batch_and_space_not_per_image() -> None:
    # One channel, two images of one pixel each: values 1 and 3 standardise to -1 and 1 over N,
    # 5 and 13 to -1 and 1 as well. Per-image standardisation would give 0 everywhere.
    f_s = torch.tensor([1.0, 3.0]).view(2, 1, 1, 1)
    f_t = torch.tensor([13.0, 5.0]).view(2, 1, 1, 1)
    d = feature_distance(f_s, f_t, normalize=True, eps=0.0)
    torch.testing.assert_close(d, torch.tensor([[[4.0]], [[4.0]]]))


def test_feature_distance_with_normalize_ignores_per_channel_scale_and_shift() -> None:
    gen = torch.Generator().manual_seed(0)
    f_s = torch.randn(2, 4, 3, 5, generator=gen)
    f_t = torch.randn(2, 4, 3, 5, generator=gen)
    scale = torch.tensor([0.5, 2.0, 10.0, 3.0]).view(1, 4, 1, 1)
    shift = torch.tensor([-1.0, 5.0, 0.0, 100.0]).view(1, 4, 1, 1)
    plain = feature_distance(f_s, f_t, normalize=True)
    moved = feature_distance(f_s * scale + shift, f_t, normalize=True)
    torch.testing.assert_close(plain, moved, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(plain, feature_distance(f_s * scale, f_t, normalize=False))


def test_feature_distance_guards_constant_channels_with_eps() -> None:
    f_s = torch.ones(1, 2, 1, 1)
    d = feature_distance(f_s, 2 * f_s, normalize=True)
    assert torch.isfinite(d).all()
    assert d.item() == 0.0


D1 = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])  # [1, 2, 2]: N_l = 4
D2 = torch.tensor([[[10.0, 20.0]]])  # [1, 1, 2]: N_l = 2


def test_region_losses_divide_by_level_location_count_not_region_size() -> None:
    # level 0: locations 0-3, level 1: 4-5; key: D1's first and D2's second, weak: D1's last
    key = [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    weak = [0.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    out = region_losses([D1, D2], torch.tensor([[key], [weak]]))
    # key: 1 / 4 + 20 / 2 = 10.25 (per-region means would give 1 + 20 = 21); weak: 4 / 4
    assert out.tolist() == pytest.approx([10.25, 1.0])


def test_region_losses_with_a_full_mask_is_the_sum_of_the_level_means() -> None:
    out = region_losses([D1, D2], torch.ones(1, 1, 6))
    assert out.tolist() == pytest.approx([2.5 + 15.0])


def test_region_losses_empty_region_is_zero() -> None:
    out = region_losses([D1, D2], torch.zeros(1, 1, 6))
    assert out.tolist() == [0.0]


def test_region_losses_sum_over_the_images_of_a_batch() -> None:
    # two images: each level's mean is over N * H_l * W_l locations
    distances = [torch.cat([D1, 3 * D1]), torch.cat([D2, D2])]
    out = region_losses(distances, torch.ones(1, 2, 6))
    assert out.tolist() == pytest.approx([(10.0 + 30.0) / 8 + 60.0 / 4])


# ---- TIDLoss ------------------------------------------------------------------------------------

SHAPES = [(2, 2), (1, 2)]  # level 0: locations 0-3, level 1: locations 4-5


def tid_loss(**overrides: object) -> TIDLoss:
    options: dict[str, object] = {
        "levels": (0, 1),
        "tasks": ("cls", "reg"),
        "weak_areas": True,
        "alpha": 2.0,
        "beta": 4.0,
        "gamma": 0.5,
        "pos_iou": 0.5,
        "neg_iou": 0.4,
        "p_min": 0.05,
        "cls_match": "box",
        "tau_key": 2.25,
        "tau_weak": 0.9,
        "normalize": False,
        "areas": "significance",
    }
    options.update(overrides)
    return TIDLoss(**options)  # type: ignore[arg-type]


def area_pair(features_s: list[Tensor], features_t: list[Tensor]) -> tuple[DetectorOutputs, ...]:
    """Teacher/student with key = {0, 4}, weak = {1, 3}, rest = {2, 5}."""
    right = probs_row(1, 0.9)
    teacher = make_outputs(
        [[IOU_1, IOU_1, IOU_0, IOU_1, IOU_1, IOU_0]],
        [[right] * 6],
        level_shapes=SHAPES,
        features=features_t,
    )
    student = make_outputs(
        [[IOU_1, IOU_0, IOU_1, IOU_045, IOU_1, IOU_1]],
        [[right] * 6],
        level_shapes=SHAPES,
        features=features_s,
    )
    return student, teacher


def known_distance_features() -> tuple[list[Tensor], list[Tensor]]:
    """Teacher zeros, student value v at a location in both channels: d = v^2, v = 1..6."""
    student = [
        torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2).expand(1, 2, 2, 2).clone(),
        torch.tensor([5.0, 6.0]).view(1, 1, 1, 2).expand(1, 2, 1, 2).clone(),
    ]
    return student, [torch.zeros_like(f) for f in student]


def test_tid_loss_area_masks_of_constructed_pair() -> None:
    student, teacher = area_pair([], [])
    key, weak = tid_loss().area_masks(student, teacher, one_gt())
    assert key.tolist() == [[True, False, False, False, True, False]]
    assert weak.tolist() == [[False, True, False, True, False, False]]


@pytest.mark.parametrize("cls_match", ["box", "point"])
def test_task_significance_scores_each_detector_as_if_alone(cls_match: str) -> None:
    # TIDLoss scores teacher and student in one call: batching them must not mix their scores
    student, teacher = area_pair([], [])
    both = task_significance([teacher, student], one_gt(), cls_match=cls_match)
    assert both.shape == (2, 1, 6)
    assert not torch.equal(both[0], both[1])
    for scores, outputs in zip(both, [teacher, student], strict=True):
        alone = task_significance([outputs], one_gt(), cls_match=cls_match)
        assert torch.equal(scores, alone[0])


def test_tid_loss_terms_equal_hand_computed_weighted_means() -> None:
    fs, ft = known_distance_features()
    student, teacher = area_pair(fs, ft)
    out, stats = tid_loss()(student, teacher, one_gt())
    # d = 1, 4, 9, 16 on level 0 (N_l 4) and 25, 36 on level 1 (N_l 2)
    assert out["tid_key"].item() == pytest.approx(2.0 * (1 / 4 + 25 / 2))  # 25.5
    assert out["tid_weak"].item() == pytest.approx(4.0 * (4 + 16) / 4)  # 20
    assert out["tid_rest"].item() == pytest.approx(0.5 * (9 / 4 + 36 / 2))  # 10.125
    assert stats["tid_key_frac"].item() == pytest.approx(2 / 6)
    assert stats["tid_weak_frac"].item() == pytest.approx(2 / 6)


@pytest.mark.parametrize(
    ("level", "expected"),
    [(0, (2.0 * 1 / 4, 4.0 * 20 / 4, 0.5 * 9 / 4)), (1, (2.0 * 25 / 2, 0.0, 0.5 * 36 / 2))],
)
def test_tid_loss_on_one_level_uses_that_levels_masks(
    level: int, expected: tuple[float, float, float]
) -> None:
    fs, ft = known_distance_features()
    student, teacher = area_pair([fs[level]], [ft[level]])
    out, _ = tid_loss(levels=(level,))(student, teacher, one_gt())
    got = (out["tid_key"].item(), out["tid_weak"].item(), out["tid_rest"].item())
    assert got == pytest.approx(expected)


def test_tid_loss_without_weak_areas_moves_weak_locations_to_key() -> None:
    fs, ft = known_distance_features()
    student, teacher = area_pair(fs, ft)
    out, _ = tid_loss(weak_areas=False)(student, teacher, one_gt())
    assert out["tid_key"].item() == pytest.approx(2.0 * ((1 + 4 + 16) / 4 + 25 / 2))
    assert out["tid_weak"].item() == 0.0
    assert out["tid_rest"].item() == pytest.approx(0.5 * (9 / 4 + 36 / 2))


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("weak_areas", [False, True])
@pytest.mark.parametrize("tasks", [("cls", "reg"), ("cls",), ("reg",)])
def test_tid_loss_is_zero_when_features_match(
    normalize: bool, weak_areas: bool, tasks: tuple[str, ...]
) -> None:
    gen = torch.Generator().manual_seed(1)
    ft = [torch.randn(1, 8, h, w, generator=gen) for h, w in SHAPES]
    student, teacher = area_pair([f.clone() for f in ft], ft)
    out, _ = tid_loss(normalize=normalize, weak_areas=weak_areas, tasks=tasks)(
        student, teacher, one_gt()
    )
    assert set(out) == {"tid_key", "tid_weak", "tid_rest"}
    assert all(v.item() == 0.0 for v in out.values())


def test_tid_loss_with_unit_weights_equals_pkd() -> None:
    gen = torch.Generator().manual_seed(2)
    fs = [torch.randn(1, 8, h, w, generator=gen) * 3 + 1 for h, w in SHAPES]
    ft = [torch.randn(1, 8, h, w, generator=gen) for h, w in SHAPES]
    student, teacher = area_pair(fs, ft)
    tid, _ = tid_loss(alpha=1.0, beta=1.0, gamma=1.0, normalize=True)(student, teacher, one_gt())
    pkd_terms, pkd_stats = pkd_loss()(student, teacher, one_gt())
    pkd = pkd_terms["pkd"]
    assert pkd_stats == {}
    assert pkd.item() > 0.1
    torch.testing.assert_close(sum(tid.values()), pkd)


def test_tid_loss_sum_equals_weighted_mean_from_its_masks() -> None:
    gen = torch.Generator().manual_seed(3)
    fs = [torch.randn(1, 8, h, w, generator=gen) for h, w in SHAPES]
    ft = [torch.randn(1, 8, h, w, generator=gen) for h, w in SHAPES]
    student, teacher = area_pair(fs, ft)
    out, _ = tid_loss()(student, teacher, one_gt())
    weights = [2.0, 4.0, 0.5, 4.0, 2.0, 0.5]  # key, weak, rest, weak, key, rest
    expected = 0.0
    for i, (h, w) in enumerate([(y, x) for y in range(2) for x in range(2)]):
        d = (fs[0][0, :, h, w] - ft[0][0, :, h, w]).pow(2).mean().item()
        expected += weights[i] * d / 4
    for j in range(2):
        d = (fs[1][0, :, 0, j] - ft[1][0, :, 0, j]).pow(2).mean().item()
        expected += weights[4 + j] * d / 2
    total = out["tid_key"] + out["tid_weak"] + out["tid_rest"]
    assert total.item() == pytest.approx(expected, rel=1e-5)


def test_tid_loss_gradient_reaches_student_features() -> None:
    fs, ft = known_distance_features()
    fs = [f.requires_grad_(True) for f in fs]
    student, teacher = area_pair(fs, ft)
    out, _ = tid_loss()(student, teacher, one_gt())
    sum(out.values()).backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in fs)


# ---- the ground-truth control -------------------------------------------------------------------


def test_ground_truth_areas_are_the_locations_inside_a_gt_box() -> None:
    # centres (8, 8) and (40, 40) inside the two GT boxes of image 0, (24, 24) in neither;
    # image 1 has no GT: all rest
    centres = [[0.0, 0.0, 16.0, 16.0], [16.0, 16.0, 32.0, 32.0], [32.0, 32.0, 48.0, 48.0]]
    outputs = make_outputs([[IOU_0] * 3] * 2, [[probs_row(1, 0.9)] * 3] * 2, anchors=centres)
    second = [36.0, 36.0, 44.0, 44.0]
    targets = [{"boxes": torch.tensor([GT, second]), "labels": torch.tensor([1, 0])}, no_gt()]
    areas = ground_truth_areas(outputs, targets)
    assert areas.tolist() == [[True, False, True], [False, False, False]]


def test_tid_loss_with_ground_truth_areas_weights_the_gt_locations_as_key() -> None:
    # area_pair's scores would make {0, 4} key and {1, 3} weak; with GT areas every location
    # whose centre (8, 8) is in GT is key, whatever the scores, and none is weak
    fs, ft = known_distance_features()
    student, teacher = area_pair(fs, ft)
    out, stats = tid_loss(areas="ground_truth")(student, teacher, one_gt())
    assert out["tid_key"].item() == pytest.approx(2.0 * ((1 + 4 + 9 + 16) / 4 + (25 + 36) / 2))
    assert out["tid_weak"].item() == 0.0 and out["tid_rest"].item() == 0.0
    assert stats["tid_key_frac"].item() == 1.0 and stats["tid_weak_frac"].item() == 0.0
    out, stats = tid_loss(areas="ground_truth")(student, teacher, [no_gt()])
    assert out["tid_key"].item() == 0.0 and stats["tid_key_frac"].item() == 0.0
    assert out["tid_rest"].item() == pytest.approx(0.5 * (30 / 4 + 61 / 2))


def test_ground_truth_areas_reach_the_loss_from_the_spec() -> None:
    loss = DISTILL_METHODS["tid"](DistillSpec(method="tid", areas="ground_truth"))
    assert isinstance(loss, TIDLoss) and loss.areas == "ground_truth"
    with pytest.raises(ValueError, match="areas must be"):
        tid_loss(areas="boxes")
