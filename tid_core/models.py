"""Detectors (torchvision FCOS / RetinaNet) on hand-built FPNs, and their weight files.

Every backbone yields the same five FPN levels (P3..P7, strides 8..128) at a chosen width, so a
teacher and a student of different backbones produce aligned feature grids. torchvision's own
FPN helpers fix the width at 256; we build `BackboneWithFPN` directly to choose it.
No pretrained weights are ever downloaded: a student's backbone starts from a file the user
supplies (`load_backbone`: a torchvision ImageNet state dict, or a detector trained here).

Weight files carry metadata (arch, backbone, classes, ...) and are checked against what the
caller declares before a strict load: a mismatch raises `WeightsMismatchError`, never a partial
load (a backbone load is strict over the backbone and leaves the FPN and heads alone).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn
from torchvision.models import mobilenet_v3_large, resnet18, resnet34, resnet50
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from tid_core.checkpoint import save_atomic, sha256_file, write_atomic
from tid_core.spec import ARCHS, TRAINABLE_BACKBONE_LAYERS

STRIDES = (8, 16, 32, 64, 128)
WEIGHTS_FORMAT = "tid-detector-v1"


@dataclass(frozen=True)
class _BackboneDef:
    build: Callable[[], nn.Module]
    return_layers: dict[str, str]  # module name -> FPN input name, strides 8, 16, 32
    in_channels: list[int]
    # the body's child where each stage starts, from the input (torchvision's stages, whose
    # last `trainable_backbone_layers` train on a pretrained backbone)
    stage_starts: tuple[str, ...]


def _resnet(fn: Callable[..., nn.Module]) -> Callable[[], nn.Module]:
    return lambda: fn(weights=None)


def _mobilenet() -> nn.Module:
    # The stride-8/16/32 stages end at features[6], [12], [16]; the classifier is not needed.
    features: nn.Module = mobilenet_v3_large(weights=None).features
    return features


_RESNET_LAYERS = {"layer2": "0", "layer3": "1", "layer4": "2"}
_RESNET_STAGES = ("conv1", "layer1", "layer2", "layer3", "layer4")  # conv1: with bn1, the stem
# torchvision's stages of MobileNetV3: the first block, the blocks that reduce resolution, the
# last conv
_MOBILENET_STAGES = ("0", "2", "4", "7", "13", "16")
BACKBONES: dict[str, _BackboneDef] = {
    "resnet18": _BackboneDef(_resnet(resnet18), _RESNET_LAYERS, [128, 256, 512], _RESNET_STAGES),
    "resnet34": _BackboneDef(_resnet(resnet34), _RESNET_LAYERS, [128, 256, 512], _RESNET_STAGES),
    "resnet50": _BackboneDef(_resnet(resnet50), _RESNET_LAYERS, [512, 1024, 2048], _RESNET_STAGES),
    "mobilenet_v3_large": _BackboneDef(
        _mobilenet, {"6": "0", "12": "1", "16": "2"}, [40, 112, 960], _MOBILENET_STAGES
    ),
}


class WeightsMismatchError(ValueError):
    """Weights that do not fit the declared detector (arch, backbone, classes, shapes)."""


@dataclass(frozen=True)
class DetectorMeta:
    """What a weight file says about the detector it holds."""

    arch: str
    backbone: str
    num_classes: int
    fpn_channels: int
    input_size: int
    class_names: list[str] = field(default_factory=list)
    cat_ids: list[int] = field(default_factory=list)
    spec_hash: str = ""

    def to_strings(self) -> dict[str, str]:
        """safetensors metadata must be str -> str."""
        out = {k: json.dumps(v) for k, v in asdict(self).items()}
        out["format"] = WEIGHTS_FORMAT
        return out

    @classmethod
    def from_strings(cls, raw: object) -> DetectorMeta:
        """Parse metadata written by `to_strings`; anything else is a WeightsMismatchError."""
        if not isinstance(raw, dict) or raw.get("format") != WEIGHTS_FORMAT:
            got = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
            raise WeightsMismatchError(
                f"weights metadata format is {got!r}, expected {WEIGHTS_FORMAT!r}"
            )
        names = cls.__dataclass_fields__
        try:
            return cls(**{k: json.loads(v) for k, v in raw.items() if k in names})
        except (TypeError, ValueError) as exc:
            raise WeightsMismatchError(f"malformed {WEIGHTS_FORMAT} metadata: {exc}") from exc


def _fpn_backbone(backbone: str, fpn_channels: int) -> BackboneWithFPN:
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; expected one of {sorted(BACKBONES)}")
    spec = BACKBONES[backbone]
    return BackboneWithFPN(
        spec.build(),
        return_layers=spec.return_layers,
        in_channels_list=spec.in_channels,
        out_channels=fpn_channels,
        extra_blocks=LastLevelP6P7(fpn_channels, fpn_channels),
    )


def build_detector(
    *, arch: str, backbone: str, num_classes: int, fpn_channels: int = 128, image_size: int = 512
) -> FCOS | RetinaNet:
    """A randomly initialised detector whose transform resizes inputs to `image_size`.

    Eval keeps low-score boxes (0.05) because COCO mAP needs the whole precision curve.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if fpn_channels % 32 or fpn_channels < 64:
        # FCOS heads use GroupNorm(32): 32 channels would leave one value per group on 1x1 levels
        raise ValueError(f"fpn_channels must be a multiple of 32 and >= 64, got {fpn_channels}")
    body = _fpn_backbone(backbone, fpn_channels)
    common = {"min_size": image_size, "max_size": image_size, "score_thresh": 0.05}
    if arch == "fcos":
        anchors = AnchorGenerator(tuple((s,) for s in STRIDES), ((1.0,),) * len(STRIDES))
        return FCOS(body, num_classes, anchor_generator=anchors, **common)
    if arch == "retinanet":
        sizes = tuple(tuple(int(4 * s * 2 ** (k / 3)) for k in range(3)) for s in STRIDES)
        anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(STRIDES))
        return RetinaNet(body, num_classes, anchor_generator=anchors, **common)
    raise ValueError(f"unknown arch {arch!r}; expected one of {list(ARCHS)}")


