"""Detector builders (aligned FPN levels for every backbone) and checked weight files."""

from __future__ import annotations

import os
import pathlib
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torchvision.models import mobilenet_v3_large, resnet18, resnet34
from torchvision.models.detection.backbone_utils import mobilenet_backbone, resnet_fpn_backbone

import tid_core.checkpoint
import tid_core.models
from tid_core.distill.capture import Detector
from tid_core.models import (
    ARCHS,
    BACKBONES,
    DetectorMeta,
    WeightsMismatchError,
    build_detector,
    describe_weights,
    export_student,
    load_backbone,
    load_checked,
    load_student,
    read_weights,
    save_weights,
)
from tid_core.spec import BACKBONE_STAGES

FPN = 64  # the smallest width build_detector accepts
SMALL = {"arch": "fcos", "backbone": "mobilenet_v3_large", "num_classes": 3, "fpn_channels": FPN}


def small_detector(**overrides: object) -> Detector:
    torch.manual_seed(0)
    options: dict[str, object] = {**SMALL, "image_size": 64, **overrides}
    return build_detector(**options)  # type: ignore[arg-type]


def small_meta(**overrides: object) -> DetectorMeta:
    options: dict[str, object] = {
        **SMALL,
        "input_size": 64,
        "class_names": ["circle", "square", "triangle"],
        "cat_ids": [1, 2, 7],
        "spec_hash": "abc123",
        **overrides,
    }
    return DetectorMeta(**options)  # type: ignore[arg-type]


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---- builders -----------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_detector_has_five_fpn_levels_at_strides_8_to_128(arch: str, backbone: str) -> None:
    torch.manual_seed(0)
    model = build_detector(
        arch=arch, backbone=backbone, num_classes=3, fpn_channels=FPN, image_size=64
    ).eval()
    with torch.no_grad():
        small = list(model.backbone(torch.rand(1, 3, 64, 64)).values())
        large = list(model.backbone(torch.rand(1, 3, 256, 256)).values())
    assert [tuple(f.shape) for f in small] == [
        (1, FPN, 8, 8),
        (1, FPN, 4, 4),
        (1, FPN, 2, 2),
        (1, FPN, 1, 1),
        (1, FPN, 1, 1),
    ]
    assert [256 // f.shape[-1] for f in large] == [8, 16, 32, 64, 128]
    assert model.backbone.out_channels == FPN


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
@pytest.mark.parametrize("arch", list(ARCHS))
def test_eval_forward_returns_boxes_scores_labels(arch: str, backbone: str) -> None:
    torch.manual_seed(0)
    model = build_detector(
        arch=arch, backbone=backbone, num_classes=3, fpn_channels=FPN, image_size=64
    ).eval()
    with torch.no_grad():
        outputs = model([torch.rand(3, 64, 64), torch.rand(3, 48, 64)])
    assert len(outputs) == 2
    for out, height in zip(outputs, (64, 48), strict=True):
        assert set(out) == {"boxes", "scores", "labels"}
        k = len(out["scores"])
        assert out["boxes"].shape == (k, 4)
        assert out["labels"].shape == (k,)
        assert ((out["labels"] >= 0) & (out["labels"] < 3)).all()
        assert (out["scores"] >= 0.05).all()
        # boxes come back in the input image's own coordinates
        assert (out["boxes"][:, 2] <= 64 + 1e-3).all()
        assert (out["boxes"][:, 3] <= height + 1e-3).all()


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"arch": "yolo"}, "'yolo'"),
        ({"backbone": "vgg16"}, "'vgg16'"),
        ({"fpn_channels": 48}, "48"),
        ({"fpn_channels": 32}, "32"),
        ({"num_classes": 0}, "0"),
    ],
)
def test_build_detector_rejects_bad_arguments_naming_the_value(
    overrides: dict[str, object], named: str
) -> None:
    options: dict[str, object] = {**SMALL, "image_size": 64, **overrides}
    with pytest.raises(ValueError, match=r"got|unknown") as info:
        build_detector(**options)  # type: ignore[arg-type]
    assert named in str(info.value)


