"""Saliency: Grad-CAM on the cosine to a target embedding, and its overlay."""

import numpy as np
import pytest
import torch
from PIL import Image

from landmarks.loader import eval_transform
from landmarks.model import LandmarkModel
from landmarks.saliency import model_view, overlay, saliency_overlay, similarity_map

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SIZE = 128  # simple_cnn pools 5 times: a 4 x 4 feature map


def _stripes(size: int) -> np.ndarray:
    """Diagonal red / yellow stripes, 8 px period."""
    band = ((np.arange(size)[:, None] + np.arange(size)[None, :]) // 4) % 2
    return np.where(band[..., None] == 0, (230, 40, 40), (250, 230, 60)).astype(np.uint8)


def _checks(size: int) -> np.ndarray:
    """A dark blue / cyan checkerboard, 16 px period."""
    yy, xx = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    band = (yy // 8 + xx // 8) % 2
    return np.where(band[..., None] == 0, (20, 40, 160), (40, 200, 220)).astype(np.uint8)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LandmarkModel("simple_cnn", "none", embedding_dim=32).eval()


def _embedding(model, pixels: np.ndarray) -> torch.Tensor:
    transform = eval_transform(SIZE, model.data_config["mean"], model.data_config["std"])
    return model.embed(transform(Image.fromarray(pixels)).unsqueeze(0))[0]


@pytest.mark.parametrize("target_half", ["left", "right"])
def test_the_half_that_looks_like_the_target_is_salient(model, target_half):
    # Left half stripes, right half checks; the target is the embedding of one texture tiled over a
    # whole image. Why it holds for a random network: the cosine does not change when the feature map is
    # scaled, so the unclipped map sums to ~0 over locations (GeM and the neck are homogeneous); the
    # locations whose features pull the embedding towards the target are positive, the others negative.
    # A textured target is needed: a flat one switches few features on and pulls weakly. (Checked over
    # 10 seeds of the random backbone, both ways round: left - right mean saliency >= 0.29 every time.)
    stripes, checks = _stripes(SIZE), _checks(SIZE)
    picture = np.concatenate([stripes[:, : SIZE // 2], checks[:, SIZE // 2 :]], axis=1)
    target = _embedding(model, stripes if target_half == "left" else checks)
    heat = similarity_map(model, Image.fromarray(picture), target, SIZE)
    width = heat.shape[1]
    left, right = heat[:, : width // 2].mean(), heat[:, width // 2 :].mean()
    assert (left > right + 0.2) if target_half == "left" else (right > left + 0.2)


def test_map_has_the_feature_maps_shape_and_lies_in_0_1(model):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 150, 3), dtype=np.uint8))
    # Seeded: an unseeded random target can pull nowhere (an all-zero map), making the test order-dependent.
    target = torch.nn.functional.normalize(
        torch.randn(model.embedding_dim, generator=torch.Generator().manual_seed(0)), dim=0
    )
    heat = similarity_map(model, image, target.numpy(), SIZE)  # a numpy target works too
    with torch.no_grad():
        features = model.feature_map(torch.zeros(1, 3, SIZE, SIZE))
    assert heat.shape == tuple(features.shape[2:]) == (4, 4) and heat.dtype == np.float32
    assert heat.min() >= 0 and heat.max() == pytest.approx(1.0)
    # Not towards the image's own embedding: there the cosine is at its maximum (1), its gradient is 0
    # and the map is rounding noise, zero or not by chance (that check was order-dependent).


def test_model_is_left_as_it_was(model):
    target = _embedding(model, _checks(SIZE))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    image = Image.fromarray(_stripes(SIZE))
    model.train()  # the flag must come back; BatchNorm statistics must not move (eval inside)
    first = similarity_map(model, image, target, SIZE)
    assert model.training
    model.eval()
    assert np.array_equal(similarity_map(model, image, target.numpy(), SIZE), first) and not model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())


def test_model_view_and_overlay_keep_the_geometry(model):
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (60, 100, 3), dtype=np.uint8))
    view = model_view(image, SIZE)
    assert view.size == (SIZE, SIZE) and view.mode == "RGB"
    # exactly what the model gets, before normalisation
    unnormalised = eval_transform(SIZE, (0, 0, 0), (1, 1, 1))
    assert torch.equal(unnormalised(image), unnormalised(view))
    gray = image.convert("L")  # any mode in, RGB out
    heat = np.array([[0.0, 1.0], [0.5, 0.0]], np.float32)
    blended = overlay(gray, heat)
    assert blended.size == gray.size and blended.mode == "RGB"
    # alpha 0 is the image itself; the hot corner (top right) is coloured differently from the cold one
    assert np.array_equal(np.asarray(overlay(image, heat, alpha=0.0)), np.asarray(image))
    flat = Image.new("RGB", (40, 40), (128, 128, 128))
    pixels = np.asarray(overlay(flat, heat, alpha=1.0)).astype(int)
    assert np.abs(pixels[2, 37] - pixels[37, 37]).sum() > 100
    target = _embedding(model, _stripes(SIZE))
    shown = saliency_overlay(model, image, target, SIZE)
    assert shown.size == (SIZE, SIZE) and shown.mode == "RGB"
