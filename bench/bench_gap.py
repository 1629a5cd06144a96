"""Benchmark: vectorised GAP (`score_predictions`) against the Python loop (`gap_reference`).

One run on the same data: 1,000,000 predictions over ~1,020,000 queries, about 2% of them
landmark queries (as in GLDv2's test set), some with several truth landmarks, GLDv2-style ids
(16 lowercase hex digits), scores rounded to 3 decimals so that many predictions tie.

`score_predictions` is timed on three kinds of input, each the best of --repeat runs:

* dict truth: predictions DataFrame (object ids), truth as a dict id -> list of landmarks;
* CSV frames: both DataFrames with object ids, as `read_submission_csv` / `read_solution_csv` give;
* Parquet frames: both DataFrames with pandas' default `str` (Arrow) ids, as the pipeline's
  `score` stage passes them (predictions read from Parquet, truth from the selection table).

Then it prints where the time goes (the phases of `score_predictions`, run one by one in the
same order, each phase's best of --repeat runs), times the loop once, and checks that every
result equals the loop's GAP exactly.
Not part of the test run:

    .venv/bin/python bench/bench_gap.py [--n 1000000] [--seed 0] [--repeat 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from gap_reference import accuracy_reference, gap_reference  # the loops the tests check the GAP against

from landmarks import metrics
from landmarks.metrics import score_predictions


def make_data(n_predictions: int, seed: int):
    rng = np.random.default_rng(seed)
    n_queries = int(n_predictions * 1.02)  # ~2% of queries get no prediction
    ids = [f"{x:016x}" for x in rng.integers(0, 2**63, n_queries)]  # GLDv2-style hex ids
    is_landmark = rng.random(n_queries) < 0.02
    n_labels = np.where(is_landmark, rng.choice([1, 1, 1, 2, 3], n_queries), 0)
    labels = rng.integers(0, 200_000, n_labels.sum())
    truth, start = {}, 0
    for query_id, count in zip(ids, n_labels.tolist()):
        truth[query_id] = labels[start : start + count].tolist()
        start += count

    # Predict for a random subset, in random order; right about half the time on landmarks.
    chosen = rng.permutation(n_queries)[:n_predictions]
    predicted = rng.integers(0, 200_000, n_predictions)
    for k, q in enumerate(chosen.tolist()):
        if truth[ids[q]] and rng.random() < 0.5:
            predicted[k] = truth[ids[q]][0]
    scores = np.round(rng.random(n_predictions), 3)  # ~1000 distinct values: many ties
    pred_df = pd.DataFrame(
        {
            # Fresh string objects, allocated in row order as when read from a CSV file.
            "id": pd.Series(np.array(ids)[chosen].tolist(), dtype=object),
            "landmark_id": predicted,
            "score": scores,
        }
    )
    pred_dict = dict(zip(pred_df["id"], zip(predicted.tolist(), scores.tolist())))
    return pred_df, pred_dict, truth


def input_kinds(pred_df: pd.DataFrame, truth: dict) -> dict[str, tuple]:
    truth_df = pd.DataFrame(
        {
            "id": pd.Series(list(truth), dtype=object),
            "landmarks": pd.Series(list(truth.values()), dtype=object),
        }
    )
    return {
        "dict truth": (pred_df, truth),
        "CSV frames": (pred_df, truth_df),
        "Parquet frames": (
            pred_df.astype({"id": "str"}),
            truth_df.astype({"id": "str"}),
        ),
    }


def timed_phases(pred, truth) -> tuple[metrics.GapScores, dict[str, float], str]:
    """`score_predictions` phase by phase, as it runs them: (scores, seconds, id key dtype)."""
    times: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        times[name] = now - clock
        clock = now

    truth_ids, n_labels, label_query, label_landmark = metrics._truth_arrays(truth)
    lap("truth arrays (ids, label lists)")
    pred_ids, landmark, score = metrics._prediction_arrays(pred)
    lap("prediction arrays")
    truth_keys, pred_keys = metrics._sortable_ids(truth_ids, pred_ids)
    lap("id keys")
    pred_row, landmark_query = metrics._join_on_ids(
        truth_keys, pred_keys, truth_ids, pred_ids, landmark_rows=np.flatnonzero(n_labels)
    )
    lap("join: sort, match ids")
    correct = metrics._correct_predictions(landmark_query, landmark[pred_row], label_query, label_landmark)
    lap("truth lookup (landmark queries)")
    ranking = metrics._ranking(score[pred_row])
    lap("ranking: stable sort by score")
    result = metrics._gap_scores(
        correct, landmark_query >= 0, ranking, n_labels, n_ignored=len(pred_ids) - len(pred_row)
    )
    lap("GAP, accuracy")
    return result, times, str(truth_keys.dtype)


def best_time(function, repeat: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="number of predictions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per input kind")
    args = parser.parse_args()

    pred_df, pred_dict, truth = make_data(args.n, args.seed)
    print(
        f"{len(pred_df):,} predictions, {len(truth):,} queries, "
        f"{sum(1 for v in truth.values() if v):,} landmark queries"
    )
    kinds = input_kinds(pred_df, truth)

    results, seconds = {}, {}
    for name, (pred, truth_input) in kinds.items():
        seconds[name], results[name] = best_time(
            lambda pred=pred, truth_input=truth_input: score_predictions(pred, truth_input), args.repeat
        )
    phases = {}
    for name, inputs in kinds.items():
        runs = [timed_phases(*inputs) for _ in range(args.repeat)]
        best = {phase: min(run[1][phase] for run in runs) for phase in runs[0][1]}
        phases[name] = (runs[0][0], best, runs[0][2])

    start = time.perf_counter()
    slow = gap_reference(pred_dict, truth)
    t_slow = time.perf_counter() - start

    print(f"\nscore_predictions, best of {args.repeat}:")
    for name, t_fast in seconds.items():
        print(f"  {name:16s} {t_fast:.3f} s   loop / vectorised {t_slow / t_fast:5.1f}x")
    print(f"loop gap_reference: {t_slow:.3f} s  (GAP {slow!r})")

    print(f"\nphases, each the best of {args.repeat} runs (s):")
    names = list(kinds)
    print(f"  {'':40s}" + "".join(f"{name:>16s}" for name in names))
    for phase in phases[names[0]][1]:
        row = "".join(f"{phases[name][1][phase]:16.3f}" for name in names)
        print(f"  {phase:40s}{row}")
    row = "".join(f"{sum(phases[name][1].values()):16.3f}" for name in names)
    print(f"  {'sum':40s}{row}")
    print(f"  {'(id keys as)':40s}" + "".join(f"{phases[name][2]:>16s}" for name in names))

    # The other two metrics against their loops too (cheaper: fewer predictions or no sort).
    slow_landmarks_only = gap_reference(pred_dict, truth, ignore_non_landmarks=True)
    slow_accuracy = accuracy_reference(pred_dict, truth)
    for name in names:
        for scores in (results[name], phases[name][0]):
            assert scores.gap == slow, (name, scores.gap, slow)
            assert scores.gap_landmarks_only == slow_landmarks_only, (name, scores)
            assert scores.accuracy == slow_accuracy, (name, scores)
            assert scores == results[names[0]], (name, scores, results[names[0]])
    print(
        f"\nall input kinds equal the loops exactly: GAP {slow!r}, "
        f"GAP landmarks only {slow_landmarks_only!r}, accuracy {slow_accuracy!r}"
    )


if __name__ == "__main__":
    main()
