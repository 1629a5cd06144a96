"""bench/long_tail.py: the landmark queries' top-1 accuracy split by how many train photos their landmark has."""

import pandas as pd
import pytest
from test_bench_method import load

from landmarks.common import write_table

bench = load("long_tail")


def _results(folder, answers):
    """Landmark 1 has 2 train photos (the tail), landmark 2 has 5, landmark 3 has 12 (the head); each has
    two test queries, and one non-landmark query (never counted in a bin)."""
    train = (
        [(f"t1_{i}", 1) for i in range(2)] + [(f"t2_{i}", 2) for i in range(5)] + [(f"t3_{i}", 3) for i in range(12)]
    )
    queries = [("q1a", 1), ("q1b", 1), ("q2a", 2), ("q2b", 2), ("q3a", 3), ("q3b", 3), ("n0", None)]
    selection = pd.DataFrame(
        {
            "id": [i for i, _ in train + queries] + ["v1"],
            "landmark_id": pd.array([lm for _, lm in train + queries] + [1], dtype="Int64"),
            "split": ["train"] * len(train) + ["test"] * len(queries) + ["val"],
        }
    )
    write_table(selection, folder / "select" / "selection.parquet")
    predictions = pd.DataFrame(
        {"id": list(answers), "landmark_id": pd.array(list(answers.values()), dtype="Int64"), "score": 0.5}
    )
    write_table(predictions, folder / "experiments" / "finetuned" / "retrieve" / "predictions.parquet")


def test_each_landmark_query_counts_in_the_bin_of_its_landmarks_train_photos(tmp_path):
    # the tail: one right of two; the middle: both wrong (one unanswered); the head: both right
    _results(tmp_path, {"q1a": 1, "q1b": 3, "q2a": 3, "q3a": 3, "q3b": 3, "n0": 2})
    row = bench.accuracy_by_size(tmp_path, "finetuned")
    assert row == pytest.approx({"1-3": 0.5, "n 1-3": 2, "4-8": 0.0, "n 4-8": 2, "9+": 1.0, "n 9+": 2})


def test_the_table_has_a_row_per_run_and_experiment_and_the_mean(tmp_path, capsys):
    for seed in (0, 1):
        _results(tmp_path / f"longtail-seed{seed}" / "results", {"q1a": 1, "q1b": 1, "q2a": 2, "q3a": 3})
    assert bench.main([str(tmp_path / f"longtail-seed{seed}" / "results") for seed in (0, 1)]) == 0
    out = capsys.readouterr().out
    assert "longtail-seed0" in out and "longtail-seed1" in out and "mean over runs" in out
    assert bench.main([str(tmp_path / "nowhere")]) == 1
