"""Google Landmark Recognition metric (GAP) exactly as Kaggle computes it, plus Kaggle CSV I/O.

Global Average Precision (GAP, also called micro average precision) as in the official Google
Landmarks code (tensorflow/models, delf `google_landmarks_dataset/metrics.py`):

* each query has at most one prediction: a landmark id and a confidence score;
* all predictions are ranked together by score, descending; ties are broken by query id
  ascending (Python string comparison, so "10" < "9" and "0123" != "123"), then by landmark id;
* walking that ranking, every correct prediction adds precision-at-its-rank
  (correct so far / rank), and the sum is divided by M, the number of queries whose ground
  truth is not empty;
* a prediction on a non-landmark query (empty ground truth) takes a rank and is never correct;
  a query without a prediction is not ranked; with several ground-truth landmarks any match is
  correct.

Choices this module makes where the official code is silent or strict:

* predictions whose query id is not in the truth are ignored (and counted in `n_ignored`): the
  Kaggle scorer only scores the ids of its solution, whereas the official helper raises;
* M = 0 (no landmark query at all) leaves GAP and accuracy undefined: they are `nan` (`None` in
  `GapScores.to_dict()`), and a warning is logged;
* a NaN score is an error (it has no place in a ranking); so is a second prediction for a query.

Also here: "GAP ignoring non-landmark queries" (predictions on empty-truth queries are dropped
before ranking; M is unchanged) and top-1 accuracy over landmark queries.

`score_predictions` is vectorised with numpy; `gap_reference` / `accuracy_reference` are the
straightforward loops it is tested against. Run `python -m landmarks.metrics SUBMISSION SOLUTION`
to print the Public / Private / all scores of a Kaggle submission as JSON.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import logging
import math
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from landmarks.common import StageError, run_cli, setup_logging, write_text_atomic

log = logging.getLogger(__name__)

USAGES = ("Public", "Private", "Ignored")


@dataclass(frozen=True)
class GapScores:
    """What `score_predictions` returns. Metrics are `nan` when `n_landmark_queries` is 0."""

    gap: float  # GAP over all ranked predictions (the Kaggle leaderboard metric)
    gap_landmarks_only: float  # GAP after dropping predictions on non-landmark queries
    accuracy: float  # correct predictions / landmark queries (no prediction counts as wrong)
    n_queries: int  # queries in the truth
    n_landmark_queries: int  # M: queries whose truth is not empty
    n_predictions: int  # predictions ranked (their id is in the truth)
    n_correct: int  # ranked predictions that match their query's truth
    n_ignored: int  # predictions whose id is not in the truth (not scored)

    def to_dict(self) -> dict:
        """JSON-ready dict: an undefined metric (no landmark query) becomes None, not NaN."""
        return {
            key: None if isinstance(value, float) and math.isnan(value) else value
            for key, value in asdict(self).items()
        }


# --------------------------------------------------------------------------------------------
# Reference loops: a direct transcription of the definition, kept to test the fast version.


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


def accuracy_reference(
    predictions: Mapping[str, tuple[int, float]], truth: Mapping[str, Sequence[int]]
) -> float:
    """Top-1 accuracy over landmark queries by a plain loop; a missing prediction is wrong."""
    landmark_queries = [qid for qid, labels in truth.items() if len(labels) > 0]
    if not landmark_queries:
        return math.nan
    correct = sum(
        1 for qid in landmark_queries if qid in predictions and predictions[qid][0] in truth[qid]
    )
    return correct / len(landmark_queries)


# --------------------------------------------------------------------------------------------
# Vectorised scoring.


def score_predictions(pred, truth) -> GapScores:
    """Score one-prediction-per-query recognition results against the ground truth.

    pred: DataFrame with columns `id` (str), `landmark_id` (int; NA = no prediction) and `score`
        (float), e.g. from `read_submission_csv`; or a dict id -> (landmark_id, score) or None.
    truth: DataFrame with columns `id` (str) and `landmarks` (list of int; empty, None or NaN for
        a non-landmark query), e.g. from `read_solution_csv` (filter its `usage` first); or a dict
        id -> list of landmark ids.

    Raises ValueError on duplicate ids or NaN scores, TypeError on non-string ids or non-integer
    landmark ids. Ids in `pred` that are not in `truth` are ignored and counted in `n_ignored`.
    """
    t_ids, n_labels, label_query, label_landmark = _truth_arrays(truth)
    p_ids, p_landmark, p_score = _prediction_arrays(pred)
    t_keys, p_keys = _sortable_ids(t_ids, p_ids)

    # Join predictions to truth rows by sorting both id lists once (any sort kind: ids are
    # unique, or we stop). Putting the predictions in id order also settles the tie-break: the
    # stable sort by score below keeps tied predictions in id order.
    t_order = _argsort_ids(t_keys)
    t_sorted = t_keys[t_order]
    _check_unique(t_sorted, t_ids, t_order, "truth")
    p_order = _argsort_ids(p_keys)
    p_sorted = p_keys[p_order]
    _check_unique(p_sorted, p_ids, p_order, "predictions")

    pos = np.minimum(np.searchsorted(t_sorted, p_sorted), max(len(t_sorted) - 1, 0))
    known = t_sorted[pos] == p_sorted if len(t_sorted) else np.zeros(len(p_sorted), dtype=bool)
    query = t_order[pos[known]]  # truth row of each ranked prediction, in id order
    landmark = p_landmark[p_order][known]
    score = p_score[p_order][known]

    is_landmark_query = n_labels[query] > 0
    # Only predictions on landmark queries can be correct: look up just those (~2% in GLDv2).
    correct = np.zeros(len(query), dtype=bool)
    correct[is_landmark_query] = _matches_truth(
        query[is_landmark_query], landmark[is_landmark_query], label_query, label_landmark
    )
    # Landmark ids never decide a tie: each query has one prediction, so ids are unique.
    ranking = np.argsort(-score, kind="stable")
    correct_ranked = correct[ranking]

    num_positives = int(np.count_nonzero(n_labels))
    n_correct = int(np.count_nonzero(correct))
    if num_positives == 0:
        log.warning("no landmark query in the truth: GAP and accuracy are undefined (nan)")
    return GapScores(
        gap=_gap_of_ranking(correct_ranked, num_positives),
        gap_landmarks_only=_gap_of_ranking(
            correct_ranked[is_landmark_query[ranking]], num_positives
        ),
        accuracy=n_correct / num_positives if num_positives else math.nan,
        n_queries=len(t_ids),
        n_landmark_queries=num_positives,
        n_predictions=len(query),
        n_correct=n_correct,
        n_ignored=len(p_ids) - len(query),
    )


def _gap_of_ranking(correct_ranked: np.ndarray, num_positives: int) -> float:
    """GAP of predictions already in rank order; `correct_ranked[i]` says if rank i+1 is right."""
    if num_positives == 0:
        return math.nan
    hits_so_far = np.cumsum(correct_ranked)
    ranks = np.arange(1, len(correct_ranked) + 1)
    terms = hits_so_far[correct_ranked] / ranks[correct_ranked]
    # cumsum adds left to right, in the official loop's order, so the result matches it exactly
    # (np.sum's pairwise summation could differ in the last bits).
    total = float(np.cumsum(terms)[-1]) if len(terms) else 0.0
    return total / num_positives


def _matches_truth(query, landmark, label_query, label_landmark) -> np.ndarray:
    """Whether (query row, predicted landmark) is one of the truth's (query row, landmark) pairs."""
    if len(label_landmark) == 0:
        return np.zeros(len(query), dtype=bool)
    # Number landmarks 0..L-1 so that a pair packs into one int64: row * L + landmark number.
    vocabulary = np.unique(label_landmark)
    n_vocab = len(vocabulary)
    code = np.minimum(np.searchsorted(vocabulary, landmark), n_vocab - 1)
    in_vocabulary = vocabulary[code] == landmark
    truth_pairs = np.unique(label_query * n_vocab + np.searchsorted(vocabulary, label_landmark))
    pred_pairs = query * n_vocab + code
    found = np.minimum(np.searchsorted(truth_pairs, pred_pairs), len(truth_pairs) - 1)
    return in_vocabulary & (truth_pairs[found] == pred_pairs)


