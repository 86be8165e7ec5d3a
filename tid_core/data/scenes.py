"""Deterministic synthetic "scenes" detection dataset in COCO layout: a harder second builtin.

`shapes` is easy enough for a small student to match its teacher, which leaves distillation
little to show. Here twelve classes come in confusable pairs (the same outline filled or hollow,
square or slightly elongated, upright or turned 45 degrees, with or without a notch, six or eight
corners), painted over crops of real photographs, overlapping one another, from 8 px to 60% of
the image side, in colours drawn alike for every class. Category ids have gaps, as COCO's do.

An object hidden behind later ones beyond `MIN_VISIBLE_FRACTION` of its pixels is left in the
image but not annotated; a box covers an object's visible pixels, as COCO's do.

The photographs are those scikit-image ships inside its wheel (`skimage/data`; its other
samples are downloaded on first use, so they are not used). They are read from the installed
package, never fetched, and checked against their SHA-256 so a dataset is the same on every
install. Their licences, from the scikit-image docstrings of `skimage.data`:
astronaut (NASA, public domain), brick and gravel (CC0Textures, CC0), camera (Lav Varshney, CC0),
chelsea (Stefan van der Walt, CC0), coffee (Rachel Michetti, CC0), coins (Brooklyn Museum, no
known copyright restrictions), grass (linolafett on DeviantArt, CC0), hubble_deep_field (NASA,
public domain) and rocket (SpaceX, public domain).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final, NamedTuple

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
    regular_polygon,
    rotation,
)

FORMAT_VERSION: Final = 1  # bump whenever the drawing changes, so stale folders are refused

MIN_VISIBLE_FRACTION: Final = 0.3
EMPTY_IMAGE_PROB: Final = 0.03
MAX_OBJECTS: Final = 8
MIN_SIDE: Final = 8.0  # pixels
MAX_SIDE_FRACTION: Final = 0.6
OVERLAP_PROB: Final = 0.5  # chance that an object is placed over an earlier one
MIN_WALL: Final = 1.5  # pixels: the thinnest wall of a hollow shape

# file name in skimage/data -> its SHA-256 (skimage's own registry of them agrees)
PHOTOS: Final[dict[str, str]] = {
    "astronaut.png": "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5",
    "brick.png": "7966caf324f6ba843118d98f7a07746d22f6a343430add0233eca5f6eaaa8fcf",
    "camera.png": "b0793d2adda0fa6ae899c03989482bff9a42d3d5690fc7e3648f2795d730c23a",
    "chelsea.png": "596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb",
    "coffee.png": "cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7",
    "coins.png": "f8d773fc9cfa6f4d8e5942dc34d0a0788fcaed2a4fefbbed0aef5398d7ef4cba",
    "grass.png": "b6b6022426b38936c43a4ac09635cd78af074e90f42ffa8227ac8b7452d39f89",
    "gravel.png": "c48615b451bf1e606fbd72c0aa9f8cc0f068ab7111ef7d93bb9b0f2586440c12",
    "hubble_deep_field.jpg": "3a19c5dd8a927a9334bb1229a6d63711b1c0c767fb27e2286e7c84a3e2c2f5f4",
    "rocket.jpg": "c2dd0de7c538df8d111e479619b129464d0269d0ae5fd18ca91d33a7fdfea95c",
}


class _Shape(NamedTuple):
    """How one class is drawn: a unit outline (centred on the origin, within [-1, 1]^2), the
    range of its width/height ratio and of its rotation in degrees, and whether it is hollow."""

    outline: NDArray[Any]
    ratio: tuple[float, float]
    degrees: tuple[float, float]
    hollow: bool = False


def _notched_triangle() -> NDArray[Any]:
    """The triangle with a V cut into its base, 30% of its height deep."""
    top, right, left = TRIANGLE
    notch = np.array([[0.25, 0.5], [0.0, 0.05], [-0.25, 0.5]])
    return np.array([top, right, *notch, left])


_CIRCLE: Final = regular_polygon(64)
_EVEN: Final = (0.92, 1.08)  # round, square: the ratio of a shape that has no long side
_LONG: Final = (1.35, 1.8)  # ellipse, rectangle: elongated, yet close enough to be confused
_ANY: Final = (0.0, 360.0)
# the ids skip numbers as COCO's do, so that nothing can assume contiguous ids
_CLASSES: Final[tuple[tuple[Category, _Shape], ...]] = (
    (Category(1, "disc", "round"), _Shape(_CIRCLE, _EVEN, _ANY)),
    (Category(2, "ring", "round"), _Shape(_CIRCLE, _EVEN, _ANY, hollow=True)),
    (Category(4, "ellipse", "round"), _Shape(_CIRCLE, _LONG, _ANY)),
    (Category(5, "square", "quad"), _Shape(SQUARE, _EVEN, _ANY)),
    (Category(7, "frame", "quad"), _Shape(SQUARE, _EVEN, _ANY, hollow=True)),
    (Category(8, "rectangle", "quad"), _Shape(SQUARE, _LONG, _ANY)),
    (Category(10, "triangle", "triangle"), _Shape(TRIANGLE, _EVEN, _ANY)),
    (Category(11, "notched triangle", "triangle"), _Shape(_notched_triangle(), _EVEN, _ANY)),
    (Category(13, "plus", "cross"), _Shape(CROSS, _EVEN, (-15.0, 15.0))),
    (Category(14, "saltire", "cross"), _Shape(CROSS, _EVEN, (30.0, 60.0))),
    (Category(16, "hexagon", "polygon"), _Shape(regular_polygon(6), _EVEN, _ANY)),
    (Category(17, "octagon", "polygon"), _Shape(regular_polygon(8), _EVEN, _ANY)),
)


@functools.cache
def _photos() -> tuple[Image.Image, ...]:
    """The background photographs, read once per process from the installed scikit-image."""
    folder = importlib.resources.files("skimage") / "data"
    photos = []
    for name, digest in PHOTOS.items():
        content = (folder / name).read_bytes()
        found = hashlib.sha256(content).hexdigest()
        if found != digest:
            raise ValueError(
                f"skimage/data/{name}: expected the photograph with SHA-256 {digest}, got "
                f"{found}: this scikit-image would make different scenes images"
            )
        with Image.open(io.BytesIO(content)) as photo:
            photos.append(photo.convert("RGB"))
    return tuple(photos)


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return math.exp(rng.uniform(math.log(low), math.log(high)))


def _background(rng: np.random.Generator, size: int) -> NDArray[np.float64]:
    """A random crop of a random photograph (15% to all of its short side, so textures come at
    every scale), mirrored half the time and with its colour balance shifted."""
    photos = _photos()
    photo = photos[int(rng.integers(len(photos)))]
    short = min(photo.size)
    side = short * _log_uniform(rng, 0.15, 1.0)
    stretch = _log_uniform(rng, 0.8, 1.25)
    width, height = min(photo.width, side * stretch), min(photo.height, side / stretch)
    left = rng.uniform(0.0, photo.width - width)
    top = rng.uniform(0.0, photo.height - height)
    crop = photo.resize(
        (size, size), Image.Resampling.BILINEAR, box=(left, top, left + width, top + height)
    )
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    gains = rng.uniform(0.7, 1.3, size=3)
    return np.clip(np.asarray(crop, dtype=np.float64) * gains, 0.0, 255.0)


def _object_mask(
    rng: np.random.Generator, shape: _Shape, size: int, placed: list[tuple[NDArray[Any], float]]
) -> NDArray[np.bool_]:
    """Draw one object of log-uniform size into a mask; half the time over an earlier object
    (`placed`: their centres and half extents, to which this one is added)."""
    side = _log_uniform(rng, MIN_SIDE, max(MIN_SIDE, MAX_SIDE_FRACTION * size))
    ratio = math.sqrt(rng.uniform(*shape.ratio))
    half = np.array([side * ratio, side / ratio]) / 2.0
    turn = rotation(math.radians(rng.uniform(*shape.degrees)))
    outer = (shape.outline * half) @ turn.T
    low, high = centre_range(outer, size)
    reach = float(np.abs(outer).max())
    if placed and rng.random() < OVERLAP_PROB:
        anchor, anchor_reach = placed[int(rng.integers(len(placed)))]
        offset = rng.uniform(-1.0, 1.0, size=2) * 0.7 * (reach + anchor_reach)
        centre = np.clip(anchor + offset, low, high)
    else:
        centre = rng.uniform(low, high)
    placed.append((centre, reach))
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    draw.polygon([(float(x), float(y)) for x, y in outer + centre], fill=255)
    if shape.hollow:
        # positive: only _EVEN shapes are hollow, so half.min() >= MIN_SIDE / 2.08 > MIN_WALL
        hole = min(rng.uniform(0.55, 0.75), 1.0 - MIN_WALL / float(half.min()))
        draw.polygon([(float(x), float(y)) for x, y in outer * hole + centre], fill=0)
    return np.asarray(mask) > 0


def _paint(
    rng: np.random.Generator, pixels: NDArray[np.float64], covered: NDArray[np.bool_]
) -> None:
    """A contrasting colour with a light gradient across the object, so it is not flat."""
    colour = np.array(contrasting_colour(rng, pixels[covered]))
    rows, cols = np.nonzero(covered)
    theta = rng.uniform(0.0, 2.0 * math.pi)
    ramp = (math.cos(theta) * cols + math.sin(theta) * rows) / pixels.shape[0]
    shade = 1.0 + rng.uniform(-0.3, 0.3) * (ramp - ramp.mean())
    pixels[rows, cols] = np.clip(shade[:, None] * colour, 0.0, 255.0)


def _render_image(rng: np.random.Generator, size: int) -> tuple[Image.Image, list[Annotation]]:
    pixels = _background(rng, size)
    occlusion = Occlusion(size)
    placed: list[tuple[NDArray[Any], float]] = []
    num_objects = 0 if rng.random() < EMPTY_IMAGE_PROB else int(rng.integers(1, MAX_OBJECTS + 1))
    for _ in range(num_objects):
        category = int(rng.integers(len(_CLASSES)))
        covered = _object_mask(rng, _CLASSES[category][1], size, placed)
        if occlusion.add(category, covered):
            _paint(rng, pixels, covered)
    return Image.fromarray(pixels.astype(np.uint8)), occlusion.annotations(MIN_VISIBLE_FRACTION)


SCENES: Final = Builtin(
    name="scenes",
    format_version=FORMAT_VERSION,
    categories=tuple(category for category, _ in _CLASSES),
    render=_render_image,
    png_compress_level=1,
)


def generate_scenes(out: Path, *, num_train: int, num_val: int, image_size: int, seed: int) -> Path:
    """Create the scenes dataset at `out` (or reuse an identical one) and return `out`."""
    return generator.generate(
        SCENES, out, num_train=num_train, num_val=num_val, image_size=image_size, seed=seed
    )


def main(argv: Sequence[str] | None = None) -> None:
    generator.main(SCENES, argv, description=__doc__.splitlines()[0] if __doc__ else None)


if __name__ == "__main__":
    main()
