"""Batch samplers for the `train` stage: which images form each batch of an epoch, on each DDP rank.

Every epoch's plan is a pure function of (seed, epoch, world size[, clusters]): all ranks compute the
same list of batches and rank r takes batches r, r + world, r + 2 world, ... (disjoint for the random
sampler). A resumed run recomputes the plan and skips the batches it already trained on, so a job
killed mid-epoch continues with exactly the batches it would have seen.

Each item a sampler yields is (position in the index, augmentation seed): `SeededDataset` seeds the
random crops/flips of that one image with it, so augmentation does not depend on which DataLoader
worker decodes the image, nor on how many batches ran before a restart.

Modes (train.sampler):
  random    a permutation of all labelled images, cut into batches of `batch_size`.
  pk        P classes x K images per batch (batch-hard triplet, or class-balanced batches for a
            classifier loss): classes are visited in shuffled rounds, each class's images in shuffled
            rounds (a class with fewer than K images repeats, each time with other augmentations). A
            triplet loss needs a positive, so its classes of one image are left out; a classifier
            loss (ArcFace, softmax, BCE) trains on them too (`min_class_images`).
  subspace  P x K batches whose P classes all come from one cluster of similar classes (seed 004's
            "subspaces": k-means over class-mean embeddings, `cluster_classes`), so the negatives in
            a batch are hard ones.

`images_per_class` draws a few images of every class, for the passes training makes over a sample of
its images (the subspace clusters, the pretrained initialisation).
"""

from __future__ import annotations

import logging
import random

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .common import StageError

log = logging.getLogger("landmarks.sampler")

MODES = ("random", "pk", "subspace")


def epoch_rng(seed: int, epoch: int, *extra: int) -> np.random.Generator:
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch, *extra])


def sample_seeds(seed: int, epoch: int, batch_number: int, count: int) -> np.ndarray:
    """Augmentation seeds of the images of one batch: a function of (seed, epoch, batch) only."""
    return np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, batch_number, 1]).generate_state(count, np.uint32)


class _Rounds:
    """Draws items in shuffled rounds: every item once before any item twice."""

    def __init__(self, items: np.ndarray, rng: np.random.Generator):
        self.items, self.rng = np.asarray(items), rng
        self.order, self.at = self.rng.permutation(self.items), 0

    def take(self, count: int, distinct: bool = False) -> np.ndarray:
        """The next `count` items; with `distinct`, no item twice (needs count <= len(items))."""
        taken: list = []
        while len(taken) < count:
            if self.at == len(self.order):
                self.order, self.at = self.rng.permutation(self.items), 0
            item = self.order[self.at]
            self.at += 1
            if distinct and item in taken:
                # Crossing into a new round may repeat a class already in this batch: swap it later.
                self.order = np.append(self.order, item)
                continue
            taken.append(item)
        return np.asarray(taken)


def random_batches(positions: np.ndarray, batch_size: int, world: int, rng: np.random.Generator) -> np.ndarray:
    """(batches, batch_size) positions: a permutation cut into batches, the last partial one dropped,
    the count a multiple of `world`. A set smaller than one batch per rank gives one smaller batch each."""
    order = rng.permutation(positions)
    per_round = batch_size * world
    if len(order) < per_round:
        batch_size = len(order) // world
        if batch_size < 2:
            raise StageError(
                f"train: {len(order)} training images cannot make batches of at least 2 images on {world} process(es)"
            )
        per_round = batch_size * world
    rounds = len(order) // per_round
    return order[: rounds * per_round].reshape(rounds * world, batch_size)


