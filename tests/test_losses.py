"""Heads and losses of the train stage: values computed by hand, and each loss learns a separable set."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from landmarks import losses as losses_module
from landmarks.config import load_schema, section_settings
from landmarks.losses import (
    ArcMarginHead,
    BatchHardTripletLoss,
    SoftmaxHead,
    build_head,
    dynamic_margins,
    head_entry,
    head_names,
    inverse_log_class_weights,
    register_head,
    spherical_kmeans,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def unit(degrees: float) -> list[float]:
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


def cross_entropy_by_hand(logits: list[float], target: int) -> float:
    return -logits[target] + math.log(sum(math.exp(z) for z in logits))


def test_arcface_adds_the_angular_margin_to_the_true_class_only():
    head = ArcMarginHead(2, 2, s=10.0, m=0.5)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([unit(0), unit(90)]))
    embedding = torch.tensor([unit(60)]) * 3.7  # the length must not matter
    loss = head(embedding, torch.tensor([0]))
    # true class: angle 60 degrees, plus the margin; other class: plain cosine of 30 degrees
    expected = cross_entropy_by_hand([10 * math.cos(math.radians(60) + 0.5), 10 * math.cos(math.radians(30))], 0)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # theta + m beyond pi: the monotonic fallback cos(theta) - m * sin(m)
    far = torch.tensor([unit(170)])
    loss = head(far, torch.tensor([0]))
    expected = cross_entropy_by_hand(
        [10 * (math.cos(math.radians(170)) - 0.5 * math.sin(0.5)), 10 * math.cos(math.radians(80))], 0
    )
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_subcenter_arcface_takes_the_closest_subcenter_of_each_class():
    head = ArcMarginHead(2, 2, s=8.0, m=0.2, k=2)
    with torch.no_grad():  # rows are class-major: class 0 sub-centers at 0 and 90 degrees, class 1 at 180, 270
        head.weight.copy_(torch.tensor([unit(0), unit(90), unit(180), unit(270)]))
    embedding = torch.tensor([unit(60)])
    assert head.cosine(embedding)[0].tolist() == pytest.approx(
        [math.cos(math.radians(30)), math.cos(math.radians(120))], abs=1e-6
    )
    expected = cross_entropy_by_hand([8 * math.cos(math.radians(30)), 8 * math.cos(math.radians(120) + 0.2)], 1)
    assert head(embedding, torch.tensor([1])).item() == pytest.approx(expected, rel=1e-5)


def test_dynamic_margins_grow_for_rare_classes():
    margins = dynamic_margins(torch.tensor([1, 16, 81]), 0.05, 0.5)
    # count^-1/4 = 1, 1/2, 1/3, rescaled linearly onto [0.05, 0.5]
    assert margins.tolist() == pytest.approx([0.5, 0.05 + 0.45 * 0.25, 0.05])
    # every landmark with 5 photos (few-shot): none is rarer, so none gets the low end of the range
    assert dynamic_margins(torch.tensor([5, 5, 5]), 0.05, 0.5).tolist() == pytest.approx([0.275] * 3)
    settings = section_settings(
        "train",
        {"loss": "subcenter_arcface", "dynamic_margin": True, "subcenters": 1, "embedding_dim": 8, "arcface_s": 4.0},
    )
    head = build_head(settings, 3, torch.tensor([1, 16, 81]), settings["embedding_dim"])
    padded = lambda degrees: unit(degrees) + [0.0] * 6  # noqa: E731  (the schema wants at least 8 dimensions)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([padded(0), padded(120), padded(240)]))
    loss = head(torch.tensor([padded(100)]), torch.tensor([1]))  # class 1 (16 images): margin 0.1625
    expected = cross_entropy_by_hand(
        [4 * math.cos(math.radians(100)), 4 * math.cos(math.radians(20) + 0.1625), 4 * math.cos(math.radians(140))], 1
    )
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_batch_hard_triplet_by_hand():
    # Class 0 at 0 and 90 degrees, class 1 at 180 and 120 degrees on the unit circle; chord = 2 sin(angle / 2).
    embeddings = torch.tensor([unit(0), unit(90), unit(180), unit(120)]) * torch.tensor([[1.0], [2.0], [0.5], [1.0]])
    labels = torch.tensor([0, 0, 1, 1])
    chord = lambda degrees: 2 * math.sin(math.radians(degrees) / 2)  # noqa: E731
    gaps = [
        chord(90) - chord(120),  # anchor 0: farthest positive 90, closest negative 120
        chord(90) - chord(30),  # anchor 90: positive 0, negative 120
        chord(60) - chord(90),  # anchor 180: positive 120, negative 90
        chord(60) - chord(30),
    ]  # anchor 120: positive 180, negative 90
    soft = BatchHardTripletLoss(None)(embeddings, labels)
    assert soft.item() == pytest.approx(sum(math.log1p(math.exp(g)) for g in gaps) / 4, rel=1e-5)
    hard = BatchHardTripletLoss(0.2)(embeddings, labels)
    assert hard.item() == pytest.approx(sum(max(0.0, g + 0.2) for g in gaps) / 4, rel=1e-5)


def test_triplet_gradient_stays_finite_with_duplicate_images():
    # A class with fewer than K images repeats them in a P x K batch: zero distances must not give NaN.
    embeddings = torch.tensor([unit(10), unit(10), unit(200), unit(200), unit(250)], requires_grad=True)
    loss = BatchHardTripletLoss(None)(embeddings, torch.tensor([0, 0, 1, 1, 1]))
    loss.backward()
    assert torch.isfinite(embeddings.grad).all()
    no_pairs = BatchHardTripletLoss(None)(embeddings, torch.tensor([0, 1, 2, 3, 4]))
    assert no_pairs.item() == 0.0  # no anchor with a positive: nothing to learn, not NaN


def test_inverse_log_class_weights_and_weighted_losses():
    weights = inverse_log_class_weights(torch.tensor([2, 8]))
    assert weights.tolist() == pytest.approx([1.5, 0.5])  # 1/ln 2 : 1/ln 8 = 3 : 1, mean 1
    head = SoftmaxHead(2, 2, class_weights=weights)
    with torch.no_grad():
        head.fc.weight.copy_(torch.eye(2))
        head.fc.bias.zero_()
    embeddings, labels = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([1, 1])
    per_sample = [cross_entropy_by_hand([1.0, 0.0], 1), cross_entropy_by_hand([0.0, 2.0], 1)]
    assert head(embeddings, labels).item() == pytest.approx(sum(per_sample) / 2, rel=1e-5)  # one class: weights cancel
    bce = SoftmaxHead(2, 2, binary=True)
    with torch.no_grad():
        bce.fc.weight.copy_(torch.eye(2))
        bce.fc.bias.zero_()
    softplus = lambda z: math.log1p(math.exp(z))  # noqa: E731  BCE(z, 1) = softplus(-z), BCE(z, 0) = softplus(z)
    expected = ((softplus(1.0) + softplus(-0.0)) + (softplus(0.0) + softplus(-2.0))) / 2
    assert bce(embeddings, labels).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("loss", ["softmax", "bce", "arcface", "subcenter_arcface", "triplet"])
def test_every_head_learns_a_separable_set(loss):
    torch.manual_seed(0)
    classes, per_class = 4, 12
    centres = torch.randn(classes, 6) * 3
    labels = torch.arange(classes).repeat_interleave(per_class)
    inputs = centres[labels] + torch.randn(len(labels), 6) * 0.5
    settings = section_settings(
        "train",
        {
            "loss": loss,
            "embedding_dim": 8,
            "dynamic_margin": loss.startswith("sub"),
            "class_weights": "inverse_log" if loss == "softmax" else "none",
            "arcface_s": 8.0,
        },
    )
    head = build_head(settings, classes, torch.bincount(labels), settings["embedding_dim"])
    embed = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8))
    optimizer = torch.optim.Adam(list(embed.parameters()) + list(head.parameters()), lr=0.02)
    losses = []
    for _ in range(40):
        value = head(embed(inputs), labels)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        losses.append(value.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_heads_start_at_the_class_means():
    sums = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 0.0]])  # class 1 has no image
    head = ArcMarginHead(3, 3, k=2)
    before = head.weight.detach().clone()
    assert head.init_from_class_means(sums) == 2
    weight = head.weight.detach().view(3, 2, 3)
    assert torch.allclose(weight[0], torch.tensor([[1.0, 0.0, 0.0]] * 2))
    assert torch.allclose(weight[2], torch.tensor([[2**-0.5, 2**-0.5, 0.0]] * 2))
    assert torch.equal(weight[1], before.view(3, 2, 3)[1])  # untouched
    softmax = SoftmaxHead(3, 3)
    assert softmax.init_from_class_means(sums) == 2 and softmax.fc.bias.abs().sum() == 0
    assert softmax.logits(torch.tensor([[1.0, 0.0, 0.0]])).argmax() == 0
    assert BatchHardTripletLoss().init_from_embeddings(torch.eye(3), torch.tensor([0, 1, 2])) == {
        "head_classes_initialised": 0
    }


def test_every_head_starts_from_the_embeddings_of_its_images():
    # the hook train calls: plain ArcFace and softmax heads report their classes, no sub-centers
    embeddings = F.normalize(torch.tensor([[1.0, 0.2, 0.0], [1.0, -0.2, 0.0], [0.0, 1.0, 0.0]]), dim=1)
    classes = torch.tensor([0, 0, 2])
    arcface = ArcMarginHead(3, 3)
    assert arcface.init_from_embeddings(embeddings, classes) == {"head_classes_initialised": 2}
    assert torch.allclose(F.normalize(arcface.weight[0].detach(), dim=0), torch.tensor([1.0, 0.0, 0.0]), atol=1e-6)
    softmax = SoftmaxHead(3, 3)
    assert softmax.init_from_embeddings(embeddings, classes) == {"head_classes_initialised": 2}
    assert softmax.logits(embeddings).argmax(1).tolist() == [0, 0, 2]


def test_subcenters_start_at_the_views_of_their_landmark():
    # landmark 0: two views (around x and around y); landmark 1: one image
    embeddings = torch.tensor([[1.0, 0.1, 0.0], [1.0, -0.1, 0.0], [0.1, 1.0, 0.0], [-0.1, 1.0, 0.0], [0.0, 0.0, 1.0]])
    classes = torch.tensor([0, 0, 0, 0, 1])
    head = ArcMarginHead(3, 2, k=2)
    counts = head.init_from_embeddings(F.normalize(embeddings, dim=1), classes)
    assert counts == {"head_classes_initialised": 2, "head_subcenters_spread": 1}
    weight = head.weight.detach().view(2, 2, 3)
    assert sorted(weight[0].argmax(1).tolist()) == [0, 1]  # one sub-center per view, not both at the mean
    assert torch.allclose(weight[1], torch.tensor([[0.0, 0.0, 1.0]] * 2))  # a single image: its mean
    # each view's images now match their own sub-center best, with nothing lost against the mean
    cos = F.normalize(embeddings[:4], dim=1) @ weight[0].T
    assert (cos.amax(1) > 0.99).all()
    assert spherical_kmeans(F.normalize(embeddings[:4], dim=1), 1).squeeze(0) == pytest.approx(
        torch.tensor([2**-0.5, 2**-0.5, 0.0]), abs=1e-6
    )


def test_the_registry_holds_every_loss_the_schema_offers():
    schema_losses = load_schema()["$defs"]["train"]["properties"]["loss"]["enum"]
    assert sorted(head_names()) == sorted(schema_losses)
    assert [name for name in head_names() if not head_entry(name).has_logits] == ["triplet"]
    with pytest.raises(ValueError, match="unknown loss 'cosface'"):
        build_head({"loss": "cosface"}, 3, torch.ones(3), 8)


def test_a_new_loss_is_one_registered_builder(monkeypatch):
    monkeypatch.setattr(losses_module, "_HEADS", dict(losses_module._HEADS))  # registered for this test only

    @register_head("plain_softmax", has_logits=True)
    def plain_softmax(settings, n_classes, class_counts, dim):
        return SoftmaxHead(dim, n_classes)

    head = build_head({"loss": "plain_softmax"}, 3, torch.ones(3), 8)
    assert isinstance(head, SoftmaxHead) and head.fc.out_features == 3
    assert head_entry("plain_softmax").has_logits
    with pytest.raises(ValueError, match="registered twice"):
        register_head("plain_softmax")(plain_softmax)
