"""Reader for any COCO-format detection folder, plus a sampler and loader that can resume mid-epoch.

Layout: `root/annotations/instances_{split}.json` and images under `root/{split}/` (a COCO 2017
folder: splits `train2017` and `val2017`). Images are not resized here because the detectors'
own transforms resize them.

A training sample's random augmentation is drawn from a seed of its own, a function of (run
seed, epoch, index) that the sampler hands over with the index: a run resumed mid-epoch, in a
fresh process with fresh loader workers, sees the very samples an uninterrupted run would.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import tv_tensors
from torchvision.transforms import v2

from tid_core.launch import set_parent_death_signal

logger = logging.getLogger(__name__)

Sample = tuple[Tensor, dict[str, Tensor]]


def _field(record: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """Fetch a typed json field, naming the file and record when it is missing or wrong."""
    value = record.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"{where}: expected {key!r} of type {kind}, got {value!r}")
    return value


def _records(content: dict[str, Any], key: str, ann_file: Path) -> list[dict[str, Any]]:
    records = content.get(key, [])
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError(f"{ann_file}: expected {key!r} as a list of objects, got {records!r:.80}")
    return records


class CocoDetection(Dataset[Sample]):
    """COCO detection images with targets in the torchvision detection format.

    Labels are contiguous (0..num_classes-1) because real COCO category ids have gaps;
    `cat_ids[label]` maps a label back to the file's category id for evaluation.
    """

    def __init__(self, root: Path, split: str, *, train: bool) -> None:
        self.root = Path(root)
        self.split = split
        self.ann_file = self.root / "annotations" / f"instances_{split}.json"
        self.image_dir = self.root / split
        try:
            content = json.loads(self.ann_file.read_text())
        except FileNotFoundError as error:
            found = sorted(
                f.name.removeprefix("instances_").removesuffix(".json")
                for f in (self.root / "annotations").glob("instances_*.json")
            )
            hint = (
                f" (this folder has the splits {', '.join(found)}: name yours with the "
                "dataset's `train_split` and `val_split`)"
                if found
                else ""
            )
            raise FileNotFoundError(f"annotation file not found: {self.ann_file}{hint}") from error
        except (OSError, ValueError) as error:
            raise ValueError(f"{self.ann_file}: not a readable json file ({error})") from error
        if not isinstance(content, dict):
            raise ValueError(f"{self.ann_file}: expected a json object, got {type(content)}")

        categories = sorted(
            (
                _field(c, "id", int, f"{self.ann_file} category"),
                _field(c, "name", str, f"{self.ann_file} category"),
            )
            for c in _records(content, "categories", self.ann_file)
        )
        if not categories:
            raise ValueError(f"{self.ann_file}: expected at least one category, got none")
        self.cat_ids: list[int] = [cat_id for cat_id, _ in categories]
        self.class_names: list[str] = [name for _, name in categories]
        if len(set(self.cat_ids)) != len(self.cat_ids):
            raise ValueError(f"{self.ann_file}: expected unique category ids, got {self.cat_ids}")
        self.num_classes = len(self.cat_ids)
        label_of = {cat_id: label for label, cat_id in enumerate(self.cat_ids)}

        self._file_names: dict[int, str] = {}
        self._sizes: dict[int, tuple[int, int]] = {}  # (width, height) where the json gives them
        for image in _records(content, "images", self.ann_file):
            where = f"{self.ann_file} image"
            image_id = _field(image, "id", int, where)
            if image_id in self._file_names:
                raise ValueError(f"{where}: expected a unique id, got {image_id} twice")
            self._file_names[image_id] = _field(image, "file_name", str, where)
            if "width" in image and "height" in image:
                self._sizes[image_id] = (
                    _field(image, "width", int, where),
                    _field(image, "height", int, where),
                )
        self.image_ids: list[int] = sorted(self._file_names)

        self._boxes: dict[int, list[list[float]]] = {i: [] for i in self.image_ids}
        self._labels: dict[int, list[int]] = {i: [] for i in self.image_ids}
        for ann in _records(content, "annotations", self.ann_file):
            where = f"{self.ann_file} annotation {ann.get('id')!r}"
            image_id = _field(ann, "image_id", int, where)
            if image_id not in self._file_names:
                raise ValueError(f"{where}: expected a known image_id, got {image_id}")
            category_id = _field(ann, "category_id", int, where)
            if category_id not in label_of:
                raise ValueError(
                    f"{where}: expected category_id in {self.cat_ids}, got unknown {category_id}"
                )
            if ann.get("iscrowd", 0):
                continue  # crowd regions are ignore areas for COCO eval, not training targets
            bbox = _field(ann, "bbox", list, where)
            if len(bbox) != 4 or not all(isinstance(v, int | float) for v in bbox):
                raise ValueError(f"{where}: expected bbox [x, y, w, h] of numbers, got {bbox!r}")
            x, y, w, h = (float(v) for v in bbox)
            self._boxes[image_id].append([x, y, x + w, y + h])
            self._labels[image_id].append(label_of[category_id])

        steps: list[v2.Transform] = [v2.ToImage()]
        if train:
            steps.append(v2.RandomHorizontalFlip(0.5))
        steps += [
            v2.ToDtype(torch.float32, scale=True),
            v2.ClampBoundingBoxes(),
            v2.SanitizeBoundingBoxes(min_size=1.0),
        ]
        self.transform = v2.Compose(steps)
        logger.debug(
            "%s: %d images, %d classes", self.ann_file, len(self.image_ids), self.num_classes
        )

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_path(self, index: int) -> Path:
        """Where image `index` lives (file_name may contain subfolders)."""
        return self.image_dir / self._file_names[self.image_ids[index]]

    def __getitem__(self, key: int | tuple[int, int]) -> Sample:
        """Sample `key`: an index, or (index, seed) from the sampler, in which case its random
        augmentation comes from that seed alone (not from the loader worker's RNG, which a
        resumed run cannot restore)."""
        index, seed = key if isinstance(key, tuple) else (key, None)
        image_id = self.image_ids[index]
        path = self.image_path(index)
        try:
            with Image.open(path) as raw:
                image = raw.convert("RGB")
        except FileNotFoundError as error:
            raise FileNotFoundError(f"image not found: {path}") from error
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(f"{path}: not a readable image ({error})") from error
        expected = self._sizes.get(image_id, image.size)
        if image.size != expected:
            raise ValueError(f"{path}: expected {expected} (width, height), got {image.size}")
        boxes = tv_tensors.BoundingBoxes(
            torch.tensor(self._boxes[image_id], dtype=torch.float32).reshape(-1, 4),
            format=tv_tensors.BoundingBoxFormat.XYXY,
            canvas_size=(image.height, image.width),
        )
        labels = torch.tensor(self._labels[image_id], dtype=torch.int64)
        if seed is None:
            out_image, out_target = self.transform(image, {"boxes": boxes, "labels": labels})
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                out_image, out_target = self.transform(image, {"boxes": boxes, "labels": labels})
        target = {
            "boxes": out_target["boxes"].as_subclass(Tensor),
            "labels": out_target["labels"].as_subclass(Tensor),
            "image_id": torch.tensor(image_id, dtype=torch.int64),
        }
        return cast(Tensor, out_image.as_subclass(Tensor)), target


def collate_detection(batch: Sequence[Sample]) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Keep images and targets as lists: detection images differ in size and box count."""
    return [image for image, _ in batch], [target for _, target in batch]


