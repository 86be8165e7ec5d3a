"""JobSpec: the full form parses, defaults fill in, the hash is canonical, bad specs say why."""

from __future__ import annotations

import copy
import inspect
import json
from typing import Any

import pytest
from pydantic import ValidationError

from tid_core.spec import TID_OPTIONS, BuiltinDataset, DistillSpec, JobSpec, PathWeights

FULL: dict[str, Any] = {
    "name": "r50-to-mbv3",
    "teacher": {"arch": "fcos", "backbone": "resnet50", "weights": {"path": "/w/teacher.pt"}},
    "student": {"arch": "fcos", "backbone": "mobilenet_v3_large"},
    "dataset": {"builtin": "shapes", "num_train": 64, "num_val": 16, "image_size": 64},
    "distill": {"method": "tid", "loss_weight": 0.5},
    "schedule": {
        "epochs": 12,
        "batch_size": 8,
        "lr": 0.01,
        "warmup_iters": 100,
        "lr_milestones": [8, 11],
        "eval_every": 1,
        "seed": 0,
        "amp": True,
    },
    "resources": {"nproc_per_node": 1},
}


def spec(**changes: Any) -> dict[str, Any]:
    """FULL with `section__field=value` changes (or a whole section by its name)."""
    out = copy.deepcopy(FULL)
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            out.setdefault(section, {})[field] = value
        else:
            out[section] = value
    return out


def reversed_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: reversed_keys(value[k]) for k in reversed(list(value))}
    return value


