"""COCO folders in the layouts users bring, made from the synthetic generators', and what the
generators' tests read back from a folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

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


def folder_files(root: Path) -> dict[str, bytes]:
    """Every file under `root` by its relative path: two generated folders compare byte for byte."""
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def split_annotations(root: Path, split: str) -> dict[str, Any]:
    """A split's COCO annotation file."""
    content: dict[str, Any] = json.loads(
        (root / "annotations" / f"instances_{split}.json").read_text()
    )
    return content
