"""What the builtin dataset generators share: the COCO folder they write (atomically, and reused
when an identical one is there), the occlusion bookkeeping that turns painted objects into COCO
boxes, and small drawing helpers.

A generator is a `Builtin`: a name, its categories and a function that renders one image from a
random stream of its own, seeded by (seed, split, image id), so that no image depends on another.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import secrets
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NamedTuple

import numpy as np
from numpy.typing import NDArray
from PIL import Image

logger = logging.getLogger(__name__)

SPLITS: Final[tuple[str, ...]] = ("train", "val")
MIN_IMAGE_SIZE: Final = 32
MIN_CONTRAST: Final = 150.0  # L1 distance over RGB between object colour and what lies under it
PNG_COMPRESS_LEVEL: Final = 6


class Category(NamedTuple):
    id: int
    name: str
    supercategory: str


class Annotation(NamedTuple):
    """One annotated object: its category's index in `Builtin.categories`, and the COCO xywh box
    and pixel area of its visible part."""

    category: int
    box: list[int]
    area: int


Renderer = Callable[[np.random.Generator, int], tuple[Image.Image, list[Annotation]]]


@dataclass(frozen=True)
class Builtin:
    """A generated dataset. `name` is the JobSpec's `builtin`; it also names the fingerprint file
    that marks a finished folder. Bump `format_version` whenever the rendering changes, so that
    folders made by an older version are refused rather than silently mixed."""

    name: str
    format_version: int
    categories: tuple[Category, ...]
    render: Renderer
    # zlib's level: 1 writes photographs twice as fast as 6 and only a few % larger
    png_compress_level: int = PNG_COMPRESS_LEVEL

    @property
    def params_file(self) -> str:
        return f"{self.name}.json"


def regular_polygon(num: int, *, radius: float = 1.0, phase: float = -math.pi / 2) -> NDArray[Any]:
    angles = phase + 2.0 * math.pi * np.arange(num) / num
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


# Unit outlines centred on the origin within [-1, 1]^2, shared by the generators.
SQUARE: Final = np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
TRIANGLE: Final = regular_polygon(3)
_ARM: Final = 1.0 / 3.0
CROSS: Final = np.array(
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
)


def rotation(theta: float) -> NDArray[Any]:
    """The matrix that turns row vectors by `theta` (radians) when applied as `points @ R.T`."""
    return np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])


def centre_range(points: NDArray[Any], size: int) -> tuple[NDArray[Any], NDArray[Any]]:
    """The offsets that keep an outline centred on the origin inside the image where it fits;
    along an axis where it does not, the offsets that keep it spanning the whole image."""
    low, high = points.min(axis=0), points.max(axis=0)
    return np.minimum(-low, size - high), np.maximum(-low, size - high)


def random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    red, green, blue = (int(c) for c in rng.integers(0, 256, size=3))
    return red, green, blue


def contrasting_colour(rng: np.random.Generator, under: NDArray[Any]) -> tuple[int, int, int]:
    """A random colour far enough from the pixels it covers (RGB rows, 0 to 255); the inverse of
    them as a fallback.

    Colours are drawn alike for every category, so colour tells nothing about the class.
    """
    mean = under.reshape(-1, 3).mean(axis=0)
    for _ in range(10):
        colour = random_colour(rng)
        if float(np.abs(np.array(colour) - mean).sum()) >= MIN_CONTRAST:
            return colour
    red, green, blue = (int(255 - c) for c in mean)
    return red, green, blue


class Occlusion:
    """Which object owns each pixel while objects are painted back to front. An object's box and
    area are those of its visible pixels, as COCO annotates them (the box of the visible mask)."""

    def __init__(self, size: int) -> None:
        self._owner = np.zeros((size, size), dtype=np.int32)  # 0 = background, k = k-th object
        self._drawn: list[tuple[int, int]] = []  # (category index, full pixel count)

    def add(self, category: int, covered: NDArray[np.bool_]) -> bool:
        """Record an object painted over `covered`; False (and nothing recorded) if it is empty."""
        full_area = int(covered.sum())
        if full_area == 0:
            return False
        self._drawn.append((category, full_area))
        self._owner[covered] = len(self._drawn)
        return True

    def annotations(self, min_visible_fraction: float) -> list[Annotation]:
        """The objects in painting order, less those hidden beyond `min_visible_fraction`: a
        sliver of an object is no fair target (the pixels stay in the image, unannotated)."""
        visible_counts = np.bincount(self._owner.ravel(), minlength=len(self._drawn) + 1)
        objects: list[Annotation] = []
        for instance, (category, full_area) in enumerate(self._drawn, start=1):
            visible = int(visible_counts[instance])
            if visible < min_visible_fraction * full_area:
                continue
            rows, cols = np.nonzero(self._owner == instance)
            x, y = int(cols.min()), int(rows.min())
            box = [x, y, int(cols.max()) - x + 1, int(rows.max()) - y + 1]
            objects.append(Annotation(category, box, visible))
        return objects


def _params(
    *, num_train: int, num_val: int, image_size: int, seed: int, version: int
) -> dict[str, int]:
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
        "format_version": version,
        "num_train": num_train,
        "num_val": num_val,
        "image_size": image_size,
        "seed": seed,
    }


def _write_split(
    builtin: Builtin, root: Path, *, split: str, num_images: int, size: int, seed: int
) -> None:
    """Write one split's PNGs and its instances json; the split index keeps the streams apart."""
    split_index = SPLITS.index(split)
    image_dir = root / split
    image_dir.mkdir(parents=True)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for image_id in range(1, num_images + 1):
        rng = np.random.default_rng([seed, split_index, image_id])
        image, objects = builtin.render(rng, size)
        file_name = f"{image_id:012d}.png"
        image.save(image_dir / file_name, format="PNG", compress_level=builtin.png_compress_level)
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        for obj in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": builtin.categories[obj.category].id,
                    "bbox": obj.box,
                    "area": obj.area,
                    "iscrowd": 0,
                }
            )
    content = {
        "info": {
            "description": f"synthetic {builtin.name} ({split})",
            "version": str(builtin.format_version),
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [category._asdict() for category in builtin.categories],
    }
    ann_file = root / "annotations" / f"instances_{split}.json"
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    ann_file.write_text(json.dumps(content, sort_keys=True, separators=(",", ":")) + "\n")


def _is_complete(builtin: Builtin, out: Path, params: dict[str, int]) -> bool:
    """True when `out` holds a finished dataset made with `params`, False when it is empty.

    Anything else is refused: overwriting a folder we did not make could destroy user data.
    """
    if not any(out.iterdir()):
        return False
    name, params_file = builtin.name, out / builtin.params_file
    try:
        stored = json.loads(params_file.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(
            f"out: expected an empty folder or a {name} dataset, got {out} without a readable "
            f"{builtin.params_file} ({error})"
        ) from error
    if stored != params:
        raise ValueError(f"out: expected a {name} dataset made with {params}, got {stored} ({out})")
    counts = {"train": params["num_train"], "val": params["num_val"]}
    for split, count in counts.items():
        ann_file = out / "annotations" / f"instances_{split}.json"
        found = len(list((out / split).glob("*.png"))) if (out / split).is_dir() else 0
        if not ann_file.is_file() or found != count:
            raise ValueError(
                f"out: expected a complete {name} dataset with {count} {split} images and "
                f"{ann_file}, got {found} images at {out}"
            )
    return True


def generate(
    builtin: Builtin, out: Path, *, num_train: int, num_val: int, image_size: int, seed: int
) -> Path:
    """Create the dataset at `out` (or reuse an identical one) and return `out`.

    Files are written to a hidden sibling folder and renamed into place, so `out` is either
    absent, empty or complete, even if the process dies or two processes race.
    """
    params = _params(
        num_train=num_train,
        num_val=num_val,
        image_size=image_size,
        seed=seed,
        version=builtin.format_version,
    )
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"out: expected a folder, got a file at {out}")
        if _is_complete(builtin, out, params):
            logger.info("%s dataset already present at %s", builtin.name, out)
            return out
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        for split, count in (("train", num_train), ("val", num_val)):
            _write_split(
                builtin, staging, split=split, num_images=count, size=image_size, seed=seed
            )
        (staging / builtin.params_file).write_text(json.dumps(params, sort_keys=True) + "\n")
        try:
            staging.replace(out)  # atomic; also replaces an empty folder
        except OSError:
            # Another process finished first: accept its result if it is the same dataset.
            if not (out.is_dir() and _is_complete(builtin, out, params)):
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    logger.info("wrote %s dataset to %s", builtin.name, out)
    return out


def main(builtin: Builtin, argv: Sequence[str] | None, *, description: str | None) -> None:
    """The command line of a generator module (`python -m tid_core.data.<module>`)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, required=True, help="dataset folder to create")
    parser.add_argument("--num-train", type=int, default=512)
    parser.add_argument("--num-val", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = generate(
            builtin,
            args.out,
            num_train=args.num_train,
            num_val=args.num_val,
            image_size=args.image_size,
            seed=args.seed,
        )
    except ValueError as error:
        parser.error(str(error))
    print(  # noqa: T201
        f"{builtin.name} dataset at {out}: {args.num_train} train, {args.num_val} val images of "
        f"{args.image_size} px, seed {args.seed}"
    )
