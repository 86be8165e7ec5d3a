"""JobSpec: the one contract between the API, the worker and the trainer.

Imports only pydantic and the standard library, so the API can validate specs without torch.
Every model forbids unknown fields and every number is bounded: a spec that validates is one
the trainer can run. The trainer accepts only the file-level forms (`{"path": ...}` weights,
`{"path": ...}` or `{"builtin": "shapes", ...}` datasets); the service resolves its ids
(`{"job": ...}`, `{"model": ...}`, `{"id": ...}`) to paths before a job reaches a worker.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

Arch = Literal["fcos", "retinanet"]
Backbone = Literal["resnet18", "resnet34", "resnet50", "mobilenet_v3_large"]
Method = Literal["none", "fitnet", "pkd", "tid"]
Task = Literal["cls", "reg"]
ClsMatch = Literal["box", "point"]
Areas = Literal["significance", "ground_truth"]

ARCHS: tuple[Arch, ...] = ("fcos", "retinanet")
BACKBONES: tuple[Backbone, ...] = ("resnet18", "resnet34", "resnet50", "mobilenet_v3_large")
# a backbone's stages in torchvision's sense, the range of `trainable_backbone_layers`: a
# ResNet's conv1 + layer1..4; MobileNetV3's blocks that start at features 0, 2, 4, 7, 13, 16
BACKBONE_STAGES: dict[Backbone, int] = {
    "resnet18": 5,
    "resnet34": 5,
    "resnet50": 5,
    "mobilenet_v3_large": 6,
}
TRAINABLE_BACKBONE_LAYERS = 3  # torchvision's detectors' default for a pretrained backbone
METHODS: tuple[Method, ...] = ("none", "fitnet", "pkd", "tid")
NUM_LEVELS = 5  # P3..P7, strides 8..128, for every backbone
# the DistillSpec options only TID reads (FitNet and PKD are defined by their normalisation)
TID_OPTIONS = frozenset(
    {"normalize", "tasks", "weak_areas", "alpha", "beta", "gamma", "pos_iou", "neg_iou", "p_min"}
    | {"cls_match", "tau_key", "tau_weak", "areas"}
)

Name = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._\- ]+$")]
PathStr = Annotated[str, Field(min_length=1, max_length=4096)]
IdStr = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$")]
# a split of a COCO folder: `annotations/instances_<split>.json` and the images under `<split>/`
SplitName = Annotated[
    str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
]
TRAIN_SPLIT, VAL_SPLIT = "train", "val"  # a folder's split names unless it names its own


class _Strict(BaseModel):
    """No unknown fields, no NaN, and no coercion: `"seed": false` or `"lr": "0.1"` is an
    error, not a 0 or a 0.1 (lists stay lists for the tuple fields, whose items are strict)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True, strict=True)


class PathWeights(_Strict):
    """Weights in a file the trainer can read (`.safetensors`; `.pt`, `.pth`: weights_only)."""

    path: PathStr


class JobWeights(_Strict):
    """The student exported by a finished job of the service."""

    job: IdStr


class ModelWeights(_Strict):
    """Weights uploaded to the service."""

    model: IdStr


Weights = PathWeights | JobWeights | ModelWeights


class ModelSpec(_Strict):
    """A detector: architecture, backbone and FPN width (teacher and student share the levels)."""

    arch: Arch = "fcos"
    backbone: Backbone = "resnet18"
    fpn_channels: int = Field(default=128, ge=64, le=512, multiple_of=32)


def _omitted_at_default(default: Any, **bounds: Any) -> Any:
    """A field added after specs were stored: left out of dumps (and so of `spec_hash`) at its
    default, so specs written before it existed keep their hash."""
    return Field(default=default, exclude_if=lambda value: value == default, **bounds)