def pk_batches(
    class_of: np.ndarray,
    positions: np.ndarray,
    classes_per_batch: int,
    images_per_class: int,
    n_batches: int,
    rng: np.random.Generator,
    clusters: np.ndarray | None = None,
    min_class_images: int = 2,
) -> np.ndarray:
    """(n_batches, P*K) positions: P distinct classes x K images each, from the classes with at least
    `min_class_images` images.

    With `clusters` (class -> cluster number, -1 = left out) every batch draws its classes from one
    cluster, the cluster picked with probability proportional to its number of images.
    """
    labels = class_of[positions]
    order = np.argsort(labels, kind="stable")
    classes, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
    images = {int(c): positions[order[s : s + n]] for c, s, n in zip(classes, starts, counts)}
    usable = np.array([c for c in images if len(images[c]) >= min_class_images], dtype=np.int64)
    if len(usable) < classes_per_batch:
        raise StageError(
            f"train.pk_classes = {classes_per_batch}, but only {len(usable)} classes have the "
            f"{min_class_images} or more training images a P x K batch needs"
        )
    pools = {}  # one shuffled round-robin per class, created when the class is first drawn

    def draw_images(cls: int) -> np.ndarray:
        if cls not in pools:
            pools[cls] = _Rounds(images[cls], rng)
        return pools[cls].take(images_per_class)

    if clusters is None:
        groups = [usable]
    else:
        groups = [usable[clusters[usable] == g] for g in np.unique(clusters[usable]) if g >= 0]
        groups = [g for g in groups if len(g) >= classes_per_batch]
        if not groups:
            raise StageError("train: no class cluster holds train.pk_classes classes (see cluster_classes)")
    class_rounds = [_Rounds(g, rng) for g in groups]
    weights = np.array([sum(len(images[int(c)]) for c in g) for g in groups], dtype=np.float64)
    picks = rng.choice(len(groups), size=n_batches, p=weights / weights.sum())
    batches = np.empty((n_batches, classes_per_batch * images_per_class), dtype=np.int64)
    for b, group in enumerate(picks):
        chosen = class_rounds[group].take(classes_per_batch, distinct=True)
        batches[b] = np.concatenate([draw_images(int(c)) for c in chosen])
    return batches


