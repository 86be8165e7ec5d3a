"""Deterministic synthetic "shapes" detection dataset in COCO layout.

It lets training, distillation and evaluation run end to end without downloading COCO, and it is
hard enough to be a real check: cluttered gradient backgrounds, occlusion, empty images and
objects of every COCO size bucket (small, medium, large) at 128 px.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw

from tid_core.data import generator
from tid_core.data.generator import (
    CROSS,
    SQUARE,
    TRIANGLE,
    Annotation,
    Builtin,
    Category,
    Occlusion,
    centre_range,
    contrasting_colour,
    random_colour,
    regular_polygon,
    rotation,
)

CATEGORIES: Final[tuple[str, ...]] = ("circle", "square", "triangle", "star", "cross")
FORMAT_VERSION: Final = 1  # bump whenever the drawing changes, so stale folders are refused

MIN_VISIBLE_FRACTION: Final = 0.3
EMPTY_IMAGE_PROB: Final = 0.05
MAX_OBJECTS: Final = 6
MIN_SIDE_FRACTION: Final = 0.06
MAX_SIDE_FRACTION: Final = 0.9


def _star() -> NDArray[Any]:
    outer = regular_polygon(5)
    inner = regular_polygon(5, radius=0.45, phase=-math.pi / 2 + math.pi / 5)
    return np.stack([outer, inner], axis=1).reshape(-1, 2)


# Unit outlines centred on the origin within [-1, 1]^2; the circle is drawn as an ellipse instead.
_OUTLINES: Final[dict[str, NDArray[Any]]] = {
    "square": SQUARE,
    "triangle": TRIANGLE,
    "star": _star(),
    "cross": CROSS,
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


def _draw_clutter(rng: np.random.Generator, image: Image.Image) -> None:
    """Thin lines and small blobs that are not annotated, so detectors cannot fire on any edge."""
    size = image.width
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 8))):
        x0, y0, x1, y1 = (float(v) for v in rng.uniform(0.0, size, size=4))
        draw.line([(x0, y0), (x1, y1)], fill=random_colour(rng), width=1)
    max_radius = max(1.0, 0.025 * size)
    for _ in range(int(rng.integers(2, 10))):
        cx, cy = (float(v) for v in rng.uniform(0.0, size, size=2))
        radius = float(rng.uniform(1.0, max_radius))
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        draw.ellipse(box, fill=random_colour(rng))


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
    points = (_OUTLINES[category] * half) @ rotation(rng.uniform(0.0, 2.0 * math.pi)).T
    centre = rng.uniform(*centre_range(points, size))
    draw.polygon([(float(x), float(y)) for x, y in points + centre], fill=255)
    return mask


def _render_image(rng: np.random.Generator, size: int) -> tuple[Image.Image, list[Annotation]]:
    canvas = Image.fromarray(_background(rng, size))
    _draw_clutter(rng, canvas)
    pixels = np.array(canvas)
    occlusion = Occlusion(size)
    num_objects = 0 if rng.random() < EMPTY_IMAGE_PROB else int(rng.integers(1, MAX_OBJECTS + 1))
    for _ in range(num_objects):
        category = int(rng.integers(len(CATEGORIES)))
        covered = np.asarray(_object_mask(rng, category=CATEGORIES[category], size=size)) > 0
        if occlusion.add(category, covered):
            pixels[covered] = contrasting_colour(rng, pixels[covered])
    return Image.fromarray(pixels), occlusion.annotations(MIN_VISIBLE_FRACTION)


SHAPES: Final = Builtin(
    name="shapes",
    format_version=FORMAT_VERSION,
    categories=tuple(Category(index + 1, name, "shape") for index, name in enumerate(CATEGORIES)),
    render=_render_image,
)


def generate_shapes(out: Path, *, num_train: int, num_val: int, image_size: int, seed: int) -> Path:
    """Create the shapes dataset at `out` (or reuse an identical one) and return `out`."""
    return generator.generate(
        SHAPES, out, num_train=num_train, num_val=num_val, image_size=image_size, seed=seed
    )


def main(argv: Sequence[str] | None = None) -> None:
    generator.main(SHAPES, argv, description=__doc__.splitlines()[0] if __doc__ else None)


if __name__ == "__main__":
    main()