# ---- weight files -------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_save_read_load_student_round_trip(tmp_path: Path, suffix: str) -> None:
    model = small_detector()
    meta = small_meta()
    path = tmp_path / f"student{suffix}"
    save_weights(model, meta, path)
    assert path.is_file()
    assert not list(tmp_path.glob(".*.tmp.*"))

    state, read_meta = read_weights(path)
    assert_same_state(state, model.state_dict())
    assert read_meta == meta

    loaded, loaded_meta = load_student(path)
    assert not loaded.training
    assert not any(m.training for m in loaded.modules())
    assert_same_state(loaded.state_dict(), model.state_dict())
    assert loaded_meta.class_names == ["circle", "square", "triangle"]
    assert loaded_meta.cat_ids == [1, 2, 7]
    assert loaded_meta == meta


def test_the_export_is_written_durably_by_the_checkpoints_helper(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each exported file is fsynced under its temporary name, renamed, and its folder fsynced,
    by the one helper checkpoints use, before the `end` event names it: a crash after that
    event finds every file it names, whole."""
    assert tid_core.models.write_atomic is tid_core.checkpoint.write_atomic  # no copy
    synced: list[tuple[str, list[str]]] = []  # (what was fsynced, the folder's files then)
    fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), sorted(os.listdir(tmp_path))))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    artifacts = export_student(small_detector(), small_meta(), tmp_path)

    pid, folder = os.getpid(), str(tmp_path)
    pt, st = "student.pt", "student.safetensors"
    assert synced == [
        (f"{folder}/.{pt}.tmp.{pid}", [f".{pt}.tmp.{pid}"]),
        (folder, [pt]),
        (f"{folder}/.{st}.tmp.{pid}", [f".{st}.tmp.{pid}", pt]),
        (folder, [pt, st]),
    ]
    assert sorted(artifacts) == [pt, st]


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_load_checked_loads_matching_weights(tmp_path: Path, suffix: str) -> None:
    model = small_detector()
    path = tmp_path / f"teacher{suffix}"
    save_weights(model, small_meta(), path)
    loaded = load_checked(path, **SMALL, image_size=64)  # type: ignore[arg-type]
    assert_same_state(loaded.state_dict(), model.state_dict())


@pytest.mark.parametrize(
    ("declared", "field", "saved", "wanted"),
    [
        ({"num_classes": 4}, "num_classes", "3", "4"),
        ({"backbone": "resnet18"}, "backbone", "'mobilenet_v3_large'", "'resnet18'"),
        ({"arch": "retinanet"}, "arch", "'fcos'", "'retinanet'"),
        ({"fpn_channels": 128}, "fpn_channels", "64", "128"),
    ],
    ids=["num_classes", "backbone", "arch", "fpn_channels"],
)
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_load_checked_rejects_metadata_mismatch_naming_field_and_values(
    tmp_path: Path, suffix: str, declared: dict[str, object], field: str, saved: str, wanted: str
) -> None:
    path = tmp_path / f"teacher{suffix}"
    save_weights(small_detector(), small_meta(), path)
    options: dict[str, object] = {**SMALL, "image_size": 64, **declared}
    with pytest.raises(WeightsMismatchError) as info:
        load_checked(path, **options)  # type: ignore[arg-type]
    message = str(info.value)
    assert f"{field}={saved}" in message
    assert f"{field}={wanted}" in message


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_load_checked_strictly_loads_raw_state_dict_without_metadata(
    tmp_path: Path, suffix: str
) -> None:
    model = small_detector()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = tmp_path / f"raw{suffix}"
    if suffix == ".pt":
        torch.save(state, path)
    else:
        save_file(state, str(path))
    assert read_weights(path)[1] is None
    loaded = load_checked(path, **SMALL, image_size=64)  # type: ignore[arg-type]
    assert_same_state(loaded.state_dict(), state)
    with pytest.raises(WeightsMismatchError, match="do not fit fcos/mobilenet_v3_large with 4"):
        load_checked(path, **{**SMALL, "num_classes": 4}, image_size=64)  # type: ignore[arg-type]


@pytest.mark.parametrize("change", ["missing", "unexpected"])
def test_load_checked_never_loads_partially(tmp_path: Path, change: str) -> None:
    state = dict(small_detector().state_dict())
    if change == "missing":
        del state["head.classification_head.cls_logits.bias"]
    else:
        state["head.extra.weight"] = torch.zeros(1)
    path = tmp_path / "raw.pt"
    torch.save(state, path)
    with pytest.raises(WeightsMismatchError, match=r"head\.(classification_head|extra)"):
        load_checked(path, **SMALL, image_size=64)  # type: ignore[arg-type]


def test_load_student_rejects_file_without_metadata(tmp_path: Path) -> None:
    path = tmp_path / "raw.pt"
    torch.save(dict(small_detector().state_dict()), path)
    with pytest.raises(WeightsMismatchError, match="no tid metadata"):
        load_student(path)


def test_read_weights_rejects_unknown_metadata_format(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    metadata = {**small_meta().to_strings(), "format": "something-else"}
    torch.save({"state_dict": {"a": torch.zeros(1)}, "metadata": metadata}, path)
    with pytest.raises(WeightsMismatchError, match="'something-else'"):
        read_weights(path)


def test_read_weights_rejects_pickle_of_plain_non_tensor_values(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save({"a": [1, 2, 3]}, path)
    with pytest.raises(WeightsMismatchError, match="neither a state_dict nor tid weights"):
        read_weights(path)


def test_read_weights_reports_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.pt"):
        read_weights(tmp_path / "nope.pt")


class _TouchOnUnpickle:
    """Unpickling this runs `Path(marker).touch()`: what a malicious weights file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[pathlib.Path]]:
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _malicious_file(path: Path, marker: Path) -> Path:
    payload = {
        "state_dict": {"w": torch.zeros(1), "evil": _TouchOnUnpickle(marker)},
        "metadata": small_meta().to_strings(),
    }
    torch.save(payload, path)
    return path


