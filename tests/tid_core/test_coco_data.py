"""The COCO reader, the resumable sampler and the loader."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from tid_core.data.coco import (
    CocoDetection,
    ResumableDistributedSampler,
    build_loader,
    collate_detection,
)
from tid_core.data.synthetic import CATEGORIES, generate_shapes


def _write_coco(root: Path, split: str, content: dict[str, Any]) -> None:
    ann_file = root / "annotations" / f"instances_{split}.json"
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    ann_file.write_text(json.dumps(content))


def _write_image(path: Path, *, size: tuple[int, int], mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(pixels.squeeze(2) if channels == 1 else pixels, mode=mode).save(path)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shapes") / "ds"
    return generate_shapes(out, num_train=24, num_val=4, image_size=64, seed=1)


@pytest.fixture
def handmade(tmp_path: Path) -> Path:
    """Real-COCO quirks: category ids with gaps, crowd, an empty image, nested file names."""
    _write_image(tmp_path / "val" / "sub" / "dir" / "a.png", size=(50, 40), mode="L")
    _write_image(tmp_path / "val" / "b.png", size=(30, 20), mode="RGBA")
    ann = {"iscrowd": 0, "area": 1.0}
    _write_coco(
        tmp_path,
        "val",
        {
            "images": [
                {"id": 42, "file_name": "sub/dir/a.png", "width": 50, "height": 40},
                {"id": 7, "file_name": "b.png", "width": 30, "height": 20},
            ],
            "categories": [{"id": 17, "name": "bee"}, {"id": 3, "name": "ant"}],
            "annotations": [
                {**ann, "id": 1, "image_id": 42, "category_id": 17, "bbox": [1, 2, 10, 20]},
                {**ann, "id": 2, "image_id": 42, "category_id": 3, "bbox": [5.5, 6, 4, 3]},
                {**ann, "id": 3, "image_id": 42, "category_id": 3, "bbox": [0, 0, 50, 40]}
                | {"iscrowd": 1},
                {**ann, "id": 4, "image_id": 42, "category_id": 17, "bbox": [8, 8, 0.5, 9]},
            ],
        },
    )
    return tmp_path


def test_reader_on_generated_shapes(shapes: Path) -> None:
    dataset = CocoDetection(shapes, "train", train=False)
    content = json.loads(dataset.ann_file.read_text())
    assert dataset.class_names == list(CATEGORIES)
    assert dataset.cat_ids == [1, 2, 3, 4, 5]
    assert dataset.num_classes == 5
    assert dataset.image_ids == list(range(1, 25))
    assert len(dataset) == 24
    num_boxes = 0
    for index in range(len(dataset)):
        image, target = dataset[index]
        assert type(image) is torch.Tensor and image.dtype == torch.float32
        assert image.shape == (3, 64, 64) and image.min() >= 0.0 and image.max() <= 1.0
        boxes, labels = target["boxes"], target["labels"]
        assert type(boxes) is torch.Tensor and boxes.dtype == torch.float32
        assert labels.dtype == torch.int64 and boxes.shape == (len(labels), 4)
        assert target["image_id"].dtype == torch.int64 and target["image_id"].ndim == 0
        image_id = int(target["image_id"])
        assert image_id == dataset.image_ids[index]
        expected = [
            [x, y, x + w, y + h]
            for ann in content["annotations"]
            if ann["image_id"] == image_id
            for x, y, w, h in [ann["bbox"]]
        ]
        assert boxes.tolist() == expected
        assert ((labels >= 0) & (labels < 5)).all()
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 64).all()
        assert (boxes[:, 2:] > boxes[:, :2]).all()
        num_boxes += len(labels)
    assert num_boxes == len(content["annotations"])


def test_horizontal_flip_keeps_boxes_consistent_and_a_seed_fixes_it(tmp_path: Path) -> None:
    width, height = 40, 30
    _write_image(tmp_path / "train" / "one.png", size=(width, height))
    _write_coco(
        tmp_path,
        "train",
        {
            "images": [{"id": 5, "file_name": "one.png", "width": width, "height": height}],
            "categories": [{"id": 1, "name": "thing"}],
            "annotations": [{"id": 1, "image_id": 5, "category_id": 1, "bbox": [5, 6, 10, 8]}],
        },
    )
    plain_image, plain = CocoDetection(tmp_path, "train", train=False)[0]
    assert plain["boxes"].tolist() == [[5.0, 6.0, 15.0, 14.0]]
    dataset = CocoDetection(tmp_path, "train", train=True)
    torch.manual_seed(0)
    seen = set()
    for _ in range(16):
        image, target = dataset[0]
        box = target["boxes"].tolist()
        if torch.equal(image, plain_image):
            assert box == [[5.0, 6.0, 15.0, 14.0]]
            seen.add("plain")
        else:
            assert torch.equal(image, plain_image.flip(-1))
            assert box == [[width - 15.0, 6.0, width - 5.0, 14.0]]
            seen.add("flipped")
        assert target["labels"].tolist() == [0]
    assert seen == {"plain", "flipped"}

    # keyed (index, seed), as the sampler asks: the seed alone decides, the global RNG is untouched
    flipped = {}
    for seed in range(8):
        state = torch.get_rng_state()
        image = dataset[(0, seed)][0]
        assert torch.equal(torch.get_rng_state(), state)
        torch.manual_seed(100 + seed)
        assert torch.equal(dataset[(0, seed)][0], image)
        flipped[seed] = not torch.equal(image, plain_image)
    assert set(flipped.values()) == {True, False}


def test_handmade_coco_quirks(handmade: Path) -> None:
    dataset = CocoDetection(handmade, "val", train=False)
    assert dataset.class_names == ["ant", "bee"]
    assert dataset.cat_ids == [3, 17]
    assert dataset.image_ids == [7, 42]

    empty_image, empty = dataset[0]
    assert empty_image.shape == (3, 20, 30)  # RGBA converted to RGB
    assert int(empty["image_id"]) == 7
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)

    gray_image, target = dataset[1]
    assert gray_image.shape == (3, 40, 50)  # grayscale converted to RGB
    assert int(target["image_id"]) == 42
    # Crowd (id 3) and the sub-pixel-wide box (id 4) are gone; labels follow sorted category ids.
    assert target["boxes"].tolist() == [[1.0, 2.0, 11.0, 22.0], [5.5, 6.0, 9.5, 9.0]]
    assert target["labels"].tolist() == [1, 0]
    assert [dataset.cat_ids[label] for label in target["labels"].tolist()] == [17, 3]


def test_missing_and_invalid_files_name_the_path(handmade: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"instances_test\.json"):
        CocoDetection(handmade, "test", train=False)

    (handmade / "val" / "b.png").unlink()
    dataset = CocoDetection(handmade, "val", train=False)
    with pytest.raises(FileNotFoundError, match=r"b\.png"):
        dataset[0]
    (handmade / "val" / "b.png").write_text("not an image")
    with pytest.raises(ValueError, match=r"b\.png"):
        dataset[0]

    ann_file = handmade / "annotations" / "instances_val.json"
    ann_file.write_text("{broken")
    with pytest.raises(ValueError, match=r"instances_val\.json"):
        CocoDetection(handmade, "val", train=False)


def test_unknown_category_is_named(handmade: Path) -> None:
    ann_file = handmade / "annotations" / "instances_val.json"
    content = json.loads(ann_file.read_text())
    content["annotations"][0]["category_id"] = 99
    ann_file.write_text(json.dumps(content))
    with pytest.raises(ValueError, match="99"):
        CocoDetection(handmade, "val", train=False)


def _sampler(size: int, **kwargs: Any) -> ResumableDistributedSampler:
    options: dict[str, Any] = {
        "num_replicas": 1,
        "rank": 0,
        "batch_size": 3,
        "shuffle": True,
        "seed": 7,
    }
    return ResumableDistributedSampler(TensorDataset(torch.arange(size)), **{**options, **kwargs})


def _indices(sampler: ResumableDistributedSampler) -> list[int]:
    return [index for index, _ in sampler]


def test_sampler_ranks_split_the_epoch() -> None:
    shares = [_indices(_sampler(12, num_replicas=2, rank=rank)) for rank in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == 6
    assert set(shares[0]).isdisjoint(shares[1])
    assert sorted(shares[0] + shares[1]) == list(range(12))
    # An uneven size is padded like DistributedSampler: every index is still seen.
    uneven = [_indices(_sampler(11, num_replicas=2, rank=rank)) for rank in (0, 1)]
    assert set(uneven[0]) | set(uneven[1]) == set(range(11))


def test_sampler_order_is_a_function_of_seed_and_epoch() -> None:
    first, second = _sampler(20), _sampler(20)
    first.set_epoch(3)
    second.set_epoch(3)
    assert list(first) == list(second)
    assert sorted(_indices(first)) == list(range(20))
    second.set_epoch(4)
    assert _indices(first) != _indices(second)
    assert _indices(_sampler(20, shuffle=False)) == list(range(20))


def test_augmentation_seed_is_a_function_of_seed_epoch_and_index_only() -> None:
    """Neither the rank, the world size nor where the epoch resumed changes a sample's seed."""
    one = _sampler(12)
    one.set_epoch(3)
    seeds = dict(one)
    assert len(set(seeds.values())) == 12  # a seed of its own per sample
    for rank in (0, 1):
        share = _sampler(12, num_replicas=2, rank=rank)
        share.set_epoch(3, start_batch=1)
        assert all(seeds[index] == seed for index, seed in share)
    one.set_epoch(4)
    assert all(seeds[index] != seed for index, seed in one)
    assert all(seeds[index] != seed for index, seed in _sampler(12, seed=8))