def cluster_classes(
    class_means: np.ndarray, present: np.ndarray, n_clusters: int, min_classes: int, seed: int = 0
) -> np.ndarray:
    """Class -> cluster number by spherical k-means (faiss) over the L2-normalised class means.

    Only `present` classes are clustered (others get -1). Clusters with fewer than `min_classes`
    classes (too few to fill a batch) are merged into the nearest large cluster.
    """
    import faiss  # imported here: only the subspace sampler needs it

    assignment = np.full(len(class_means), -1, dtype=np.int64)
    members = np.flatnonzero(present)
    k = min(n_clusters, len(members) // max(1, min_classes))
    if k <= 1:
        assignment[members] = 0
        return assignment
    x = class_means[members].astype(np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    kmeans = faiss.Kmeans(
        x.shape[1], k, niter=25, seed=seed & 0x7FFFFFFF, spherical=True, verbose=False, min_points_per_centroid=1
    )
    kmeans.train(x)
    similarity = x @ kmeans.centroids.T
    labels = similarity.argmax(1)
    sizes = np.bincount(labels, minlength=k)
    large = sizes >= min_classes
    if not large.any():
        assignment[members] = 0
        return assignment
    small = ~large[labels]
    labels[small] = np.flatnonzero(large)[similarity[small][:, large].argmax(1)]
    # Renumber 0..clusters-1 so the numbering does not depend on which clusters were merged away.
    assignment[members] = np.unique(labels, return_inverse=True)[1]
    return assignment


def images_per_class(class_of: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Positions of up to `per_class` random images of every class (sorted)."""
    labelled = np.flatnonzero(class_of >= 0)
    # A random order, grouped by class (stable sort), keeping the first `per_class` images of each class.
    shuffled = labelled[rng.permutation(len(labelled))]
    by_class = shuffled[np.argsort(class_of[shuffled], kind="stable")]
    classes = class_of[by_class]
    rank_in_class = np.arange(len(by_class)) - np.searchsorted(classes, classes, side="left")
    return np.sort(by_class[rank_in_class < per_class])


class TrainBatchSampler(Sampler):
    """Per-rank batches of (position, augmentation seed) for one epoch at a time.

    `class_of[position]` is the class number of each image of the index (-1: unlabelled, never drawn).
    Call `set_epoch(epoch, skip=..., clusters=...)` before iterating; `skip` leaves out the first batches
    of this rank (already trained on before a restart).
    """

    def __init__(
        self,
        class_of: np.ndarray,
        *,
        mode: str = "random",
        batch_size: int = 32,
        classes_per_batch: int = 8,
        images_per_class: int = 4,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        batches_multiple_of: int = 1,
        min_batches: int = 1,
        min_class_images: int = 2,
    ):
        if mode not in MODES:
            raise StageError(f"train.sampler must be one of {', '.join(MODES)}, got {mode!r}")
        self.class_of = np.asarray(class_of, dtype=np.int64)
        self.positions = np.flatnonzero(self.class_of >= 0)
        if len(self.positions) == 0:
            raise StageError("train: no labelled training images")
        self.mode, self.batch_size, self.seed = mode, batch_size, seed
        self.classes_per_batch, self.images_per_class = classes_per_batch, images_per_class
        self.min_class_images = min_class_images
        self.rank, self.world_size = rank, world_size
        self.epoch, self.skip, self.clusters = 0, 0, None
        self._batches: np.ndarray | None = None
        # Gradient accumulation: an epoch ends on a whole optimizer step (leftover batches are not drawn).
        # A small set is drawn several times over, so an epoch makes at least `min_batches` batches.
        rounds = max(self._rounds_per_epoch(), min_batches)
        self.batches_per_epoch = rounds - rounds % batches_multiple_of
        if self.batches_per_epoch == 0:
            raise StageError(
                f"train: {len(self.positions)} labelled images give {rounds} batch(es) per process and "
                f"epoch, fewer than train.grad_accumulation = {batches_multiple_of}"
            )

    def _rounds_per_epoch(self) -> int:
        """Batches per rank and epoch, before rounding to whole optimizer steps."""
        n = len(self.positions)
        if self.mode == "random":
            return max(1, n // (self.batch_size * self.world_size))
        return max(1, n // (self.classes_per_batch * self.images_per_class * self.world_size))

    @property
    def images_per_batch(self) -> int:
        return self.batch_size if self.mode == "random" else self.classes_per_batch * self.images_per_class

    def set_epoch(self, epoch: int, skip: int = 0, clusters: np.ndarray | None = None) -> None:
        if self.mode == "subspace" and clusters is None:
            raise StageError("train: the subspace sampler needs class clusters for every epoch")
        self.epoch, self.skip, self.clusters = epoch, skip, clusters
        self._batches = None

    def epoch_batches(self) -> np.ndarray:
        """All ranks' batches of this epoch, (batches, images per batch); rank r owns rows r::world."""
        if self._batches is None:
            rng = epoch_rng(self.seed, self.epoch)
            n_batches = self.batches_per_epoch * self.world_size
            if self.mode == "random":
                passes = [random_batches(self.positions, self.batch_size, self.world_size, rng)]
                while sum(map(len, passes)) < n_batches:  # min_batches: more passes, each in a new order
                    passes.append(random_batches(self.positions, self.batch_size, self.world_size, rng))
                self._batches = np.concatenate(passes)[:n_batches]
            else:
                self._batches = pk_batches(
                    self.class_of,
                    self.positions,
                    self.classes_per_batch,
                    self.images_per_class,
                    n_batches,
                    rng,
                    self.clusters if self.mode == "subspace" else None,
                    self.min_class_images,
                )
        return self._batches

    def rank_batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(positions, augmentation seeds) of this rank's batch number `step` of the epoch."""
        number = step * self.world_size + self.rank
        batch = self.epoch_batches()[number]
        return batch, sample_seeds(self.seed, self.epoch, number, len(batch))

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch - self.skip)

    def __iter__(self):
        for step in range(self.skip, self.batches_per_epoch):
            positions, seeds = self.rank_batch(step)
            yield list(zip(positions.tolist(), seeds.tolist()))


class SeededDataset(Dataset):
    """Wraps a map-style dataset so that item (position, seed) is transformed with its own seed.

    torchvision's random transforms draw from torch's (and Python's) global generators; these are
    seeded per image and restored afterwards, so the main process's random state is left as it was.
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        position, seed = item
        python_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            try:
                return self.dataset[position]
            finally:
                random.setstate(python_state)
