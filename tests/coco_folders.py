"""COCO folders in the layouts users bring, made from the synthetic generator's."""

from __future__ import annotations

import shutil
from pathlib import Path

COCO_2017 = {"train": "train2017", "val": "val2017"}


def with_split_names(source: Path, dest: Path, names: dict[str, str]) -> Path:
    """A copy of `source` whose splits are renamed (`{"train": "train2017", ...}`): each
    split's annotation file and image folder, as in COCO 2017's own layout."""
    shutil.copytree(source, dest)
    for old, new in names.items():
        annotations = dest / "annotations"
        (annotations / f"instances_{old}.json").rename(annotations / f"instances_{new}.json")
        (dest / old).rename(dest / new)
    return dest
