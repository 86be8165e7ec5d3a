"""Deterministic synthetic "shapes" detection dataset in COCO layout.

It lets training, distillation and evaluation run end to end without downloading COCO, and it is
hard enough to be a real check: cluttered gradient backgrounds, occlusion, empty images and
objects of every COCO size bucket (small, medium, large) at 128 px.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import secrets
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

CATEGORIES: Final[tuple[str, ...]] = ("circle", "square", "triangle", "star", "cross")
SPLITS: Final[tuple[str, ...]] = ("train", "val")
PARAMS_FILE: Final = "shapes.json"
FORMAT_VERSION: Final = 1  # bump whenever the drawing changes, so stale folders are refused

MIN_IMAGE_SIZE: Final = 32
MIN_VISIBLE_FRACTION: Final = 0.3
EMPTY_IMAGE_PROB: Final = 0.05
MAX_OBJECTS: Final = 6
MIN_SIDE_FRACTION: Final = 0.06
MAX_SIDE_FRACTION: Final = 0.9
MIN_CONTRAST: Final = 150.0  # L1 distance over RGB between object colour and what lies under it
PNG_COMPRESS_LEVEL: Final = 6


def _regular_polygon(num: int, *, radius: float = 1.0, phase: float = -math.pi / 2) -> NDArray[Any]:
    angles = phase + 2.0 * math.pi * np.arange(num) / num
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _star() -> NDArray[Any]:
    outer = _regular_polygon(5)
    inner = _regular_polygon(5, radius=0.45, phase=-math.pi / 2 + math.pi / 5)
    return np.stack([outer, inner], axis=1).reshape(-1, 2)


_ARM: Final = 1.0 / 3.0
# Unit outlines centred on the origin within [-1, 1]^2; the circle is drawn as an ellipse instead.
_OUTLINES: Final[dict[str, NDArray[Any]]] = {
    "square": np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]]),
    "triangle": _regular_polygon(3),
    "star": _star(),
    "cross": np.array(
        [
            [-_ARM, -1.0],
            [_ARM, -1.0],
            [_ARM, -_ARM],
            [1.0, -_ARM],
            [1.0, _ARM],
            [_ARM, _ARM],
            [_ARM, 1.0],
            [-_ARM, 1.0],
            [-_ARM, _ARM],
            [-1.0, _ARM],
            [-1.0, -_ARM],
            [-_ARM, -_ARM],
        ]
    ),
}


def _params(*, num_train: int, num_val: int, image_size: int, seed: int) -> dict[str, int]:
    """Validate the generator arguments; the returned dict is also the folder's fingerprint."""
    checks = {
        "num_train": (num_train, 1),
        "num_val": (num_val, 1),
        "image_size": (image_size, MIN_IMAGE_SIZE),
        "seed": (seed, 0),
    }
    for name, (value, low) in checks.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")
    return {
        "format_version": FORMAT_VERSION,
        "num_train": num_train,
        "num_val": num_val,
        "image_size": image_size,
        "seed": seed,
    }


def _background(rng: np.random.Generator, size: int) -> NDArray[np.uint8]:
    """A smooth two-colour gradient in a random direction plus pixel noise."""
    start, end = rng.uniform(0.0, 255.0, size=(2, 3))
    theta = rng.uniform(0.0, 2.0 * math.pi)
    coords = np.arange(size, dtype=np.float64) / max(size - 1, 1)
    ramp = math.cos(theta) * coords[None, :] + math.sin(theta) * coords[:, None]
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-9)
    image = start + ramp[:, :, None] * (end - start)
    image += rng.normal(0.0, 8.0, size=image.shape)
    pixels: NDArray[np.uint8] = np.clip(image, 0.0, 255.0).astype(np.uint8)
    return pixels


def _random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    red, green, blue = (int(c) for c in rng.integers(0, 256, size=3))
    return red, green, blue