class StudentSpec(ModelSpec):
    """The detector a job trains. `weights_backbone` (torchvision's name) initialises its
    backbone from a file: a torchvision ImageNet classifier's state dict, or any detector of the
    same backbone (a finished job, an uploaded model); the FPN and heads start random, and the
    backbone trains as torchvision trains a pretrained one: frozen BatchNorm, and only its last
    `trainable_backbone_layers` stages updated (torchvision's name and default, 3; 0 freezes
    the whole backbone, 5 (ResNet) or 6 (MobileNetV3) trains all of it)."""

    weights_backbone: Weights | None = _omitted_at_default(None)
    # bounded here by the deepest backbone's stages (so the schema says it); by this one's below
    trainable_backbone_layers: (
        Annotated[int, Field(ge=0, le=max(BACKBONE_STAGES.values()))] | None
    ) = _omitted_at_default(None)

    @model_validator(mode="after")
    def _trainable_layers_of_a_pretrained_backbone(self) -> Self:
        layers = self.trainable_backbone_layers
        if layers is None:
            return self
        if self.weights_backbone is None:
            raise ValueError(
                "trainable_backbone_layers: only with weights_backbone (a backbone trained from "
                "scratch trains all of its layers)"
            )
        stages = BACKBONE_STAGES[self.backbone]
        if layers > stages:
            raise ValueError(
                f"trainable_backbone_layers: {layers} is not in 0..{stages}, the stages of "
                f"{self.backbone}"
            )
        return self

    @property
    def trainable_layers(self) -> int:
        """How many of the backbone's last stages train when it starts from `weights_backbone`."""
        if self.trainable_backbone_layers is None:
            return TRAINABLE_BACKBONE_LAYERS
        return self.trainable_backbone_layers


class TeacherSpec(ModelSpec):
    weights: Weights


class PathDataset(_Strict):
    """A COCO-format folder: `annotations/instances_<split>.json` and `<split>/...` for the
    training and validation splits (`train`/`val`; a COCO 2017 folder: `train2017`/`val2017`)."""

    path: PathStr
    input_size: int = Field(default=512, ge=32, le=2048, multiple_of=32)
    train_split: SplitName = _omitted_at_default(TRAIN_SPLIT)
    val_split: SplitName = _omitted_at_default(VAL_SPLIT)


BuiltinName = Literal["shapes", "scenes"]


class BuiltinDataset(_Strict):
    """A generated dataset, nothing downloaded: `shapes` (5 classes over gradients: quick, for
    tests and demos) or `scenes` (12 classes in confusable pairs over photographs: harder, for
    measuring what distillation adds)."""

    builtin: BuiltinName
    num_train: int = Field(default=512, ge=1, le=100_000)
    num_val: int = Field(default=128, ge=1, le=20_000)
    image_size: int = Field(default=128, ge=32, le=1024, multiple_of=32)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)

    @property
    def input_size(self) -> int:
        return self.image_size

    @property
    def train_split(self) -> str:
        return TRAIN_SPLIT

    @property
    def val_split(self) -> str:
        return VAL_SPLIT


class IdDataset(_Strict):
    """A dataset registered with the service."""

    id: IdStr
    input_size: int = Field(default=512, ge=32, le=2048, multiple_of=32)


Dataset = PathDataset | BuiltinDataset | IdDataset


class DistillSpec(_Strict):
    """Distillation method and its options (docs/METHOD.md#options explains every one)."""

    method: Method = "none"
    loss_weight: float = Field(default=0.5, ge=0.0, le=100.0)
    distill_warmup_iters: int = Field(default=100, ge=0, le=1_000_000)
    levels: tuple[Annotated[int, Field(strict=True, ge=0, lt=NUM_LEVELS)], ...] = Field(
        default=(0, 1, 2, 3, 4), min_length=1, max_length=NUM_LEVELS, strict=False
    )
    normalize: bool = True
    # TID (DIEM / LDAM / SFDM)
    tasks: tuple[Task, ...] = Field(
        default=("cls", "reg"), min_length=1, max_length=2, strict=False
    )
    weak_areas: bool = True
    alpha: float = Field(default=2.0, ge=0.0, le=100.0)
    beta: float = Field(default=4.0, ge=0.0, le=100.0)
    gamma: float = Field(default=0.5, ge=0.0, le=100.0)
    pos_iou: float = Field(default=0.5, gt=0.0, le=1.0)
    neg_iou: float = Field(default=0.4, ge=0.0, lt=1.0)
    p_min: float = Field(default=0.05, ge=0.0, lt=0.5)
    # which GT judges a location's class: the one its box overlaps ("box", the paper) or the one
    # containing its centre ("point": the class scored independently of the box)
    cls_match: ClsMatch = "box"
    # tuned on the held-out split (docs/BENCHMARKS.md): significant where the teacher is right
    # on one task (2.0 x 0.4) or mid on both; weak from a 0.6 lead. the paper starts at 2.25 / 0.9
    tau_key: float = Field(default=0.8, ge=0.0, le=4.0)
    tau_weak: float = Field(default=0.6, ge=0.0, le=4.0)
    # where the areas come from: task significance (TID), or the ground-truth boxes (a control:
    # key = every location inside a GT box, no weak area; tells TID's scores from plain
    # foreground weighting)
    areas: Areas = _omitted_at_default("significance")

    @model_validator(mode="after")
    def _check(self) -> Self:
        if len(set(self.levels)) != len(self.levels):
            raise ValueError(
                f"distill.levels must be distinct FPN level indices in 0..{NUM_LEVELS - 1}, "
                f"got {list(self.levels)}"
            )
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"distill.tasks must not repeat a task, got {list(self.tasks)}")
        if self.neg_iou > self.pos_iou:
            raise ValueError(
                f"distill.neg_iou ({self.neg_iou}) must not exceed distill.pos_iou ({self.pos_iou})"
            )
        return self

    def options_read(self) -> dict[str, Any]:
        """The options this method reads, as JSON: `none` reads none, FitNet and PKD not
        TID's, so a changed TID default does not change a plain or baseline job's hash."""
        if self.method == "none":
            return {"method": "none"}
        return self.model_dump(
            mode="json", exclude=None if self.method == "tid" else set(TID_OPTIONS)
        )