def build_from_meta(meta: DetectorMeta) -> FCOS | RetinaNet:
    return build_detector(
        arch=meta.arch,
        backbone=meta.backbone,
        num_classes=meta.num_classes,
        fpn_channels=meta.fpn_channels,
        image_size=meta.input_size,
    )


def save_weights(model: nn.Module, meta: DetectorMeta, path: Path) -> None:
    """Write a detector's weights with metadata, as `.safetensors` or `.pt` by suffix, as a
    checkpoint is written (atomic, fsynced): the `end` event that names the file comes after."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        encoded = safetensors_bytes(state, metadata=meta.to_strings())
        write_atomic(path, lambda f: f.write(encoded))
    else:
        save_atomic({"state_dict": state, "metadata": meta.to_strings()}, path)


def export_student(model: nn.Module, meta: DetectorMeta, folder: Path) -> dict[str, Any]:
    """Write `student.pt` and `student.safetensors` into `folder`; each file's size and SHA-256
    by name, so a copy can be checked against the run's `end` event."""
    artifacts = {}
    for name in ("student.pt", "student.safetensors"):
        path = folder / name
        save_weights(model, meta, path)
        artifacts[name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    return artifacts


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], DetectorMeta | None]:
    """Read a weight file without running any pickled code (safetensors or weights_only)."""
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                raw_meta = f.metadata() or {}
            state = load_file(str(path))
        except SafetensorError as exc:
            raise WeightsMismatchError(f"{path} is not a valid safetensors file: {exc}") from exc
        return state, DetectorMeta.from_strings(raw_meta) if raw_meta else None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors come in many types; all mean "not plain weights"
        raise WeightsMismatchError(f"{path} is not a plain weights file: {exc}") from exc
    if isinstance(obj, dict) and "state_dict" in obj and "metadata" in obj:
        return obj["state_dict"], DetectorMeta.from_strings(obj["metadata"])
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, None
    raise WeightsMismatchError(f"{path} holds neither a state_dict nor tid weights")