def _draw_clutter(rng: np.random.Generator, image: Image.Image) -> None:
    """Thin lines and small blobs that are not annotated, so detectors cannot fire on any edge."""
    size = image.width
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 8))):
        x0, y0, x1, y1 = (float(v) for v in rng.uniform(0.0, size, size=4))
        draw.line([(x0, y0), (x1, y1)], fill=_random_colour(rng), width=1)
    max_radius = max(1.0, 0.025 * size)
    for _ in range(int(rng.integers(2, 10))):
        cx, cy = (float(v) for v in rng.uniform(0.0, size, size=2))
        radius = float(rng.uniform(1.0, max_radius))
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        draw.ellipse(box, fill=_random_colour(rng))


def _object_mask(rng: np.random.Generator, *, category: str, size: int) -> Image.Image:
    """Draw one object of log-uniform size, random aspect, rotation and position into a mask."""
    side = math.exp(
        rng.uniform(math.log(MIN_SIDE_FRACTION * size), math.log(MAX_SIDE_FRACTION * size))
    )
    aspect = math.exp(rng.uniform(math.log(0.75), math.log(1.33)))
    half = np.array([side * aspect, side / aspect]) / 2.0
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    if category == "circle":
        centre = rng.uniform(np.minimum(half, size - half), np.maximum(half, size - half))
        draw.ellipse([*(centre - half), *(centre + half)], fill=255)
        return mask
    theta = rng.uniform(0.0, 2.0 * math.pi)
    rotation = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    points = (_OUTLINES[category] * half) @ rotation.T
    low, high = points.min(axis=0), points.max(axis=0)
    # Keep the outline inside the image when it fits, otherwise let the image crop it.
    centre = rng.uniform(np.minimum(-low, size - high), np.maximum(-low, size - high))
    draw.polygon([(float(x), float(y)) for x, y in points + centre], fill=255)
    return mask


def _contrasting_colour(rng: np.random.Generator, under: NDArray[np.uint8]) -> tuple[int, int, int]:
    """A random colour far enough from the pixels it covers; the inverse of them as a fallback."""
    mean = under.reshape(-1, 3).mean(axis=0)
    for _ in range(10):
        colour = _random_colour(rng)
        if float(np.abs(np.array(colour) - mean).sum()) >= MIN_CONTRAST:
            return colour
    red, green, blue = (int(255 - c) for c in mean)
    return red, green, blue


def _render_image(
    rng: np.random.Generator, size: int
) -> tuple[Image.Image, list[tuple[int, list[int], int]]]:
    """Render one image; returns it with (category index, visible xywh box, visible area) rows."""
    canvas = Image.fromarray(_background(rng, size))
    _draw_clutter(rng, canvas)
    pixels = np.array(canvas)
    instance_map = np.zeros((size, size), dtype=np.int32)  # 0 = no object, k = k-th object
    num_objects = 0 if rng.random() < EMPTY_IMAGE_PROB else int(rng.integers(1, MAX_OBJECTS + 1))
    drawn: list[tuple[int, int]] = []  # (category index, full pixel count)
    for instance in range(1, num_objects + 1):
        category = int(rng.integers(len(CATEGORIES)))
        covered = np.asarray(_object_mask(rng, category=CATEGORIES[category], size=size)) > 0
        full_area = int(covered.sum())
        if full_area == 0:
            continue
        pixels[covered] = _contrasting_colour(rng, pixels[covered])
        instance_map[covered] = instance
        drawn.append((category, full_area))
    visible_counts = np.bincount(instance_map.ravel(), minlength=num_objects + 1)
    objects: list[tuple[int, list[int], int]] = []
    for instance, (category, full_area) in enumerate(drawn, start=1):
        visible = int(visible_counts[instance])
        if visible < MIN_VISIBLE_FRACTION * full_area:
            continue
        rows, cols = np.nonzero(instance_map == instance)
        x, y = int(cols.min()), int(rows.min())
        box = [x, y, int(cols.max()) - x + 1, int(rows.max()) - y + 1]
        objects.append((category, box, visible))
    return Image.fromarray(pixels), objects