MAX_RUNTIME_MINUTES = 365 * 24 * 60  # a bound for the schema; the server's cap is lower


class ScheduleSpec(_Strict):
    """Optimisation schedule. Milestones are epochs; warm-up and logging are iterations.
    `max_runtime_minutes` stops a job that runs longer, all attempts together (it fails); None
    = the server's cap (`TID_MAX_RUNTIME_MINUTES`), which a value may not exceed."""

    epochs: int = Field(default=12, ge=1, le=1000)
    batch_size: int = Field(default=8, ge=1, le=512)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(default=0.01, gt=0.0, le=10.0)
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(default=1e-4, ge=0.0, le=1.0)
    warmup_iters: int = Field(default=100, ge=0, le=1_000_000)
    lr_milestones: tuple[Annotated[int, Field(strict=True, ge=1, le=1000)], ...] = Field(
        default=(), max_length=16, strict=False
    )
    lr_gamma: float = Field(default=0.1, gt=0.0, le=1.0)
    grad_clip: float = Field(default=10.0, ge=0.0, le=1e6)
    eval_every: int = Field(default=1, ge=0, le=1000)
    checkpoint_every: int = Field(default=0, ge=0, le=1_000_000)
    log_every: int = Field(default=10, ge=1, le=100_000)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    amp: bool = True
    max_runtime_minutes: Annotated[int, Field(ge=1, le=MAX_RUNTIME_MINUTES)] | None = (
        _omitted_at_default(None)
    )

    @model_validator(mode="after")
    def _check(self) -> Self:
        ms = list(self.lr_milestones)
        if ms != sorted(set(ms)) or any(not 0 < m <= self.epochs for m in ms):
            raise ValueError(
                f"schedule.lr_milestones must be increasing epochs in 1..{self.epochs}, got {ms}"
            )
        return self


class ResourcesSpec(_Strict):
    """Where and how the job runs: `nnodes` hosts (workers) of `nproc_per_node` processes each,
    a world of nnodes x nproc_per_node. `max_attempts` caps the attempts the service starts (lost
    workers and retryable crashes count; deploy hand-backs do not); None = the server default."""

    nnodes: int = _omitted_at_default(1, ge=1, le=64)
    nproc_per_node: int = Field(default=1, ge=1, le=64)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_workers: int = Field(default=2, ge=0, le=64)
    max_attempts: int | None = Field(default=None, ge=1, le=20)


class JobSpec(_Strict):
    """A distillation (or plain training) job. docs/ARCHITECTURE.md#jobspec shows the JSON form."""

    name: Name = "job"
    teacher: TeacherSpec | None = None
    student: StudentSpec = StudentSpec()
    dataset: Dataset
    distill: DistillSpec = DistillSpec()
    schedule: ScheduleSpec = ScheduleSpec()
    resources: ResourcesSpec = ResourcesSpec()

    @model_validator(mode="after")
    def _check(self) -> Self:
        method = self.distill.method
        if method != "none" and self.teacher is None:
            raise ValueError(f'method "{method}" needs a teacher')
        if method == "none" and self.teacher is not None:
            raise ValueError(
                'method "none" trains the student alone: remove the teacher or choose a method '
                f"({', '.join(m for m in METHODS if m != 'none')})"
            )
        return self

    def spec_hash(self) -> str:
        """A stable hash of what the job does: key order, spelled-out defaults and options its
        method does not read do not change it (a cached teacher survives a new TID default)."""
        content = self.model_dump(mode="json", exclude={"distill"})
        content["distill"] = self.distill.options_read()
        canonical = json.dumps(content, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()
