"""Tests for landmarks.metrics: GAP as Kaggle computes it, and Kaggle CSV I/O."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pandas as pd
import pytest

from landmarks.common import StageError
from landmarks.metrics import (
    GapScores,
    _argsort_ids,
    accuracy_reference,
    gap_reference,
    main,
    read_solution_csv,
    read_submission_csv,
    score_files,
    score_predictions,
    write_submission_csv,
)

# Test vectors of the official Google Landmarks metric tests (ids shortened, leading zeros kept).
OFFICIAL_TRUTH = {"0123": [0, 12], "0223": [100, 200, 300], "0323": [1], "0423": [], "0523": []}
OFFICIAL_PRED = {"0223": (0, 0.01), "0323": (1, 10.0), "0423": (150, 15.0)}

# The public worked example of the Kaggle evaluation page.
EXAMPLE_TRUTH = {
    "001": [123], "002": [], "003": [999], "004": [123], "005": [999],
    "006": [888], "007": [666], "008": [666], "009": [], "010": [666],
}  # fmt: skip
EXAMPLE_PRED = {
    "001": (123, 0.15), "002": (123, 0.10), "003": (999, 0.30), "005": (999, 0.40),
    "007": (555, 0.60), "008": (666, 0.70), "010": (666, 0.99),
}  # fmt: skip


def _frame(pred: dict) -> pd.DataFrame:
    """dict id -> (landmark, score) as the DataFrame[id, landmark_id, score] the API takes."""
    return pd.DataFrame(
        {
            "id": pd.Series(list(pred), dtype=object),
            "landmark_id": pd.array([p[0] for p in pred.values()], dtype="Int64"),
            "score": [float(p[1]) for p in pred.values()],
        }
    )


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


# ---------------------------------------------------------------------------- known values


def test_official_vectors():
    scores = score_predictions(_frame(OFFICIAL_PRED), OFFICIAL_TRUTH)
    assert scores.gap == pytest.approx(0.1666667, abs=1e-7)
    assert scores.gap_landmarks_only == pytest.approx(0.3333333, abs=1e-7)
    assert scores.accuracy == pytest.approx(0.3333333, abs=1e-7)
    assert (scores.n_queries, scores.n_landmark_queries) == (5, 3)
    assert (scores.n_predictions, scores.n_correct, scores.n_ignored) == (3, 1, 0)


def test_official_vectors_reference_loop():
    assert gap_reference(OFFICIAL_PRED, OFFICIAL_TRUTH) == pytest.approx(0.1666667, abs=1e-7)
    assert gap_reference(OFFICIAL_PRED, OFFICIAL_TRUTH, ignore_non_landmarks=True) == (
        pytest.approx(0.3333333, abs=1e-7)
    )
    assert accuracy_reference(OFFICIAL_PRED, OFFICIAL_TRUTH) == pytest.approx(0.3333333, abs=1e-7)


def test_public_example():
    # Ranked: 010 ok, 008 ok, 007 wrong, 005 ok, 003 ok, 001 ok, 002 (non-landmark) wrong.
    hand = (1 / 1 + 2 / 2 + 3 / 4 + 4 / 5 + 5 / 6) / 8
    scores = score_predictions(_frame(EXAMPLE_PRED), EXAMPLE_TRUTH)
    assert scores.gap == pytest.approx(0.5479166666666, abs=1e-12)
    assert scores.gap == pytest.approx(hand, abs=1e-15)
    assert gap_reference(EXAMPLE_PRED, EXAMPLE_TRUTH) == scores.gap
    assert scores.accuracy == pytest.approx(5 / 8)


def test_dict_predictions_give_the_same_scores():
    assert score_predictions(EXAMPLE_PRED, EXAMPLE_TRUTH) == score_predictions(
        _frame(EXAMPLE_PRED), EXAMPLE_TRUTH
    )


# ---------------------------------------------------------------------------- ties and ids


def test_ties_are_broken_by_query_id_as_strings():
    # Equal scores: "10" < "9" as strings, so the wrong "10" takes rank 1 and the right "9"
    # rank 2: GAP = (1/2) / 2. Numeric id order would give (1/1) / 2 = 0.5.
    truth = {"9": [1], "10": [2]}
    pred = {"9": (1, 0.5), "10": (7, 0.5)}
    assert score_predictions(_frame(pred), truth).gap == 0.25
    assert gap_reference(pred, truth) == 0.25
    # The same prediction on the other query of the tie: now it comes first.
    pred = {"9": (7, 0.5), "10": (2, 0.5)}
    assert score_predictions(_frame(pred), truth).gap == 0.5
    assert gap_reference(pred, truth) == 0.5


def test_ties_with_several_queries_hand_computed():
    # Scores 0.9, then a three-way tie at 0.5 ordered "a0" < "a1" < "b", then 0.1.
    truth = {"z": [5], "b": [1], "a1": [2], "a0": [3], "c": []}
    pred = {"b": (1, 0.5), "a1": (9, 0.5), "a0": (3, 0.5), "z": (5, 0.9), "c": (4, 0.1)}
    # Ranks: z ok (1/1), a0 ok (2/2), a1 wrong, b ok (3/4), c wrong.
    hand = (1 + 1 + 3 / 4) / 4
    scores = score_predictions(_frame(pred), truth)
    assert scores.gap == pytest.approx(hand, abs=1e-15)
    assert scores.gap == gap_reference(pred, truth)
    # Without the non-landmark query "c" nothing changes: it is ranked last.
    assert scores.gap_landmarks_only == scores.gap


def test_tie_between_landmark_and_non_landmark_query():
    truth = {"a": [], "b": [1]}
    pred = {"a": (1, 0.5), "b": (1, 0.5)}  # "a" (never correct) takes rank 1 in the tie
    scores = score_predictions(_frame(pred), truth)
    assert scores.gap == 0.5
    assert scores.gap_landmarks_only == 1.0
    assert scores.accuracy == 1.0


def test_leading_zeros_make_different_queries():
    truth = {"0123": [1], "123": [2]}
    pred = {"0123": (1, 0.9), "123": (1, 0.8)}
    scores = score_predictions(_frame(pred), truth)
    assert (scores.n_correct, scores.gap) == (1, 0.5)


def test_integer_ids_are_refused():
    with pytest.raises(TypeError, match="strings"):
        score_predictions(_frame(OFFICIAL_PRED), {123: [1]})
    pred = pd.DataFrame({"id": [123], "landmark_id": [1], "score": [0.5]})
    with pytest.raises(TypeError, match="strings"):
        score_predictions(pred, OFFICIAL_TRUTH)


def test_non_ascii_ids():
    truth = {"é": [1], "e": [2], "z": [3]}
    pred = {"é": (1, 0.5), "e": (9, 0.5), "z": (3, 0.5)}  # "e" < "z" < "é"
    scores = score_predictions(_frame(pred), truth)
    assert scores.gap == gap_reference(pred, truth) == pytest.approx((1 / 2 + 2 / 3) / 3)


# ---------------------------------------------------------------------------- rules of GAP


def test_any_of_several_truth_landmarks_is_correct():
    truth = {"q": [4, 5, 6]}
    for landmark in (4, 5, 6):
        assert score_predictions(_frame({"q": (landmark, 0.1)}), truth).gap == 1.0
    assert score_predictions(_frame({"q": (7, 0.1)}), truth).gap == 0.0


def test_missing_prediction_is_not_ranked_but_counts_in_m():
    truth = {"a": [1], "b": [2]}
    scores = score_predictions(_frame({"a": (1, 0.3)}), truth)
    assert (scores.gap, scores.accuracy, scores.n_predictions) == (0.5, 0.5, 1)


def test_rows_without_prediction_are_skipped():
    pred = pd.DataFrame(
        {
            "id": pd.Series(["a", "b"], dtype=object),
            "landmark_id": pd.array([1, None], dtype="Int64"),
            "score": [0.3, np.nan],
        }
    )
    scores = score_predictions(pred, {"a": [1], "b": [2]})
    assert (scores.gap, scores.n_predictions) == (0.5, 1)
    # Same with a float landmark column (NaN rows) and with None in a dict.
    pred["landmark_id"] = [1.0, np.nan]
    assert score_predictions(pred, {"a": [1], "b": [2]}).gap == 0.5
    assert score_predictions({"a": (1, 0.3), "b": None}, {"a": [1], "b": [2]}).gap == 0.5


def test_extra_prediction_ids_are_ignored_and_counted():
    pred = dict(OFFICIAL_PRED, unknown=(0, 99.0))  # would take rank 1 if it were scored
    scores = score_predictions(_frame(pred), OFFICIAL_TRUTH)
    assert scores.gap == pytest.approx(1 / 6)
    assert (scores.n_predictions, scores.n_ignored) == (3, 1)


def test_no_landmark_query_gives_nan():
    scores = score_predictions(_frame({"a": (1, 0.5)}), {"a": [], "b": []})
    assert math.isnan(scores.gap) and math.isnan(scores.gap_landmarks_only)
    assert math.isnan(scores.accuracy)
    assert scores.n_landmark_queries == 0
    as_dict = scores.to_dict()
    assert as_dict["gap"] is None and as_dict["accuracy"] is None
    json.dumps(as_dict, allow_nan=False)  # valid JSON
    assert math.isnan(gap_reference({"a": (1, 0.5)}, {"a": []}))
    assert math.isnan(score_predictions(_frame({}), {}).gap)


def test_no_predictions_gives_zero():
    empty = pd.DataFrame({"id": pd.Series([], dtype=object), "landmark_id": [], "score": []})
    scores = score_predictions(empty.astype({"landmark_id": "Int64"}), OFFICIAL_TRUTH)
    assert (scores.gap, scores.gap_landmarks_only, scores.accuracy) == (0.0, 0.0, 0.0)


def test_truth_as_dataframe_with_arrays_and_missing_values():
    truth = pd.DataFrame(
        {
            "id": list(OFFICIAL_TRUTH),
            "landmarks": [np.array([0, 12]), [100, 200, 300], (1,), None, np.nan],
        }
    )
    assert score_predictions(_frame(OFFICIAL_PRED), truth) == score_predictions(
        _frame(OFFICIAL_PRED), OFFICIAL_TRUTH
    )


@pytest.mark.parametrize(
    "pred, truth, error",
    [
        (pd.DataFrame({"id": ["a", "a"], "landmark_id": [1, 2], "score": [0.1, 0.2]}),
         {"a": [1]}, "duplicate query id 'a'"),
        (pd.DataFrame({"id": ["a"], "landmark_id": [1], "score": [np.nan]}),
         {"a": [1]}, "NaN"),
        (pd.DataFrame({"id": ["a"], "landmark_id": [1.5], "score": [0.1]}),
         {"a": [1]}, "non-integer"),
        (pd.DataFrame({"id": ["a"], "score": [0.1]}), {"a": [1]}, "missing column"),
        (pd.DataFrame({"id": ["a"], "landmark_id": [1], "score": [0.1]}),
         pd.DataFrame({"id": ["a", "a"], "landmarks": [[1], [2]]}), "duplicate query id 'a'"),
    ],
)  # fmt: skip
def test_bad_inputs_raise(pred, truth, error):
    with pytest.raises(ValueError, match=error):
        score_predictions(pred, truth)


def test_non_integer_truth_landmarks_raise():
    with pytest.raises(TypeError, match="integers"):
        score_predictions(_frame({"a": (1, 0.5)}), {"a": [1.5]})


# ---------------------------------------------------------------------------- property test


def test_id_sort_matches_python_string_order():
    rng = random.Random(5)
    for _ in range(200):
        ids = list({
            rng.choice(["", "a", "abcdefg", "abcdefgh", "abcdefghi", "0" * 12])
            + "".join(rng.choice("0a~ ") for _ in range(rng.randint(0, 3)))
            for _ in range(rng.randint(1, 40))
        })
        keys = np.array(ids, dtype=object).astype("S")
        order = _argsort_ids(keys)
        assert [ids[i] for i in order] == sorted(ids)


def _random_case(rng: random.Random):
    # Short ids over a tiny alphabet: many prefixes ("0" < "00" < "01"), leading zeros,
    # sometimes a non-ASCII id; few distinct scores (ties) incl. 0.0 / -0.0 / negatives.
    # A shared prefix of 7 to 10 characters exercises the fast id sort's tie handling.
    alphabet = "019aé" if rng.random() < 0.2 else "019a"
    prefix = rng.choice(["", "", "", "landmk", "landmrk_", "000000000"])
    ids = {
        prefix + "".join(rng.choice(alphabet) for _ in range(rng.randint(0 if prefix else 1, 4)))
        for _ in range(60)
    }
    ids = sorted(ids)
    n_queries = rng.randint(0, len(ids))
    queries = rng.sample(ids, n_queries)
    landmarks = range(rng.randint(1, 8))
    truth = {
        q: rng.sample(landmarks, min(rng.choice([0, 0, 1, 1, 1, 2, 3]), len(landmarks)))
        for q in queries
    }
    scores = [0.0, -0.0, 0.5, 0.25, 1.0, -1.0, 0.1 + 0.2]
    extra = [i for i in ids if i not in truth]
    candidates = queries + rng.sample(extra, min(len(extra), rng.randint(0, 3)))
    pred = {
        q: (rng.choice(landmarks), rng.choice(scores) if rng.random() < 0.8 else rng.random())
        for q in candidates
        if rng.random() < 0.8
    }
    return pred, truth


def test_vectorised_equals_reference_on_random_cases():
    rng = random.Random(1234)
    for case in range(500):
        pred, truth = _random_case(rng)
        scores = score_predictions(_frame(pred), truth)
        context = f"case {case}: pred={pred} truth={truth}"
        assert _same(scores.gap, gap_reference(pred, truth)), context
        assert _same(
            scores.gap_landmarks_only, gap_reference(pred, truth, ignore_non_landmarks=True)
        ), context
        assert _same(scores.accuracy, accuracy_reference(pred, truth)), context
        assert scores.n_ignored == sum(1 for q in pred if q not in truth), context


def test_vectorised_equals_reference_on_a_larger_case():
    rng = np.random.default_rng(7)
    n = 20_000
    ids = [f"{i:06d}" for i in rng.permutation(n)]
    truth = {q: rng.integers(0, 50, rng.choice([0, 0, 0, 1, 2])).tolist() for q in ids}
    pred = {q: (int(rng.integers(0, 50)), float(rng.integers(0, 20)) / 20) for q in ids[:-500]}
    scores = score_predictions(_frame(pred), truth)
    assert scores.gap == gap_reference(pred, truth)  # exactly: same summation order
    assert scores.gap_landmarks_only == gap_reference(pred, truth, ignore_non_landmarks=True)
    assert scores.accuracy == accuracy_reference(pred, truth)


# ---------------------------------------------------------------------------- CSV files


def _write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


def test_read_solution_csv(tmp_path):
    path = _write(
        tmp_path / "solution.csv",
        "id,landmarks,Usage\n0123,0 12,Public\n0223,100 200  300 ,Private\n0423,,Public\n"
        "0999,7,Ignored\n",
    )
    df = read_solution_csv(path)
    assert df["id"].tolist() == ["0123", "0223", "0423", "0999"]
    assert df["landmarks"].tolist() == [[0, 12], [100, 200, 300], [], [7]]
    assert df["usage"].tolist() == ["Public", "Private", "Public", "Ignored"]


def test_read_submission_csv(tmp_path):
    path = _write(
        tmp_path / "sub.csv",
        "\ufeffid,landmarks\n0223,0 0.01\n0323, 1 1e1 \n0423,150 15\n0523,\n\n",
    )
    df = read_submission_csv(path)
    assert df["id"].tolist() == ["0223", "0323", "0423", "0523"]
    assert df["landmark_id"].tolist() == [0, 1, 150, pd.NA]
    assert df["score"].tolist()[:3] == [0.01, 10.0, 15.0] and math.isnan(df["score"].iloc[3])


def test_submission_round_trip_is_exact(tmp_path):
    pred = _frame({"0001": (5, 0.1 + 0.2), "0002": (7, 1e-12), "0003": (9, -3.0)})
    pred.loc[3] = ["0004", pd.NA, np.nan]
    pred.loc[4] = ["odd,id", 1, 0.5]  # needs CSV quoting
    path = tmp_path / "out" / "sub.csv"
    write_submission_csv(pred, path)
    assert path.read_text().splitlines()[:2] == ["id,landmarks", "0001,5 0.30000000000000004"]
    back = read_submission_csv(path)
    pd.testing.assert_frame_equal(back, pred.astype({"id": object}), check_dtype=False)
    assert [p.name for p in path.parent.iterdir()] == ["sub.csv"]  # no temporary left


def test_score_files_splits(tmp_path):
    solution = _write(
        tmp_path / "solution.csv",
        "id,landmarks,Usage\n"
        "0123,0 12,Public\n0223,100 200 300,Public\n0323,1,Private\n0423,,Private\n0523,,Public\n"
        "0623,5,Ignored\n",
    )
    submission = _write(
        tmp_path / "sub.csv",
        "id,landmarks\n0223,0 0.01\n0323,1 10.0\n0423,150 15.0\n0523,\n0623,5 99\n",
    )
    results = score_files(submission, solution)
    # "all" is the official example: the Ignored row and its prediction play no part.
    assert results["all"].gap == pytest.approx(1 / 6)
    assert results["all"].n_ignored == 0
    # Public: 0123, 0223 (landmarks), 0523; only 0223 is predicted, wrongly.
    assert (results["Public"].gap, results["Public"].n_landmark_queries) == (0.0, 2)
    # Private: 0423 (non-landmark, rank 1 at 15.0) then 0323 correct at rank 2.
    assert results["Private"].gap == 0.5
    assert results["Private"].gap_landmarks_only == 1.0


def test_cli_prints_json(tmp_path, capsys):
    solution = _write(tmp_path / "s.csv", "id,landmarks,Usage\na,1,Public\nb,,Private\n")
    submission = _write(tmp_path / "p.csv", "id,landmarks\na,1 0.5\nb,2 0.9\n")
    assert main([str(submission), str(solution)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["all"]["gap"] == 0.5 and out["Public"]["gap"] == 1.0
    assert out["Private"]["gap"] is None  # no landmark query in Private: undefined


@pytest.mark.parametrize(
    "text, row, problem",
    [
        ("id,landmarks\na,1 0.5\nb,x 0.5\n", 3, "landmark 'x' is not an integer"),
        ("id,landmarks\na,1.5 0.5\n", 2, "landmark '1.5' is not an integer"),
        ("id,landmarks\na,1 high\n", 2, "score 'high' is not a finite number"),
        ("id,landmarks\na,1 nan\n", 2, "score 'nan' is not a finite number"),
        ("id,landmarks\na,1 1e999\n", 2, "score '1e999' is not a finite number"),
        ("id,landmarks\na,1 0.5 2 0.4\n", 2, "2 predictions"),
        ("id,landmarks\na,1\n", 2, "expected '<landmark_id> <score>'"),
        ("id,landmarks\na,1 0.5\nb,\na,2 0.1\n", 4, "duplicate id 'a' (first at row 2)"),
        ("id,landmarks\n,1 0.5\n", 2, "empty id"),
        ("id,landmarks\na,1 0.5,extra\n", 2, "3 fields"),
        ("id,prediction\na,1 0.5\n", 1, "missing column(s) landmarks"),
    ],
)  # fmt: skip
def test_bad_submission_rows(tmp_path, text, row, problem):
    path = _write(tmp_path / "bad_sub.csv", text)
    with pytest.raises(StageError) as err:
        read_submission_csv(path)
    message = str(err.value)
    assert str(path) in message and f"row {row}:" in message and problem in message


@pytest.mark.parametrize(
    "text, row, problem",
    [
        ("id,landmarks,Usage\na,1 two,Public\n", 2, "landmark 'two' is not an integer"),
        ("id,landmarks,Usage\na,1,Public\na,2,Private\n", 3, "duplicate id 'a'"),
        ("id,landmarks,Usage\na,1,Secret\n", 2, "Usage 'Secret' is not one of"),
        ("id,landmarks\na,1\n", 1, "missing column(s) usage"),
        ("id,landmarks,Usage\na,1\n", 2, "2 fields"),
    ],
)  # fmt: skip
def test_bad_solution_rows(tmp_path, text, row, problem):
    path = _write(tmp_path / "bad_solution.csv", text)
    with pytest.raises(StageError) as err:
        read_solution_csv(path)
    message = str(err.value)
    assert str(path) in message and f"row {row}:" in message and problem in message


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(StageError, match="file not found"):
        read_submission_csv(tmp_path / "nope.csv")
    with pytest.raises(StageError, match="empty file"):
        read_solution_csv(_write(tmp_path / "empty.csv", ""))
    (tmp_path / "latin1.csv").write_bytes(b"id,landmarks\n\xe9,1 0.5\n")
    with pytest.raises(StageError, match="not UTF-8"):
        read_submission_csv(tmp_path / "latin1.csv")


def test_gapscores_is_a_plain_record():
    scores = score_predictions(_frame(OFFICIAL_PRED), OFFICIAL_TRUTH)
    assert isinstance(scores, GapScores)
    assert set(scores.to_dict()) == {
        "gap", "gap_landmarks_only", "accuracy", "n_queries", "n_landmark_queries",
        "n_predictions", "n_correct", "n_ignored",
    }  # fmt: skip
