"""Classification heads and metric-learning losses for the `train` stage.

Every head takes the embedding batch and the class numbers and returns the loss;
`loss_and_logits` also returns the per-class scores it computed on the way (None for the triplet
loss), which the training loop uses for the training accuracy without a second matrix product.
Heads compute in float32 whatever the autocast state: margins on cosines near 1 need the precision.

Each loss is registered by name (`register_head`, as timm registers models): a new loss is a head class
and a registered builder here, plus its name in config.schema.yaml's `train.loss` enum.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def inverse_log_class_weights(counts: torch.Tensor) -> torch.Tensor:
    """Weights 1/log(count), normalised to mean 1 over the classes (rare classes count more)."""
    weights = 1.0 / torch.log(counts.float().clamp(min=2.0))
    return weights / weights.mean()


def dynamic_margins(counts: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Per-class ArcFace margins that grow for rare classes (GLR2020 winners): m ∝ count^-1/4,
    rescaled linearly into [low, high]. Classes all of one size (a few-shot train set) have no rare
    ones: every margin is then the middle of the range, not its low end."""
    x = counts.float().clamp(min=1.0).pow(-0.25)
    span = x.max() - x.min()
    if span <= 1e-12:
        return torch.full_like(x, (low + high) / 2)
    return low + (high - low) * (x - x.min()) / span


def spherical_kmeans(points: torch.Tensor, k: int, iterations: int = 10) -> torch.Tensor:
    """k unit centroids of unit-norm `points` (k <= len(points)) by cosine k-means, started
    deterministically: the point nearest the mean, then each time the point farthest from those chosen."""
    mean = F.normalize(points.mean(0), dim=0)
    chosen = [int((points @ mean).argmax())]
    while len(chosen) < k:
        chosen.append(int((points @ points[chosen].T).amax(1).argmin()))
    centroids = points[chosen]
    for _ in range(iterations):
        assignment = (points @ centroids.T).argmax(1)
        sums = torch.zeros_like(centroids).index_add_(0, assignment, points)
        empty = sums.norm(dim=1) == 0
        centroids = torch.where(empty.unsqueeze(1), centroids, F.normalize(sums, dim=1))
    return centroids


