"""COCO box mAP for detector outputs.

faster-coco-eval is the default backend because its C++ evaluation is much faster on full
validation sets; pycocotools is kept as the reference implementation to check it against.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import torch
from faster_coco_eval import COCO, COCOeval_faster
from torch import Tensor

from tid_core.events import COCO_STATS

logger = logging.getLogger(__name__)

Backend = Literal["faster-coco-eval", "pycocotools"]
DEFAULT_BACKEND: Final[Backend] = "faster-coco-eval"


def coco_metrics(
    ann_file: Path,
    predictions: list[dict[str, Any]],
    *,
    backend: Backend = DEFAULT_BACKEND,
) -> dict[str, Any]:
    """Box mAP of ``predictions`` against ``ann_file`` in percent; ``None`` where COCO has no GT.

    All images of the annotation file are evaluated, so images without predictions count as
    misses. ``predictions`` is not modified (both libraries annotate result dicts in place).
    """
    # Both libraries print progress and the summary table to stdout; keep it out of our logs.
    with contextlib.redirect_stdout(io.StringIO()):
        if backend == "faster-coco-eval":
            coco_eval = _faster_eval(ann_file, predictions)
        elif backend == "pycocotools":
            coco_eval = _pycocotools_eval(ann_file, predictions)
        else:
            raise ValueError(f"unknown COCO eval backend {backend!r}")
        coco_eval.params.imgIds = sorted(coco_eval.cocoGt.getImgIds())
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()

    result: dict[str, Any] = {
        name: _percent(float(coco_eval.stats[i])) for i, name in enumerate(COCO_STATS)
    }
    result["per_class"] = _per_class_ap(coco_eval)
    result["backend"] = backend
    result["num_images"] = len(coco_eval.params.imgIds)
    result["num_detections"] = len(predictions)
    logger.info(
        "COCO bbox (%s): AP %s AP50 %s AP75 %s on %d images, %d detections",
        backend,
        _fmt(result["AP"]),
        _fmt(result["AP50"]),
        _fmt(result["AP75"]),
        result["num_images"],
        result["num_detections"],
    )
    return result


def detections_to_coco(
    outputs: list[dict[str, Tensor]],
    image_ids: Sequence[int],
    cat_ids: Sequence[int],
) -> list[dict[str, Any]]:
    """Turn torchvision detector outputs into COCO result dicts (xywh, the file's category ids).

    ``labels`` are contiguous class indices, so ``cat_ids[label]`` restores the annotation
    file's (possibly non-contiguous) category id.
    """
    if len(outputs) != len(image_ids):
        raise ValueError(f"{len(outputs)} outputs but {len(image_ids)} image ids")
    results: list[dict[str, Any]] = []
    for output, image_id in zip(outputs, image_ids, strict=True):
        boxes = output["boxes"].detach().float().cpu()
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        scores = output["scores"].detach().float().cpu().tolist()
        labels = output["labels"].detach().cpu().tolist()
        for box, score, label in zip(xywh, scores, labels, strict=True):
            results.append(
                {
                    "image_id": int(image_id),
                    "category_id": int(cat_ids[label]),
                    "bbox": [round(v, 3) for v in box],
                    "score": round(score, 5),
                }
            )
    return results


def _faster_eval(ann_file: Path, predictions: list[dict[str, Any]]) -> Any:
    """Build a faster-coco-eval evaluator; its logger output is silenced, not just stdout."""
    coco_gt = COCO(str(ann_file), print_function=logger.debug)
    coco_dt = _load_results(coco_gt, predictions)
    return COCOeval_faster(coco_gt, coco_dt, iouType="bbox", print_function=logger.debug)


def _pycocotools_eval(ann_file: Path, predictions: list[dict[str, Any]]) -> Any:
    """Build the reference pycocotools evaluator (a dev-only dependency, hence the lazy import)."""
    from pycocotools.coco import COCO as PyCOCO
    from pycocotools.cocoeval import COCOeval

    coco_gt = PyCOCO(str(ann_file))
    coco_dt = _load_results(coco_gt, predictions)
    return COCOeval(coco_gt, coco_dt, iouType="bbox")


def _load_results(coco_gt: Any, predictions: list[dict[str, Any]]) -> Any:
    """Load results into the GT's COCO class; an empty list gets an empty result set.

    pycocotools' ``loadRes`` indexes ``anns[0]`` and so fails on an empty list.
    """
    if predictions:
        return coco_gt.loadRes([dict(p) for p in predictions])
    coco_dt = type(coco_gt)()
    coco_dt.dataset = {
        "images": list(coco_gt.dataset["images"]),
        "categories": list(coco_gt.dataset["categories"]),
        "annotations": [],
    }
    coco_dt.createIndex()
    return coco_dt


def _per_class_ap(coco_eval: Any) -> dict[str, float | None]:
    """Per-category AP@[.5:.95], all areas, last maxDets, from the accumulated precision.

    precision has shape [T, R, K, A, M]; -1 marks categories without GT.
    """
    precision = np.asarray(coco_eval.eval["precision"])
    per_class: dict[str, float | None] = {}
    for k, cat_id in enumerate(coco_eval.params.catIds):
        values = precision[:, :, k, 0, -1]
        values = values[values > -1]
        name = coco_eval.cocoGt.cats[cat_id]["name"]
        per_class[name] = float(np.mean(values)) * 100.0 if values.size else None
    return per_class


def _percent(value: float) -> float | None:
    """COCO stats as percent, with its -1 (no GT in range) mapped to ``None``."""
    return None if value < 0 else value * 100.0


def _fmt(value: float | None) -> str:
    """Format a metric for the log line."""
    return "n/a" if value is None else f"{value:.2f}"
