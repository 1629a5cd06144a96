"""The non-landmark threshold: the confidence below which predict calls a photo a non-landmark, chosen
on val's answers (retrieve chooses it, predict chooses again for another share of landmark photos)."""

from __future__ import annotations

import numpy as np
import pandas as pd

NO_CONFIDENCE = -1e9  # a query without a prediction: rejected first
GRID_POINTS = 1001  # candidate thresholds of the smoothed choice, from below every val answer to above


def choose_threshold(
    confidence: np.ndarray,
    correct: np.ndarray,
    is_landmark: np.ndarray,
    landmark_share: float | None = None,
    smoothing: float = 0.0,
) -> dict:
    """The non-landmark threshold that makes the most right decisions on val: a landmark query is right
    when its predicted landmark is right and its confidence reaches the threshold, a non-landmark query
    when its confidence stays below it.

    With `landmark_share`, the decisions are weighed for photos of which that share shows a landmark
    (a landmark query counts landmark_share / landmark queries, a non-landmark one the rest over theirs):
    val asks as many non-landmark as landmark questions, but the photos a model is asked about may be
    mostly landmarks, where rejecting a right answer costs more than keeping a distractor.

    `smoothing` 0 counts the decisions on val as they are (`most_right_threshold`); above 0 it counts
    them over smoothed confidences (`smoothed_threshold`), which a val of a dozen photos needs."""
    confidence = np.where(np.isfinite(confidence), confidence, NO_CONFIDENCE).astype(np.float64)
    correct, is_landmark = np.asarray(correct, bool), np.asarray(is_landmark, bool)
    weight = decision_weights(is_landmark, landmark_share)
    threshold = smoothed_threshold(confidence, correct, is_landmark, weight, smoothing) if smoothing > 0 else None
    smoothed_by = smoothing if threshold is not None else 0.0  # 0: counted (asked to, or too few answers)
    if threshold is None:
        threshold = most_right_threshold(confidence, correct, is_landmark, weight)
    total = weight.sum()
    return {
        "threshold": threshold,
        "accuracy": right_decisions(confidence, correct, is_landmark, weight, threshold),
        "queries": int(len(confidence)),
        "landmark_queries": int(is_landmark.sum()),
        "nonlandmark_queries": int((~is_landmark).sum()),
        "accuracy_without_threshold": float(((correct & is_landmark) * weight).sum() / total) if total else None,
        "landmark_share": landmark_share,
        "smoothing": smoothed_by,
    }


def right_decisions(confidence, correct, is_landmark, weight, threshold: float | None) -> float | None:
    """The weighed share of val decisions `threshold` gets right (None: no val queries)."""
    if threshold is None or not weight.sum():
        return None
    kept = confidence >= threshold
    return float((weight * np.where(is_landmark, correct & kept, ~kept)).sum() / weight.sum())


def most_right_threshold(confidence, correct, is_landmark, weight) -> float | None:
    """The threshold that makes the most (weighed) right decisions on val, counted as they are. It lies
    halfway between the two confidences it separates (ties: the lowest such threshold, which keeps the
    most answers)."""
    order = np.argsort(confidence, kind="stable")
    values = confidence[order]
    landmark_right = ((correct & is_landmark) * weight)[order]
    nonlandmark = ((~is_landmark) * weight)[order]
    # Threshold just above the first i sorted values (i = 0..n): those are called non-landmarks.
    rejected_right = np.concatenate([[0], np.cumsum(nonlandmark)])
    accepted_right = landmark_right.sum() - np.concatenate([[0], np.cumsum(landmark_right)])
    right = rejected_right + accepted_right
    distinct = np.concatenate([[True], values[1:] > values[:-1], [True]])  # cut only between distinct values
    right = np.where(distinct, right, -1)
    best = int(np.argmax(right >= right.max() - 1e-9 * weight.sum()))  # the first of equal scores (float sums)
    if best == 0:
        return float(values[0]) - 1e-6 if len(values) else None
    if best == len(values):
        return float(values[-1]) + 1e-6
    if values[best - 1] <= NO_CONFIDENCE:  # below it: only queries without a prediction
        return float(values[best]) - 1e-6
    return float((values[best - 1] + values[best]) / 2)


