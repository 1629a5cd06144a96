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

`score_predictions` is vectorised with numpy (about 0.4 s for a million predictions with GLDv2
ids, see bench/bench_gap.py); the straightforward loops it is tested against (tests/gap_reference.py)
give exactly its values. Run
`python -m landmarks.metrics SUBMISSION SOLUTION` to print the Public / Private / all scores of a
Kaggle submission as JSON.
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
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

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
# Vectorised scoring.


def score_predictions(pred, truth) -> GapScores:
    """Score one-prediction-per-query recognition results against the ground truth.

    pred: DataFrame with columns `id` (str), `landmark_id` (int; NA = no prediction) and `score`
        (float), e.g. from `read_submission_csv`; or a dict id -> (landmark_id, score) or None.
    truth: DataFrame with columns `id` (str) and `landmarks` (list of int; empty, None or NaN for
        a non-landmark query), e.g. from `read_solution_csv` (filter its `usage` first); or a dict
        id -> list of landmark ids.

    Raises ValueError on duplicate ids, ids containing NUL or NaN scores, TypeError on non-string
    ids or non-integer landmark ids. Ids in `pred` that are not in `truth` are ignored and
    counted in `n_ignored`.
    """
    # bench/bench_gap.py times these steps one by one.
    truth_ids, n_labels, label_query, label_landmark = _truth_arrays(truth)
    pred_ids, pred_landmark, pred_score = _prediction_arrays(pred)
    truth_keys, pred_keys = _sortable_ids(truth_ids, pred_ids)
    pred_row, landmark_query = _join_on_ids(
        truth_keys, pred_keys, truth_ids, pred_ids, landmark_rows=np.flatnonzero(n_labels)
    )
    correct = _correct_predictions(landmark_query, pred_landmark[pred_row], label_query, label_landmark)
    ranking = _ranking(pred_score[pred_row])
    return _gap_scores(correct, landmark_query >= 0, ranking, n_labels, n_ignored=len(pred_ids) - len(pred_row))


def _join_on_ids(truth_keys, pred_keys, truth_ids, pred_ids, landmark_rows) -> tuple[np.ndarray, np.ndarray]:
    """Match predictions to truth queries by id; checks that ids are unique on both sides.

    Returns the rows of the predictions whose id is in the truth, in id order (the order that
    breaks ties between equal scores), and for each the truth row of its query when that is a
    landmark query (one of `landmark_rows`), else -1. Only landmark queries need their row, and
    they are few (~2% in GLDv2), so the truth is sorted by value (faster than an argsort).
    Sorted keys are searched in sorted keys, which walks memory in order.
    """
    truth_sorted = _sorted_ids(truth_keys)
    _check_unique(truth_sorted, truth_keys, truth_ids, "truth")
    pred_order = _argsort_ids(pred_keys)
    pred_sorted = pred_keys[pred_order]
    _check_unique(pred_sorted, pred_keys, pred_ids, "predictions")
    known = _is_in(pred_sorted, truth_sorted)
    pred_row, matched = pred_order[known], pred_sorted[known]
    # Find the few landmark queries among the matched ids, rather than the other way round.
    found, at = _is_in(truth_keys[landmark_rows], matched, return_position=True)
    landmark_query = np.full(len(matched), -1, dtype=np.intp)
    landmark_query[at[found]] = landmark_rows[found]
    return pred_row, landmark_query


def _is_in(keys: np.ndarray, sorted_keys: np.ndarray, return_position: bool = False):
    """Which `keys` are in `sorted_keys` (and where, when asked): a search of each key."""
    if len(sorted_keys) == 0:
        position = np.zeros(len(keys), dtype=np.intp)
        found = np.zeros(len(keys), dtype=bool)
    else:
        position = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
        found = sorted_keys[position] == keys
    return (found, position) if return_position else found