def test_malicious_payload_runs_code_when_unpickled_unsafely(tmp_path: Path) -> None:
    # Guards the test below: the payload really executes when loaded without weights_only.
    marker = tmp_path / "unsafe-marker"
    path = _malicious_file(tmp_path / "evil.pt", marker)
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()
    assert pickle.loads(pickle.dumps(_TouchOnUnpickle(marker))) is None
    assert marker.exists()


@pytest.mark.parametrize("loader", ["read_weights", "load_checked", "load_student"])
def test_weights_with_malicious_pickle_are_rejected_without_running_code(
    tmp_path: Path, loader: str
) -> None:
    marker = tmp_path / "marker"
    path = _malicious_file(tmp_path / "evil.pt", marker)
    with pytest.raises(WeightsMismatchError, match="not a plain weights file"):
        if loader == "read_weights":
            read_weights(path)
        elif loader == "load_checked":
            load_checked(path, **SMALL, image_size=64)  # type: ignore[arg-type]
        else:
            load_student(path)
    assert not marker.exists()


# ---- malformed files: every failure should be a WeightsMismatchError naming the file ------------


def test_read_weights_rejects_corrupt_safetensors_file(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(b"this is not a safetensors file")
    with pytest.raises(WeightsMismatchError, match=r"corrupt\.safetensors"):
        read_weights(path)


def test_read_weights_rejects_corrupt_pt_file(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.pt"
    path.write_bytes(b"this is not a torch file")
    with pytest.raises(WeightsMismatchError, match=r"corrupt\.pt is not a plain weights file"):
        read_weights(path)


def _with_metadata(path: Path, metadata: object) -> Path:
    torch.save({"state_dict": {"w": torch.zeros(1)}, "metadata": metadata}, path)
    return path


@pytest.mark.parametrize(
    "metadata",
    [
        pytest.param(
            {**small_meta().to_strings(), "num_classes": "three"},
            id="value-not-json",
        ),
        pytest.param(
            {"format": "tid-detector-v1"},
            id="fields-missing",
        ),
        pytest.param(
            ["tid-detector-v1"],
            id="not-a-dict",
        ),
    ],
)
def test_read_weights_rejects_malformed_tid_metadata(tmp_path: Path, metadata: object) -> None:
    path = _with_metadata(tmp_path / "w.pt", metadata)
    with pytest.raises(WeightsMismatchError):
        read_weights(path)


def test_load_student_rejects_tensors_that_do_not_fit_their_metadata(tmp_path: Path) -> None:
    path = tmp_path / "student.pt"
    save_weights(small_detector(num_classes=4), small_meta(num_classes=3), path)
    with pytest.raises(WeightsMismatchError):
        load_student(path)


def test_load_checked_rejects_teacher_of_other_classes(tmp_path: Path) -> None:
    path = tmp_path / "teacher.safetensors"
    save_weights(small_detector(), small_meta(), path)
    with pytest.raises(WeightsMismatchError, match=r"trained on classes \['circle'"):
        load_checked(
            path,
            **SMALL,
            image_size=64,
            class_names=["cat", "dog", "bird"],  # type: ignore[arg-type]
        )
    same = load_checked(
        path,
        **SMALL,
        image_size=64,
        class_names=["circle", "square", "triangle"],  # type: ignore[arg-type]
    )
    assert not any(p.isnan().any() for p in same.parameters())


# ---- backbone initialisation ---------------------------------------------------------------------


def classifier_file(tmp_path: Path, net: torch.nn.Module, *, counters: bool = True) -> Path:
    """A torchvision ImageNet classifier's file, as `torch.hub` saves it (random weights here)."""
    state = {k: v for k, v in net.state_dict().items() if counters or "num_batches" not in k}
    path = tmp_path / f"{type(net).__name__.lower()}.pth"
    torch.save(state, path)
    return path


@pytest.mark.parametrize(
    ("make", "backbone", "counters"),
    [(resnet18, "resnet18", False), (mobilenet_v3_large, "mobilenet_v3_large", True)],
)
def test_load_backbone_takes_a_classifiers_features_and_leaves_fpn_and_heads(
    tmp_path: Path, make: type[torch.nn.Module], backbone: str, counters: bool
) -> None:
    torch.manual_seed(1)
    net = make()
    path = classifier_file(tmp_path, net, counters=counters)
    model = small_detector(backbone=backbone)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    load_backbone(model, path, backbone=backbone)
    after = model.state_dict()
    source = net.state_dict()
    prefix = "features." if backbone == "mobilenet_v3_large" else ""
    body = [k for k in after if k.startswith("backbone.body.")]
    used = {prefix + k.removeprefix("backbone.body.") for k in body}
    unused = {k for k in source if "num_batches" not in k} - used
    assert unused and all(k.startswith(("fc.", "classifier.")) for k in unused)
    for key in body:
        assert torch.equal(after[key], source[prefix + key.removeprefix("backbone.body.")]), key
    assert_same_state(
        {k: v for k, v in after.items() if not k.startswith("backbone.body.")},
        {k: v for k, v in before.items() if not k.startswith("backbone.body.")},
    )
    assert describe_weights(path) == {"backbone": backbone}

    # trained as torchvision trains a pretrained backbone: frozen BatchNorm, the stem frozen
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.body.modules())
    trains = {n.split(".")[0]: p.requires_grad for n, p in model.backbone.body.named_parameters()}
    stem, last = ("conv1", "layer4") if backbone == "resnet18" else ("0", "16")
    assert (trains[stem], trains[last]) == (False, True)
    assert all(p.requires_grad for p in model.backbone.fpn.parameters())


def test_every_backbone_has_the_stages_the_spec_allows_to_train() -> None:
    assert {name: len(b.stage_starts) for name, b in BACKBONES.items()} == BACKBONE_STAGES


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v3_large"])
def test_trainable_backbone_layers_freeze_what_torchvision_freezes(
    tmp_path: Path, backbone: str
) -> None:
    """For every `trainable_layers`, the parameters left training are torchvision's own
    (`resnet_fpn_backbone` / `mobilenet_backbone` with that `trainable_layers`)."""
    make = resnet18 if backbone == "resnet18" else mobilenet_v3_large
    path = classifier_file(tmp_path, make())
    for layers in range(BACKBONE_STAGES[backbone] + 1):
        model = small_detector(backbone=backbone)
        load_backbone(model, path, backbone=backbone, trainable_layers=layers)
        ours = {n for n, p in model.backbone.body.named_parameters() if p.requires_grad}
        if backbone == "resnet18":
            reference = resnet_fpn_backbone(
                backbone_name=backbone, weights=None, trainable_layers=layers
            )
        else:
            reference = mobilenet_backbone(
                backbone_name=backbone, weights=None, fpn=True, trainable_layers=layers
            )
        theirs = {n for n, p in reference.body.named_parameters() if p.requires_grad}
        assert ours == theirs, (layers, sorted(ours ^ theirs)[:5])
        assert bool(ours) == (layers > 0)


def test_load_backbone_takes_a_detectors_backbone_of_another_arch_and_width(
    tmp_path: Path,
) -> None:
    source = small_detector(arch="retinanet", fpn_channels=96)
    path = tmp_path / "retina.safetensors"
    save_weights(source, small_meta(arch="retinanet", fpn_channels=96), path)
    model = small_detector(arch="fcos", num_classes=5)
    load_backbone(model, path, backbone="mobilenet_v3_large")
    loaded = model.backbone.body.state_dict()
    assert_same_state(
        loaded, {k: v for k, v in source.backbone.body.state_dict().items() if k in loaded}
    )

    # what it then exports (frozen BatchNorm: no step counters) loads as a plain detector, and
    # computes the same; a backbone trained frozen initialises another student the same way
    exported = tmp_path / "student.safetensors"
    save_weights(model, small_meta(num_classes=5), exported)
    plain, _ = load_student(exported)
    images = [torch.rand(3, 64, 64)]
    model.eval()
    with torch.no_grad():
        assert torch.allclose(plain(images)[0]["scores"], model(images)[0]["scores"])
    again = small_detector()
    load_backbone(again, exported, backbone="mobilenet_v3_large")
    assert_same_state(again.backbone.body.state_dict(), loaded)


def test_load_backbone_refuses_another_backbone_naming_what_differs(tmp_path: Path) -> None:
    model = small_detector(backbone="resnet18")
    deeper = classifier_file(tmp_path, resnet34())  # every resnet18 tensor, and more blocks
    with pytest.raises(WeightsMismatchError, match=r"not hold a resnet18: .* layer1\.2\."):
        load_backbone(model, deeper, backbone="resnet18")
    other = classifier_file(tmp_path, mobilenet_v3_large())
    with pytest.raises(WeightsMismatchError, match="100 of its 100 tensors are missing"):
        load_backbone(model, other, backbone="resnet18")
    detector = tmp_path / "mbv3.safetensors"
    save_weights(small_detector(), small_meta(), detector)
    with pytest.raises(WeightsMismatchError, match="from a mobilenet_v3_large detector"):
        load_backbone(model, detector, backbone="resnet18")
    state = resnet18().state_dict()
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(WeightsMismatchError, match=r"layer1\.0\.conv1\.weight \(64, 64, 1, 1\)"):
        load_backbone(model, tmp_path / "bad.pt", backbone="resnet18")
    assert describe_weights(deeper) == {"backbone": "resnet34"}
    with pytest.raises(WeightsMismatchError, match="neither tid detector weights nor"):
        describe_weights(tmp_path / "bad.pt")