def _truth_arrays(truth):
    """(ids, labels per query, query row of each label, each label) from a dict or DataFrame."""
    if isinstance(truth, Mapping):
        ids = np.array(list(truth.keys()), dtype=object)
        labels = list(truth.values())
    elif isinstance(truth, pd.DataFrame):
        _require_columns(truth, ("id", "landmarks"), "truth")
        ids = truth["id"].to_numpy(dtype=object)
        labels = truth["landmarks"].tolist()
    else:
        raise TypeError(f"truth must be a dict or a DataFrame, not {type(truth).__name__}")
    try:
        n_labels = np.fromiter(map(len, labels), dtype=np.int64, count=len(labels))
    except TypeError:  # None / NaN for an empty truth (e.g. from Parquet); slower path
        labels = [_label_list(v) for v in labels]
        n_labels = np.fromiter(map(len, labels), dtype=np.int64, count=len(labels))
    flat = np.array(list(itertools.chain.from_iterable(labels)))
    if flat.size and flat.dtype.kind not in "iu":
        raise TypeError(f"truth landmark ids must be integers, found {flat.dtype} values")
    label_query = np.repeat(np.arange(len(ids), dtype=np.int64), n_labels)
    return ids, n_labels, label_query, flat.astype(np.int64)


def _label_list(value):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ()
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        raise TypeError(f"truth landmarks must be lists of integers, found {value!r}")
    return value


