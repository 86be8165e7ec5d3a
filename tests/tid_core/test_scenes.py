"""The scenes generator: deterministic, COCO-valid, harder than shapes (photographs, confusable
classes, occlusion, sparse ids), reachable from a JobSpec, and trainable by the trainer."""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import get_args

import numpy as np
import pytest
from coco_folders import folder_files, split_annotations
from PIL import Image
from test_train import run_train, write_spec

from tid_core.data import scenes
from tid_core.data.builtin import BUILTINS, generate_builtin
from tid_core.data.generator import Occlusion
from tid_core.data.scenes import SCENES, generate_scenes
from tid_core.events import read_events
from tid_core.models import load_student
from tid_core.spec import BuiltinDataset, BuiltinName, JobSpec

SMALL = {"num_train": 6, "num_val": 3, "image_size": 64, "seed": 3}
SIZE = 96


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("scenes") / "ds"
    return generate_scenes(out, num_train=150, num_val=10, image_size=SIZE, seed=0)


def test_same_seed_gives_identical_files_and_another_seed_others(tmp_path: Path) -> None:
    first = folder_files(generate_scenes(tmp_path / "a", **SMALL))
    assert first == folder_files(generate_scenes(tmp_path / "b", **SMALL))
    assert len([name for name in first if name.endswith(".png")]) == 9
    assert "scenes.json" in first
    other = folder_files(generate_scenes(tmp_path / "c", **{**SMALL, "seed": 4}))
    assert other.keys() == first.keys()
    assert other["annotations/instances_train.json"] != first["annotations/instances_train.json"]
    assert other["train/000000000001.png"] != first["train/000000000001.png"]
    assert first["train/000000000001.png"] != first["val/000000000001.png"]


def test_categories_are_many_named_once_with_sparse_ids(dataset: Path) -> None:
    categories = split_annotations(dataset, "train")["categories"]
    ids = [c["id"] for c in categories]
    names = [c["name"] for c in categories]
    assert len(ids) >= 10 and len(set(ids)) == len(ids) and len(set(names)) == len(names)
    assert ids != list(range(1, len(ids) + 1))  # gaps, as in COCO
    assert split_annotations(dataset, "val")["categories"] == categories
    used = {ann["category_id"] for ann in split_annotations(dataset, "train")["annotations"]}
    assert used == set(ids)


def test_annotations_are_valid_coco_inside_the_image(dataset: Path) -> None:
    for split in ("train", "val"):
        content = split_annotations(dataset, split)
        known = {c["id"] for c in content["categories"]}
        ann_ids = [ann["id"] for ann in content["annotations"]]
        assert ann_ids == list(range(1, len(ann_ids) + 1))
        for image in content["images"]:
            assert (image["width"], image["height"]) == (SIZE, SIZE)
            with Image.open(dataset / split / image["file_name"]) as png:
                assert (png.size, png.mode) == ((SIZE, SIZE), "RGB")
        for ann in content["annotations"]:
            x, y, w, h = ann["bbox"]
            assert x >= 0 and y >= 0 and w >= 1 and h >= 1
            assert x + w <= SIZE and y + h <= SIZE
            assert 1 <= ann["area"] <= w * h
            assert ann["iscrowd"] == 0 and ann["category_id"] in known


def test_objects_overlap_and_span_a_wide_range_of_scales(dataset: Path) -> None:
    content = split_annotations(dataset, "train")
    boxes: dict[int, list[list[int]]] = {}
    for ann in content["annotations"]:
        boxes.setdefault(ann["image_id"], []).append(ann["bbox"])

    def overlapping(rows: list[list[int]]) -> bool:
        return any(
            a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]
            for i, a in enumerate(rows)
            for b in rows[i + 1 :]
        )

    assert sum(overlapping(rows) for rows in boxes.values()) >= len(content["images"]) // 3
    sides = np.array([max(ann["bbox"][2:]) for ann in content["annotations"]])
    assert sides.min() <= 10 and sides.max() >= 0.5 * SIZE