def load_checked(
    path: Path,
    *,
    arch: str,
    backbone: str,
    num_classes: int,
    fpn_channels: int,
    image_size: int,
    class_names: Sequence[str] | None = None,
) -> FCOS | RetinaNet:
    """Build the declared detector and load `path` into it strictly, or raise naming the misfit.

    With `class_names` (the dataset's), weights that name their classes must name the same ones
    in the same order: a teacher of another label space would teach the wrong classes.
    """
    state, meta = read_weights(path)
    if meta is not None:
        declared = {
            "arch": arch,
            "backbone": backbone,
            "num_classes": num_classes,
            "fpn_channels": fpn_channels,
        }
        for key, want in declared.items():
            got = getattr(meta, key)
            if got != want:
                raise WeightsMismatchError(
                    f"teacher weights {path.name} have {key}={got!r} but the spec declares "
                    f"{key}={want!r}"
                )
        if class_names is not None and meta.class_names and meta.class_names != list(class_names):
            raise WeightsMismatchError(
                f"teacher weights {path.name} were trained on classes {meta.class_names} but "
                f"the dataset has {list(class_names)}"
            )
    model = build_detector(
        arch=arch,
        backbone=backbone,
        num_classes=num_classes,
        fpn_channels=fpn_channels,
        image_size=image_size,
    )
    _load_strict(model, state, path, f"{arch}/{backbone} with {num_classes} classes")
    return model


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], path: Path, what: str) -> None:
    """All keys and shapes must match: a partial load would silently train on noise. A missing
    BatchNorm `num_batches_tracked` (a backbone trained frozen has none) is a step counter, not
    a weight: the model's own stands in."""
    counters = {k: v for k, v in model.state_dict().items() if k.endswith("num_batches_tracked")}
    try:
        model.load_state_dict({**counters, **state}, strict=True)
    except RuntimeError as exc:
        raise WeightsMismatchError(f"weights {path.name} do not fit {what}: {exc}") from exc


# where a backbone's body sits in the files `load_backbone` reads: a torchvision ResNet
# classifier (top level), a MobileNetV3 classifier (`features`), a detector (`backbone.body`)
_BODY_PREFIXES = ("", "features.", "backbone.body.")


def _body_tensors(
    state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], *, what: str
) -> dict[str, torch.Tensor]:
    """`own` (a backbone body's state dict) filled from `state`, or a WeightsMismatchError.

    Keys beyond the body (a classifier's `fc`, a detector's FPN and heads) are not used; keys
    inside it must all be the body's. BatchNorm's `num_batches_tracked` may be missing (older
    torchvision files, backbones trained frozen): it counts steps, it is not a weight.
    """
    counters = {k for k in state if k.endswith("num_batches_tracked")}
    needed = [k for k in own if not k.endswith("num_batches_tracked")]
    prefix = max(_BODY_PREFIXES, key=lambda p: sum(p + k in state for k in needed))
    missing = [k for k in needed if prefix + k not in state]
    if missing:
        raise WeightsMismatchError(
            f"{what}: {len(missing)} of its {len(needed)} tensors are missing "
            f"(e.g. {', '.join(missing[:3])})"
        )
    # a deeper network of the family (ResNet34's layer1.2 for a ResNet18) is not this backbone
    modules = {k.split(".")[0] for k in own}
    inside = [k.removeprefix(prefix) for k in state if k.startswith(prefix) and k not in counters]
    extra = [k for k in inside if k not in own and k.split(".")[0] in modules]
    if extra:
        raise WeightsMismatchError(
            f"{what}: {len(extra)} tensors are not in it (e.g. {', '.join(extra[:3])})"
        )
    found = {k: state[prefix + k] for k in own if prefix + k in state}
    wrong = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in found.items()
        if v.shape != own[k].shape
    ]
    if wrong:
        raise WeightsMismatchError(f"{what}: shapes differ: {'; '.join(wrong[:3])}")
    return {**own, **found}


