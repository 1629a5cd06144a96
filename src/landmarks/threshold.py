"""The non-landmark threshold: the confidence below which predict calls a photo a non-landmark, chosen
on val's answers (retrieve chooses it, predict chooses again for another share of landmark photos)."""

from __future__ import annotations

import numpy as np
import pandas as pd

NO_CONFIDENCE = -1e9  # a query without a prediction: rejected first


def choose_threshold(
    confidence: np.ndarray, correct: np.ndarray, is_landmark: np.ndarray, landmark_share: float | None = None
) -> dict:
    """The non-landmark threshold that makes the most right decisions on val: a landmark query is right
    when its predicted landmark is right and its confidence reaches the threshold, a non-landmark query
    when its confidence stays below it. The threshold lies halfway between the two confidences it
    separates (ties: the lowest such threshold, which keeps the most answers).

    With `landmark_share`, the decisions are weighed for photos of which that share shows a landmark
    (a landmark query counts landmark_share / landmark queries, a non-landmark one the rest over theirs):
    val asks as many non-landmark as landmark questions, but the photos a model is asked about may be
    mostly landmarks, where rejecting a right answer costs more than keeping a distractor."""
    confidence = np.where(np.isfinite(confidence), confidence, NO_CONFIDENCE).astype(np.float64)
    weight = decision_weights(is_landmark, landmark_share)
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
        threshold = float(values[0]) - 1e-6 if len(values) else None
    elif best == len(values):
        threshold = float(values[-1]) + 1e-6
    elif values[best - 1] <= NO_CONFIDENCE:  # below it: only queries without a prediction
        threshold = float(values[best]) - 1e-6
    else:
        threshold = float((values[best - 1] + values[best]) / 2)
    total = weight.sum()
    return {
        "threshold": threshold,
        "accuracy": float(right[best] / total) if total else None,
        "queries": int(len(values)),
        "landmark_queries": int(is_landmark.sum()),
        "nonlandmark_queries": int((~is_landmark).sum()),
        "accuracy_without_threshold": float(((correct & is_landmark) * weight).sum() / total) if total else None,
        "landmark_share": landmark_share,
    }


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


def threshold_from_answers(val_answers: pd.DataFrame, landmark_share: float | None) -> dict:
    """`choose_threshold` on the val answers (`calibration_table`: retrieve's choice, and predict's for
    another share)."""
    truth = val_answers["landmark_id"].astype("Int64").fillna(-1).to_numpy(dtype=np.int64)
    label = val_answers["predicted_landmark_id"].astype("Int64").fillna(-1).to_numpy(dtype=np.int64)
    confidence = val_answers["confidence"].to_numpy(dtype=np.float64)  # NaN: no answer, rejected first
    return choose_threshold(confidence, (label == truth) & (truth >= 0), truth >= 0, landmark_share)
