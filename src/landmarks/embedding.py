"""Embedding images with a model: the one loop over a dataset (the embed stage; train's validation,
subspace and initialisation passes; predict's photos, through ImageViews) and the test-time-augmented
views that the embed stage and predict share.

A model runs in eval mode on channels-last inputs (faster on GPUs and on CPUs alike: oneDNN's NHWC
kernels, 1.4-1.8x for EfficientNet-Lite0 inference), under bf16 autocast on a GPU when `amp` is on.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm import tqdm

from .common import StageError
from .loader import eval_transform  # the loader owns the eval transform


def model_input(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch moved to `device` in channels-last memory format."""
    return images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)


def run_model(model, images: torch.Tensor, device: torch.device, *, amp: bool, pooled: bool = False) -> torch.Tensor:
    """The model's embeddings of a batch (float32, not normalised); with `pooled`, the backbone's pooled
    descriptors instead (before the neck)."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
        embedding = model.descriptor_of(images) if pooled else model(images)
    return embedding.float()


@torch.no_grad()
def embed_dataset(
    model,
    dataset: Dataset,
    embed_batch: Callable[[object], np.ndarray],
    out: np.ndarray,
    *,
    batch_size: int,
    workers: int,
    device: torch.device,
    progress: bool = False,
    desc: str = "embed",
    check: Callable[[np.ndarray, np.ndarray], None] | None = None,
) -> np.ndarray:
    """Fill `out[positions]` with `embed_batch(inputs)` for every (inputs, label, positions) batch of
    `dataset` (a loader dataset: positions are rows of its index), with the model in eval mode for the
    duration. `check(batch, rows)` may refuse a batch before it is stored. Returns which rows were
    written (a dataset may hold only this process's share of the index)."""
    written = np.zeros(len(out), bool)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        collate_fn=collate_by_shape,
    )
    bar = tqdm(
        loader,
        total=-(-len(out) // batch_size),
        desc=desc,
        unit="batch",
        disable=not progress,
        mininterval=2.0 if sys.stderr.isatty() else 30.0,
    )
    was_training = model.training
    model.eval()
    try:
        for groups in bar:
            for inputs, _, positions in groups:
                batch = embed_batch(inputs)
                rows = positions.numpy()
                if check is not None:
                    check(batch, rows)
                out[rows] = batch
                written[rows] = True
    finally:
        bar.close()
        model.train(was_training)
    return written


def _input_shapes(inputs) -> tuple:
    return tuple(view.shape for view in inputs) if isinstance(inputs, (tuple, list)) else (inputs.shape,)


def collate_by_shape(samples: list) -> list:
    """A batch as groups of (inputs, labels, positions), one per shape of the image tensors, each collated
    as usual: whole photos (embed.whole_image) keep their aspect ratios, so one batch can hold several
    sizes. Centre-cropped views all share one shape: one group, the usual batch."""
    groups: dict[tuple, list] = {}
    for sample in samples:
        groups.setdefault(_input_shapes(sample[0]), []).append(sample)
    return [default_collate(group) for group in groups.values()]


# ---------------------------------------------------------------------------------------------------
# Test-time augmentation: scales x flips, averaged


def tta_sizes(image_size: int, scales) -> list[int]:
    """Input size of each TTA scale (at least 16 px), in the order given."""
    if not scales:
        raise StageError("embed: at least one TTA scale is needed (embed.scales)")
    if any(s <= 0 for s in scales):
        raise StageError(f"embed.scales: scales must be positive, got {list(scales)}")
    return [max(16, int(round(image_size * scale))) for scale in scales]


class MultiScaleTransform:
    """One decoded image -> a tuple of tensors, one per TTA size (so each image is read only once)."""

    def __init__(self, sizes, mean, std, *, whole_image: bool = False):
        self.transforms = [eval_transform(size, mean, std, whole_image=whole_image) for size in sizes]

    def __call__(self, image):
        return tuple(transform(image) for transform in self.transforms)


class ImageViews(Dataset):
    """Decoded images held in memory (predict's photos) as an `embed_dataset` dataset: item i is image
    i's views through `transform` (a MultiScaleTransform), no label (-1) and its position i."""

    def __init__(self, images: list, transform: MultiScaleTransform):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), -1, i


@torch.no_grad()
def embed_views(model, views_by_scale, device: torch.device, *, flip: bool = False, amp: bool = True) -> np.ndarray:
    """One batch's L2-normalised embeddings (float32) from its images at each TTA scale (a tensor per
    scale): each view (scale x flip) normalised, the views averaged, the average normalised."""
    total = None
    for images in views_by_scale:
        images = model_input(images, device)
        for view in [images, torch.flip(images, dims=[3])] if flip else [images]:
            embedding = F.normalize(run_model(model, view, device, amp=amp), dim=1)
            total = embedding if total is None else total + embedding
    return F.normalize(total, dim=1).cpu().numpy()