def load_backbone(
    model: FCOS | RetinaNet,
    path: Path,
    *,
    backbone: str,
    trainable_layers: int = TRAINABLE_BACKBONE_LAYERS,
) -> None:
    """Initialise `model`'s backbone from `path` (a torchvision classifier's state dict or a
    detector of the same backbone): all of its weights, or a WeightsMismatchError. Pretraining
    transfers features, not the task: the FPN and heads keep their initialisation. The backbone
    then trains as a pretrained one does (`_freeze_pretrained`): its last `trainable_layers`
    stages."""
    state, meta = read_weights(path)
    if meta is not None and meta.backbone != backbone:
        raise WeightsMismatchError(
            f"backbone weights {path.name} are from a {meta.backbone} detector but the spec "
            f"declares {backbone}"
        )
    body = model.backbone.body
    what = f"backbone weights {path.name} do not hold a {backbone}"
    body.load_state_dict(_body_tensors(state, body.state_dict(), what=what), strict=True)
    _freeze_pretrained(body, BACKBONES[backbone].stage_starts, trainable_layers)


def _freeze_pretrained(body: nn.Module, stage_starts: tuple[str, ...], trainable: int) -> None:
    """Train a pretrained backbone as torchvision's detectors do: FrozenBatchNorm2d (a
    detector's few images per GPU would wreck the pretrained statistics) and only its last
    `trainable` stages updated (`stage_starts`: where each stage begins among the body's
    children)."""
    for module in list(body.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.BatchNorm2d):
                frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
                for key in ("weight", "bias", "running_mean", "running_var"):
                    getattr(frozen, key).copy_(getattr(child, key).detach())
                setattr(module, name, frozen)
    children = [name for name, _ in body.named_children()]
    first = (
        children.index(stage_starts[len(stage_starts) - trainable]) if trainable else len(children)
    )
    for name in children[:first]:
        body.get_submodule(name).requires_grad_(False)


def describe_weights(path: Path) -> dict[str, Any]:
    """What a weights file holds, once it loads: a detector's metadata (loaded strictly into
    the detector it declares), or, without tid metadata, `{"backbone": name}` for the backbone
    whose weights it holds (what `load_backbone` accepts). Else a WeightsMismatchError."""
    state, meta = read_weights(path)
    if meta is not None:
        _from_meta(state, meta, path)
        return asdict(meta)
    for name in BACKBONES:
        try:
            _body_tensors(state, _fpn_backbone(name, 64).body.state_dict(), what=name)
        except WeightsMismatchError:
            continue
        return {"backbone": name}
    raise WeightsMismatchError(
        f"{path.name} holds neither tid detector weights nor the weights of a backbone "
        f"({', '.join(BACKBONES)})"
    )


def _from_meta(state: dict[str, torch.Tensor], meta: DetectorMeta, path: Path) -> FCOS | RetinaNet:
    """The detector `meta` describes, holding `state` (strictly)."""
    model = build_from_meta(meta)
    what = f"{meta.arch}/{meta.backbone} with {meta.num_classes} classes (its own metadata)"
    _load_strict(model, state, path, what)
    return model


def load_student(
    path: str | Path, *, device: str | torch.device = "cpu"
) -> tuple[FCOS | RetinaNet, DetectorMeta]:
    """Load an exported student (`student.safetensors` or `student.pt`) for inference.

    Returns the detector in eval mode and its metadata (class names, the dataset's category ids).
    """
    path = Path(path)
    state, meta = read_weights(path)
    if meta is None:
        raise WeightsMismatchError(f"{path} has no tid metadata; use load_checked with the spec")
    return _from_meta(state, meta, path).to(device).eval(), meta
