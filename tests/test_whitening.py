"""Learned whitening: what it learns from labelled embeddings, and that model.pt carries it."""

import numpy as np
import pytest
import torch

from landmarks.model import LandmarkModel, model_from_checkpoint
from landmarks.whitening import (
    apply_whitening,
    fit_whitening,
    ledoit_wolf_shrinkage,
    unwhiten,
    within_class_deviations,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def normalised(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def views_with_a_shared_nuisance(rng, classes=6, views=8, dim=24, nuisance=3.0):
    """Photos of `classes` landmarks: each a point plus small noise plus a large shift in 3 directions
    that say nothing about the landmark (light, season: they vary as much within every class)."""
    centres = 0.3 * rng.normal(size=(classes, dim))
    labels = np.repeat(np.arange(classes), views)
    x = centres[labels] + 0.1 * rng.normal(size=(len(labels), dim))
    x[:, :3] += nuisance * rng.normal(size=(len(labels), 3)) / np.sqrt(3)
    return normalised(x).astype(np.float32), labels


def nearest_neighbour_accuracy(x, labels):
    cosines = x @ x.T
    np.fill_diagonal(cosines, -np.inf)
    return float((labels[cosines.argmax(1)] == labels).mean())


def test_whitening_divides_out_what_varies_within_landmarks():
    x, labels = views_with_a_shared_nuisance(np.random.default_rng(0))
    whitening = fit_whitening(x, labels)
    whitened = apply_whitening(x, whitening)
    assert np.allclose(np.linalg.norm(whitened, axis=1), 1.0, atol=1e-5)
    assert nearest_neighbour_accuracy(x, labels) < 0.7  # the nuisance decides the raw neighbours
    assert nearest_neighbour_accuracy(whitened, labels) > 0.9
    assert 0 < whitening["about"]["shrinkage"] < 1 and whitening["about"]["images"] == len(x)


def test_full_whitening_without_shrinkage_makes_the_within_class_covariance_the_identity():
    rng = np.random.default_rng(1)
    x, labels = views_with_a_shared_nuisance(rng, classes=10, views=30, dim=8)
    whitening = fit_whitening(x, labels, shrinkage=0.0, power=1.0)
    projected = (x - whitening["mean"]) @ whitening["matrix"].T
    deviations = np.concatenate(list(within_class_deviations(projected, labels)))
    assert np.allclose(deviations.T @ deviations / len(deviations), np.eye(8), atol=1e-3)


def test_ledoit_wolf_shrinkage_matches_the_published_estimate():
    """Against the formula written out row by row (scikit-learn's ledoit_wolf_shrinkage, centred data)."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(12, 5)) * np.array([3.0, 1.0, 1.0, 0.5, 0.1])
    n, p = x.shape
    sample = x.T @ x / n
    mu = np.trace(sample) / p
    d2 = ((sample - mu * np.eye(p)) ** 2).sum() / p
    b2 = sum(((np.outer(row, row) - sample) ** 2).sum() for row in x) / n**2 / p
    expected = min(b2, d2) / d2
    got = ledoit_wolf_shrinkage(n, x.T @ x, float(((x**2).T @ (x**2)).sum()), float(np.trace(x.T @ x)))
    assert got == pytest.approx(expected, rel=1e-9)
    scales = np.array([3.0, 1.0, 1.0, 0.5, 0.1])
    assert ledoit_wolf_shrinkage(4000, *stats(rng.normal(size=(4000, 5)) * scales)) < got / 10  # more rows, less
    assert ledoit_wolf_shrinkage(4000, *stats(rng.normal(size=(4000, 5)))) > 0.5  # already a multiple of I


def stats(x):
    return x.T @ x, float(((x**2).T @ (x**2)).sum()), float(np.trace(x.T @ x))


def test_no_landmark_with_two_photos_learns_no_whitening():
    x = normalised(np.random.default_rng(3).normal(size=(5, 8))).astype(np.float32)
    assert fit_whitening(x, np.arange(5)) is None
    assert fit_whitening(np.vstack([x, x]), np.tile(np.arange(5), 2)) is None  # each photo twice: nothing differs
    assert apply_whitening(x, None) is x


def test_model_pt_carries_the_whitening_to_every_stage_that_embeds(tmp_path):
    """embed, predict and score rebuild the model with model_from_checkpoint: the whitening must come
    with it, applied in float32 after the L2 normalisation."""
    model = LandmarkModel("test_resnet", "none", neck="none").eval()
    images = torch.rand(4, 3, 40, 40)
    plain = model.embed(images).numpy()
    rng = np.random.default_rng(4)
    whitening = {"mean": rng.normal(size=96).astype(np.float32) * 0.01}
    whitening["matrix"] = (np.eye(96) + 0.1 * rng.normal(size=(96, 96))).astype(np.float32)
    weights = {**model.state_dict(), "whiten_mean": torch.from_numpy(whitening["mean"])}
    weights["whiten_matrix"] = torch.from_numpy(whitening["matrix"])
    settings = {"backbone": "test_resnet", "embedding_dim": 512, "gem_p": 3.0, "neck": "none"}
    torch.save({"model": weights, "settings": settings, "data_config": model.data_config}, tmp_path / "model.pt")
    rebuilt, _ = model_from_checkpoint(tmp_path / "model.pt")
    embedded = rebuilt.eval().embed(images).numpy()
    assert np.allclose(embedded, apply_whitening(plain, whitening), atol=1e-5)
    assert not np.allclose(embedded, plain, atol=1e-3)


def test_the_embeddings_before_the_whitening_come_back_from_its_float16_output():
    """retrieve re-whitens stored embeddings with another whitening of the same model (its threshold folds)."""
    x, labels = views_with_a_shared_nuisance(np.random.default_rng(4))
    whitening = fit_whitening(x, labels)
    stored = apply_whitening(x, whitening).astype(np.float16)  # as embed writes them
    assert np.abs(unwhiten(stored, whitening) - x).max() < 2e-3
    assert not np.array_equal(apply_whitening(x, whitening), stored.astype(np.float32))  # float16 did round