class ResumableDistributedSampler(DistributedSampler[tuple[int, int]]):
    """DistributedSampler that can skip the batches a rank already saw in the current epoch.

    It yields (index, augmentation seed) pairs. The order of an epoch depends only on (seed,
    epoch), and a sample's augmentation seed only on (seed, epoch, index), so a run resumed from
    a checkpoint taken after `start_batch` batches sees exactly the samples it had not seen.
    """

    def __init__(
        self,
        dataset: Dataset[Any],
        *,
        num_replicas: int,
        rank: int,
        batch_size: int,
        shuffle: bool,
        seed: int,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        if num_replicas < 1:
            raise ValueError(f"num_replicas: expected >= 1, got {num_replicas}")
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.batch_size = batch_size
        self.start_batch = 0

    def set_epoch(self, epoch: int, *, start_batch: int = 0) -> None:
        """Select the epoch and how many of this rank's batches to skip (until the next call)."""
        num_batches = math.ceil(self.num_samples / self.batch_size)
        if not 0 <= start_batch <= num_batches:
            raise ValueError(f"start_batch: expected 0..{num_batches}, got {start_batch}")
        super().set_epoch(epoch)
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = cast(Iterator[int], super().__iter__())  # the base class yields plain indices
        indices = list(order)[self.start_batch * self.batch_size :]
        return ((i, self.augmentation_seed(i)) for i in indices)

    def augmentation_seed(self, index: int) -> int:
        """32 well-mixed bits of (seed, epoch, index)."""
        state = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)
        return int(state[0])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start_batch * self.batch_size)


def _leave_trainer_group(_worker_id: int) -> None:
    """A loader worker moves to a process group of its own and dies with its trainer instead.

    A cancel or a deploy SIGTERMs the trainer's whole process group, torchrun stops a rank by
    signalling its group, and Ctrl-C reaches the terminal's group: a worker still in the group
    would die at once, and the trainer with it at its next batch ("DataLoader worker ... is
    killed by signal"), before it could checkpoint. Out of the group, the worker serves on until
    the trainer, checkpointed, shuts it down; the parent-death signal keeps it from outliving a
    trainer that is killed outright.
    """
    os.setpgid(0, 0)
    set_parent_death_signal(signal.SIGKILL)


def build_loader(
    dataset: CocoDetection,
    *,
    batch_size: int,
    train: bool,
    seed: int,
    num_workers: int,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader[Sample]:
    """A loader over this rank's share; call `loader.sampler.set_epoch` before each epoch."""
    if num_workers < 0:
        raise ValueError(f"num_workers: expected >= 0, got {num_workers}")
    sampler = ResumableDistributedSampler(
        dataset,
        num_replicas=world_size,
        rank=rank,
        batch_size=batch_size,
        shuffle=train,
        seed=seed,
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_detection,
        pin_memory=torch.cuda.is_available(),
        drop_last=False,
        persistent_workers=num_workers > 0,
        worker_init_fn=_leave_trainer_group,
        # the workers' base seeds come from here, not from the global RNG a checkpoint saves
        generator=torch.Generator().manual_seed(seed),
    )
