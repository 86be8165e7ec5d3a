"""File-system rules that the route tests do not reach: no roots configured, log tails, the
zip end record."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest

from api.problems import Unprocessable
from api.storage import _central_directory_bytes, resolve_under_roots, tail_lines


def test_server_paths_are_refused_when_no_root_is_configured(tmp_path: Path) -> None:
    with pytest.raises(Unprocessable, match="TID_DATASET_ROOTS"):
        resolve_under_roots(str(tmp_path), [], loc=("body", "path"))


def test_a_file_under_a_root_is_not_a_dataset_folder(tmp_path: Path) -> None:
    (tmp_path / "file.json").write_text("{}")
    with pytest.raises(Unprocessable, match="not a folder"):
        resolve_under_roots(str(tmp_path / "file.json"), [tmp_path], loc=("body", "path"))
    assert resolve_under_roots(str(tmp_path), [tmp_path], loc=()) == tmp_path.resolve()


@pytest.mark.parametrize(
    ("text", "lines", "expected"),
    [
        ("a\nb\nc\n", 2, "b\nc\n"),
        ("a\nb\nc", 2, "b\nc\n"),  # a last line still being written
        ("a\n", 5, "a\n"),
        ("", 3, ""),
    ],
)
def test_tail_lines(tmp_path: Path, text: str, lines: int, expected: str) -> None:
    path = tmp_path / "train.log"
    path.write_text(text)
    assert tail_lines(path, lines) == expected
    assert tail_lines(tmp_path / "missing.log", lines) == ""


@pytest.mark.parametrize("entries", [3, 70_000])  # 70k entries need the zip64 end record
def test_central_directory_size_is_read_from_the_end_record(entries: int) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i in range(entries):
            archive.writestr(f"e{i}", b"")
    expected = sum(46 + len(f"e{i}") for i in range(entries))  # fixed header + name
    assert _central_directory_bytes(buffer) == expected


def test_central_directory_size_of_a_non_zip_is_none() -> None:
    assert _central_directory_bytes(io.BytesIO(b"not a zip at all")) is None
