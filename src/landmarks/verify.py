"""Geometric verification of retrieval neighbours: RANSAC inliers of SIFT matches between two photos.

Two photos of the same building share many local features whose positions agree with one geometric
transformation; photos of different places only share a few chance matches, which no transformation
explains. As the Google Landmark Recognition 2019 winners did with DELF + RANSAC, the number of RANSAC
inliers between a query and each of its kNN neighbours re-scores the neighbours: many inliers = the same
physical place.

Defaults (measured on real photos: 26 web photos of 5 Paris landmarks and 25 non-landmark photos against
250 Paris6k photos; numbers in the README): 1,000 keypoints, RootSIFT, ratio 0.85 with mutual nearest
neighbours, an affine model at 6 px. Homography, MAGSAC and fundamental-matrix models separated no
better and cost up to 5x more per pair. No non-landmark or other-landmark pair reached 9 inliers there;
`min_inliers` 10 keeps a margin. On web-scraped photos of 13 landmarks (stock photos with watermarks
among them) 16 of 815 other-landmark pairs reached 10-19 inliers, most through the watermark both
carried; without the matches that stay in place (`ignore_static`), 2 did (10 and 11).
Those counts were taken on 224-px shards (shorter side 224 px: SIFT saw about 300 x 224). Chance inliers
grow with the image SIFT sees (more keypoints, more tentative matches), so `max_side` is 224: on 384-px
shards (training's default size since then) SIFT at 384 px gave 31 wrong-landmark pairs of the web set
10-18 inliers (mean 11.9); the same pairs have 3-9 (mean 5.2) on 224-px shards and 3-7 (4.9) on 384-px
shards seen at 224 px (bench/real_photos.md, "Geometric verification at 224 px"; bench/verify_size.py).

Pipeline per image: grayscale, longer side down to `max_side` px (never enlarged), OpenCV SIFT with the
`max_features` strongest keypoints. Per pair: RootSIFT (L1-normalise, square root) descriptors compared
by dot products, Lowe's ratio test and mutual nearest neighbours; with `ignore_static`, the matches that
do not move between the two images (a watermark or logo both carry: `moving_matches`) are dropped;
then RANSAC with the `model` (affine by default) and a `threshold` in pixels of the resized images.
Too few matches to fit = 0.
Tiny, blank, grayscale, RGBA and other odd images give no keypoints or just a few: 0 inliers, no error.

Results are reproducible: OpenCV's RANSAC random generator is seeded (`seed`) before every fit, in the
thread that fits, so counts do not depend on `threads` or on the order pairs are processed.

    settings = VerifySettings()
    counts = verify_neighbours(query_ids, neighbour_ids, load_image, settings, threads=2)
    verified = counts >= settings.min_inliers

Memory: each image's features stay cached for the whole call, about 136 bytes per keypoint (130 KiB per
image at 1,000 keypoints); for millions of images, call verify_neighbours on chunks of queries.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from .common import StageError

MODELS = ("affine", "affine_partial", "homography", "magsac", "fundamental")
# Fewest point pairs each model can be fitted to (fewer matches: 0 inliers).
MIN_MATCHES = {"affine": 3, "affine_partial": 2, "homography": 4, "magsac": 4, "fundamental": 8}
MIN_SIDE = 16  # images smaller than this have no usable SIFT keypoints
# Matches in place over this share of the keypoints: the same picture twice (moving_matches).
DUPLICATE_SHARE = 0.25


@dataclass(frozen=True)
class VerifySettings:
    """How features are extracted, matched and verified (defaults: see the module docstring)."""

    max_side: int = 224  # longer side of the image SIFT sees (never enlarged): min_inliers was measured there
    max_features: int = 1000  # strongest SIFT keypoints kept per image
    rootsift: bool = True  # RootSIFT descriptors (else SIFT's own, L2-normalised)
    ratio: float = 0.85  # Lowe's ratio test on descriptor distances; 1.0 turns it off
    mutual: bool = True  # keep only mutual nearest neighbours
    model: str = "affine"  # one of MODELS
    threshold: float = 6.0  # RANSAC reprojection threshold, pixels of the resized images
    max_iters: int = 2000  # RANSAC iterations at most
    confidence: float = 0.995  # RANSAC stops early once this sure of its best model
    min_inliers: int = 10  # decision threshold for callers: counts >= this = same place
    ignore_static: bool = True  # matches that stay in place are an overlay both images carry, not the place
    seed: int = 0  # RANSAC random seed (reproducible counts)

    def __post_init__(self):
        if self.model not in MODELS:
            raise StageError(f"verify: unknown model {self.model!r} (choose from {', '.join(MODELS)})")
        if self.max_side < MIN_SIDE or self.max_features < 1:
            raise StageError(
                f"verify: max_side must be >= {MIN_SIDE} and max_features >= 1, "
                f"got {self.max_side} and {self.max_features}"
            )
        if not 0 < self.ratio <= 1:
            raise StageError(f"verify: ratio must be in (0, 1], got {self.ratio}")


@dataclass
class Features:
    """SIFT keypoints of one image: xy (n, 2) float32 in pixels of the resized image, descriptors
    (n, 128) uint8 (OpenCV's SIFT values are integers 0..255, so uint8 stores them exactly)."""

    xy: np.ndarray
    descriptors: np.ndarray

    def __len__(self) -> int:
        return len(self.xy)


EMPTY = Features(np.zeros((0, 2), np.float32), np.zeros((0, 128), np.uint8))

# ---------------------------------------------------------------------------------------------------
# Features


def to_gray(image) -> np.ndarray:
    """A PIL image (any mode) or an array (H, W), (H, W, 1), (H, W, 3) RGB or (H, W, 4) RGBA as a
    2-d uint8 array. Float arrays are taken as 0..1 when their maximum is at most 1, else 0..255."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("L"))
    array = np.asarray(image)
    if array.size == 0:
        return np.zeros((0, 0), np.uint8)
    if array.dtype != np.uint8:
        array = np.nan_to_num(array.astype(np.float32))
        if array.max() <= 1.0:
            array = array * 255.0
        array = np.clip(np.rint(array), 0, 255).astype(np.uint8)
    if array.ndim == 3 and array.shape[2] in (3, 4):
        return cv2.cvtColor(np.ascontiguousarray(array[:, :, :3]), cv2.COLOR_RGB2GRAY)
    if array.ndim == 3 and array.shape[2] == 1:
        return array[:, :, 0]
    if array.ndim != 2:
        raise StageError(f"verify: cannot read an image array of shape {array.shape}")
    return array


def _resized(gray: np.ndarray, max_side: int) -> np.ndarray:
    height, width = gray.shape
    scale = max_side / max(height, width)
    if scale >= 1:
        return np.ascontiguousarray(gray)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(gray, size, interpolation=cv2.INTER_AREA)


def extract(image, settings: VerifySettings = VerifySettings()) -> Features:
    """SIFT keypoints and descriptors of `image` (PIL image or array, see to_gray), at most
    `max_features`, on the image resized to `max_side`. Empty Features when it has none."""
    gray = to_gray(image)
    if min(gray.shape) < MIN_SIDE:
        return EMPTY
    gray = _resized(gray, settings.max_side)
    keypoints, descriptors = cv2.SIFT_create(settings.max_features).detectAndCompute(gray, None)
    if descriptors is None or not keypoints:
        return EMPTY
    keypoints, descriptors = keypoints[: settings.max_features], descriptors[: settings.max_features]
    xy = np.array([point.pt for point in keypoints], np.float32).reshape(-1, 2)
    return Features(xy, np.clip(descriptors, 0, 255).astype(np.uint8))


# ---------------------------------------------------------------------------------------------------
# Matching and RANSAC


def _unit_descriptors(descriptors: np.ndarray, rootsift: bool) -> np.ndarray:
    """Descriptors with L2 norm 1 (dot product = cosine). RootSIFT: L1-normalise, then square root
    (the result has L2 norm 1 by construction); Hellinger instead of Euclidean distance."""
    values = descriptors.astype(np.float32)
    if rootsift:
        return np.sqrt(values / np.maximum(values.sum(axis=1, keepdims=True), 1e-12))
    return values / np.maximum(np.linalg.norm(values, axis=1, keepdims=True), 1e-12)


def match(a: Features, b: Features, settings: VerifySettings = VerifySettings()) -> np.ndarray:
    """(m, 2) rows (index in a, index in b) of the descriptor matches that pass the ratio test and,
    with `mutual`, are each other's nearest neighbour."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((0, 2), np.int64)
    # cv2.gemm, not numpy's matmul: OpenBLAS's own threads, started from each worker thread, contend
    # for the cores (measured: 2-3x the CPU time of the whole verification on a busy 2-core machine).
    similarity = cv2.gemm(
        _unit_descriptors(a.descriptors, settings.rootsift),
        _unit_descriptors(b.descriptors, settings.rootsift),
        1.0,
        None,
        0.0,
        flags=cv2.GEMM_2_T,
    )
    rows = np.arange(len(a))
    nearest = similarity.argmax(axis=1)
    keep = np.ones(len(a), bool)
    if settings.mutual:
        keep &= similarity.argmax(axis=0)[nearest] == rows
    if settings.ratio < 1 and len(b) > 1:
        best = similarity[rows, nearest]
        similarity[rows, nearest] = -np.inf
        second = similarity.max(axis=1)
        # Unit vectors: squared distance = 2 - 2 cosine; Lowe's test d1 < ratio * d2, squared.
        keep &= 2.0 - 2.0 * best < settings.ratio**2 * (2.0 - 2.0 * second)
    return np.stack([rows[keep], nearest[keep]], axis=1)


def _fit_mask(source: np.ndarray, target: np.ndarray, settings: VerifySettings):
    """The inlier mask RANSAC finds for `settings.model` (None when it finds no model)."""
    model, threshold = settings.model, settings.threshold
    options = dict(maxIters=settings.max_iters, confidence=settings.confidence)
    if model in ("affine", "affine_partial"):
        estimate = cv2.estimateAffine2D if model == "affine" else cv2.estimateAffinePartial2D
        return estimate(source, target, method=cv2.RANSAC, ransacReprojThreshold=threshold, **options)[1]
    if model in ("homography", "magsac"):
        method = cv2.RANSAC if model == "homography" else cv2.USAC_MAGSAC
        return cv2.findHomography(source, target, method, threshold, **options)[1]
    return cv2.findFundamentalMat(source, target, cv2.FM_RANSAC, threshold, **options)[1]


def inliers(source: np.ndarray, target: np.ndarray, settings: VerifySettings = VerifySettings()) -> int:
    """RANSAC inliers among the point pairs source[i] -> target[i] ((m, 2) arrays); 0 when there are
    fewer than the model needs or RANSAC finds no model (degenerate points)."""
    if len(source) < MIN_MATCHES[settings.model]:
        return 0
    cv2.setRNGSeed(settings.seed)  # OpenCV's generator is per thread: seed the one that fits
    source, target = np.ascontiguousarray(source, np.float32), np.ascontiguousarray(target, np.float32)
    try:
        mask = _fit_mask(source, target, settings)
    except cv2.error:  # degenerate configurations (e.g. all points on a line) in some estimators
        return 0
    return 0 if mask is None else int(np.count_nonzero(mask))


def count_inliers(a: Features, b: Features, settings: VerifySettings = VerifySettings()) -> int:
    """RANSAC inliers of the matches between two images' features (0 when too few matches)."""
    pairs = match(a, b, settings)
    source, target = a.xy[pairs[:, 0]], b.xy[pairs[:, 1]]
    if settings.ignore_static:
        source, target = moving_matches(source, target, settings.threshold, min(len(a), len(b)))
    return inliers(source, target, settings)


def moving_matches(source: np.ndarray, target: np.ndarray, tolerance: float, keypoints: int):
    """The matches whose point moves by more than `tolerance` pixels between the two images.

    A match that stays in place is, between two different photos, something both frames carry at the
    same spot: a stock-photo watermark, a logo, a caption, a border. Such matches fit the identity
    transform and would verify any two photos of one agency (measured on web-scraped photos of 13
    landmarks: they made 14 of the 16 pairs of different landmarks that reached 10 inliers; on the
    Paris photos, dropping them lost 1 of 185 verified pairs). When they are DUPLICATE_SHARE of the
    keypoints or more, the two images are the same picture, and every match stays."""
    static = np.linalg.norm(source - target, axis=1) <= tolerance
    if static.sum() >= DUPLICATE_SHARE * keypoints:
        return source, target
    return source[~static], target[~static]


# ---------------------------------------------------------------------------------------------------
# Neighbour lists


def is_missing(identifier) -> bool:
    """No neighbour: None, NaN / pandas NA, or a negative integer (faiss's -1)."""
    if isinstance(identifier, (int, np.integer)) and not isinstance(identifier, bool):
        return identifier < 0
    return not isinstance(identifier, (str, bytes)) and bool(pd.isna(identifier))


def _distinct_ids(query_ids: list, neighbour_ids: np.ndarray, pairs: list) -> list:
    """Every image some pair needs, once, in first-use order."""
    return list(dict.fromkeys(ident for row, column in pairs for ident in (query_ids[row], neighbour_ids[row, column])))


def _map(function, items: Iterable, threads: int, bar) -> list:
    """function over items, in order, on `threads` threads (OpenCV and numpy release the GIL)."""

    def step(item):
        result = function(item)
        bar.update()
        return result

    if threads <= 1:
        return [step(item) for item in items]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(step, items))