def class_sums(embeddings: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Per class, the sum of its images' embeddings (zero for a class without images): the direction
    of its mean."""
    sums = torch.zeros(n_classes, embeddings.shape[1], device=embeddings.device, dtype=embeddings.dtype)
    return sums.index_add_(0, labels, embeddings)


class ArcMarginHead(nn.Module):
    """ArcFace (k=1) and sub-center ArcFace (k>1): logit of the true class is s*cos(theta + m).

    With k sub-centers per class the class cosine is the max over its sub-centers. `margins` may be a
    scalar or a per-class tensor (dynamic margins).
    """

    def __init__(
        self,
        embedding_dim: int,
        n_classes: int,
        s: float = 30.0,
        m: float | torch.Tensor = 0.3,
        k: int = 1,
        class_weights: torch.Tensor | None = None,
    ):
        super().__init__()
        self.n_classes, self.k, self.s = n_classes, k, s
        self.weight = nn.Parameter(torch.empty(n_classes * k, embedding_dim))
        nn.init.xavier_uniform_(self.weight)
        margins = torch.as_tensor(m, dtype=torch.float32).expand(n_classes).clone()
        self.register_buffer("margins", margins)
        self.register_buffer("class_weights", class_weights if class_weights is not None else torch.ones(n_classes))

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        with torch.autocast(embeddings.device.type, enabled=False):
            cos = F.linear(F.normalize(embeddings.float()), F.normalize(self.weight.float()))
        return cos.view(-1, self.n_classes, self.k).amax(dim=2)

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.s * self.cosine(embeddings)

    @torch.no_grad()
    def init_from_class_means(self, sums: torch.Tensor) -> int:
        """Each class's weights (all its sub-centers) at the direction of its mean embedding; classes
        without images keep their random weights. Returns how many classes were set."""
        present = sums.norm(dim=1) > 0
        weight = self.weight.view(self.n_classes, self.k, -1)
        weight[present] = F.normalize(sums[present], dim=1).unsqueeze(1).to(weight.dtype)
        return int(present.sum())

    @torch.no_grad()
    def init_from_embeddings(self, embeddings: torch.Tensor, labels: torch.Tensor) -> dict:
        """`head_init: class_means`: every class at its images' mean (unit-norm) embedding, and with
        k > 1 its sub-centers at the views among its images. Returns the counts train.json reports."""
        counts = {
            "head_classes_initialised": self.init_from_class_means(class_sums(embeddings, labels, self.n_classes))
        }
        if self.k > 1:
            counts["head_subcenters_spread"] = self.init_subcenters(embeddings, labels)
        return counts

    @torch.no_grad()
    def init_subcenters(self, embeddings: torch.Tensor, classes: torch.Tensor) -> int:
        """Sub-centers (k > 1) of each class at the k-means centroids of its images' embeddings, so that
        each starts at one view of the landmark. At the class mean all k tie, the max picks the first for
        every image, and the other k - 1 learn only as copies pushed away from other classes. A class with
        fewer images than k keeps its surplus sub-centers at the mean. Returns how many classes were set."""
        weight = self.weight.view(self.n_classes, self.k, -1)
        order = torch.argsort(classes)  # one sort, not one scan of every image per class (GLDv2: 81k classes)
        labels, sizes = torch.unique_consecutive(classes[order], return_counts=True)
        spread = 0
        for label, rows in zip(labels.tolist(), torch.split(order, sizes.tolist())):
            if len(rows) < 2:
                continue
            members = F.normalize(embeddings[rows].float(), dim=1)
            centroids = spherical_kmeans(members, min(self.k, len(members)))
            weight[label, : len(centroids)] = centroids.to(weight.dtype)
            spread += 1
        return spread

    def margin_logits(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self._apply_margin(self.cosine(embeddings), labels)

    def _apply_margin(self, cos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = cos.clamp(-1 + 1e-7, 1 - 1e-7)
        m = self.margins[labels].unsqueeze(1)
        # cos(theta + m) = cos*cos(m) - sin*sin(m); past theta + m > pi the function stops being
        # monotonic, so there use the usual linear fallback cos - m*sin(m) ("easy margin" off).
        sin = torch.sqrt(1.0 - cos * cos)
        cos_margin = cos * torch.cos(m) - sin * torch.sin(m)
        cos_margin = torch.where(cos > torch.cos(math.pi - m), cos_margin, cos - m * torch.sin(m))
        one_hot = F.one_hot(labels, self.n_classes).bool()
        return self.s * torch.where(one_hot, cos_margin, cos)

    def loss_and_logits(self, embeddings: torch.Tensor, labels: torch.Tensor):
        cos = self.cosine(embeddings)
        loss = F.cross_entropy(self._apply_margin(cos, labels), labels, weight=self.class_weights)
        return loss, self.s * cos.detach()

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss_and_logits(embeddings, labels)[0]


class SoftmaxHead(nn.Module):
    """Plain linear classifier with softmax cross-entropy (or one-vs-all binary cross-entropy)."""

    def __init__(
        self, embedding_dim: int, n_classes: int, binary: bool = False, class_weights: torch.Tensor | None = None
    ):
        super().__init__()
        self.fc = nn.Linear(embedding_dim, n_classes)
        self.binary, self.n_classes = binary, n_classes
        self.register_buffer("class_weights", class_weights if class_weights is not None else torch.ones(n_classes))

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        with torch.autocast(embeddings.device.type, enabled=False):
            return self.fc(embeddings.float())

    @torch.no_grad()
    def init_from_class_means(self, sums: torch.Tensor) -> int:
        """Weights along each class's mean embedding (scaled like a softmax over cosines), zero bias."""
        present = sums.norm(dim=1) > 0
        self.fc.weight[present] = (10.0 * F.normalize(sums[present], dim=1)).to(self.fc.weight.dtype)
        self.fc.bias.zero_()
        return int(present.sum())

    def init_from_embeddings(self, embeddings: torch.Tensor, labels: torch.Tensor) -> dict:
        """`head_init: class_means` from the images' (unit-norm) embeddings; returns train.json's count."""
        return {"head_classes_initialised": self.init_from_class_means(class_sums(embeddings, labels, self.n_classes))}

    def loss_and_logits(self, embeddings: torch.Tensor, labels: torch.Tensor):
        logits = self.logits(embeddings)
        if self.binary:
            target = F.one_hot(labels, self.n_classes).float()
            per_sample = F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(1)
            loss = (per_sample * self.class_weights[labels]).sum() / self.class_weights[labels].sum()
        else:
            loss = F.cross_entropy(logits, labels, weight=self.class_weights)
        return loss, logits.detach()

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss_and_logits(embeddings, labels)[0]


class BatchHardTripletLoss(nn.Module):
    """Batch-hard triplet loss on L2-normalised embeddings: for each anchor the farthest positive and
    the closest negative in the batch; soft margin log(1 + exp(d_ap - d_an)) when `margin` is None."""

    def __init__(self, margin: float | None = None):
        super().__init__()
        self.margin = margin

    def logits(self, embeddings: torch.Tensor) -> None:
        return None

    def init_from_embeddings(self, embeddings: torch.Tensor, labels: torch.Tensor) -> dict:
        return {"head_classes_initialised": 0}  # no class weights to initialise

    def loss_and_logits(self, embeddings: torch.Tensor, labels: torch.Tensor):
        return self.forward(embeddings, labels), None

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = F.normalize(embeddings.float(), dim=1)
        distances = torch.cdist(x, x)
        same = labels.unsqueeze(0) == labels.unsqueeze(1)
        eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        positives = same & ~eye
        valid = positives.any(1) & (~same).any(1)
        if not valid.any():
            return distances.sum() * 0.0  # no anchor has both a positive and a negative in this batch
        hardest_positive = distances.masked_fill(~positives, float("-inf")).amax(1)
        hardest_negative = distances.masked_fill(same, float("inf")).amin(1)
        gap = (hardest_positive - hardest_negative)[valid]
        if self.margin is None:
            return F.softplus(gap).mean()
        return F.relu(gap + self.margin).mean()


# ---------------------------------------------------------------------------------------------------
# The registry (after timm's model registry): a loss is a builder registered under the name that
# config.yaml's `train.loss` gives it, with what the training loop needs to know about its head.


@dataclass(frozen=True)
class HeadEntry:
    """A registered head/loss: its builder, called as build(settings, n_classes, class_counts, dim), and
    `has_logits`: whether the head scores every class (a classifier: train accuracy, class weights to
    start at the class means) or only compares embeddings within the batch (triplet)."""

    name: str
    build: Callable[[dict, int, torch.Tensor, int], nn.Module]
    has_logits: bool = True


_HEADS: dict[str, HeadEntry] = {}


def register_head(name: str, *, has_logits: bool = True):
    """Decorator: register `build(settings, n_classes, class_counts, dim) -> nn.Module` as loss `name`
    (which config.schema.yaml's `train.loss` enum must list too)."""

    def register(build):
        if name in _HEADS:
            raise ValueError(f"loss {name!r} is registered twice")
        _HEADS[name] = HeadEntry(name, build, has_logits)
        return build

    return register


def head_names() -> list[str]:
    """The registered losses, in registration order."""
    return list(_HEADS)


def head_entry(name: str) -> HeadEntry:
    if name not in _HEADS:
        raise ValueError(f"unknown loss {name!r} (registered: {', '.join(_HEADS)})")
    return _HEADS[name]


def build_head(settings: dict, n_classes: int, class_counts: torch.Tensor, dim: int) -> nn.Module:
    """The head/loss named by `settings['loss']` (train section of config.yaml) for `dim`-d embeddings."""
    return head_entry(settings["loss"]).build(settings, n_classes, class_counts, dim)


def _class_weights(settings: dict, class_counts: torch.Tensor) -> torch.Tensor | None:
    return inverse_log_class_weights(class_counts) if settings["class_weights"] == "inverse_log" else None


def _arcface(settings: dict, n_classes: int, class_counts: torch.Tensor, dim: int, k: int) -> ArcMarginHead:
    margin = settings["arcface_m"]
    if settings["dynamic_margin"]:
        margin = dynamic_margins(class_counts, settings["dynamic_margin_min"], settings["dynamic_margin_max"])
    return ArcMarginHead(dim, n_classes, settings["arcface_s"], margin, k, _class_weights(settings, class_counts))


@register_head("arcface")
def arcface(settings: dict, n_classes: int, class_counts: torch.Tensor, dim: int) -> nn.Module:
    return _arcface(settings, n_classes, class_counts, dim, k=1)


@register_head("subcenter_arcface")
def subcenter_arcface(settings: dict, n_classes: int, class_counts: torch.Tensor, dim: int) -> nn.Module:
    return _arcface(settings, n_classes, class_counts, dim, k=settings["subcenters"])


@register_head("softmax")
def softmax(settings: dict, n_classes: int, class_counts: torch.Tensor, dim: int) -> nn.Module:
    return SoftmaxHead(dim, n_classes, binary=False, class_weights=_class_weights(settings, class_counts))


@register_head("bce")
def bce(settings: dict, n_classes: int, class_counts: torch.Tensor, dim: int) -> nn.Module:
    return SoftmaxHead(dim, n_classes, binary=True, class_weights=_class_weights(settings, class_counts))


@register_head("triplet", has_logits=False)
def triplet(settings: dict, n_classes: int, class_counts: torch.Tensor, dim: int) -> nn.Module:
    return BatchHardTripletLoss(settings["triplet_margin"])
