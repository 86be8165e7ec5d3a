"""Service ids in a stored spec become the paths the trainer reads."""

from __future__ import annotations

from typing import Any

import pytest
from worker_support import MakeJob, tiny_spec

from store.db.models import Dataset, Job, Model
from store.db.session import session_scope
from store.settings import Settings
from worker.resolve import ResolveError, resolve_spec

TEACHER = {"arch": "fcos", "backbone": "resnet18", "fpn_channels": 64}


def add(settings: Settings, row: Dataset | Model) -> str:
    with session_scope(settings.database_url) as session:
        session.add(row)
        session.flush()
        return row.id


def dataset_row(**overrides: Any) -> Dataset:
    columns = {"owner": "alice", "name": "d", "kind": "path", "source": {}, "state": "ready"}
    return Dataset(**{**columns, "path": "/data/coco", **overrides})


def model_row(**overrides: Any) -> Model:
    columns = {"owner": "alice", "name": "m", "sha256": "0" * 64, "bytes": 1, "state": "ready"}
    return Model(**{**columns, "path": "/data/models/t.safetensors", **overrides})


def resolve(settings: Settings, job_id: str) -> dict[str, Any]:
    with session_scope(settings.database_url) as session:
        return resolve_spec(session, session.get_one(Job, job_id), settings).model_dump(mode="json")


def with_teacher(weights: dict[str, str]) -> dict[str, Any]:
    return tiny_spec(teacher={**TEACHER, "weights": weights}, distill={"method": "tid"})


def test_dataset_id_becomes_its_path_keeping_input_size(
    settings: Settings, make_job: MakeJob
) -> None:
    dataset_id = add(settings, dataset_row())
    job_id = make_job(spec={**tiny_spec(), "dataset": {"id": dataset_id, "input_size": 96}})

    assert resolve(settings, job_id)["dataset"] == {"path": "/data/coco", "input_size": 96}


def test_a_dataset_id_brings_the_split_names_it_was_registered_with(
    settings: Settings, make_job: MakeJob
) -> None:
    splits = {"train_split": "train2017", "val_split": "val2017"}
    dataset_id = add(settings, dataset_row(source={"path": "/data/coco", **splits}))
    job_id = make_job(spec={**tiny_spec(), "dataset": {"id": dataset_id, "input_size": 96}})

    resolved = resolve(settings, job_id)["dataset"]
    assert resolved == {"path": "/data/coco", "input_size": 96, **splits}


def test_teacher_job_becomes_its_student_export(settings: Settings, make_job: MakeJob) -> None:
    teacher_job = make_job(state="succeeded")
    job_id = make_job(spec=with_teacher({"job": teacher_job}))

    weights = resolve(settings, job_id)["teacher"]["weights"]

    assert weights == {"path": str(settings.jobs_dir / teacher_job / "student.safetensors")}


def test_teacher_model_becomes_its_file(settings: Settings, make_job: MakeJob) -> None:
    model_id = add(settings, model_row())
    job_id = make_job(spec=with_teacher({"model": model_id}))

    weights = resolve(settings, job_id)["teacher"]["weights"]

    assert weights == {"path": "/data/models/t.safetensors"}


def test_student_weights_backbone_ids_become_paths(settings: Settings, make_job: MakeJob) -> None:
    source = make_job(state="succeeded")
    model_id = add(settings, model_row(meta={"backbone": "resnet18"}))
    for weights, path in (
        ({"job": source}, str(settings.jobs_dir / source / "student.safetensors")),
        ({"model": model_id}, "/data/models/t.safetensors"),
        ({"path": "/w/resnet18.pth"}, "/w/resnet18.pth"),
    ):
        job_id = make_job(spec=tiny_spec(student={**TEACHER, "weights_backbone": weights}))
        assert resolve(settings, job_id)["student"]["weights_backbone"] == {"path": path}


def test_builtin_and_path_forms_are_unchanged(settings: Settings, make_job: MakeJob) -> None:
    spec = with_teacher({"path": "/w/t.pt"})
    job_id = make_job(spec=spec)

    resolved = resolve(settings, job_id)

    assert resolved["dataset"]["builtin"] == "shapes"
    assert resolved["dataset"]["num_train"] == spec["dataset"]["num_train"]
    assert resolved["teacher"]["weights"] == {"path": "/w/t.pt"}


def test_resolve_rejects_another_owners_dataset(settings: Settings, make_job: MakeJob) -> None:
    dataset_id = add(settings, dataset_row(owner="bob"))
    job_id = make_job(spec={**tiny_spec(), "dataset": {"id": dataset_id}})

    with pytest.raises(ResolveError, match=f"dataset '{dataset_id}' not found"):
        resolve(settings, job_id)


def test_resolve_rejects_a_model_that_is_not_ready(settings: Settings, make_job: MakeJob) -> None:
    model_id = add(settings, model_row(state="failed"))
    job_id = make_job(spec=with_teacher({"model": model_id}))

    with pytest.raises(ResolveError, match="is failed, not ready"):
        resolve(settings, job_id)
