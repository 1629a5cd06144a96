"""The GAP and accuracy definitions as plain Python loops: the reference the vectorised
`landmarks.metrics.score_predictions` is tested against (tests/test_metrics.py) and timed against
(bench/bench_gap.py). A direct transcription of the official definition, kept simple on purpose.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence


def gap_reference(
    predictions: Mapping[str, tuple[int, float]],
    truth: Mapping[str, Sequence[int]],
    ignore_non_landmarks: bool = False,
) -> float:
    """GAP by a plain Python loop. `predictions`: id -> (landmark_id, score); `truth`: id -> ids."""
    num_positives = sum(1 for labels in truth.values() if len(labels) > 0)
    if num_positives == 0:
        return math.nan
    ranked = sorted(
        (-score, qid, landmark)
        for qid, (landmark, score) in predictions.items()
        if qid in truth and (len(truth[qid]) > 0 or not ignore_non_landmarks)
    )
    gap, correct = 0.0, 0
    for rank, (_, qid, landmark) in enumerate(ranked, start=1):
        if landmark in truth[qid]:
            correct += 1
            gap += correct / rank
    return gap / num_positives


def accuracy_reference(predictions: Mapping[str, tuple[int, float]], truth: Mapping[str, Sequence[int]]) -> float:
    """Top-1 accuracy over landmark queries by a plain loop; a missing prediction is wrong."""
    landmark_queries = [qid for qid, labels in truth.items() if len(labels) > 0]
    if not landmark_queries:
        return math.nan
    correct = sum(1 for qid in landmark_queries if qid in predictions and predictions[qid][0] in truth[qid])
    return correct / len(landmark_queries)
