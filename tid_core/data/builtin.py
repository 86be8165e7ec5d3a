"""The one entry point for every builtin dataset a JobSpec can name (`{"builtin": ...}`)."""

from __future__ import annotations

from pathlib import Path
from typing import Final

from tid_core.data.generator import Builtin, generate
from tid_core.data.scenes import SCENES
from tid_core.data.synthetic import SHAPES
from tid_core.spec import BuiltinDataset, BuiltinName

BUILTINS: Final[dict[BuiltinName, Builtin]] = {"shapes": SHAPES, "scenes": SCENES}


def generate_builtin(spec: BuiltinDataset, root: Path) -> Path:
    """Create the dataset `spec` describes at `root` (or reuse an identical one); return `root`."""
    return generate(
        BUILTINS[spec.builtin],
        root,
        num_train=spec.num_train,
        num_val=spec.num_val,
        image_size=spec.image_size,
        seed=spec.seed,
    )