def smoothed_threshold(confidence, correct, is_landmark, weight, smoothing: float) -> float | None:
    """The threshold that makes the most right decisions expected when each val confidence stands for a
    spread of confidences around it (a logistic kernel; its width is Silverman's rule of thumb for the
    right landmark answers and for the non-landmarks, each times `smoothing`). Counted as they are, a
    dozen val photos put the threshold just under the lowest right answer val happened to hold, while the
    test's right answers reach lower (on real photos, counting fell below keeping every answer more often
    and further: bench/real_photos.md, "predict's non-landmark verdict"). None when either side has fewer than 2 answers
    (nothing to estimate a spread from): the caller counts instead."""
    answered = confidence > NO_CONFIDENCE  # unanswered queries are rejected at any threshold
    right, others = answered & correct & is_landmark, answered & ~is_landmark
    if right.sum() < 2 or others.sum() < 2:
        return None
    widths = [smoothing * silverman_bandwidth(confidence[side]) for side in (right, others)]
    if min(widths) <= 0:
        return None
    low, high = confidence[answered].min() - 4 * max(widths), confidence[answered].max() + 4 * max(widths)
    grid = np.linspace(low, high, GRID_POINTS)  # the candidate thresholds; each answer counts at its nearest

    def binned(side: np.ndarray) -> np.ndarray:  # bounded work for any size of val: O(answers + grid^2)
        nearest = np.rint((confidence[side] - low) / (grid[1] - grid[0])).astype(np.int64)
        return np.bincount(nearest, weights=weight[side], minlength=GRID_POINTS)

    above = grid[None, :] - grid[:, None]  # [threshold i, answer at j]: how far the answer lies above it
    expected = logistic_cdf(above / widths[0]) @ binned(right) + logistic_cdf(-above / widths[1]) @ binned(others)
    best = int(np.argmax(expected >= expected.max() - 1e-12))  # the lowest of equal scores keeps the most
    return float(grid[best])


def silverman_bandwidth(values: np.ndarray) -> float:
    """Silverman's rule of thumb: 0.9 x min(standard deviation, interquartile range / 1.349) x n^-1/5."""
    spread = values.std(ddof=1)
    iqr = float(np.subtract(*np.percentile(values, [75, 25])))
    if iqr > 0:
        spread = min(spread, iqr / 1.349)
    return float(0.9 * spread * len(values) ** -0.2)


def logistic_cdf(z: np.ndarray) -> np.ndarray:
    """The logistic distribution's CDF, scaled to standard deviation 1 (a smooth step: 0 far below 0, 1
    far above)."""
    return 1.0 / (1.0 + np.exp(-np.clip(z * np.pi / np.sqrt(3.0), -60, 60)))


def decision_weights(is_landmark: np.ndarray, landmark_share: float | None) -> np.ndarray:
    """What each val decision counts for `choose_threshold`: 1 each, or shared out so that the landmark
    queries weigh landmark_share in all and the non-landmark queries the rest (each side as present)."""
    is_landmark = np.asarray(is_landmark, bool)
    if landmark_share is None:
        return np.ones(len(is_landmark))
    landmarks, others = int(is_landmark.sum()), int((~is_landmark).sum())
    return np.where(is_landmark, landmark_share / max(landmarks, 1), (1 - landmark_share) / max(others, 1))


def threshold_landmark_share(query_ids: pd.DataFrame, setting: float | None) -> tuple[float | None, str]:
    """The share of landmark photos the threshold is chosen for, and where it comes from: the
    `landmark_share` setting, else the test queries' own mix (how many are landmark photos, the split's
    design), else none (val's mix) when the test queries are not a mix of both."""
    if setting is not None:
        return float(setting), "retrieve.landmark_share"
    labelled = query_ids["landmark_id"].notna()
    if labelled.all() or not labelled.any():
        return None, "val's own mix: the test queries are not a mix of landmark and non-landmark photos"
    return float(labelled.mean()), "the test queries"


def threshold_from_answers(val_answers: pd.DataFrame, landmark_share: float | None, smoothing: float = 0.0) -> dict:
    """`choose_threshold` on the val answers (`calibration_table`: retrieve's choice, and predict's for
    another share)."""
    truth = val_answers["landmark_id"].astype("Int64").fillna(-1).to_numpy(dtype=np.int64)
    label = val_answers["predicted_landmark_id"].astype("Int64").fillna(-1).to_numpy(dtype=np.int64)
    confidence = val_answers["confidence"].to_numpy(dtype=np.float64)  # NaN: no answer, rejected first
    return choose_threshold(confidence, (label == truth) & (truth >= 0), truth >= 0, landmark_share, smoothing)