def _correct_predictions(landmark_query, landmark, label_query, label_landmark) -> np.ndarray:
    """Whether each matched prediction is right; `landmark_query` as from `_join_on_ids`."""
    is_landmark_query = landmark_query >= 0
    # Only predictions on landmark queries can be correct: look up just those.
    correct = np.zeros(len(landmark_query), dtype=bool)
    correct[is_landmark_query] = _matches_truth(
        landmark_query[is_landmark_query], landmark[is_landmark_query], label_query,
        label_landmark,
    )  # fmt: skip
    return correct


def _gap_scores(correct, is_landmark_query, ranking, n_labels, n_ignored: int) -> GapScores:
    """GapScores from the matched predictions (in id order) and their `ranking`."""
    num_positives = int(np.count_nonzero(n_labels))
    n_correct = int(np.count_nonzero(correct))
    if num_positives == 0:
        log.warning("no landmark query in the truth: GAP and accuracy are undefined (nan)")
    ranking_landmarks_only = ranking[is_landmark_query[ranking]]
    return GapScores(
        gap=_gap_of_ranking(correct[ranking], num_positives),
        gap_landmarks_only=_gap_of_ranking(correct[ranking_landmarks_only], num_positives),
        accuracy=n_correct / num_positives if num_positives else math.nan,
        n_queries=len(n_labels),
        n_landmark_queries=num_positives,
        n_predictions=len(correct),
        n_correct=n_correct,
        n_ignored=n_ignored,
    )


def _ranking(score: np.ndarray) -> np.ndarray:
    """Permutation of predictions listed in id order into GAP rank order.

    Score descending, then query id ascending, i.e. position here: a stable sort by score.
    (Landmark ids never decide a tie: each query has one prediction.)
    """
    bits = (-score + 0.0).view(np.uint64)  # + 0.0 turns -0.0 into 0.0: they tie, as in Python
    # IEEE floats as unsigned integers in the same order: negatives reversed, below positives.
    negative = bits >= np.uint64(1 << 63)
    ascending = np.where(negative, ~bits, bits | np.uint64(1 << 63))
    return _stable_argsort_u64(ascending)


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


def _stable_argsort_u64(keys: np.ndarray) -> np.ndarray:
    """`np.argsort(keys, kind="stable")` for uint64 keys, several times faster.

    numpy sorts plain numbers much faster than it argsorts them (and its stable argsort of
    64-bit numbers is slower still), so each key's high bits and its position are packed into
    one uint64 and those are sorted; the positions come back out of the low bits. Keys that
    differ only in the dropped low bits (rare, unless they are very close) are then put in
    order by a stable argsort of just their group.
    """
    n = len(keys)
    if n < 2:
        return np.arange(n, dtype=np.intp)
    position_bits = (n - 1).bit_length()
    lowest = keys.min()
    dropped = max(int(keys.max() - lowest).bit_length() + position_bits - 64, 0)
    packed = (keys - lowest) >> np.uint64(dropped)
    packed <<= np.uint64(position_bits)
    packed |= np.arange(n, dtype=np.uint64)
    packed.sort()
    order = (packed & np.uint64((1 << position_bits) - 1)).astype(np.intp)
    if dropped:
        high = packed >> np.uint64(position_bits)
        new_group = np.ones(n, dtype=bool)
        new_group[1:] = high[1:] != high[:-1]
        # Neighbours whose high bits tie but whose keys differ: their group needs the full keys.
        tied = np.flatnonzero(~new_group[1:])
        if len(tied) < n // 8:  # e.g. unique ids: compare just the tied neighbours
            misplaced = tied[keys[order[tied]] != keys[order[tied + 1]]]
        else:  # e.g. scores with many ties: one pass over all keys in order is cheaper
            sorted_keys = keys[order]
            misplaced = np.flatnonzero(~new_group[1:] & (sorted_keys[1:] != sorted_keys[:-1]))
        if len(misplaced):
            group = np.cumsum(new_group) - 1
            to_fix = np.zeros(group[-1] + 1, dtype=bool)
            to_fix[group[misplaced]] = True
            slots = np.flatnonzero(to_fix[group])
            rows = order[slots]  # in position order within each group, so stable below
            order[slots] = rows[np.argsort(keys[rows], kind="stable")]
    return order


