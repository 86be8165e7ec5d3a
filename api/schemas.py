"""Request and response bodies, separate from the tables: what clients see is decided here.

Responses are built from ORM rows (`from_attributes`) but list only public fields: no lease,
no server paths of uploads, no key hashes. Timestamps are timezone-aware UTC (ISO 8601).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Tag

from tid_core.spec import TRAIN_SPLIT, VAL_SPLIT, BuiltinDataset, Name, PathStr, SplitName


class _Public(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class JobPublic(_Public):
    id: str
    name: str
    state: str
    method: str
    attempt: int
    handbacks: int  # attempts handed back by a deploy: not counted against max_attempts
    max_attempts: int
    step: int
    total_steps: int | None
    best_ap: float | None
    error: str | None
    cancel_requested: bool
    # why a queued job on several nodes has not started: its workers are not all free at once
    waiting_reason: str | None = None
    spec: dict[str, Any]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    latest_metrics: dict[str, float] = {}  # name -> value at the last logged step


class JobsPublic(BaseModel):
    data: list[JobPublic]
    next_cursor: str | None  # pass as ?cursor= for the next (older) page; None at the end


class MetricPoint(_Public):
    id: int  # pass the last one as ?after_id= to fetch only newer points
    attempt: int
    step: int
    name: str
    value: float


class EvaluationPublic(_Public):
    id: int
    attempt: int
    epoch: int
    step: int
    ap: float | None
    ap50: float | None
    ap75: float | None
    aps: float | None
    apm: float | None
    apl: float | None
    per_class: dict[str, Any]
    backend: str
    created_at: datetime


class MetricsPublic(BaseModel):
    data: list[MetricPoint]
    evaluations: list[EvaluationPublic]


class CheckpointPublic(_Public):
    id: int
    attempt: int
    epoch: int
    step: int
    path: str  # relative to the job's run directory
    sha256: str
    bytes: int
    created_at: datetime


class CheckpointsPublic(BaseModel):
    data: list[CheckpointPublic]


class BuiltinDatasetCreate(BuiltinDataset):
    """Generate a builtin dataset, `shapes` or `scenes` (same bounds as a job's builtin dataset)."""

    model_config = ConfigDict(strict=True)  # `false` is not a seed, nor `"16"` a count
    name: Name


class PathDatasetCreate(BaseModel):
    """Register a COCO folder already on the server, under one of the allowed roots; its
    splits are `annotations/instances_<split>.json` and `<split>/` (COCO 2017: `train2017`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    name: Name
    path: PathStr
    train_split: SplitName = TRAIN_SPLIT
    val_split: SplitName = VAL_SPLIT


def _dataset_kind(body: Any) -> str:
    """Pick the schema by its key, so errors describe the form the client meant."""
    return "builtin" if isinstance(body, dict) and "builtin" in body else "path"


DatasetCreate = Annotated[
    Annotated[BuiltinDatasetCreate, Tag("builtin")] | Annotated[PathDatasetCreate, Tag("path")],
    Discriminator(_dataset_kind),
]


class DatasetPublic(_Public):
    id: str
    name: str
    kind: Literal["builtin", "path", "upload"]
    source: dict[str, Any]
    state: str
    error: str | None
    num_train: int | None
    num_val: int | None
    class_names: list[Any] | None
    created_at: datetime


class DatasetsPublic(BaseModel):
    data: list[DatasetPublic]


class ModelPublic(_Public):
    id: str
    name: str
    sha256: str
    bytes: int
    state: str
    error: str | None
    meta: dict[str, Any] | None  # arch, backbone, num_classes... once a worker checked it
    created_at: datetime


class ModelsPublic(BaseModel):
    data: list[ModelPublic]


class Health(BaseModel):
    status: Literal["ok"]
