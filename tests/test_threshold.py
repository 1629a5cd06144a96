"""The non-landmark threshold chosen on val (landmarks.threshold)."""

import numpy as np
import pandas as pd
import pytest

from landmarks import threshold


def test_the_nonlandmark_threshold_makes_the_most_right_decisions():
    confidence = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    correct = np.array([True, True, False, True, False, False])
    is_landmark = np.array([True, True, True, True, False, False])
    chosen = threshold.choose_threshold(confidence, correct, is_landmark)
    # Cut between 0.6 and 0.5: the 3 right landmarks kept, both non-landmarks rejected (the wrong one at 0.7
    # costs a decision either way).
    assert chosen["threshold"] == pytest.approx(0.55) and chosen["accuracy"] == pytest.approx(5 / 6)
    assert chosen["accuracy_without_threshold"] == pytest.approx(3 / 6)
    # Equal confidences cannot be told apart: the cut never falls between them.
    tied = threshold.choose_threshold(
        np.array([0.5, 0.5, 0.2]), np.array([True, False, False]), np.array([True, False, False])
    )
    assert tied["threshold"] == pytest.approx(0.35)
    # Only right landmark answers: keep them all; a query without a prediction (-inf) is rejected first.
    keep = threshold.choose_threshold(
        np.array([0.3, 0.9, -np.inf]), np.array([True, True, False]), np.array([True, True, False])
    )
    assert keep["threshold"] == pytest.approx(0.3 - 1e-6) and keep["accuracy"] == 1.0


def test_the_threshold_is_chosen_for_the_share_of_landmark_photos_expected():
    """val asks as many non-landmark as landmark questions; where 90% of the photos show landmarks,
    rejecting a right answer costs more than keeping a distractor, and the threshold goes down."""
    confidence = np.array([0.9, 0.5, 0.7, 0.6, 0.3])
    correct = np.array([True, True, False, False, False])
    is_landmark = np.array([True, True, False, False, False])
    even = threshold.choose_threshold(confidence, correct, is_landmark)
    assert even["threshold"] == pytest.approx(0.8) and even["accuracy"] == pytest.approx(4 / 5)  # 1 + 3 right
    mostly = threshold.choose_threshold(confidence, correct, is_landmark, landmark_share=0.9)
    # Keeping both right landmarks (0.9) and rejecting one of three non-landmarks (0.1 / 3) beats keeping
    # one (0.45) and rejecting all three (0.1).
    assert mostly["threshold"] == pytest.approx(0.4) and mostly["accuracy"] == pytest.approx(0.9 + 0.1 / 3)
    assert mostly["landmark_share"] == 0.9
    balanced = threshold.choose_threshold(confidence, correct, is_landmark, landmark_share=2 / 5)
    assert balanced["threshold"] == even["threshold"] and balanced["accuracy"] == pytest.approx(even["accuracy"])


def test_the_landmark_share_comes_from_the_setting_or_the_test_queries():
    mixed = pd.DataFrame({"id": list("abcd"), "landmark_id": pd.array([1, 2, 3, None], dtype="Int64")})
    assert threshold.threshold_landmark_share(mixed, None) == (0.75, "the test queries")
    assert threshold.threshold_landmark_share(mixed, 0.2) == (0.2, "retrieve.landmark_share")
    only_landmarks = mixed.assign(landmark_id=pd.array([1, 2, 3, 4], dtype="Int64"))
    share, source = threshold.threshold_landmark_share(only_landmarks, None)
    assert share is None and source.startswith("val's own mix")


def test_smoothing_lets_the_threshold_reach_below_the_lowest_right_answer_val_holds():
    """Counted, five right answers put the threshold just under the lowest of them (0.60); the test's
    right answers reach lower, and where nine photos in ten show a landmark a right answer rejected costs
    nine non-landmarks kept: smoothed, the threshold goes down into the non-landmarks' range."""
    right = np.array([0.60, 0.65, 0.70, 0.75, 0.80])
    nonlandmarks = np.array([0.30, 0.35, 0.40, 0.45, 0.58])
    confidence = np.concatenate([right, nonlandmarks])
    correct = is_landmark = np.arange(10) < 5
    counted = threshold.choose_threshold(confidence, correct, is_landmark, landmark_share=0.9)
    smoothed = threshold.choose_threshold(confidence, correct, is_landmark, landmark_share=0.9, smoothing=1.0)
    assert counted["threshold"] == pytest.approx(0.59) and counted["smoothing"] == 0.0
    assert 0.30 < smoothed["threshold"] < 0.58 and smoothed["smoothing"] == 1.0
    rejected = (nonlandmarks < smoothed["threshold"]).sum()  # the val decisions it makes, counted
    assert smoothed["accuracy"] == pytest.approx(0.9 + 0.1 * rejected / 5)
    wider = threshold.choose_threshold(confidence, correct, is_landmark, landmark_share=0.9, smoothing=2.0)
    assert wider["threshold"] < smoothed["threshold"]  # a wider spread of right answers: lower still


def test_with_a_large_val_smoothing_and_counting_agree():
    """Google Landmarks' val holds ~100k photos: the smoothed choice stays cheap (binned) and lands where
    counting does, since the spread it assumes shrinks as val grows."""
    rng = np.random.default_rng(0)
    confidence = np.concatenate([rng.normal(0.7, 0.05, 100_000), rng.normal(0.4, 0.05, 100_000)])
    correct = is_landmark = np.arange(200_000) < 100_000
    counted = threshold.choose_threshold(confidence, correct, is_landmark)["threshold"]
    smoothed = threshold.choose_threshold(confidence, correct, is_landmark, smoothing=1.0)["threshold"]
    assert counted == pytest.approx(0.55, abs=0.01) and smoothed == pytest.approx(counted, abs=0.01)


@pytest.mark.parametrize("right_answers", [0, 1])
def test_smoothing_needs_two_answers_on_each_side_else_counts(right_answers):
    confidence = np.array([0.9, 0.5, 0.4, 0.3, np.nan])  # the last: a non-landmark without an answer
    correct = np.arange(5) < right_answers
    is_landmark = np.array([True, False, False, False, False])
    counted = threshold.choose_threshold(confidence, correct, is_landmark, landmark_share=0.9)
    smoothed = threshold.choose_threshold(confidence, correct, is_landmark, landmark_share=0.9, smoothing=1.0)
    assert smoothed == {**counted, "smoothing": 0.0}