def _matches_truth(query, landmark, label_query, label_landmark) -> np.ndarray:
    """Whether (query row, predicted landmark) is one of the truth's (query row, landmark) pairs."""
    if len(label_landmark) == 0:
        return np.zeros(len(query), dtype=bool)
    # Number landmarks 0..L-1 so that a pair packs into one int64: row * L + landmark number.
    vocabulary = _unique(label_landmark)
    n_vocab = len(vocabulary)
    code = np.minimum(np.searchsorted(vocabulary, landmark), n_vocab - 1)
    in_vocabulary = vocabulary[code] == landmark
    truth_pairs = _unique(label_query * n_vocab + np.searchsorted(vocabulary, label_landmark))
    pred_pairs = query * n_vocab + code
    found = np.minimum(np.searchsorted(truth_pairs, pred_pairs), len(truth_pairs) - 1)
    return in_vocabulary & (truth_pairs[found] == pred_pairs)


def _unique(values: np.ndarray) -> np.ndarray:
    """np.unique(values), by sorting: ~10x faster than numpy 2.4's hash-based unique here."""
    values = np.sort(values)
    first = np.ones(len(values), dtype=bool)
    first[1:] = values[1:] != values[:-1]
    return values[first]


# Query ids travel as a list or object array of str, or, for a pandas column backed by Arrow
# (pandas' default `str` dtype, e.g. read from Parquet), as the Arrow array itself: its bytes
# can be turned into keys without creating a million Python strings.
Ids = Sequence[str] | np.ndarray | pa.Array


def _truth_arrays(truth):
    """(ids, labels per query, query row of each label, each label) from a dict or DataFrame."""
    if isinstance(truth, Mapping):
        ids = list(truth)
        labels = list(truth.values())
    elif isinstance(truth, pd.DataFrame):
        _require_columns(truth, ("id", "landmarks"), "truth")
        ids = _id_column(truth["id"])
        labels = truth["landmarks"].tolist()
    else:
        raise TypeError(f"truth must be a dict or a DataFrame, not {type(truth).__name__}")
    try:
        n_labels = np.fromiter(map(len, labels), dtype=np.int64, count=len(labels))
    except TypeError:  # None / NaN for an empty truth (e.g. from Parquet); slower path
        labels = [_label_list(v) for v in labels]
        n_labels = np.fromiter(map(len, labels), dtype=np.int64, count=len(labels))
    # Few queries are landmark queries (~2% in GLDv2): flatten only their label lists.
    landmark_rows = np.flatnonzero(n_labels)
    flat = np.array(list(itertools.chain.from_iterable([labels[row] for row in landmark_rows.tolist()])))
    if flat.size and flat.dtype.kind not in "iu":
        raise TypeError(f"truth landmark ids must be integers, found {flat.dtype} values")
    label_query = np.repeat(landmark_rows, n_labels[landmark_rows])
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
    if not has_prediction.all():
        pred = pred[has_prediction]
    ids = _id_column(pred["id"])
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
    nan_rows = np.flatnonzero(np.isnan(score))
    if len(nan_rows):
        raise ValueError(f"predictions: score is NaN for query id {_id_at(ids, nan_rows[0])!r}")
    return ids, landmark, score


def _id_column(column: pd.Series) -> Ids:
    """The ids of a DataFrame column: its Arrow string array when it has one, else objects."""
    dtype = column.dtype
    if isinstance(dtype, pd.ArrowDtype):
        arrow_backed = dtype.pyarrow_dtype in (pa.string(), pa.large_string())
    else:
        arrow_backed = isinstance(dtype, pd.StringDtype) and dtype.storage == "pyarrow"
    if arrow_backed:
        array = pa.array(column.array)  # pandas hands over its Arrow data, no copy
        return array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array
    return column.to_numpy(dtype=object)


