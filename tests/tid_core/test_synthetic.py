"""The shapes generator: deterministic, idempotent, safe, and with realistic annotations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from coco_folders import folder_files, split_annotations
from PIL import Image

from tid_core.data.synthetic import CATEGORIES, generate_shapes, main

SMALL = {"num_train": 8, "num_val": 3, "image_size": 64, "seed": 3}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shapes") / "ds"
    return generate_shapes(out, num_train=200, num_val=20, image_size=128, seed=0)


def test_same_arguments_give_identical_files(tmp_path: Path) -> None:
    first = folder_files(generate_shapes(tmp_path / "a", **SMALL))
    second = folder_files(generate_shapes(tmp_path / "b", **SMALL))
    assert first == second
    assert len([name for name in first if name.endswith(".png")]) == 11
    other = folder_files(generate_shapes(tmp_path / "c", **{**SMALL, "seed": 4}))
    assert other.keys() == first.keys()
    assert other["annotations/instances_train.json"] != first["annotations/instances_train.json"]
    assert other["train/000000000001.png"] != first["train/000000000001.png"]


def test_train_and_val_use_different_streams(tmp_path: Path) -> None:
    files = folder_files(generate_shapes(tmp_path / "ds", **SMALL))
    assert files["train/000000000001.png"] != files["val/000000000001.png"]


def test_rerun_is_a_no_op_and_conflicts_are_refused(tmp_path: Path) -> None:
    out = generate_shapes(tmp_path / "ds", **SMALL)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert generate_shapes(out, **SMALL) == out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamps
    with pytest.raises(ValueError, match="num_train"):
        generate_shapes(out, **{**SMALL, "num_train": 9})
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]  # no staging folder left behind


def test_foreign_or_incomplete_folders_are_refused(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"shapes\.json"):
        generate_shapes(foreign, **SMALL)
    assert (foreign / "notes.txt").read_text() == "mine"

    broken = generate_shapes(tmp_path / "broken", **SMALL)
    (broken / "val" / "000000000001.png").unlink()
    with pytest.raises(ValueError, match="val images"):
        generate_shapes(broken, **SMALL)


def test_empty_existing_folder_is_filled(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    out.mkdir()
    generate_shapes(out, **SMALL)
    assert (out / "shapes.json").is_file()


@pytest.mark.parametrize(
    ("field", "value"),
    [("num_train", 0), ("num_val", -1), ("image_size", 16), ("seed", -1)],
)
def test_invalid_arguments_name_the_field(tmp_path: Path, field: str, value: int) -> None:
    with pytest.raises(ValueError, match=field):
        generate_shapes(tmp_path / "ds", **{**SMALL, field: value})
    assert not (tmp_path / "ds").exists()


def test_annotations_are_valid_coco(shapes: Path) -> None:
    for split, count in (("train", 200), ("val", 20)):
        content = split_annotations(shapes, split)
        assert [c["name"] for c in content["categories"]] == list(CATEGORIES)
        assert [c["id"] for c in content["categories"]] == [1, 2, 3, 4, 5]
        assert {c["supercategory"] for c in content["categories"]} == {"shape"}
        assert [image["id"] for image in content["images"]] == list(range(1, count + 1))
        ann_ids = [ann["id"] for ann in content["annotations"]]
        assert len(set(ann_ids)) == len(ann_ids)
        for image in content["images"]:
            assert (image["width"], image["height"]) == (128, 128)
            with Image.open(shapes / split / image["file_name"]) as png:
                assert png.size == (128, 128)
        for ann in content["annotations"]:
            x, y, w, h = ann["bbox"]
            assert x >= 0 and y >= 0 and w >= 1 and h >= 1
            assert x + w <= 128 and y + h <= 128
            assert 1 <= ann["area"] <= w * h
            assert ann["iscrowd"] == 0
            assert 1 <= ann["category_id"] <= len(CATEGORIES)


def test_all_size_buckets_and_empty_images_occur(shapes: Path) -> None:
    content = split_annotations(shapes, "train")
    areas = np.array([ann["area"] for ann in content["annotations"]])
    assert (areas < 32**2).sum() > 20
    assert ((areas >= 32**2) & (areas <= 96**2)).sum() > 20
    assert (areas > 96**2).sum() >= 1
    annotated = {ann["image_id"] for ann in content["annotations"]}
    assert 1 <= len(content["images"]) - len(annotated) <= 30
    assert {ann["category_id"] for ann in content["annotations"]} == set(range(1, 6))


def test_boxes_are_tight_on_visible_object_pixels(shapes: Path) -> None:
    """Objects are flat-coloured: the box edges must show the object's colour."""
    content = split_annotations(shapes, "train")
    ann = max(content["annotations"], key=lambda a: a["area"])
    with Image.open(shapes / "train" / f"{ann['image_id']:012d}.png") as png:
        pixels = np.asarray(png.convert("RGB")).astype(int)
    x, y, w, h = ann["bbox"]
    crop = pixels[y : y + h, x : x + w].reshape(-1, 3)
    colours, counts = np.unique(crop, axis=0, return_counts=True)
    colour = colours[counts.argmax()]
    assert counts.max() == ann["area"]
    inside = np.all(pixels == colour, axis=2)[y : y + h, x : x + w]
    assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()


def test_cli_prints_a_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--out", str(tmp_path / "ds"), "--num-train", "2", "--num-val", "1"]
    main([*argv, "--image-size", "32", "--seed", "1"])
    assert "2 train, 1 val" in capsys.readouterr().out
    assert len(list((tmp_path / "ds" / "train").glob("*.png"))) == 2
