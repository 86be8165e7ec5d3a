"""COCO box mAP: faster-coco-eval against the pycocotools reference, on the same predictions.

Both run through the trainer's own `tid_core.evaluate.coco_metrics` (read the GT file, load
the results, evaluate, accumulate, summarize, per-class AP), alternately in one process, so
drift hits both alike; the figure is the median of rounds. The GT is the synthetic shapes val
split; the predictions are made from it by a seeded noise model (jittered hits, misses,
duplicates, wrong classes, background false positives; hits score higher only on average).
Exits 1 when the backends differ by more than 1e-6 (percent) in AP, AP50, AP75, APs, APm or APl.

    python bench/coco_eval.py [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, get_args

import numpy as np

from bench import harness
from tid_core.data.synthetic import generate_shapes
from tid_core.evaluate import Backend, coco_metrics
from tid_core.events import COCO_STATS

BACKENDS: tuple[Backend, ...] = get_args(Backend)
TOLERANCE = 1e-6  # percent points, as tests/tid_core/test_evaluate.py compares them


def make_predictions(
    gt: dict[str, Any], *, seed: int, false_positives: float
) -> list[dict[str, Any]]:
    """Detector-like results for `gt`: 90% of objects found with a localisation error that is
    small for most and large for some, 5% of those under the wrong class, ~0.5 duplicates per
    hit, and Poisson(`false_positives`) background boxes per image, rounded like
    `detections_to_coco` rounds real outputs."""
    rng = np.random.default_rng(seed)
    cat_ids = [c["id"] for c in gt["categories"]]
    sizes = {img["id"]: (img["width"], img["height"]) for img in gt["images"]}
    preds: list[dict[str, Any]] = []

    def add(image_id: int, cat_id: int, box: Any, score: float) -> None:
        width, height = sizes[image_id]
        x0, y0 = max(0.0, float(box[0])), max(0.0, float(box[1]))
        x1, y1 = min(width, float(box[0] + box[2])), min(height, float(box[1] + box[3]))
        if x1 - x0 >= 1.0 and y1 - y0 >= 1.0:
            xywh = [round(v, 3) for v in (x0, y0, x1 - x0, y1 - y0)]
            preds.append(
                {
                    "image_id": image_id,
                    "category_id": cat_id,
                    "bbox": xywh,
                    "score": round(score, 5),
                }
            )

    for ann in gt["annotations"]:
        if rng.random() < 0.1:
            continue  # missed
        x, y, w, h = ann["bbox"]
        sigma = rng.choice([0.03, 0.1, 0.25], p=[0.5, 0.35, 0.15])
        cat = ann["category_id"] if rng.random() > 0.05 else int(rng.choice(cat_ids))
        box = np.array([x, y, w, h]) + rng.normal(0.0, sigma, size=4) * [w, h, w, h]
        add(ann["image_id"], cat, box, rng.beta(5, 2))
        for _ in range(rng.poisson(0.5)):
            shifted = np.array([x, y, w, h]) + rng.normal(0.0, 0.3, size=4) * [w, h, w, h]
            add(ann["image_id"], ann["category_id"], shifted, rng.beta(2, 4))
    for image_id, (width, height) in sizes.items():
        for _ in range(rng.poisson(false_positives)):
            w, h = np.exp(rng.uniform(math.log(4), math.log(0.8 * min(width, height)), size=2))
            box = [rng.uniform(0, width - w), rng.uniform(0, height - h), w, h]
            add(image_id, int(rng.choice(cat_ids)), box, rng.beta(1.5, 5))
    return preds


def max_abs_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Largest difference over the summary stats; a stat that is None on one side only is inf."""
    return max(_diff(a[k], b[k]) for k in COCO_STATS)


def _diff(a: float | None, b: float | None) -> float:
    if a is None or b is None:
        return 0.0 if a is b else math.inf
    return abs(a - b)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        root = generate_shapes(
            Path(tmp) / "shapes",
            num_train=1,
            num_val=args.images,
            image_size=args.image_size,
            seed=args.seed,
        )
        ann_file = root / "annotations" / "instances_val.json"
        gt = json.loads(ann_file.read_text())
        preds = make_predictions(gt, seed=args.seed, false_positives=args.false_positives)
        seconds: dict[Backend, list[float]] = {b: [] for b in BACKENDS}
        metrics: dict[Backend, dict[str, Any]] = {}
        for round_ in range(-args.warmup, args.rounds):  # negative rounds warm up, untimed
            for backend in BACKENDS if round_ % 2 == 0 else BACKENDS[::-1]:
                start = time.perf_counter()
                metrics[backend] = coco_metrics(ann_file, preds, backend=backend)
                if round_ >= 0:
                    seconds[backend].append(time.perf_counter() - start)
    fast = statistics.median(seconds["faster-coco-eval"])
    ref = statistics.median(seconds["pycocotools"])
    result: dict[str, Any] = {
        "images": args.images,
        "gt_boxes": len(gt["annotations"]),
        "detections": len(preds),
        "faster_coco_eval_s": round(fast, 4),
        "pycocotools_s": round(ref, 4),
        "speedup": round(ref / fast, 2),
        "max_abs_diff": max_abs_diff(metrics["faster-coco-eval"], metrics["pycocotools"]),
        "tolerance": TOLERANCE,
    }
    result.update({k: metrics["faster-coco-eval"][k] for k in COCO_STATS})
    result["config"] = {k: v for k, v in vars(args).items() if k not in {"json", "quick"}}
    result["reference"] = {k: metrics["pycocotools"][k] for k in COCO_STATS}
    return result


def print_table(result: dict[str, Any]) -> None:
    cfg = result["config"]
    print(
        f"COCO bbox eval: {result['images']} shapes val images of {cfg['image_size']} px, "
        f"{result['gt_boxes']} GT boxes, {result['detections']} detections, "
        f"median of {cfg['rounds']} alternating rounds"
    )
    print(f"{'backend':<18}{'s':>10}{'speedup':>10}")
    print(f"{'pycocotools':<18}{result['pycocotools_s']:>10.3f}{1.0:>10.2f}")
    print(
        f"{'faster-coco-eval':<18}{result['faster_coco_eval_s']:>10.3f}{result['speedup']:>10.2f}"
    )
    print(f"{'metric':<8}{'faster-coco-eval':>18}{'pycocotools':>14}")
    for k in COCO_STATS:
        fast, ref = result[k], result["reference"][k]
        print(f"{k:<8}{_fmt(fast):>18}{_fmt(ref):>14}")
    verdict = "equal" if result["max_abs_diff"] <= TOLERANCE else "DIFFERENT"
    print(f"max abs diff {result['max_abs_diff']:.3g} (tolerance {TOLERANCE:g}): {verdict}")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.6f}"


def main(argv: list[str] | None = None) -> int:
    parser = harness.parser("faster-coco-eval vs pycocotools, side by side.")
    parser.add_argument(
        "--images", type=int, default=5000, help="val images (COCO val2017 has 5000)"
    )
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--false-positives", type=float, default=20.0, help="mean per image")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.rounds = 100, 2
    result = measure(args)
    harness.report(result, print_table, args.json)
    return 0 if result["max_abs_diff"] <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
