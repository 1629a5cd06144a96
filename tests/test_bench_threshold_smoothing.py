"""bench/threshold_smoothing.py: the threshold chosen again from a run's val answers, scored on its test queries."""

import json

import pandas as pd
import pytest
from test_bench_method import load

from landmarks.common import write_table

bench = load("threshold_smoothing")


def _results(folder):
    """val: five right answers (0.60-0.80) and five bank photos (0.30-0.58), for a landmark share of 0.9;
    test: two right answers between the smoothed threshold (about 0.50) and the counted one (0.59), two
    above both, and a non-landmark below both."""
    retrieve = folder / "experiments" / "finetuned" / "retrieve"
    val_landmarks = pd.array([1, 2, 1, 2, 1] + [None] * 5, dtype="Int64")
    calibration = pd.DataFrame(
        {
            "id": [f"v{i}" for i in range(10)],
            "landmark_id": val_landmarks,
            "predicted_landmark_id": pd.array([1, 2, 1, 2, 1, 1, 2, 1, 2, 1], dtype="Int64"),
            "confidence": [0.60, 0.65, 0.70, 0.75, 0.80, 0.30, 0.35, 0.40, 0.45, 0.58],
        }
    )
    write_table(calibration, retrieve / "calibration.parquet")
    (retrieve / "retrieve.json").write_text(json.dumps({"nonlandmark_threshold": {"landmark_share": 0.9}}))
    queries = ["q0", "q1", "q2", "q3", "n0"]
    write_table(
        pd.DataFrame(
            {
                "id": queries,
                "landmark_id": pd.array([1, 2, 1, 2, 1], dtype="Int64"),
                "score": [0.53, 0.56, 0.7, 0.8, 0.3],
            }
        ),
        retrieve / "predictions.parquet",
    )
    selection = pd.DataFrame(
        {"id": queries, "landmark_id": pd.array([1, 2, 1, 2, None], dtype="Int64"), "split": ["test"] * 5}
    )
    write_table(selection, folder / "select" / "selection.parquet")


def test_each_smoothing_chooses_again_on_val_and_is_scored_on_the_test_queries(tmp_path):
    _results(tmp_path)
    row = bench.run_verdicts(tmp_path, "finetuned", smoothings=[0.0, 1.0])
    assert row["smoothing 0"] == pytest.approx(3 / 5)  # 0.53 and 0.56 rejected under 0.59; n0 rejected
    assert row["smoothing 1"] == pytest.approx(5 / 5)  # all four right answers kept, n0 still rejected
    assert row[bench.KEEP_ALL] == pytest.approx(4 / 5)  # n0 kept


def test_the_table_has_a_row_per_run_and_experiment(tmp_path, capsys):
    _results(tmp_path / "fewshot-seed0" / "results")
    assert bench.main([str(tmp_path / "fewshot-seed0" / "results")]) == 0
    out = capsys.readouterr().out
    assert "finetuned fewshot (1 runs)" in out and "smoothing 1 " in out and bench.KEEP_ALL in out


def test_no_finished_run_is_said_and_fails(tmp_path, capsys):
    assert bench.main([str(tmp_path)]) == 1
    assert "no finished runs" in capsys.readouterr().err