def _write_split(root: Path, *, split: str, num_images: int, size: int, seed: int) -> None:
    """Write one split's PNGs and its instances json; the split index keeps the streams apart."""
    split_index = SPLITS.index(split)
    image_dir = root / split
    image_dir.mkdir(parents=True)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for image_id in range(1, num_images + 1):
        rng = np.random.default_rng([seed, split_index, image_id])
        image, objects = _render_image(rng, size)
        file_name = f"{image_id:012d}.png"
        image.save(image_dir / file_name, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        for category, box, area in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category + 1,
                    "bbox": box,
                    "area": area,
                    "iscrowd": 0,
                }
            )
    content = {
        "info": {"description": f"synthetic shapes ({split})", "version": str(FORMAT_VERSION)},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": index + 1, "name": name, "supercategory": "shape"}
            for index, name in enumerate(CATEGORIES)
        ],
    }
    ann_file = root / "annotations" / f"instances_{split}.json"
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    ann_file.write_text(json.dumps(content, sort_keys=True, separators=(",", ":")) + "\n")


def _is_complete(out: Path, params: dict[str, int]) -> bool:
    """True when `out` holds a finished dataset made with `params`, False when it is empty.

    Anything else is refused: overwriting a folder we did not make could destroy user data.
    """
    if not any(out.iterdir()):
        return False
    params_file = out / PARAMS_FILE
    try:
        stored = json.loads(params_file.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(
            f"out: expected an empty folder or a shapes dataset, got {out} without a readable "
            f"{PARAMS_FILE} ({error})"
        ) from error
    if stored != params:
        raise ValueError(f"out: expected a shapes dataset made with {params}, got {stored} ({out})")
    counts = {"train": params["num_train"], "val": params["num_val"]}
    for split, count in counts.items():
        ann_file = out / "annotations" / f"instances_{split}.json"
        found = len(list((out / split).glob("*.png"))) if (out / split).is_dir() else 0
        if not ann_file.is_file() or found != count:
            raise ValueError(
                f"out: expected a complete shapes dataset with {count} {split} images and "
                f"{ann_file}, got {found} images at {out}"
            )
    return True


def generate_shapes(out: Path, *, num_train: int, num_val: int, image_size: int, seed: int) -> Path:
    """Create the dataset at `out` (or reuse an identical one) and return `out`.

    Files are written to a hidden sibling folder and renamed into place, so `out` is either
    absent, empty or complete, even if the process dies or two processes race.
    """
    params = _params(num_train=num_train, num_val=num_val, image_size=image_size, seed=seed)
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"out: expected a folder, got a file at {out}")
        if _is_complete(out, params):
            logger.info("shapes dataset already present at %s", out)
            return out
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        for split, count in (("train", num_train), ("val", num_val)):
            _write_split(staging, split=split, num_images=count, size=image_size, seed=seed)
        (staging / PARAMS_FILE).write_text(json.dumps(params, sort_keys=True) + "\n")
        try:
            staging.replace(out)  # atomic; also replaces an empty folder
        except OSError:
            # Another process finished first: accept its result if it is the same dataset.
            if not (out.is_dir() and _is_complete(out, params)):
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    logger.info("wrote shapes dataset to %s", out)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, required=True, help="dataset folder to create")
    parser.add_argument("--num-train", type=int, default=512)
    parser.add_argument("--num-val", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = generate_shapes(
            args.out,
            num_train=args.num_train,
            num_val=args.num_val,
            image_size=args.image_size,
            seed=args.seed,
        )
    except ValueError as error:
        parser.error(str(error))
    print(  # noqa: T201
        f"shapes dataset at {out}: {args.num_train} train, {args.num_val} val images of "
        f"{args.image_size} px, seed {args.seed}"
    )


if __name__ == "__main__":
    main()
