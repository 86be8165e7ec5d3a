"""The API's file-system rules: which server paths a user may name, how uploads land on disk,
and how job files (logs, exported weights) are read back.

Everything a client sends ends up under the service's own folders, and a rejected or failed
upload leaves nothing behind (a file is renamed into place when complete; an extraction is
removed again). Zip archives are checked as a whole (names, links, sizes) before a single byte
is written.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import struct
import zipfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from fastapi.responses import FileResponse
from starlette.responses import MalformedRangeHeader
from starlette.responses import RangeNotSatisfiable as StarletteRangeNotSatisfiable

from api.problems import BadRequest, PayloadTooLarge, RangeNotSatisfiable, Unprocessable

CHUNK = 1 << 20
MAX_ZIP_RATIO = 100  # uncompressed / compressed; real COCO folders (JPEG/PNG + JSON) are ~1-10
# zipfile holds a few hundred bytes per entry of the central directory in memory before any
# check can run; all of COCO 2017 (123k images) has a directory of about 10 MB
MAX_ZIP_DIRECTORY_BYTES = 64 << 20
_DRIVE = re.compile(r"^[A-Za-z]:")
# a corrupt entry, or a file and a folder under one name: the archive's fault, not ours
_BROKEN_ENTRY = (zipfile.BadZipFile, FileExistsError, NotADirectoryError, IsADirectoryError)


def resolve_under_roots(path: str, roots: Sequence[Path], *, loc: Sequence[str]) -> Path:
    """The real folder `path` names, if it lies under an allowed root (after `..` and links)."""
    if not roots:
        raise Unprocessable(
            "server-side dataset paths are disabled (no TID_DATASET_ROOTS configured)", loc=loc
        )
    if not Path(path).is_absolute():
        raise Unprocessable(f"dataset path must be absolute, got {path!r}", loc=loc)
    try:
        resolved = Path(path).resolve()
    except (RuntimeError, ValueError) as exc:  # a symlink loop; a NUL byte in the path
        raise Unprocessable(f"dataset path {path!r} cannot be resolved: {exc}", loc=loc) from exc
    if not any(resolved.is_relative_to(root.resolve()) for root in roots):
        allowed = ", ".join(str(r) for r in roots)
        raise Unprocessable(
            f"dataset path {path!r} is not under an allowed root ({allowed})", loc=loc
        )
    if not resolved.is_dir():
        raise Unprocessable(f"dataset path {path!r} is not a folder", loc=loc)
    return resolved


def save_upload(src: BinaryIO, dest: Path, *, max_bytes: int) -> tuple[str, int]:
    """Copy `src` to `dest` atomically, refusing more than `max_bytes`; (sha256, bytes)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    digest, size = hashlib.sha256(), 0
    try:
        with tmp.open("wb") as out:
            while chunk := src.read(CHUNK):
                size += len(chunk)
                if size > max_bytes:
                    raise PayloadTooLarge(f"upload exceeds the limit of {max_bytes} bytes")
                digest.update(chunk)
                out.write(chunk)
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)
    return digest.hexdigest(), size


def _checked_members(
    archive: zipfile.ZipFile, *, max_bytes: int
) -> list[tuple[zipfile.ZipInfo, PurePosixPath]]:
    """Every entry with its safe relative path; raises on anything that could escape or explode."""
    members, total, compressed = [], 0, 0
    for info in archive.infolist():
        name = info.filename
        mode = info.external_attr >> 16
        if name.startswith(("/", "\\")) or _DRIVE.match(name):
            raise Unprocessable(f"zip entry {name!r} has an absolute path")
        rel = PurePosixPath(name.replace("\\", "/"))
        if ".." in rel.parts:
            raise Unprocessable(f"zip entry {name!r} points outside the archive (..)")
        if stat.S_ISLNK(mode):
            raise Unprocessable(f"zip entry {name!r} is a symbolic link")
        if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):  # 0: no type recorded
            raise Unprocessable(f"zip entry {name!r} is not a regular file or folder")
        if info.flag_bits & 0x1:
            raise Unprocessable(f"zip entry {name!r} is encrypted")
        total += info.file_size
        compressed += info.compress_size
        if rel.parts:
            members.append((info, rel))
    if total > max_bytes:
        raise Unprocessable(f"zip expands to {total} bytes, above the limit of {max_bytes}")
    if total > MAX_ZIP_RATIO * max(compressed, 1):
        raise Unprocessable(
            f"zip compression ratio {total / max(compressed, 1):.0f} is above {MAX_ZIP_RATIO} "
            "(a zip bomb?)"
        )
    return members