def rejection(data: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate(data)
    return str(info.value)


def test_full_spec_parses_and_fills_defaults() -> None:
    job = JobSpec.model_validate(FULL)
    assert job.name == "r50-to-mbv3"
    assert job.teacher is not None
    assert isinstance(job.teacher.weights, PathWeights)
    assert job.teacher.weights.path == "/w/teacher.pt"
    assert job.teacher.fpn_channels == 128
    assert isinstance(job.dataset, BuiltinDataset)
    assert job.dataset.input_size == 64
    assert job.dataset.seed == 0
    assert job.student.backbone == "mobilenet_v3_large"
    assert job.student.fpn_channels == 128
    assert job.distill.method == "tid"
    assert job.distill.levels == (0, 1, 2, 3, 4)
    assert job.distill.tasks == ("cls", "reg")
    assert (job.distill.alpha, job.distill.beta, job.distill.gamma) == (2.0, 4.0, 0.5)
    assert (job.distill.pos_iou, job.distill.neg_iou, job.distill.p_min) == (0.5, 0.4, 0.05)
    assert (job.distill.tau_key, job.distill.tau_weak) == (0.8, 0.6)
    assert job.distill.distill_warmup_iters == 100
    assert job.distill.weak_areas is True
    assert job.distill.normalize is True
    assert job.schedule.lr_milestones == (8, 11)
    assert job.schedule.optimizer == "sgd"
    assert job.schedule.lr_gamma == 0.1
    assert job.resources.device == "auto"


def test_minimal_spec_is_plain_training_with_defaults() -> None:
    job = JobSpec.model_validate({"dataset": {"path": "/data/coco"}})
    assert job.teacher is None
    assert job.distill.method == "none"
    assert job.dataset.input_size == 512
    assert job.student.arch == "fcos"


def test_spec_hash_is_stable_under_key_order_and_spelled_out_defaults() -> None:
    first = JobSpec.model_validate(FULL).spec_hash()
    assert len(first) == 64
    assert JobSpec.model_validate(reversed_keys(FULL)).spec_hash() == first
    explicit = spec(distill__alpha=2.0, student__fpn_channels=128, resources__device="auto")
    assert JobSpec.model_validate(explicit).spec_hash() == first
    assert JobSpec.model_validate_json(json.dumps(FULL)).spec_hash() == first


def test_a_spec_on_one_node_keeps_the_hash_it_had_before_nnodes_existed() -> None:
    # computed before `resources.nnodes` existed: stored idempotency hashes and checkpoints
    # of jobs on one node still match
    default = {"dataset": {"builtin": "shapes"}}
    assert JobSpec.model_validate(default).spec_hash() == (
        "5083d6071e65df7dd5833e06db14b8a244148984031ab7f898c7b407081c6491"
    )
    two_procs = {**default, "resources": {"nproc_per_node": 2, "device": "cpu", "nnodes": 1}}
    assert JobSpec.model_validate(two_procs).spec_hash() == (
        "10d839f009d033877289a7c8059147c7c77d97f58a61fc6f30e340abaec86057"
    )
    assert "nnodes" not in JobSpec.model_validate(two_procs).model_dump(mode="json")["resources"]
    two_nodes = JobSpec.model_validate({**default, "resources": {"nnodes": 2}})
    assert two_nodes.model_dump(mode="json")["resources"]["nnodes"] == 2
    assert two_nodes.spec_hash() != JobSpec.model_validate(default).spec_hash()
    assert "resources.nnodes" in rejection({**default, "resources": {"nnodes": 0}})


@pytest.mark.parametrize(
    "change",
    [
        {"schedule__lr": 0.02},
        {"distill__alpha": 2.5},
        {"student__backbone": "resnet18"},
        {"dataset__seed": 1},
        {"name": "other"},
    ],
)
def test_spec_hash_changes_when_a_field_changes(change: dict[str, Any]) -> None:
    first = JobSpec.model_validate(FULL).spec_hash()
    assert JobSpec.model_validate(spec(**change)).spec_hash() != first


def test_a_path_dataset_names_its_splits_and_specs_without_them_keep_their_hash() -> None:
    coco = {"path": "/data/coco", "input_size": 640}
    plain = JobSpec.model_validate(spec(dataset=coco))
    # what spec_hash hashed before split names existed, so stored idempotency hashes still match
    assert plain.model_dump(mode="json")["dataset"] == coco
    defaults = {**coco, "train_split": "train", "val_split": "val"}
    assert JobSpec.model_validate(spec(dataset=defaults)).spec_hash() == plain.spec_hash()

    named = {**coco, "train_split": "train2017", "val_split": "val2017"}
    job = JobSpec.model_validate(spec(dataset=named))
    assert job.model_dump(mode="json")["dataset"] == named
    assert job.spec_hash() != plain.spec_hash()


def test_a_student_may_name_backbone_weights_and_specs_without_them_keep_their_hash() -> None:
    plain = JobSpec.model_validate(FULL)
    assert "weights_backbone" not in plain.model_dump(mode="json")["student"]
    spelled = spec(student__weights_backbone=None)
    assert JobSpec.model_validate(spelled).spec_hash() == plain.spec_hash()

    for weights in ({"path": "/w/resnet18.pth"}, {"job": "j1"}, {"model": "m1"}):
        job = JobSpec.model_validate(spec(student__weights_backbone=weights))
        assert job.model_dump(mode="json")["student"]["weights_backbone"] == weights
        assert job.spec_hash() != plain.spec_hash()
    message = rejection(spec(student__weights_backbone={"url": "https://x/r18.pth"}))
    assert "student.weights_backbone" in message
    assert "weights_backbone" in rejection(spec(teacher__weights_backbone={"path": "/w"}))


def test_a_schedule_may_cap_its_run_time_and_specs_without_it_keep_their_hash() -> None:
    plain = JobSpec.model_validate(FULL)
    assert plain.schedule.max_runtime_minutes is None  # the server's cap
    assert "max_runtime_minutes" not in plain.model_dump(mode="json")["schedule"]
    spelled = spec(schedule__max_runtime_minutes=None)
    assert JobSpec.model_validate(spelled).spec_hash() == plain.spec_hash()

    capped = JobSpec.model_validate(spec(schedule__max_runtime_minutes=90))
    assert capped.schedule.max_runtime_minutes == 90
    assert capped.spec_hash() != plain.spec_hash()
    for minutes in (0, 365 * 24 * 60 + 1):
        assert "schedule.max_runtime_minutes" in rejection(
            spec(schedule__max_runtime_minutes=minutes)
        )
    assert "valid integer" in rejection(spec(schedule__max_runtime_minutes=1.5))


def test_trainable_backbone_layers_go_with_backbone_weights_within_the_backbones_stages() -> None:
    weights = {"path": "/w/mobilenet.pth"}
    pretrained = JobSpec.model_validate(spec(student__weights_backbone=weights))
    assert pretrained.student.trainable_layers == 3  # torchvision's default
    assert "trainable_backbone_layers" not in pretrained.model_dump(mode="json")["student"]
    for layers in (0, 6):  # MobileNetV3 has 6 stages
        job = JobSpec.model_validate(
            spec(student__weights_backbone=weights, student__trainable_backbone_layers=layers)
        )
        assert job.student.trainable_layers == layers
        assert job.spec_hash() != pretrained.spec_hash()

    message = rejection(
        spec(student__weights_backbone=weights, student__trainable_backbone_layers=7)
    )
    field = "student.trainable_backbone_layers"
    assert field in message and "less than or equal to 6" in message
    message = rejection(
        spec(student__weights_backbone=weights, student__trainable_backbone_layers=-1)
    )
    assert field in message and "greater than or equal to 0" in message
    resnet = {"backbone": "resnet18", "weights_backbone": weights, "trainable_backbone_layers": 6}
    assert "6 is not in 0..5, the stages of resnet18" in rejection(spec(student=resnet))
    assert "only with weights_backbone" in rejection(spec(student__trainable_backbone_layers=2))


@pytest.mark.parametrize("name", ["", "../val", "a/b", ".hidden", "train 2017", "x" * 65])
def test_a_split_name_is_one_plain_path_component(name: str) -> None:
    message = rejection(spec(dataset={"path": "/data/coco", "train_split": name}))
    assert "dataset.PathDataset.train_split" in message


def method_spec(method: str, **options: Any) -> JobSpec:
    data = spec(distill={"method": method, **options})
    if method == "none":
        del data["teacher"]
    return JobSpec.model_validate(data)


@pytest.mark.parametrize(
    ("method", "ignored", "read"),
    [
        ("none", {"loss_weight": 2.0, "levels": [0], "tau_key": 0.3}, {}),
        ("fitnet", {"tau_key": 0.3, "gamma": 1.0, "tasks": ["reg"]}, {"levels": [0]}),
        ("pkd", {"tau_weak": 0.3, "cls_match": "point", "normalize": False}, {"loss_weight": 2.0}),
        ("tid", {}, {"tau_key": 0.3}),
        ("tid", {}, {"normalize": False}),
    ],
)
def test_spec_hash_covers_the_options_the_method_reads(
    method: str, ignored: dict[str, Any], read: dict[str, Any]
) -> None:
    # a cached teacher (method none) keeps its hash when a TID default changes
    first = method_spec(method).spec_hash()
    assert method_spec(method, **ignored).spec_hash() == first
    if read:
        assert method_spec(method, **read).spec_hash() != first


def test_ground_truth_areas_are_a_tid_option_and_tid_specs_without_it_keep_their_hash() -> None:
    plain = method_spec("tid")
    assert "areas" not in plain.distill.options_read()  # what the hash covered before it
    assert method_spec("tid", areas="significance").spec_hash() == plain.spec_hash()
    assert method_spec("tid", areas="ground_truth").spec_hash() != plain.spec_hash()
    assert method_spec("pkd", areas="ground_truth").spec_hash() == method_spec("pkd").spec_hash()


def test_tid_options_are_the_tid_losss_parameters() -> None:
    from tid_core.distill.tid import TIDLoss

    assert set(DistillSpec.model_fields) >= TID_OPTIONS
    # levels go to the Distiller, which every method uses
    assert set(inspect.signature(TIDLoss).parameters) - {"levels"} == TID_OPTIONS


def test_spec_rejects_distillation_without_teacher() -> None:
    data = spec()
    del data["teacher"]
    assert 'method "tid" needs a teacher' in rejection(data)


def test_spec_rejects_teacher_with_method_none() -> None:
    message = rejection(spec(distill__method="none"))
    assert 'method "none" trains the student alone' in message
    assert "remove the teacher" in message


@pytest.mark.parametrize(
    ("data", "location"),
    [
        ({**FULL, "epochs": 3}, "epochs"),
        (spec(schedule__epoch=3), "schedule.epoch"),
        (spec(distill__tau=1.0), "distill.tau"),
        (spec(teacher__weights={"path": "/w.pt", "sha": "x"}), "teacher.weights.PathWeights.sha"),
        (spec(dataset__extra=1), "dataset.BuiltinDataset.extra"),
        (spec(resources__gpus=2), "resources.gpus"),
    ],
    ids=["top", "schedule", "distill", "weights", "dataset", "resources"],
)
def test_spec_rejects_unknown_fields_anywhere(data: dict[str, Any], location: str) -> None:
    message = rejection(data)
    assert location in message
    assert "Extra inputs are not permitted" in message


@pytest.mark.parametrize(
    ("text", "location"),
    [
        ('{"dataset": {"builtin": "shapes"}, "schedule": {"lr": NaN}}', "schedule.lr"),
        ('{"dataset": {"builtin": "shapes"}, "distill": {"alpha": Infinity}}', "distill.alpha"),
        (
            '{"dataset": {"builtin": "shapes"}, "schedule": {"grad_clip": -Infinity}}',
            "schedule.grad_clip",
        ),
    ],
)
def test_spec_rejects_non_finite_numbers_in_json(text: str, location: str) -> None:
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate_json(text)
    message = str(info.value)
    assert location in message
    assert "finite number" in message


def test_spec_rejects_nan_given_as_python_float() -> None:
    message = rejection(spec(distill__loss_weight=float("nan")))
    assert "distill.loss_weight" in message
    assert "finite number" in message


@pytest.mark.parametrize(
    ("change", "location", "reason"),
    [
        ({"schedule__batch_size": 0}, "schedule.batch_size", "greater than or equal to 1"),
        ({"schedule__lr": 0}, "schedule.lr", "greater than 0"),
        ({"student__fpn_channels": 48}, "student.fpn_channels", "multiple of 32"),
        ({"student__fpn_channels": 32}, "student.fpn_channels", "greater than or equal to 64"),
        ({"distill__p_min": 0.5}, "distill.p_min", "less than 0.5"),
        ({"dataset__image_size": 100}, "dataset.BuiltinDataset.image_size", "multiple of 32"),
        ({"resources__nproc_per_node": 0}, "resources.nproc_per_node", "greater than or equal"),
    ],
)
def test_spec_rejects_out_of_range_numbers(
    change: dict[str, Any], location: str, reason: str
) -> None:
    message = rejection(spec(**change))
    assert location in message
    assert reason in message


def test_spec_rejects_repeated_distill_levels() -> None:
    message = rejection(spec(distill__levels=[1, 1]))
    assert "distill.levels must be distinct FPN level indices in 0..4, got [1, 1]" in message


@pytest.mark.parametrize(
    ("levels", "location", "reason"),
    [([0, 5], "distill.levels.1", "less than 5"), ([-1], "distill.levels.0", "greater than")],
)
def test_spec_rejects_distill_levels_out_of_range(
    levels: list[int], location: str, reason: str
) -> None:
    message = rejection(spec(distill__levels=levels))
    assert location in message and reason in message


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("schedule__seed", False),
        ("schedule__lr", "0.1"),
        ("schedule__epochs", "3"),
        ("distill__levels", [True]),
        ("distill__normalize", "yes"),
    ],
)
def test_spec_coerces_nothing(field: str, value: Any) -> None:
    message = rejection(spec(**{field: value}))
    assert field.split("__")[0] in message


