"""Where in a photo its match comes from: Grad-CAM on the cosine to a target embedding.

The embedding is GeM pooled over the backbone's feature map A, so every location of A feeds it; the
gradient of cos(embedding, target) with respect to A, times A itself (summed over channels), is each
location's contribution to that cosine to first order. Its positive part is where the photo looks
like what the target (e.g. the top neighbour's embedding) looks like. Used by the score report and
by predict's evidence.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .loader import eval_transform


def model_view(image: Image.Image, image_size: int) -> Image.Image:
    """The RGB image as the model sees it: loader.eval_transform's resize and centre crop, before the
    tensor conversion."""
    from torchvision import transforms

    geometry = eval_transform(image_size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)).transforms[:2]
    return transforms.Compose(geometry)(image.convert("RGB"))


@torch.no_grad()
def embed_image(model, image: Image.Image, image_size: int) -> torch.Tensor:
    """The model's unit embedding of one image, one view (eval transform): a saliency target."""
    device = next(model.parameters()).device
    transform = eval_transform(image_size, model.data_config["mean"], model.data_config["std"])
    return model.embed(transform(image.convert("RGB")).unsqueeze(0).to(device))[0]


def similarity_map(model, image: Image.Image, target, image_size: int) -> np.ndarray:
    """(h, w) float32 map in [0, 1], h x w the feature map's size: which regions of `image` make its
    embedding similar to `target` (a unit embedding). relu(sum_c A_c * dcos/dA_c), divided by its
    max (all zeros when nothing pulls towards the target). The model runs in eval mode, its
    parameters and their .grad are left as they were, and its training flag is restored."""
    mean, std = model.data_config["mean"], model.data_config["std"]
    device = next(model.parameters()).device
    x = eval_transform(image_size, mean, std)(image.convert("RGB")).unsqueeze(0).to(device)
    if isinstance(target, torch.Tensor):
        target = target.detach().to(device=device, dtype=torch.float32).flatten()
    else:
        target = torch.as_tensor(np.asarray(target, dtype=np.float32), device=device).flatten()
    target = F.normalize(target, dim=0)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():  # no graph through the backbone: only the pooled head needs gradients
            features = model.feature_map(x).float()
        with torch.enable_grad():
            features = features.detach().requires_grad_(True)
            embedding = model.whitened(model.embedding_from_pooled(model.pool(features))).float()
            cosine = (F.normalize(embedding, dim=1)[0] * target).sum()
            (gradient,) = torch.autograd.grad(cosine, features)  # fills no parameter's .grad
        heat = torch.relu((features.detach() * gradient).sum(1))[0]
    finally:
        model.train(was_training)
    peak = heat.max()
    heat = heat / peak if peak > 0 else torch.zeros_like(heat)
    return heat.cpu().numpy().astype(np.float32)


def overlay(image: Image.Image, heat: np.ndarray, alpha: float = 0.45, cmap: str = "jet") -> Image.Image:
    """`heat` (values in [0, 1]) upsampled bilinearly to the image's size, coloured with a matplotlib
    colormap and blended over the image with weight `alpha`; RGB."""
    import matplotlib

    image = image.convert("RGB")
    field = Image.fromarray(np.asarray(heat, dtype=np.float32)).resize(image.size, Image.Resampling.BILINEAR)
    colours = matplotlib.colormaps[cmap](np.clip(np.asarray(field), 0.0, 1.0))[..., :3]
    coloured = Image.fromarray((colours * 255).round().astype(np.uint8))
    return Image.blend(image, coloured, alpha)


def saliency_overlay(model, image: Image.Image, target, image_size: int) -> Image.Image:
    """The image as the model sees it, with its similarity map towards `target` over it."""
    return overlay(model_view(image, image_size), similarity_map(model, image, target, image_size))