def verify_neighbours(
    query_ids,
    neighbour_ids,
    load_image: Callable[[Hashable], Image.Image],
    settings: VerifySettings = VerifySettings(),
    threads: int = 1,
    progress: bool = True,
) -> np.ndarray:
    """Inlier counts (int32, the shape of `neighbour_ids`) between each query and its neighbours.

    query_ids: n ids; neighbour_ids: (n, k) ids, missing ones as -1, None or NaN (count 0 there).
    load_image(id) returns the image (PIL or array) of a query or neighbour id: ids name one image
    each, across queries and neighbours. Each distinct image is loaded and its features extracted once.
    Calls of load_image are serialised (it need not be thread-safe); extraction and matching run on
    `threads` threads.
    """
    query_ids = list(query_ids)
    neighbour_ids = np.asarray(neighbour_ids, dtype=object)
    if neighbour_ids.ndim != 2 or len(neighbour_ids) != len(query_ids):
        raise StageError(f"verify: neighbour_ids must be ({len(query_ids)}, k), got shape {neighbour_ids.shape}")
    pairs = [
        (row, column) for row, column in np.ndindex(*neighbour_ids.shape) if not is_missing(neighbour_ids[row, column])
    ]
    ids = _distinct_ids(query_ids, neighbour_ids, pairs)
    lock = threading.Lock()

    def features_of(identifier) -> Features:
        with lock:
            image = load_image(identifier)
        return extract(image, settings)

    def count(pair) -> int:
        row, column = pair
        return count_inliers(cache[query_ids[row]], cache[neighbour_ids[row, column]], settings)

    counts = np.zeros(neighbour_ids.shape, np.int32)
    with tqdm(
        total=len(ids) + len(pairs),
        desc=f"verify {len(pairs)} pairs, {len(ids)} images",
        unit="step",
        mininterval=10,
        disable=not progress,
    ) as bar:
        cache = dict(zip(ids, _map(features_of, ids, threads, bar)))
        for (row, column), value in zip(pairs, _map(count, pairs, threads, bar)):
            counts[row, column] = value
    return counts