def test_occluded_objects_keep_their_visible_box_and_hidden_ones_are_dropped() -> None:
    occlusion = Occlusion(10)
    square = np.zeros((10, 10), dtype=bool)
    square[2:6, 2:6] = True  # 16 pixels
    assert occlusion.add(0, square)
    hidden = square.copy()
    assert occlusion.add(1, hidden)  # covers object 0 whole
    cover = np.zeros((10, 10), dtype=bool)
    cover[2:6, 2:4] = True  # half of object 1
    assert occlusion.add(2, cover)
    assert not occlusion.add(3, np.zeros((10, 10), dtype=bool))
    visible = occlusion.annotations(min_visible_fraction=0.3)
    assert [(a.category, a.box, a.area) for a in visible] == [
        (1, [4, 2, 2, 4], 8),
        (2, [2, 2, 2, 4], 8),
    ]


def test_backgrounds_are_the_bundled_photographs(monkeypatch: pytest.MonkeyPatch) -> None:
    folder = importlib.resources.files("skimage") / "data"
    assert all((folder / name).is_file() for name in scenes.PHOTOS)
    assert len(scenes._photos()) == len(scenes.PHOTOS) >= 5

    def background_spread() -> float:
        """The median over images of the pixel spread outside every box."""
        spreads = []
        for image_id in range(1, 21):
            image, objects = scenes._render_image(np.random.default_rng([0, 0, image_id]), 64)
            free = np.ones((64, 64), dtype=bool)
            for obj in objects:
                x, y, w, h = obj.box
                free[y : y + h, x : x + w] = False
            spreads.append(float(np.asarray(image)[free].std(axis=0).max()))
        return float(np.median(spreads))

    assert background_spread() > 10.0  # photographs have texture
    flat = tuple(Image.new("RGB", photo.size, (120, 120, 120)) for photo in scenes._photos())
    monkeypatch.setattr(scenes, "_photos", lambda: flat)
    assert background_spread() < 1.0  # and they are all the background there is


def test_a_changed_photograph_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(scenes.PHOTOS, "camera.png", "0" * 64)
    scenes._photos.cache_clear()
    try:
        with pytest.raises(ValueError, match=r"camera\.png"):
            scenes._photos()
    finally:
        monkeypatch.undo()
        scenes._photos.cache_clear()


def test_every_builtin_name_of_the_spec_has_a_generator(tmp_path: Path) -> None:
    assert set(BUILTINS) == set(get_args(BuiltinName))
    for name, builtin in BUILTINS.items():
        spec = BuiltinDataset.model_validate(
            {"builtin": name, "num_train": 2, "num_val": 1, "image_size": 32, "seed": 1}
        )
        root = generate_builtin(spec, tmp_path / name)
        assert (root / builtin.params_file).is_file()
        assert [c["id"] for c in split_annotations(root, "val")["categories"]] == [
            c.id for c in builtin.categories
        ]


def test_one_builtin_never_reuses_or_overwrites_anothers_folder(tmp_path: Path) -> None:
    shapes = BuiltinDataset.model_validate({"builtin": "shapes", "num_train": 2, "num_val": 1})
    root = generate_builtin(shapes, tmp_path / "ds")
    before = folder_files(root)
    with pytest.raises(ValueError, match=r"scenes\.json"):
        generate_builtin(shapes.model_copy(update={"builtin": "scenes"}), root)
    assert folder_files(root) == before


def test_a_spec_names_scenes_and_a_shapes_spec_keeps_its_form() -> None:
    dataset = {"builtin": "scenes", "num_train": 4, "num_val": 1000, "image_size": 64}
    job = JobSpec.model_validate({"dataset": dataset})
    assert isinstance(job.dataset, BuiltinDataset) and job.dataset.builtin == "scenes"
    shapes = JobSpec.model_validate({"dataset": {**dataset, "builtin": "shapes"}})
    assert shapes.model_dump(mode="json")["dataset"]["builtin"] == "shapes"
    assert shapes.spec_hash() != job.spec_hash()


@pytest.mark.slow
def test_the_trainer_trains_and_evaluates_on_scenes(tmp_path: Path) -> None:
    data = generate_scenes(tmp_path / "scenes", num_train=8, num_val=4, image_size=64, seed=0)
    spec = write_spec(tmp_path, data, schedule={"epochs": 1})
    run_dir = tmp_path / "run"
    proc = run_train(spec, run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = read_events(run_dir / "events.jsonl")
    assert events[-1]["type"] == "end" and "eval" in {e["type"] for e in events}
    _, meta = load_student(run_dir / "student.safetensors")
    assert meta.cat_ids == [c.id for c in SCENES.categories]
    assert meta.class_names == [c.name for c in SCENES.categories]