def _strip_single_top(
    members: list[tuple[zipfile.ZipInfo, PurePosixPath]],
) -> list[tuple[zipfile.ZipInfo, PurePosixPath]]:
    """`coco/annotations/...` and `annotations/...` are the same dataset: drop one shared folder."""
    tops = {rel.parts[0] for _, rel in members}
    files = [rel for info, rel in members if not info.is_dir()]
    if len(tops) != 1 or not files or any(len(rel.parts) < 2 for rel in files):
        return members
    return [(info, PurePosixPath(*rel.parts[1:])) for info, rel in members if len(rel.parts) > 1]


def _central_directory_bytes(src: BinaryIO) -> int | None:
    """The size of the zip's central directory, as its end record declares it (None when
    there is no end record: then it is no zip, and zipfile says so)."""
    size = src.seek(0, os.SEEK_END)
    tail_len = min(size, 22 + 0xFFFF)  # the end record and its comment
    src.seek(size - tail_len)
    tail = src.read(tail_len)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) < at + 22:
        return None
    (directory,) = struct.unpack_from("<I", tail, at + 12)
    locator = tail.rfind(b"PK\x06\x07", 0, at)
    if directory == 0xFFFFFFFF and locator >= 0 and len(tail) >= locator + 16:  # zip64
        (offset,) = struct.unpack_from("<Q", tail, locator + 8)
        src.seek(offset)
        record = src.read(56)
        if record[:4] == b"PK\x06\x06" and len(record) == 56:
            (directory,) = struct.unpack_from("<Q", record, 40)
    return int(directory)


def extract_dataset_zip(src: BinaryIO, dest: Path, *, max_bytes: int, splits: Sequence[str]) -> int:
    """Unpack a zipped COCO folder with these splits into `dest` (created here) and return the
    bytes written, or raise and remove it again."""
    if src.seek(0, os.SEEK_END) > max_bytes:
        raise PayloadTooLarge(f"upload exceeds the limit of {max_bytes} bytes")
    directory = _central_directory_bytes(src)
    if directory is not None and directory > MAX_ZIP_DIRECTORY_BYTES:
        raise Unprocessable(
            f"zip directory of {directory} bytes is above {MAX_ZIP_DIRECTORY_BYTES}: "
            "too many entries"
        )
    src.seek(0)
    try:
        archive = zipfile.ZipFile(src)
    except zipfile.BadZipFile as exc:
        raise Unprocessable("the uploaded file is not a zip archive") from exc
    with archive:
        members = _strip_single_top(_checked_members(archive, max_bytes=max_bytes))
        names = {str(rel) for _, rel in members}
        annotations = [f"annotations/instances_{split}.json" for split in splits]
        missing = [a for a in annotations if a not in names]
        if missing:
            raise Unprocessable(f"not a COCO dataset folder: missing {', '.join(missing)}")
        dest.mkdir(parents=True)
        try:
            written = 0
            for info, rel in members:
                target = dest.joinpath(*rel.parts)
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as entry, target.open("wb") as out:
                    while chunk := entry.read(CHUNK):
                        written += len(chunk)
                        if written > max_bytes:
                            raise Unprocessable(f"zip expands past the limit of {max_bytes} bytes")
                        out.write(chunk)
        except BaseException as exc:
            shutil.rmtree(dest, ignore_errors=True)
            if isinstance(exc, _BROKEN_ENTRY):
                raise Unprocessable(f"cannot extract the zip: {exc}") from exc
            raise
    return written


def tail_lines(path: Path, lines: int) -> str:
    """The last `lines` lines of a file, read backwards from its end (logs grow large)."""
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return ""
    with f:
        pos, data = f.seek(0, os.SEEK_END), b""
        while pos > 0 and data.count(b"\n") <= lines:
            step = min(CHUNK, pos)
            pos -= step
            f.seek(pos)
            data = f.read(step) + data
    kept = data.splitlines()[-lines:]
    return b"".join(line + b"\n" for line in kept).decode(errors="replace")


def etag_matches(if_none_match: str, etag: str) -> bool:
    tags = [t.strip().removeprefix("W/") for t in if_none_match.split(",")]
    return "*" in tags or etag in tags


def check_range(header: str, size: int) -> None:
    """Reject a bad Range as problem+json (FileResponse itself would answer in plain text)."""
    try:
        FileResponse._parse_range_header(header, size)
    except MalformedRangeHeader as exc:
        raise BadRequest(f"invalid Range header {header!r}: {exc.content}") from exc
    except StarletteRangeNotSatisfiable as exc:
        raise RangeNotSatisfiable(f"Range {header!r} is outside the file", size=size) from exc
