"""Input built to break a dataset check: an annotation file that is small on disk and in a
zip, but needs far more memory parsed than the small limit the tests give the check."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from worker.resource_check import CHILD_ENV

# json.loads makes each `[]` (3 bytes with its comma) a list of 56 bytes plus a pointer: the
# 24 MB file needs ~0.5 GiB, twice the headroom the limit below leaves
EMPTY_LISTS = 8_000_000
HEADROOM_MB = 256


def check_memory_limit_mb() -> int:
    """A TID_CHECK_MEMORY_MB that a dataset check starts under, with `HEADROOM_MB` to spare:
    the address space of a process that imported what the check imports (torch's libraries
    map GiBs of it), measured, plus the headroom."""
    probe = (
        "import worker.resource_check, tid_core.data.coco, tid_core.data.builtin, tid_core.spec\n"
        "print(open('/proc/self/status').read())"
    )
    status = subprocess.run(
        [sys.executable, "-c", probe],
        env={**os.environ, **CHILD_ENV},
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    match = re.search(r"^VmPeak:\s+(\d+) kB$", status, re.MULTILINE)
    assert match, status
    return int(match.group(1)) // 1024 + HEADROOM_MB


def write_memory_bomb(annotations: Path, split: str) -> Path:
    """`annotations/instances_<split>.json`: valid JSON, one object of `EMPTY_LISTS` empty lists."""
    annotations.mkdir(parents=True, exist_ok=True)
    path = annotations / f"instances_{split}.json"
    with path.open("w") as out:
        out.write('{"images": [' + "[]," * (EMPTY_LISTS - 1) + "[]]}")
    return path


def memory_bomb_zip(dest: Path) -> Path:
    """An uploadable COCO zip whose train annotations are the bomb. Random filler keeps the
    compression ratio under the API's zip-bomb limit (100): the file is what the check
    explodes, not the archive."""
    bomb = write_memory_bomb(dest.parent / "bomb" / "annotations", "train")
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.write(bomb, "annotations/instances_train.json")
        archive.writestr("annotations/instances_val.json", '{"images": []}')
        archive.writestr("filler.bin", os.urandom(512 << 10), zipfile.ZIP_STORED)
    return dest
