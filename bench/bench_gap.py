"""Benchmark: vectorised GAP (`score_predictions`) against the Python loop (`gap_reference`).

One run on the same data: 1,000,000 predictions over ~1,020,000 queries, about 2% of them
landmark queries (as in GLDv2's test set), some with several truth landmarks, GLDv2-style ids
(16 lowercase hex digits), scores rounded to 3 decimals so that many predictions tie.

Both contenders start from the same three kinds of input and get the same treatment: --repeat
timed runs each, alternating loop / vectorised, the best of each reported, and the ratio per kind:

* dict truth: predictions DataFrame (object ids), truth as a dict id -> list of landmarks;
* CSV frames: both DataFrames with object ids, as `read_submission_csv` / `read_solution_csv` give;
* Parquet frames: both DataFrames with pandas' default `str` (Arrow) ids, as the pipeline's
  `score` stage passes them (predictions read from Parquet, truth from the selection table).

`score_predictions` takes these as they are; the loop's time includes turning them into the dicts
it takes (id -> (landmark, score), id -> landmarks), the way a caller would have to.
Then it prints where the vectorised time goes (the phases of `score_predictions`, run one by one
in the same order, each phase's best of --repeat runs) and checks that every result equals the
loop's GAP exactly.
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
    return pred_df, truth


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


def loop_inputs(pred: pd.DataFrame, truth) -> tuple[dict, dict]:
    """The loop's inputs from one kind of input: id -> (landmark, score) and id -> landmarks."""
    pred_dict = dict(zip(pred["id"].tolist(), zip(pred["landmark_id"].tolist(), pred["score"].tolist())))
    if isinstance(truth, pd.DataFrame):
        truth = dict(zip(truth["id"].tolist(), truth["landmarks"].tolist()))
    return pred_dict, truth


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


def best_times(functions: dict, repeat: int) -> tuple[dict[str, tuple[float, float]], dict[str, object]]:
    """Each function's best of `repeat` timed runs, the functions alternating within each repeat:
    (wall s, CPU s of this process) of the run with the least wall time (both from that one run)."""
    best, results = dict.fromkeys(functions, (float("inf"), float("inf"))), {}
    for _ in range(repeat):
        for name, function in functions.items():
            wall, cpu = time.perf_counter(), time.process_time()
            results[name] = function()
            run = (time.perf_counter() - wall, time.process_time() - cpu)
            best[name] = min(best[name], run)
    return best, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="number of predictions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per input kind and contender")
    args = parser.parse_args()

    pred_df, truth = make_data(args.n, args.seed)
    print(
        f"{len(pred_df):,} predictions, {len(truth):,} queries, "
        f"{sum(1 for v in truth.values() if v):,} landmark queries"
    )
    kinds = input_kinds(pred_df, truth)

    results, seconds, loop_seconds, loop_gaps = {}, {}, {}, {}
    for name, (pred, truth_input) in kinds.items():
        best, outcome = best_times(
            {
                "loop": lambda pred=pred, truth_input=truth_input: gap_reference(*loop_inputs(pred, truth_input)),
                "vectorised": lambda pred=pred, truth_input=truth_input: score_predictions(pred, truth_input),
            },
            args.repeat,
        )
        seconds[name], results[name] = best["vectorised"], outcome["vectorised"]
        loop_seconds[name], loop_gaps[name] = best["loop"], outcome["loop"]
    phases = {}
    for name, inputs in kinds.items():
        runs = [timed_phases(*inputs) for _ in range(args.repeat)]
        best = {phase: min(run[1][phase] for run in runs) for phase in runs[0][1]}
        phases[name] = (runs[0][0], best, runs[0][2])

    slow = loop_gaps["dict truth"]
    print(
        f"\nbest of {args.repeat} runs each (by wall time, with that run's CPU time), from the same inputs"
        " (the loop's time includes making its dicts):"
    )
    print(
        f"  {'input':16s} {'loop wall s':>12s} {'CPU s':>7s} {'vectorised wall s':>18s} {'CPU s':>7s}"
        f" {'loop / vectorised: wall':>24s} {'CPU':>6s}"
    )
    for name, (wall, cpu) in seconds.items():
        loop_wall, loop_cpu = loop_seconds[name]
        print(
            f"  {name:16s} {loop_wall:12.3f} {loop_cpu:7.3f} {wall:18.3f} {cpu:7.3f}"
            f" {loop_wall / wall:23.1f}x {loop_cpu / cpu:5.1f}x"
        )
    print(f"loop GAP {slow!r}")

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
    assert all(gap == slow for gap in loop_gaps.values()), loop_gaps
    pred_dict, _ = loop_inputs(pred_df, truth)
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