def _prediction_arrays(pred):
    """(ids, landmark ids, scores) of the queries that have a prediction."""
    if isinstance(pred, Mapping):
        rows = [(qid, p[0], p[1]) for qid, p in pred.items() if p is not None]
        pred = pd.DataFrame(rows, columns=["id", "landmark_id", "score"], dtype=object)
        pred = pred.astype({"landmark_id": "Int64", "score": float})
    elif not isinstance(pred, pd.DataFrame):
        raise TypeError(f"predictions must be a DataFrame or a dict, not {type(pred).__name__}")
    _require_columns(pred, ("id", "landmark_id", "score"), "predictions")
    has_prediction = pred["landmark_id"].notna().to_numpy()
    pred = pred[has_prediction]
    ids = pred["id"].to_numpy(dtype=object)
    column = pred["landmark_id"]
    if column.dtype.kind in "iu":
        landmark = column.to_numpy(dtype=np.int64)
    elif column.dtype.kind == "f":  # integers stored as float because of NaN rows
        values = column.to_numpy(dtype=np.float64)
        if not np.array_equal(values, np.round(values)):
            raise ValueError("predictions: landmark_id has non-integer values")
        landmark = values.astype(np.int64)
    else:
        raise TypeError(f"predictions: landmark_id must be integers (Int64), not {column.dtype}")
    try:
        score = pred["score"].to_numpy(dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"predictions: score must be numeric ({err})") from err
    if np.isnan(score).any():
        raise ValueError(f"predictions: score is NaN for query id {ids[np.isnan(score)][0]!r}")
    return ids, landmark, score


