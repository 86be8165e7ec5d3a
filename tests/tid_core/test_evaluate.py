"""COCO mAP: faster-coco-eval must agree with the pycocotools reference."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tid_core.evaluate import DEFAULT_BACKEND, Backend, coco_metrics, detections_to_coco

# Non-contiguous ids like real COCO; "zebra" has no GT at all.
CATEGORIES = [
    {"id": 1, "name": "cat"},
    {"id": 5, "name": "dog"},
    {"id": 9, "name": "bird"},
    {"id": 12, "name": "zebra"},
]
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
# Side lengths on either side of COCO's 32**2 / 96**2 area thresholds.
SIZES = {"small": (14.0, 22.0), "medium": (40.0, 70.0), "large": (110.0, 180.0)}


def _make_gt(rng: np.random.Generator) -> dict[str, Any]:
    """Five 640x480 images; image 5 has no objects; one crowd box on image 1."""
    images = [{"id": i, "width": 640, "height": 480, "file_name": f"{i}.jpg"} for i in range(1, 6)]
    annotations: list[dict[str, Any]] = []
    for image_id in range(1, 5):
        for cat_id in (1, 5, 9):
            for lo, hi in SIZES.values():
                w, h = rng.uniform(lo, hi, size=2)
                x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
                annotations.append(_ann(image_id, cat_id, [x, y, w, h], crowd=False))
    annotations.append(_ann(1, 5, [300.0, 200.0, 200.0, 150.0], crowd=True))
    for ann_id, ann in enumerate(annotations, start=1):
        ann["id"] = ann_id
    return {"images": images, "annotations": annotations, "categories": CATEGORIES}


def _ann(image_id: int, cat_id: int, bbox: list[float], *, crowd: bool) -> dict[str, Any]:
    x, y, w, h = (float(v) for v in bbox)
    return {
        "image_id": image_id,
        "category_id": cat_id,
        "bbox": [x, y, w, h],
        "area": w * h,
        "iscrowd": int(crowd),
        "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
    }


def _make_predictions(gt: dict[str, Any], rng: np.random.Generator) -> list[dict[str, Any]]:
    """Good, shifted, wrong-class and spurious boxes with varied scores."""
    preds: list[dict[str, Any]] = []
    for ann in gt["annotations"]:
        x, y, w, h = ann["bbox"]
        jitter = rng.normal(0.0, 0.03, size=4) * [w, h, w, h]
        preds.append(
            _pred(ann["image_id"], ann["category_id"], np.array([x, y, w, h]) + jitter, rng)
        )
        shift = rng.uniform(0.15, 0.45) * w
        preds.append(_pred(ann["image_id"], ann["category_id"], [x + shift, y, w, h], rng))
        if rng.random() < 0.4:
            wrong = int(rng.choice([c for c in (1, 5, 9) if c != ann["category_id"]]))
            preds.append(_pred(ann["image_id"], wrong, [x, y, w, h], rng))
    for image_id in range(1, 6):
        for _ in range(4):
            w, h = rng.uniform(10, 150, size=2)
            box = [rng.uniform(0, 640 - w), rng.uniform(0, 480 - h), w, h]
            preds.append(_pred(image_id, int(rng.choice([1, 5, 9])), box, rng))
    return preds


def _pred(image_id: int, cat_id: int, bbox: Any, rng: np.random.Generator) -> dict[str, Any]:
    return {
        "image_id": image_id,
        "category_id": cat_id,
        "bbox": [float(v) for v in bbox],
        "score": float(rng.uniform(0.05, 1.0)),
    }


def _gt_as_predictions(gt: dict[str, Any]) -> list[dict[str, Any]]:
    """Every non-crowd GT box as a score-1 detection."""
    return [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": a["bbox"],
            "score": 1.0,
        }
        for a in gt["annotations"]
        if not a["iscrowd"]
    ]


@pytest.fixture
def gt_data() -> dict[str, Any]:
    return _make_gt(np.random.default_rng(0))


@pytest.fixture
def ann_file(tmp_path: Path, gt_data: dict[str, Any]) -> Path:
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(gt_data))
    return path


def test_fixture_covers_all_area_ranges(gt_data: dict[str, Any]) -> None:
    areas = [a["area"] for a in gt_data["annotations"] if not a["iscrowd"]]
    assert min(areas) < 32**2 < max(areas)
    assert any(32**2 < a < 96**2 for a in areas)
    assert max(areas) > 96**2


def test_faster_coco_eval_matches_pycocotools(
    ann_file: Path, gt_data: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    preds = _make_predictions(gt_data, np.random.default_rng(1))
    snapshot = json.dumps(preds)

    fast = coco_metrics(ann_file, preds)
    ref = coco_metrics(ann_file, preds, backend="pycocotools")

    assert DEFAULT_BACKEND == "faster-coco-eval"
    assert fast["backend"] == "faster-coco-eval"
    assert ref["backend"] == "pycocotools"
    for name in METRICS:
        assert fast[name] is not None
        assert 0.0 < fast[name] < 100.0
        assert fast[name] == pytest.approx(ref[name], abs=1e-6), name
    assert fast["per_class"].keys() == {"cat", "dog", "bird", "zebra"}
    assert fast["per_class"]["zebra"] is None
    assert ref["per_class"]["zebra"] is None
    for name in ("cat", "dog", "bird"):
        assert fast["per_class"][name] == pytest.approx(ref["per_class"][name], abs=1e-6), name
    assert fast["num_images"] == ref["num_images"] == 5
    assert fast["num_detections"] == ref["num_detections"] == len(preds)
    # Neither library may leak prints to stdout nor annotate the caller's dicts.
    assert capsys.readouterr().out == ""
    assert json.dumps(preds) == snapshot


@pytest.mark.parametrize("backend", ["faster-coco-eval", "pycocotools"])
def test_perfect_predictions_give_100(
    ann_file: Path, gt_data: dict[str, Any], backend: Backend
) -> None:
    preds = _gt_as_predictions(gt_data)
    result = coco_metrics(ann_file, preds, backend=backend)
    for name in METRICS:
        assert result[name] == pytest.approx(100.0), name
    assert result["per_class"] == {
        "cat": pytest.approx(100.0),
        "dog": pytest.approx(100.0),
        "bird": pytest.approx(100.0),
        "zebra": None,
    }


@pytest.mark.parametrize("backend", ["faster-coco-eval", "pycocotools"])
def test_images_without_predictions_count_as_misses(
    ann_file: Path, gt_data: dict[str, Any], backend: Backend
) -> None:
    preds = [p for p in _gt_as_predictions(gt_data) if p["image_id"] != 1]
    result = coco_metrics(ann_file, preds, backend=backend)
    assert result["AP"] < 100.0
    assert result["num_images"] == 5


@pytest.mark.parametrize("backend", ["faster-coco-eval", "pycocotools"])
def test_empty_predictions_give_zero(ann_file: Path, backend: Backend) -> None:
    result = coco_metrics(ann_file, [], backend=backend)
    for name in METRICS:
        assert result[name] == 0.0, name
    assert result["per_class"] == {"cat": 0.0, "dog": 0.0, "bird": 0.0, "zebra": None}
    assert result["num_detections"] == 0
    assert result["backend"] == backend


def test_area_range_without_gt_is_none(tmp_path: Path) -> None:
    gt = {
        "images": [{"id": 3, "width": 100, "height": 100, "file_name": "3.jpg"}],
        "annotations": [_ann(3, 5, [10.0, 10.0, 50.0, 50.0], crowd=False) | {"id": 1}],
        "categories": CATEGORIES,
    }
    path = tmp_path / "medium_only.json"
    path.write_text(json.dumps(gt))
    pred = {"image_id": 3, "category_id": 5, "bbox": [10.0, 10.0, 50.0, 50.0], "score": 0.9}
    result = coco_metrics(path, [pred])
    assert result["APm"] == pytest.approx(100.0)
    assert result["APs"] is None
    assert result["APl"] is None
    assert result["per_class"]["cat"] is None


def test_detections_to_coco_converts_boxes_and_labels() -> None:
    outputs = [
        {
            "boxes": torch.tensor([[10.0, 20.0, 50.0, 80.0], [0.0, 0.0, 5.5, 4.25]]),
            "scores": torch.tensor([0.9, 0.25]),
            "labels": torch.tensor([2, 0], dtype=torch.int64),
        },
        {
            "boxes": torch.zeros((0, 4)),
            "scores": torch.zeros(0),
            "labels": torch.zeros(0, dtype=torch.int64),
        },
    ]
    results = detections_to_coco(outputs, [42, 7], [1, 5, 9])
    assert results == [
        {"image_id": 42, "category_id": 9, "bbox": [10.0, 20.0, 40.0, 60.0], "score": 0.9},
        {"image_id": 42, "category_id": 1, "bbox": [0.0, 0.0, 5.5, 4.25], "score": 0.25},
    ]
    assert all(isinstance(v, float) for r in results for v in [*r["bbox"], r["score"]])


def test_detections_to_coco_rejects_misaligned_ids() -> None:
    with pytest.raises(ValueError, match="image ids"):
        detections_to_coco([], [1], [1])