def _id_at(ids: Ids, row) -> object:
    """The id in `row`, as a Python object (for error messages)."""
    value = ids[int(row)]
    return value.as_py() if isinstance(value, pa.Scalar) else value


def _sortable_ids(truth_ids: Ids, pred_ids: Ids) -> tuple[np.ndarray, np.ndarray]:
    """Both id lists as keys that compare and sort exactly like the ids as Python `str`.

    GLDv2 ids (16 lowercase hex digits) become uint64 numbers; any other ids become numpy
    strings. Both lists get the same kind of key, so that they compare with each other.
    """
    truth_hex = _hex_keys(truth_ids)
    pred_hex = _hex_keys(pred_ids) if truth_hex is not None else None
    if truth_hex is not None and pred_hex is not None:
        (truth_width, truth_keys), (pred_width, pred_keys) = truth_hex, pred_hex
        # Only ids of one length compare like their numbers ("0a" != "a"); 0: empty list.
        if truth_width == pred_width or 0 in (truth_width, pred_width):
            return truth_keys, pred_keys
    truth_ids, pred_ids = _object_ids(truth_ids), _object_ids(pred_ids)
    truth_keys = _ascii_keys(truth_ids, "truth")
    pred_keys = _ascii_keys(pred_ids, "predictions")
    if truth_keys is None or pred_keys is None:
        return truth_ids.astype("U"), pred_ids.astype("U")
    return truth_keys, pred_keys


