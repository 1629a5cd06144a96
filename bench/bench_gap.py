"""Benchmark: vectorised GAP (`score_predictions`) against the Python loop (`gap_reference`).

One run on the same data: 1,000,000 predictions over ~1,020,000 queries, about 2% of them
landmark queries (as in GLDv2's test set), some with several truth landmarks, scores rounded
to 3 decimals so that many predictions tie. Prints both times and the ratio, and checks that
the two GAP values are exactly equal. Not part of the test run:

    .venv/bin/python bench/bench_gap.py [--n 1000000] [--seed 0]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd

from landmarks.metrics import gap_reference, score_predictions


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="number of predictions")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    pred_df, pred_dict, truth = make_data(args.n, args.seed)
    print(f"{len(pred_df):,} predictions, {len(truth):,} queries, "
          f"{sum(1 for v in truth.values() if v):,} landmark queries")

    start = time.perf_counter()
    fast = score_predictions(pred_df, truth)
    t_fast = time.perf_counter() - start

    start = time.perf_counter()
    slow = gap_reference(pred_dict, truth)
    t_slow = time.perf_counter() - start

    print(f"vectorised score_predictions: {t_fast:.3f} s  (GAP {fast.gap!r}, plus "
          f"GAP landmarks-only and accuracy)")
    print(f"loop gap_reference:           {t_slow:.3f} s  (GAP {slow!r})")
    print(f"ratio loop / vectorised:      {t_slow / t_fast:.1f}x")
    assert fast.gap == slow, (fast.gap, slow)
    print("values equal: yes")


if __name__ == "__main__":
    main()