def _sortable_ids(truth_ids: np.ndarray, pred_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both id arrays as numpy strings that sort exactly like Python `str`.

    ASCII bytes compare like code points and sort several times faster than numpy's UCS-4 `U`
    strings, which are the fallback for non-ASCII ids. Both arrays get the same kind so that
    they compare with each other. (numpy ignores trailing NUL characters; ids never have them.)
    """
    truth_keys = _ascii_keys(truth_ids, "truth")
    pred_keys = _ascii_keys(pred_ids, "predictions")
    if truth_keys is None or pred_keys is None:
        return truth_ids.astype("U"), pred_ids.astype("U")
    return truth_keys, pred_keys


def _ascii_keys(ids: np.ndarray, what: str) -> np.ndarray | None:
    """`ids` as a fixed-width bytes array, or None when some id is not ASCII."""
    try:
        text = "".join(ids)  # also the check that every id is a string
    except TypeError:
        bad = next(x for x in ids if not isinstance(x, str))
        raise TypeError(
            f"{what}: query ids must be strings (\"0123\" != \"123\"), found {bad!r}"
        ) from None
    if not text.isascii():
        return None
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    if len(ids) and lengths.min() == lengths.max() > 0:
        # Equal-length ids (GLDv2's are 16 hex digits): one buffer, no per-id conversion.
        return np.frombuffer(text.encode("ascii"), dtype=f"S{lengths[0]}")
    return ids.astype("S")


def _argsort_ids(keys: np.ndarray) -> np.ndarray:
    """argsort of id keys; for bytes, first by their first 8 bytes as one integer.

    numpy compares fixed-width strings byte by byte; a uint64 sort of the 8-byte prefix (big
    endian, so it orders like the bytes) is several times faster, and only ids sharing their
    prefix (few, for GLDv2's random hex ids) still need the string sort.
    """
    if keys.dtype.kind != "S" or len(keys) == 0:
        return np.argsort(keys)
    n, width = len(keys), keys.dtype.itemsize
    prefix = np.zeros((n, 8), dtype=np.uint8)  # NUL padding sorts short ids first, as str does
    prefix[:, : min(width, 8)] = keys.view(np.uint8).reshape(n, width)[:, :8]
    prefix = prefix.view(">u8").ravel().astype(np.uint64)
    order = np.argsort(prefix)
    # Slots of the sorted order whose prefix is shared: sorting the ids found there by the full
    # key and writing them back orders every group of equal prefixes, as groups stay in order.
    same = prefix[order[1:]] == prefix[order[:-1]]
    tied = np.zeros(n, dtype=bool)
    tied[1:] |= same
    tied[:-1] |= same
    slots = np.flatnonzero(tied)
    if len(slots):
        ids = order[slots]
        order[slots] = ids[np.argsort(keys[ids])]
    return order


def _check_unique(sorted_keys: np.ndarray, ids: np.ndarray, order: np.ndarray, what: str) -> None:
    """Raise on the first repeated id; `sorted_keys` is `ids` sorted by `order`."""
    same = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1])
    if len(same):
        raise ValueError(f"{what}: duplicate query id {ids[order[same[0]]]!r} (one row per query)")


def _require_columns(frame: pd.DataFrame, columns, what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what}: missing column(s) {missing}; found {list(frame.columns)}")


def _require_strings(ids: np.ndarray, what: str) -> None:
    # Query ids stay strings: "0123" and "123" are different queries.
    if len(ids) and pd.api.types.infer_dtype(ids, skipna=False) != "string":
        bad = next(x for x in ids if not isinstance(x, str))
        raise TypeError(f"{what}: query ids must be strings, found {bad!r} ({type(bad).__name__})")


# --------------------------------------------------------------------------------------------
# Kaggle CSV files. Errors name the file and the row: row 1 is the header, as in a spreadsheet.

_INTEGER = re.compile(r"[+-]?[0-9]+")
_NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
_USAGE_BY_LOWER = {usage.lower(): usage for usage in USAGES}


def read_solution_csv(path) -> pd.DataFrame:
    """Read a Kaggle solution `id,landmarks,Usage` into DataFrame[id, landmarks, usage].

    `landmarks` becomes a list of int (empty for a non-landmark query); `usage` is one of
    Public / Private / Ignored (any letter case in the file). Ignored rows are kept here;
    `score_files` drops them. Raises StageError naming the file and row on bad input.
    """
    ids, landmarks, usages = [], [], []
    for row_number, row in _csv_rows(path, ("id", "landmarks", "usage")):
        query_id, field, usage = row
        labels = []
        for token in field.split():
            if not _INTEGER.fullmatch(token):
                raise StageError(f"{path}: row {row_number}: landmark {token!r} is not an integer")
            labels.append(int(token))
        canonical = _USAGE_BY_LOWER.get(usage.lower())
        if canonical is None:
            raise StageError(
                f"{path}: row {row_number}: Usage {usage!r} is not one of {', '.join(USAGES)}"
            )
        ids.append(query_id)
        landmarks.append(labels)
        usages.append(canonical)
    return pd.DataFrame(
        {
            "id": pd.Series(ids, dtype=object),
            "landmarks": pd.Series(landmarks, dtype=object),
            "usage": pd.Series(usages, dtype=object),
        }
    )


def read_submission_csv(path) -> pd.DataFrame:
    """Read a Kaggle submission `id,landmarks` into DataFrame[id, landmark_id, score].

    `landmarks` holds "<landmark_id> <score>" or nothing; a row without a prediction keeps its id
    with landmark_id <NA> and score NaN. Raises StageError naming the file and row for a
    non-integer landmark, a non-numeric (or non-finite) score, more than one prediction, a
    duplicate id, or missing columns.
    """
    ids, landmark_ids, scores = [], [], []
    for row_number, (query_id, field) in _csv_rows(path, ("id", "landmarks")):
        tokens = field.split()
        if not tokens:
            landmark, score = None, math.nan
        elif len(tokens) == 2:
            landmark, score = _parse_prediction(path, row_number, *tokens)
        elif len(tokens) % 2 == 0:
            raise StageError(
                f"{path}: row {row_number}: {len(tokens) // 2} predictions for query "
                f"{query_id!r}; recognition allows one '<landmark_id> <score>' per query"
            )
        else:
            raise StageError(
                f"{path}: row {row_number}: expected '<landmark_id> <score>', "
                f"found {field.strip()!r}"
            )
        ids.append(query_id)
        landmark_ids.append(landmark)
        scores.append(score)
    return pd.DataFrame(
        {
            "id": pd.Series(ids, dtype=object),
            "landmark_id": pd.array(landmark_ids, dtype="Int64"),
            "score": np.array(scores, dtype=np.float64),
        }
    )


def _parse_prediction(path, row_number, landmark: str, score: str) -> tuple[int, float]:
    if not _INTEGER.fullmatch(landmark):
        raise StageError(f"{path}: row {row_number}: landmark {landmark!r} is not an integer")
    if not _NUMBER.fullmatch(score):  # also rejects nan / inf, which cannot be ranked sensibly
        raise StageError(f"{path}: row {row_number}: score {score!r} is not a finite number")
    value = float(score)
    if not math.isfinite(value):  # e.g. 1e999
        raise StageError(f"{path}: row {row_number}: score {score!r} is not a finite number")
    return int(landmark), value


def _csv_rows(path, columns: tuple[str, ...]):
    """Yield (row number, [values of `columns`]) for each data row, checking ids are unique.

    Header names are matched ignoring case and surrounding spaces; other columns are ignored.
    Blank lines are skipped. Every other problem raises StageError naming file and row.
    """
    path = Path(path)
    try:
        handle = open(path, encoding="utf-8-sig", newline="")  # utf-8-sig: tolerate a BOM
    except FileNotFoundError:
        raise StageError(f"{path}: file not found") from None
    except OSError as err:
        raise StageError(f"{path}: cannot open ({err.strerror})") from None
    with handle:
        reader = csv.reader(handle)
        try:
            header = next(reader, None)
            if header is None:
                raise StageError(f"{path}: empty file, expected a header {','.join(columns)}")
            names = [name.strip().lower() for name in header]
            missing = [c for c in columns if c not in names]
            if missing:
                raise StageError(
                    f"{path}: row 1: missing column(s) {', '.join(missing)} "
                    f"(header is {','.join(header)!r}; expected {','.join(columns)})"
                )
            positions = [names.index(c) for c in columns]
            first_seen: dict[str, int] = {}
            for row in reader:
                row_number = reader.line_num
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                if len(row) != len(header):
                    raise StageError(
                        f"{path}: row {row_number}: {len(row)} fields, but the header has "
                        f"{len(header)} (an unquoted comma?)"
                    )
                values = [row[i].strip() for i in positions]
                query_id = values[0]
                if not query_id:
                    raise StageError(f"{path}: row {row_number}: empty id")
                if "\x00" in query_id:
                    raise StageError(f"{path}: row {row_number}: id contains a NUL character")
                if query_id in first_seen:
                    raise StageError(
                        f"{path}: row {row_number}: duplicate id {query_id!r} "
                        f"(first at row {first_seen[query_id]})"
                    )
                first_seen[query_id] = row_number
                yield row_number, values
        except UnicodeDecodeError as err:
            raise StageError(f"{path}: not UTF-8 text ({err.reason})") from None
        except csv.Error as err:
            raise StageError(f"{path}: row {reader.line_num}: unreadable CSV ({err})") from None


def write_submission_csv(pred, path) -> None:
    """Write DataFrame[id, landmark_id, score] as a Kaggle submission `id,landmarks`, atomically.

    A row whose landmark_id is NA gets an empty prediction. Scores are written with `repr`, the
    shortest text that reads back as the same float, so re-reading and re-scoring is exact.
    """
    _require_columns(pred, ("id", "landmark_id", "score"), "predictions")
    ids = pred["id"].to_numpy(dtype=object)
    _require_strings(ids, "predictions")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["id", "landmarks"])
    rows = zip(ids, pred["landmark_id"].tolist(), pred["score"].tolist())
    for query_id, landmark, score in rows:
        if pd.isna(landmark):  # None, NA or NaN: no prediction
            writer.writerow([query_id, ""])
            continue
        if not math.isfinite(score):
            raise ValueError(f"predictions: score of query {query_id!r} is {score}")
        if landmark != int(landmark):
            raise ValueError(f"predictions: landmark_id of query {query_id!r} is {landmark}")
        writer.writerow([query_id, f"{int(landmark)} {float(score)!r}"])
    write_text_atomic(path, buffer.getvalue())


def score_files(submission, solution) -> dict[str, GapScores]:
    """Score a submission CSV against a solution CSV: {"all": ..., "Public": ..., "Private": ...}.

    Ignored rows are dropped everywhere, predictions on them included. "all" scores Public and
    Private together. A split's `n_ignored` also counts the other split's predictions; in "all"
    it counts predictions whose id is not in the solution at all (a warning is logged).
    """
    solution_df = read_solution_csv(solution)
    submission_df = read_submission_csv(submission)
    ignored = solution_df["usage"] == "Ignored"
    submission_df = submission_df[~submission_df["id"].isin(solution_df.loc[ignored, "id"])]
    scored = solution_df[~ignored]
    results = {"all": score_predictions(submission_df, scored)}
    if results["all"].n_ignored:
        log.warning(
            "%s: %d predictions for ids not in %s were ignored",
            submission,
            results["all"].n_ignored,
            solution,
        )
    for usage in ("Public", "Private"):
        results[usage] = score_predictions(submission_df, scored[scored["usage"] == usage])
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m landmarks.metrics",
        description="Score a Kaggle landmark recognition submission (GAP) and print JSON.",
    )
    parser.add_argument("submission", help="CSV id,landmarks with '<landmark_id> <score>'")
    parser.add_argument("solution", help="CSV id,landmarks,Usage")
    args = parser.parse_args(argv)
    setup_logging()
    results = score_files(args.submission, args.solution)
    json.dump({name: s.to_dict() for name, s in results.items()}, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    run_cli(main)
