"""bench/confidence.py: the answers' confidences it compares, on a results folder shaped as retrieve writes it."""

import numpy as np
import pandas as pd
import pytest
from test_bench_method import load

from landmarks.common import write_table
from landmarks.embed import write_embeddings

confidence = load("confidence")


def test_the_nearest_image_of_the_answers_landmark_is_the_one_whose_term_counts():
    neighbours = pd.DataFrame(
        {
            "query_id": ["q1", "q1", "q1", "q2"],
            "rank": [1, 2, 3, 1],
            "neighbour_id": ["a", "b", "c", "a"],
            "neighbour_landmark_id": pd.array([5, 6, 6, 5], dtype="Int64"),
        }
    )
    predictions = pd.DataFrame({"id": ["q1", "q2", "q3"], "landmark_id": pd.array([6, 5, None], dtype="Int64")})
    rows = confidence.answer_rows(neighbours, predictions, {"a": 0, "b": 1, "c": 2})
    assert rows.tolist() == [1, 0, -1]  # q1 was relabelled to 6: its first image of 6; q3 has no answer


def test_the_verification_bonus_grows_with_the_inliers_up_to_full():
    predictions = pd.DataFrame({"inliers": [0, 9, 10, 20, 80]})
    bonus = confidence.verification_bonus(predictions, {"min_inliers": 10, "full_inliers": 40, "weight": 0.25})
    assert bonus == pytest.approx([0, 0, 0.0625, 0.125, 0.25])
    assert confidence.verification_bonus(predictions.drop(columns="inliers"), {}).tolist() == [0] * 5


def _results(folder):
    """Two landmarks; database images t1 and t2 resemble each other's landmark (crowded), t0 nothing else."""
    vectors = np.array([[1, 0, 0], [0.6, 0.8, 0], [0, 1, 0], [0, 0.9, 0.436]], np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = pd.DataFrame({"id": ["t0", "t1", "t2", "t3"], "landmark_id": pd.array([1, 1, 2, 2], dtype="Int64")})
    embed = folder / "experiments" / "finetuned" / "embed"
    embed.mkdir(parents=True)
    write_embeddings(vectors, ids, embed / "train.npy", dtype="float32")
    bank = pd.DataFrame({"id": ["b0"], "landmark_id": pd.array([None], dtype="Int64")})
    write_embeddings(np.array([[0, 0, 1]], np.float32), bank, embed / "nonlandmark.npy", dtype="float32")
    selection = pd.DataFrame(
        {
            "id": ["t0", "t1", "t2", "t3", "qa", "qb"],
            "landmark_id": pd.array([1, 1, 2, 2, 1, 1], dtype="Int64"),
            "split": ["train"] * 4 + ["test"] * 2,
        }
    )
    write_table(selection, folder / "select" / "selection.parquet")
    retrieve = folder / "experiments" / "finetuned" / "retrieve"
    # Both queries show landmark 1: qa matched t0 (cosine 0.9, right); qb matched the crowded t2 (0.95, wrong).
    write_table(
        pd.DataFrame(
            {
                "id": ["qa", "qb"],
                "landmark_id": pd.array([1, 2], dtype="Int64"),
                "score": [0.9, 0.9],
                "top_cosine": [0.9, 0.95],
                "other_cosine": [0.5, 0.5],
            }
        ),
        retrieve / "predictions.parquet",
    )
    write_table(
        pd.DataFrame(
            {
                "query_id": ["qa", "qb"],
                "rank": [1, 1],
                "neighbour_id": ["t0", "t2"],
                "neighbour_landmark_id": pd.array([1, 2], dtype="Int64"),
                "cosine": [0.9, 0.95],
            }
        ),
        retrieve / "neighbours.parquet",
    )


def test_a_wrong_answer_on_a_crowded_image_drops_below_a_right_one(tmp_path):
    """qb's wrong answer (landmark 2 by t2, whose impostor term is its cosine 0.8 to t1) outranks qa's right
    one by cosine, not once the impostor term is subtracted (0.95 - 0.4 against 0.9 - 0)."""
    _results(tmp_path)
    gaps = confidence.run_confidences(tmp_path, "finetuned")
    assert gaps["top-1 cosine"] == pytest.approx(0.25)  # the wrong answer first: 1/2 x (0 + 1/2)
    assert gaps["- 0.5 x impostor k=1"] == pytest.approx(0.5)  # the right one first


def _rescore(folder, **columns):
    path = folder / "experiments" / "finetuned" / "retrieve" / "predictions.parquet"
    pd.read_parquet(path).assign(**columns).to_parquet(path)
    return confidence.run_confidences(folder, "finetuned")


def test_a_close_runner_up_lowers_the_answer_once_weighed(tmp_path):
    """Scores below: top-1 cosine + verification bonus - 0.25 x impostor term (k=3: qa's t0 0, qb's t2 0.267)
    - weight x runner-up."""
    _results(tmp_path)
    # qb (wrong) 1.05 - 0.067 against qa (right) 0.9 unweighed; at 0.3 its close runner-up (0.9 against 0.5)
    # costs it 0.27 against 0.15: 0.713 under 0.75. At 0.1 the wrong answer still comes first.
    gaps = _rescore(tmp_path, top_cosine=[0.9, 1.05], other_cosine=[0.5, 0.9], inliers=[0, 0])
    assert gaps["default - 0.0 x runner-up"] == pytest.approx(0.25)
    assert gaps["default - 0.1 x runner-up"] == pytest.approx(0.25)
    assert gaps["default - 0.3 x runner-up"] == pytest.approx(0.5)
    assert gaps["default - 0.3 x runner-up if unverified (schema default)"] == pytest.approx(0.5)
    # qa verified (40 inliers: bonus 0.25) but with a close runner-up (0.85): paying the margin drops it
    # under qb (1.15 - 0.255 against 1.133 - 0.03); exempt as verified, as retrieve does, it stays first.
    gaps = _rescore(tmp_path, top_cosine=[0.9, 1.2], other_cosine=[0.85, 0.1], inliers=[40, 0])
    assert gaps["default - 0.0 x runner-up"] == pytest.approx(0.5)
    assert gaps["default - 0.3 x runner-up"] == pytest.approx(0.25)
    assert gaps["default - 0.3 x runner-up if unverified (schema default)"] == pytest.approx(0.5)


def test_a_query_more_like_the_bank_than_its_answer_drops_once_the_excess_is_weighed(tmp_path):
    """qb (wrong) 1.05 - 0.067 - 0.15 = 0.833 against qa (right) 0.9 - 0.15 = 0.75; qb's bank term 1.3
    exceeds its cosine by 0.25: at weight 0.5 it drops to 0.708, under qa (whose bank term is below its
    cosine: it pays nothing); at 0.25 (0.771) it does not."""
    _results(tmp_path)
    gaps = _rescore(tmp_path, top_cosine=[0.9, 1.05], other_cosine=[0.5, 0.5], inliers=[0, 0], bank_cosine=[0.5, 1.3])
    assert gaps["default with 0.0 x bank excess"] == pytest.approx(0.25)
    assert gaps["default with 0.25 x bank excess"] == pytest.approx(0.25)
    assert gaps["default with 0.5 x bank excess"] == pytest.approx(0.5)
    assert gaps["default - 0.3 x runner-up if unverified (schema default)"] == pytest.approx(0.5)