def test_sampler_resumes_mid_epoch() -> None:
    sampler = _sampler(20, num_replicas=2, rank=1)
    sampler.set_epoch(2)
    full = list(sampler)
    assert len(sampler) == 10
    resumed = _sampler(20, num_replicas=2, rank=1)
    resumed.set_epoch(2, start_batch=2)
    assert list(resumed) == full[6:]
    assert len(resumed) == 4
    resumed.set_epoch(2, start_batch=4)  # resuming exactly at the end of the epoch
    assert list(resumed) == [] and len(resumed) == 0
    resumed.set_epoch(3)
    assert len(resumed) == 10
    with pytest.raises(ValueError, match="start_batch"):
        resumed.set_epoch(3, start_batch=5)
    with pytest.raises(ValueError, match="batch_size"):
        _sampler(20, batch_size=0)


def test_collate_keeps_lists() -> None:
    batch = [
        (torch.zeros(3, 4, 5), {"labels": torch.tensor([1])}),
        (torch.zeros(3, 6, 7), {"labels": torch.tensor([], dtype=torch.int64)}),
    ]
    images, targets = collate_detection(batch)
    assert [tuple(image.shape) for image in images] == [(3, 4, 5), (3, 6, 7)]
    assert [target["labels"].tolist() for target in targets] == [[1], []]


def test_build_loader_batches(shapes: Path) -> None:
    dataset = CocoDetection(shapes, "train", train=True)
    loader = build_loader(dataset, batch_size=5, train=True, seed=0, num_workers=0)
    assert isinstance(loader.sampler, ResumableDistributedSampler)
    assert len(loader) == math.ceil(24 / 5)
    batches = list(loader)
    assert [len(images) for images, _ in batches] == [5, 5, 5, 5, 4]
    for images, targets in batches:
        assert all(image.shape == (3, 64, 64) for image in images)
        assert all(set(target) == {"boxes", "labels", "image_id"} for target in targets)
    seen = sorted(int(t["image_id"]) for _, targets in batches for t in targets)
    assert seen == dataset.image_ids

    loader.sampler.set_epoch(0, start_batch=3)
    assert [len(images) for images, _ in loader] == [5, 4]

    ranked = build_loader(
        dataset, batch_size=4, train=False, seed=0, num_workers=1, rank=1, world_size=2
    )
    assert ranked.persistent_workers and len(ranked) == 3
    assert _indices(ranked.sampler) == list(range(1, 24, 2))  # type: ignore[arg-type]
