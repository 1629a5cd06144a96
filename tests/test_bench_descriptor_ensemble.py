"""bench/descriptor_ensemble.py: the untrained descriptor beside the fine-tuned one, as bench/real_photos.md reports it."""

import numpy as np
import pandas as pd
import pytest
from conftest import load_bench_script

from landmarks.common import write_table
from landmarks.embed import write_embeddings

ensemble = load_bench_script("descriptor_ensemble")

SPLITS = ("train", "val", "test")
LANDMARKS = {"train": [1, 1, 2, 2], "val": [1, 2], "test": [1, 2]}


def write_experiment(results, experiment, vectors):
    embed = results / "experiments" / experiment / "embed"
    embed.mkdir(parents=True)
    for split in SPLITS:
        ids = [f"{split}{i}" for i in range(len(LANDMARKS[split]))]
        table = pd.DataFrame({"id": ids, "landmark_id": pd.array(LANDMARKS[split], dtype="Int64")})
        write_embeddings(np.array(vectors[split], dtype=np.float32), table, embed / f"{split}.npy", dtype="float32")


def write_selection(results):
    ids = [f"{split}{i}" for split in SPLITS for i in range(len(LANDMARKS[split]))]
    landmarks = sum((LANDMARKS[split] for split in SPLITS), [])
    split = [split for split in SPLITS for _ in LANDMARKS[split]]
    table = pd.DataFrame({"id": ids, "landmark_id": pd.array(landmarks, dtype="Int64"), "split": split})
    write_table(table, results / "select" / "selection.parquet")


def test_concatenation_weighs_the_untrained_descriptor_and_weight_zero_is_the_fine_tuned_one():
    tuned = np.array([[0.6, 0.8]])  # both L2-normalised, as experiment_embeddings gives them
    untrained = np.array([[0.0, 1.0]])
    np.testing.assert_allclose(ensemble.concatenate(tuned, untrained, 0.0), [[0.6, 0.8, 0.0, 0.0]])
    both = ensemble.concatenate(tuned, untrained, 1.0)
    np.testing.assert_allclose(both, [[0.6, 0.8, 0.0, 1.0]] / np.sqrt(2))


def test_the_untrained_descriptor_beside_the_fine_tuned_one_can_change_the_answer(tmp_path):
    results = tmp_path / "cpu384_web_full" / "full-seed0" / "results"  # the benchmark's layout
    # The fine-tuned embedding puts test0 (landmark 1) nearest a landmark 2 photo by a hair; the untrained
    # descriptor sees it clearly as landmark 1. test1 is right in both.
    write_experiment(
        results,
        "finetuned",
        {
            "train": [[1, 0, 0], [1, 0.1, 0], [0, 1, 0], [0.1, 1, 0]],
            "val": [[1, 0, 0.1], [0, 1, 0.1]],
            "test": [[0.69, 0.72, 0], [0, 1, 0.05]],
        },
    )
    write_experiment(
        results,
        "pretrained",
        {
            "train": [[1, 0], [1, 0.2], [0, 1], [0.2, 1]],
            "val": [[1, 0.1], [0.1, 1]],
            "test": [[1, 0.05], [0.05, 1]],
        },
    )
    write_selection(results)
    gaps = ensemble.run_gaps(results, "finetuned")
    assert gaps["fine-tuned"] == 0.5  # test0 wrong, test1 right
    assert gaps["untrained, raw"] == 1.0
    assert gaps["fine-tuned + 1.0 x untrained, raw"] == 1.0
    assert {"untrained, whitened", "fine-tuned + 0.5 x untrained, whitened"} <= set(gaps)
    table = ensemble.runs_table([results], "finetuned")
    assert table["set"].tolist() == ["cpu384_web_full"] and table["fine-tuned"].tolist() == [0.5]
    assert "cpu384_web_full, full (1 runs)" in ensemble.summary(table)
    assert ensemble.runs_table([results], "other").empty  # a run without the experiment is left out


def test_runs_whose_experiments_embedded_different_queries_are_refused(tmp_path):
    vectors = {"train": np.eye(4)[:, :3], "val": np.eye(3)[:2], "test": np.eye(3)[:2]}
    write_experiment(tmp_path, "finetuned", vectors)
    write_experiment(tmp_path, "pretrained", vectors)
    (tmp_path / "experiments" / "pretrained" / "embed" / "test.npy").unlink()
    other = pd.DataFrame({"id": ["x0", "x1"], "landmark_id": pd.array([1, 2], dtype="Int64")})
    embed = tmp_path / "experiments" / "pretrained" / "embed"
    write_embeddings(np.eye(3)[:2].astype(np.float32), other, embed / "test.npy", dtype="float32")
    write_selection(tmp_path)
    with pytest.raises(SystemExit, match="different test photos"):
        ensemble.run_gaps(tmp_path, "finetuned")


def test_no_finished_run_is_said_and_fails(tmp_path, capsys):
    assert ensemble.main([str(tmp_path)]) == 1
    assert "no finished runs with both finetuned and pretrained" in capsys.readouterr().err