def _hex_keys(ids: Ids) -> tuple[int, np.ndarray] | None:
    """(id length, uint64 keys) when all ids are lowercase hex of one even length <= 16, else None.

    For ids of one length, lowercase hex digits in numeric order are in string order too, so
    the numbers sort and match exactly like the ids; and a uint64 sorts several times faster
    than a 16-byte string. C code parses the whole list at once: one join, `bytes.fromhex`.
    None means "use the general path", which also reports non-string ids. An empty list gives
    length 0.
    """
    n = len(ids)
    if n == 0:
        return 0, np.zeros(0, dtype=np.uint64)
    if isinstance(ids, pa.Array):
        if ids.null_count:
            return None
        offset_type = np.int64 if pa.types.is_large_string(ids.type) else np.int32
        offsets = np.frombuffer(ids.buffers()[1], dtype=offset_type)[ids.offset :][: n + 1]
        width = int(offsets[1] - offsets[0])
        if not _is_hex_width(width) or not (np.diff(offsets) == width).all():
            return None
        raw = ids.buffers()[2].slice(int(offsets[0]), n * width).to_pybytes()
        if not raw.isascii():
            return None
        text = raw.decode("ascii")
    else:
        width = len(ids[0]) if isinstance(ids[0], str) else 0
        if not _is_hex_width(width):
            return None
        try:
            text = " ".join(ids.tolist() if isinstance(ids, np.ndarray) else ids)
        except TypeError:  # not all strings
            return None
        # A space must end every `width` characters; with the count of digits checked below,
        # these are then all the spaces, so every id has exactly `width` characters.
        if len(text) != n * (width + 1) - 1 or text[width :: width + 1] != " " * (n - 1):
            return None
    # Lowercase only: "A" and "a" would both read as 10 (ASCII "A" is in no GLDv2 id).
    if not text.isascii() or any(letter in text for letter in "ABCDEF"):
        return None
    try:
        digits = bytes.fromhex(text)  # skips whitespace between digit pairs: the separators
    except ValueError:  # a character that is not a hex digit, or an odd run of digits
        return None
    if len(digits) != n * width // 2:  # fromhex also skipped whitespace within ids
        return None
    if width == 16:
        return width, np.frombuffer(digits, dtype=">u8").astype(np.uint64)
    padded = np.zeros((n, 8), dtype=np.uint8)  # leading zero bytes: same order, same length
    padded[:, 8 - width // 2 :] = np.frombuffer(digits, dtype=np.uint8).reshape(n, width // 2)
    return width, padded.view(">u8").ravel().astype(np.uint64)


def _is_hex_width(width: int) -> bool:
    return 0 < width <= 16 and width % 2 == 0  # 16 hex digits fill a uint64; pairs for fromhex


def _object_ids(ids: Ids) -> np.ndarray:
    if isinstance(ids, pa.Array):
        return ids.to_numpy(zero_copy_only=False)  # nulls become None, reported as non-strings
    return ids if isinstance(ids, np.ndarray) else np.array(ids, dtype=object)


def _ascii_keys(ids: np.ndarray, what: str) -> np.ndarray | None:
    """`ids` as a fixed-width bytes array, or None when some id is not ASCII.

    ASCII bytes compare like code points and sort several times faster than numpy's UCS-4 `U`
    strings, which are the fallback for non-ASCII ids. numpy ignores trailing NUL characters,
    so ids containing NUL are refused, as in the CSV readers.
    """
    try:
        text = "".join(ids.tolist())  # also the check that every id is a string
    except TypeError:
        bad = next(x for x in ids if not isinstance(x, str))
        raise TypeError(f'{what}: query ids must be strings ("0123" != "123"), found {bad!r}') from None
    if "\x00" in text:
        bad = next(x for x in ids if "\x00" in x)
        raise ValueError(f"{what}: query id {bad!r} contains a NUL character")
    if not text.isascii():
        return None
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    if len(ids) and lengths.min() == lengths.max() > 0:
        # Equal-length ids: one buffer, no per-id conversion.
        return np.frombuffer(text.encode("ascii"), dtype=f"S{lengths[0]}")
    return ids.astype("S")


def _argsort_ids(keys: np.ndarray) -> np.ndarray:
    """argsort of id keys; for bytes, first by their first 8 bytes as one integer.

    numpy compares fixed-width strings byte by byte; a uint64 sort of the 8-byte prefix (big
    endian, so it orders like the bytes) is several times faster, and only ids sharing their
    prefix still need the string sort. uint64 keys (hex ids) sort directly, stably.
    """
    if keys.dtype.kind == "u":
        return _stable_argsort_u64(keys)
    if keys.dtype.kind != "S" or len(keys) == 0:
        return np.argsort(keys)
    n, width = len(keys), keys.dtype.itemsize
    prefix = np.zeros((n, 8), dtype=np.uint8)  # NUL padding sorts short ids first, as str does
    prefix[:, : min(width, 8)] = keys.view(np.uint8).reshape(n, width)[:, :8]
    prefix = prefix.view(">u8").ravel().astype(np.uint64)
    order = _stable_argsort_u64(prefix)
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


def _sorted_ids(keys: np.ndarray) -> np.ndarray:
    """The keys sorted: by value for numbers (faster than an argsort), else via `_argsort_ids`."""
    return np.sort(keys) if keys.dtype.kind == "u" else keys[_argsort_ids(keys)]


def _check_unique(sorted_keys: np.ndarray, keys: np.ndarray, ids: Ids, what: str) -> None:
    """Raise on the first repeated id; `sorted_keys` is `keys` (the keys of `ids`) sorted."""
    same = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1])
    if len(same):
        row = np.flatnonzero(keys == sorted_keys[same[0]])[0]
        raise ValueError(f"{what}: duplicate query id {_id_at(ids, row)!r} (one row per query)")


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
            raise StageError(f"{path}: row {row_number}: Usage {usage!r} is not one of {', '.join(USAGES)}")
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
            raise StageError(f"{path}: row {row_number}: expected '<landmark_id> <score>', found {field.strip()!r}")
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
                        f"{path}: row {row_number}: duplicate id {query_id!r} (first at row {first_seen[query_id]})"
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
