"""Tests for landmarks.metrics: GAP as Kaggle computes it, and Kaggle CSV I/O."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from gap_reference import accuracy_reference, gap_reference

from landmarks.common import StageError
from landmarks.metrics import (
    GapScores,
    _argsort_ids,
    _hex_keys,
    _ranking,
    _sortable_ids,
    _stable_argsort_u64,
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
    assert score_predictions(EXAMPLE_PRED, EXAMPLE_TRUTH) == score_predictions(_frame(EXAMPLE_PRED), EXAMPLE_TRUTH)


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
    assert score_predictions(_frame(OFFICIAL_PRED), truth) == score_predictions(_frame(OFFICIAL_PRED), OFFICIAL_TRUTH)


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
        ids = list(
            {
                rng.choice(["", "a", "abcdefg", "abcdefgh", "abcdefghi", "0" * 12])
                + "".join(rng.choice("0a~ ") for _ in range(rng.randint(0, 3)))
                for _ in range(rng.randint(1, 40))
            }
        )
        keys = np.array(ids, dtype=object).astype("S")
        order = _argsort_ids(keys)
        assert [ids[i] for i in order] == sorted(ids)


def _random_case(rng: random.Random):
    # Short ids over a tiny alphabet: many prefixes ("0" < "00" < "01"), leading zeros,
    # sometimes a non-ASCII id; few distinct scores (ties) incl. 0.0 / -0.0 / negatives.
    # A shared prefix of 7 to 10 characters exercises the fast id sort's tie handling.
    alphabet = "019aé" if rng.random() < 0.2 else "019a"
    prefix = rng.choice(["", "", "", "landmk", "landmrk_", "000000000"])
    ids = {prefix + "".join(rng.choice(alphabet) for _ in range(rng.randint(0 if prefix else 1, 4))) for _ in range(60)}
    ids = sorted(ids)
    n_queries = rng.randint(0, len(ids))
    queries = rng.sample(ids, n_queries)
    landmarks = range(rng.randint(1, 8))
    truth = {q: rng.sample(landmarks, min(rng.choice([0, 0, 1, 1, 1, 2, 3]), len(landmarks))) for q in queries}
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
        assert _same(scores.gap_landmarks_only, gap_reference(pred, truth, ignore_non_landmarks=True)), context
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


# ---------------------------------------------------------------------------- fast paths
# GLDv2 ids (lowercase hex, one length) are matched and sorted as uint64 numbers, Arrow-backed
# id columns are read without Python strings, and sorts pack positions into uint64 values.
# Each must give exactly what the general path and the reference loops give.


def _hex_ids(rng: random.Random, count: int, width: int = 16, prefix: str = "") -> list[str]:
    """`count` distinct random ids of `width` lowercase hex digits (fewer if there are fewer)."""
    digits = "0123456789abcdef"
    prefix = prefix[: width - 1]
    count = min(count, 16 ** (width - len(prefix)))
    ids = set()
    while len(ids) < count:
        ids.add(prefix + "".join(rng.choice(digits) for _ in range(width - len(prefix))))
    return sorted(ids)


def _scores_and_references(pred: dict, truth: dict) -> tuple:
    scores = score_predictions(_frame(pred), truth)
    return scores, (
        gap_reference(pred, truth),
        gap_reference(pred, truth, ignore_non_landmarks=True),
        accuracy_reference(pred, truth),
    )


def _assert_equals_references(scores: GapScores, references: tuple, context: str = "") -> None:
    gap, gap_landmarks_only, accuracy = references
    assert _same(scores.gap, gap), context
    assert _same(scores.gap_landmarks_only, gap_landmarks_only), context
    assert _same(scores.accuracy, accuracy), context


@pytest.mark.parametrize("width", [2, 4, 8, 10, 16])
def test_hex_keys_sort_and_compare_like_the_ids(width):
    rng = random.Random(width)
    # A shared prefix makes ids differ only in their last digits, where "9" < "a" matters.
    ids = _hex_ids(rng, 300, width, prefix="0f" * (width // 4))
    rng.shuffle(ids)
    for source in (ids, np.array(ids, dtype=object), pa.array(ids), pa.array(["x"] + ids)[1:]):
        found = _hex_keys(source)
        assert found is not None and found[0] == width
        keys = found[1]
        assert keys.dtype == np.uint64
        assert [ids[i] for i in np.argsort(keys)] == sorted(ids)
        assert len(np.unique(keys)) == len(ids)


@pytest.mark.parametrize(
    "ids",
    [
        ["0A", "0b"],  # uppercase: "0A" and "0a" would read as the same number
        ["0a", "0abc"],  # different lengths
        ["abcd", "ef", "123456"],  # the same total length as 3 ids of 4 characters
        ["abc", "def"],  # odd length
        ["0" * 18, "1" * 18],  # more than 16 digits
        ["abcd", "ab  "],  # spaces inside an id
        ["abcd", "ab\tc"],
        [" abc", "abcd"],
        ["0x12", "0012"],  # not a hex digit
        ["é1", "a1"],  # not ASCII
        ["", "ab"],
    ],
)  # fmt: skip
def test_ids_that_are_not_one_length_lowercase_hex_take_the_general_path(ids):
    assert _hex_keys(ids) is None
    assert _hex_keys(pa.array(ids)) is None
    # The general path gives the right scores: "ab" < "ab  " etc. as Python strings.
    pred = dict.fromkeys(ids, (1, 0.5))
    truth = {qid: [1] if k % 2 else [2] for k, qid in enumerate(ids)}
    scores, references = _scores_and_references(pred, truth)
    _assert_equals_references(scores, references)


def test_non_string_and_missing_ids_are_not_hex():
    assert _hex_keys([12, "ab"]) is None and _hex_keys(["ab", 12]) is None
    assert _hex_keys(pa.array(["ab", None])) is None
    assert _hex_keys([]) == (0, pytest.approx(np.zeros(0)))


def test_hex_ids_with_one_odd_id_fall_back_with_identical_scores():
    rng = random.Random(3)
    ids = _hex_ids(rng, 200, prefix="00ff")
    truth = {q: [rng.randrange(4)] if rng.random() < 0.5 else [] for q in ids}
    pred = {q: (rng.randrange(4), rng.choice([0.5, 0.25, 1.0])) for q in ids if rng.random() < 0.9}
    fast, references = _scores_and_references(pred, truth)
    _assert_equals_references(fast, references)
    assert _sortable_ids(ids, list(pred))[0].dtype == np.uint64  # the fast path was taken

    # A prediction for an unknown, non-hex id: ignored, and the rest scores the same.
    odd_pred = dict(pred, **{"not-hex": (1, 99.0)})
    assert _sortable_ids(ids, list(odd_pred))[0].dtype.kind == "S"
    scores, odd_references = _scores_and_references(odd_pred, truth)
    assert odd_references == references
    _assert_equals_references(scores, references)
    assert (scores.n_predictions, scores.n_ignored) == (fast.n_predictions, 1)

    # An uppercase id in the truth is another query than its lowercase spelling.
    upper = ids[0].upper()
    assert upper != ids[0]
    odd_truth = dict(truth, **{upper: [1]})
    odd_pred = dict(pred, **{upper: (1, 0.75)})
    scores, references = _scores_and_references(odd_pred, odd_truth)
    _assert_equals_references(scores, references)
    assert scores.n_queries == len(truth) + 1 and scores.n_ignored == 0


def test_hex_ids_of_different_lengths_are_different_queries():
    # Each side is hex of one length, but not the same one: "00ab" is not "ab".
    scores = score_predictions(_frame({"ab": (1, 0.5), "cd": (2, 0.5)}), {"00ab": [1], "00cd": [2]})
    assert (scores.gap, scores.n_predictions, scores.n_ignored) == (0.0, 0, 2)
    # Both lengths on one side.
    truth = {"00ab": [1], "ab": [2]}
    pred = {"ab": (2, 0.5), "00ab": (1, 0.4)}
    assert score_predictions(_frame(pred), truth).gap == 1.0 == gap_reference(pred, truth)


def test_duplicate_hex_ids_are_reported():
    ids = ["00000000000000aa", "00000000000000ab", "00000000000000aa"]
    with pytest.raises(ValueError, match="truth: duplicate query id '00000000000000aa'"):
        score_predictions(_frame({ids[0]: (1, 0.5)}), pd.DataFrame({"id": ids, "landmarks": [[1]] * 3}))
    pred = pd.DataFrame({"id": pd.Series(ids, dtype="str"), "landmark_id": 1, "score": 0.5})
    with pytest.raises(ValueError, match="predictions: duplicate query id '00000000000000aa'"):
        score_predictions(pred, {ids[0]: [1]})


@pytest.mark.parametrize("id_dtype", ["str", pd.ArrowDtype(pa.string()), object])
@pytest.mark.parametrize("hex_ids", [True, False])
def test_arrow_backed_id_columns_give_the_same_scores(id_dtype, hex_ids):
    # pandas' default `str` columns (e.g. read from Parquet) hold their ids in Arrow arrays.
    rng = random.Random(11)
    ids = _hex_ids(rng, 120) if hex_ids else [f"img_{k}" for k in range(120)]
    truth = {q: [rng.randrange(3)] if rng.random() < 0.4 else [] for q in ids}
    pred = {q: (rng.randrange(3), rng.choice([0.1, 0.2, 0.3])) for q in ids[5:] if rng.random() < 0.9}
    expected, references = _scores_and_references(pred, truth)
    _assert_equals_references(expected, references)

    pred_frame = _frame(pred).astype({"id": id_dtype})
    # Rows without a prediction are filtered out; the truth column comes in two Arrow chunks.
    pred_frame.loc[len(pred_frame)] = [ids[0], pd.NA, np.nan]
    truth_frame = pd.DataFrame({"id": list(truth), "landmarks": list(truth.values())})
    halves = [truth_frame.iloc[:50], truth_frame.iloc[50:]]
    truth_frame = pd.concat([half.astype({"id": id_dtype}) for half in halves], ignore_index=True)
    assert score_predictions(pred_frame, truth_frame) == expected
    assert score_predictions(pred_frame.iloc[1:], truth_frame) == score_predictions(_frame(pred).iloc[1:], truth)


def test_missing_id_in_an_arrow_column_is_refused():
    pred = pd.DataFrame({"id": pd.Series(["ab", None], dtype="str"), "landmark_id": 1, "score": 0.5})
    with pytest.raises(TypeError, match="strings"):
        score_predictions(pred, {"ab": [1]})


def test_ids_with_nul_are_refused():
    # numpy strings drop trailing NULs, so "a\x00" would be taken for "a".
    with pytest.raises(ValueError, match="NUL"):
        score_predictions(_frame({"a": (1, 0.5)}), {"a": [1], "a\x00": [2]})


def test_vectorised_equals_reference_on_random_hex_cases():
    rng = random.Random(99)
    for case in range(150):
        # A long shared prefix and few ids: many ids differ in one digit; few scores: ties.
        ids = _hex_ids(rng, rng.randint(1, 40), width=rng.choice([2, 8, 16]),
                       prefix=rng.choice(["", "", "0", "ffffff"]))  # fmt: skip
        queries = rng.sample(ids, rng.randint(0, len(ids)))
        truth = {q: rng.sample(range(5), rng.choice([0, 0, 1, 2])) for q in queries}
        pred = {
            q: (rng.randrange(5), rng.choice([0.0, -0.0, 0.5, 1.0, -1.0, rng.random()]))
            for q in ids
            if rng.random() < 0.8
        }
        if rng.random() < 0.2:  # one id that is not hex: the general path
            pred["zz"] = (0, rng.random())
        scores, references = _scores_and_references(pred, truth)
        _assert_equals_references(scores, references, f"case {case}: pred={pred} truth={truth}")
        assert scores.n_ignored == sum(1 for q in pred if q not in truth)


def _u64(values) -> np.ndarray:
    return np.array(values, dtype=np.uint64)


def test_stable_argsort_u64_equals_numpy_stable_argsort():
    rng = np.random.default_rng(5)
    top = np.iinfo(np.uint64).max
    cases = [
        _u64([]), _u64([7]), _u64([3, 3]), _u64([top, 0, top, 1]),
        rng.integers(0, 2**63, 5000, dtype=np.uint64) * np.uint64(2),  # full range: bits dropped
        rng.integers(0, 10, 5000, dtype=np.uint64),  # narrow range with ties: nothing dropped
        # Keys that differ only in low bits, spread over the full range: dropped bits tie them.
        np.repeat(rng.integers(0, 2**63, 50, dtype=np.uint64), 40) + rng.integers(0, 4, 2000, dtype=np.uint64),
        np.concatenate([_u64([0, top]), rng.integers(2**40, 2**40 + 3, 3000, dtype=np.uint64)]),
    ]  # fmt: skip
    for keys in cases:
        assert np.array_equal(_stable_argsort_u64(keys), np.argsort(keys, kind="stable"))


def test_ranking_is_score_descending_then_position():
    rng = np.random.default_rng(8)
    tiny = np.nextafter(0.5, 1.0)
    special = [0.0, -0.0, np.inf, -np.inf, -1.0, 0.5, tiny, 5e-324, -5e-324, 1e308, -1e308]
    for scores in (
        np.array(special * 30),
        np.round(rng.standard_normal(3000), 1),
        rng.random(3000) * 1e-300,
        np.float32(rng.random(3000)).astype(np.float64),
    ):
        rng.shuffle(scores)
        expected = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        assert _ranking(scores).tolist() == expected


# ---------------------------------------------------------------------------- CSV files


def _write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


def test_read_solution_csv(tmp_path):
    path = _write(
        tmp_path / "solution.csv",
        "id,landmarks,Usage\n0123,0 12,Public\n0223,100 200  300 ,Private\n0423,,Public\n0999,7,Ignored\n",
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
