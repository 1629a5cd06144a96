"""How training fine-tunes a pretrained backbone: what is trained, at which learning rate, from where.

- Start: `initialise_from_pretrained` (`neck_init: pca`, `head_init: class_means`) sets the neck and the
  head from the pretrained descriptors of a sample of train images, before any step.
- What is trained: `set_backbone_frozen` (`freeze_backbone_epochs`) and `set_train_mode` (`freeze_bn`:
  the backbone's BatchNorm statistics stay as pretrained).
- Learning rates: `parameter_groups` (backbone at `lr`, scaled down layer by layer with `layer_decay`,
  the rest at `lr * head_lr_multiplier`; no weight decay on one-dimensional parameters),
  `build_optimizer`, and the schedule `warmup_cosine`.
- Held near the start: `pull_towards_start` (`l2sp`) after every step.
- End: `interpolate_weights`, the WiSE-FT blend of trained and starting weights (`wise_alpha`).

The defaults were measured on real photos (bench/real_photos.py); `train` applies them, this module
only knows the model, the head and the settings.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .distributed import Distributed
from .loader import ShardIndex
from .model import LandmarkModel
from .sampler import epoch_rng, images_per_class
from .validation import embed_for_training

log = logging.getLogger("landmarks.train")  # the stage this serves, as its log lines always said

INIT_IMAGES_PER_CLASS = 20  # images per class embedded to initialise the neck (PCA) and the head (class means)
PCA_MAX_IMAGES = 50_000


def initialise_from_pretrained(
    model: LandmarkModel,
    head: nn.Module,
    train_index: ShardIndex,
    class_of: np.ndarray,
    settings: dict,
    device,
    dist: Distributed,
) -> dict | None:
    """Start the neck and the head from what the pretrained backbone already sees, before any step:
    `neck_init: pca` makes the neck a PCA whitening of the pooled descriptors; `head_init: class_means`
    puts each class weight at its class's mean embedding, so the first steps refine the embedding
    instead of dragging it towards random class weights. One pass over (a sample of) the train images."""
    if settings["neck_init"] != "pca" and settings["head_init"] != "class_means":
        return None
    started = time.perf_counter()
    chosen = images_per_class(class_of, INIT_IMAGES_PER_CLASS, epoch_rng(settings["seed"], 0, 11))
    if len(chosen) > PCA_MAX_IMAGES:
        chosen = np.sort(epoch_rng(settings["seed"], 0, 12).choice(chosen, PCA_MAX_IMAGES, replace=False))
    sub_index = ShardIndex(train_index.table.iloc[chosen].reset_index(drop=True))
    pooled = torch.from_numpy(embed_for_training(model, sub_index, settings, device, dist, pooled=True))
    about = {"images": len(chosen)}
    if settings["neck_init"] == "pca":
        about["pca"] = model.init_neck_from_pca(pooled.to(device), settings["pca_shrinkage"])
    if settings["head_init"] == "class_means":
        about.update(head_from_class_means(model, head, pooled.to(device), class_of[chosen]))
    about["seconds"] = round(time.perf_counter() - started, 1)
    log.info("initialised from the pretrained descriptors of %d train images: %s", len(chosen), about)
    return about


def head_from_class_means(model: LandmarkModel, head: nn.Module, pooled: torch.Tensor, classes: np.ndarray) -> dict:
    """The head started from the embeddings of the pooled descriptors (`classes`: each row's class):
    each head knows what to set from them (class weights at the class means, sub-centers at its views);
    returns its counts for train.json."""
    with torch.no_grad():
        was_training = model.training
        model.eval()
        embeddings = F.normalize(model.embedding_from_pooled(pooled).float(), dim=1)
        model.train(was_training)
    return head.init_from_embeddings(embeddings, torch.from_numpy(classes).to(embeddings.device))


def set_backbone_frozen(model: LandmarkModel, frozen: bool) -> None:
    """Freeze the backbone (no gradients, BatchNorm statistics kept) while the head warms up."""
    for param in model.backbone.parameters():
        param.requires_grad_(not frozen)


def set_train_mode(module: nn.Module, model: LandmarkModel, *, backbone_frozen: bool, freeze_bn: bool) -> None:
    """Training mode, except the backbone's BatchNorm layers when their statistics are frozen (all of
    the backbone while it is frozen): small batches of few classes would otherwise rewrite the
    statistics the pretrained weights rely on."""
    module.train()
    if backbone_frozen:
        model.backbone.eval()
    elif freeze_bn:
        for layer in model.backbone.modules():
            if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                layer.eval()


def parameter_groups(model: LandmarkModel, head: nn.Module, settings: dict) -> list[dict]:
    """Backbone at `lr` (scaled down layer by layer when `layer_decay` < 1), pooling/neck/head at
    `lr * head_lr_multiplier`; no weight decay on biases, norms and GeM's p (one-dimensional
    parameters), as usual."""
    decay_rate = settings["weight_decay"]
    if settings["layer_decay"] < 1:
        # timm's layer-wise decay (BEiT): the last block at lr, each block below it at layer_decay x the next.
        from timm.optim import param_groups_layer_decay

        backbone = param_groups_layer_decay(
            model.backbone, weight_decay=decay_rate, layer_decay=settings["layer_decay"]
        )
        groups = [
            {"params": g["params"], "lr": settings["lr"] * g["lr_scale"], "weight_decay": g["weight_decay"]}
            for g in backbone
        ]
    else:
        groups = _decay_split(model.backbone.parameters(), settings["lr"], decay_rate)
    rest = [p for m in (model.pool, model.neck, model.bn, head) for p in m.parameters()]
    groups += _decay_split(rest, settings["lr"] * settings["head_lr_multiplier"], decay_rate)
    return [g for g in groups if g["params"]]


def _decay_split(params, lr: float, weight_decay: float) -> list[dict]:
    params = [p for p in params if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim > 1], "lr": lr, "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "lr": lr, "weight_decay": 0.0},
    ]


def build_optimizer(groups: list[dict], settings: dict) -> torch.optim.Optimizer:
    if settings["optimizer"] == "sgd":
        return torch.optim.SGD(groups, momentum=settings["momentum"])
    if settings["optimizer"] == "adam":
        return torch.optim.Adam(groups)
    return torch.optim.AdamW(groups)


def pull_towards_start(model: LandmarkModel, start: dict, optimizer: torch.optim.Optimizer, strength: float) -> None:
    """L2-SP, decoupled (`l2sp`): after an optimizer step each trainable backbone weight moves lr x strength
    of the way back to its starting (pretrained) value, at its own group's lr, so a weight the photos
    push one way every step settles near 1 / strength from where it started, and one they push back and
    forth returns to it. `start`: the model's state_dict before the first step."""
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    with torch.no_grad():
        for name, param in model.backbone.named_parameters():
            if param.requires_grad and id(param) in lr_of:
                param.lerp_(start[f"backbone.{name}"].to(param.dtype), min(1.0, lr_of[id(param)] * strength))


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, final: float = 0.0) -> float:
    """Learning-rate factor: linear warm-up to 1, then cosine decay to `final` (min_lr / lr)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def interpolate_weights(start: dict, trained: dict, alpha: float) -> dict:
    """alpha x trained + (1 - alpha) x start for every floating-point tensor (counters: the trained ones)."""
    return {
        key: torch.lerp(start[key].to(value.dtype), value, alpha) if value.is_floating_point() else value
        for key, value in trained.items()
    }
