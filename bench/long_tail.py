"""Head and tail of the long-tail regime, offline on finished runs: how often the answer is right for
the queries of landmarks with few database photos and of those with many.

`bench/real_photos.py --regimes longtail` keeps 2 to all of each landmark's photos (its train photos
are the kNN database) and queries the rest. Its tables give one GAP over every query; this splits the
landmark queries by how many train photos their landmark has (SIZE_BINS) and prints, per run and
experiment, the top-1 accuracy in each bin (the answer's landmark is the query's, whatever its
confidence) and the number of queries, then the mean over runs. A recipe that helps the head and hurts
the tail, or the reverse, shows here when one GAP would hide it.

    .venv/bin/python bench/long_tail.py bench/out/longtail_all31/longtail-seed*/results \\
        --experiments pretrained finetuned balanced_batches
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

from neighbour_smoothing import finished_runs  # noqa: E402

from landmarks.common import read_table  # noqa: E402

# (lowest, highest) train photos of a landmark, and the bin's name in the tables
SIZE_BINS = [(1, 3, "1-3"), (4, 8, "4-8"), (9, 10_000, "9+")]


def size_bin(train_photos: int) -> str:
    return next(name for low, high, name in SIZE_BINS if low <= train_photos <= high)


def accuracy_by_size(results: Path, experiment: str) -> dict[str, float]:
    """Top-1 accuracy of the landmark queries in each SIZE_BINS bin (`n <bin>`: how many queries)."""
    selection = read_table(results / "select" / "selection.parquet")
    landmarks = selection.dropna(subset=["landmark_id"])
    train_photos = landmarks[landmarks["split"] == "train"].groupby("landmark_id").size()
    queries = landmarks[landmarks["split"] == "test"][["id", "landmark_id"]]
    predictions = read_table(results / "experiments" / experiment / "retrieve" / "predictions.parquet")
    answered = queries.merge(predictions[["id", "landmark_id"]], on="id", how="left", suffixes=("", "_answer"))
    answered["right"] = answered["landmark_id_answer"] == answered["landmark_id"]
    answered["bin"] = answered["landmark_id"].map(train_photos).fillna(0).astype(int).map(size_bin)
    row = {}
    for _, _, name in SIZE_BINS:
        in_bin = answered[answered["bin"] == name]
        row[name] = in_bin["right"].mean() if len(in_bin) else float("nan")
        row[f"n {name}"] = len(in_bin)
    return row


def main(argv=None) -> int:
    table = finished_runs(__doc__, accuracy_by_size, "retrieve/predictions.parquet", argv)
    if table is None:
        return 1
    print(table.to_string(index=False, float_format="%.3f"))
    print("\nmean over runs (top-1 accuracy; n: landmark queries per run)")
    print(table.drop(columns="run").groupby("experiment", sort=False).mean().to_string(float_format="%.3f"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