def test_spec_rejects_repeated_task() -> None:
    assert "must not repeat a task" in rejection(spec(distill__tasks=["cls", "cls"]))


def test_spec_rejects_neg_iou_above_pos_iou() -> None:
    message = rejection(spec(distill__neg_iou=0.6, distill__pos_iou=0.5))
    assert "distill.neg_iou (0.6) must not exceed distill.pos_iou (0.5)" in message


def test_spec_accepts_neg_iou_equal_to_pos_iou() -> None:
    job = JobSpec.model_validate(spec(distill__neg_iou=0.5, distill__pos_iou=0.5))
    assert job.distill.neg_iou == job.distill.pos_iou == 0.5


@pytest.mark.parametrize(
    ("milestones", "shown"),
    [([11, 8], "[11, 8]"), ([8, 13], "[8, 13]"), ([8, 8], "[8, 8]")],
)
def test_spec_rejects_bad_milestones(milestones: list[int], shown: str) -> None:
    message = rejection(spec(schedule__lr_milestones=milestones))
    assert "schedule.lr_milestones must be increasing epochs in 1..12" in message
    assert f"got {shown}" in message


def test_spec_accepts_milestone_at_last_epoch() -> None:
    job = JobSpec.model_validate(spec(schedule__lr_milestones=[12]))
    assert job.schedule.lr_milestones == (12,)


@pytest.mark.parametrize("section", ["student", "teacher"])
def test_spec_rejects_unknown_backbone(section: str) -> None:
    message = rejection(spec(**{f"{section}__backbone": "vgg16"}))
    assert f"{section}.backbone" in message
    assert "'resnet18', 'resnet34', 'resnet50' or 'mobilenet_v3_large'" in message


def test_spec_rejects_unknown_method_and_arch() -> None:
    assert "distill.method" in rejection(spec(distill__method="fgd"))
    assert "student.arch" in rejection(spec(student__arch="yolo"))


def test_spec_is_frozen() -> None:
    job = JobSpec.model_validate(FULL)
    with pytest.raises(ValidationError, match="frozen"):
        job.name = "other"  # type: ignore[misc]
