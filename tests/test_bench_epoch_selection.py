"""bench/epoch_selection.py: every epoch's test score beside the val scores that could choose it."""

import json

import numpy as np
import pandas as pd
import pytest
from test_bench_method import load

from landmarks import train, validation
from landmarks.config import section_settings

epoch_selection = load("epoch_selection")


def test_mean_average_precision_counts_every_photo_of_the_landmark():
    db = np.eye(3, dtype=np.float32)
    db_labels = np.array([1, 1, 2])
    # the query ranks photo 0 (landmark 1), photo 2 (landmark 2), photo 1 (landmark 1): AP = (1/1 + 2/3) / 2
    query = np.array([[0.9, 0.1, 0.4]], np.float32)
    assert epoch_selection.mean_average_precision(db, db_labels, query, np.array([1])) == pytest.approx(5 / 6)
    assert epoch_selection.mean_average_precision(db, db_labels, query, np.array([2])) == pytest.approx(1 / 2)


def test_rules_pick_as_train_does_later_epoch_on_a_tie():
    table = pd.DataFrame(
        {
            "epoch": [0, 1, 2],
            "val_gap": [0.9, 0.9, 0.8],
            "val_map": [0.5, 0.4, 0.7],
            "val_top1_cosine": [0.1, 0.2, 0.3],
            "test_gap": [0.6, 0.7, 0.5],
        }
    )
    picks = {rule: pick(table) for rule, pick in epoch_selection.RULES.items()}
    assert picks["val GAP (train's rule)"] == 1
    assert picks["val mAP"] == 2
    assert picks["val GAP, then val mAP on a tie"] == 0
    assert picks["oracle (best test GAP)"] == 1


def test_each_epoch_is_scored_on_val_as_train_scores_it_and_on_test(shards, tmp_path):
    results = tmp_path / "results"
    (results / "experiments" / "finetuned" / "train").mkdir(parents=True)
    (results / "shards").symlink_to(shards)
    settings = section_settings(
        "train",
        {"epochs": 1, "image_size": 64, "batch_size": 8, "workers": 0, "backbone": "simple_cnn", "pretrained": "none"},
        "test",
    )
    (results / "experiments" / "finetuned" / "train" / "train.json").write_text(json.dumps({"settings": settings}))
    table = epoch_selection.epochs_of_run(results, "finetuned", tmp_path / "again", threads=1)
    assert train.evaluate_val_gap is epoch_selection.EVALUATE_VAL_GAP  # put back
    assert validation.embed_for_training is epoch_selection.EMBED_FOR_TRAINING
    metrics = pd.read_csv(tmp_path / "again" / "metrics.csv")
    assert table["epoch"].tolist() == [0, 1]
    assert table["val_gap"].to_numpy() == pytest.approx(metrics["val_gap"].to_numpy())
    assert table[["val_map", "test_gap", "test_accuracy"]].notna().all().all()
    assert ((table["test_gap"] >= 0) & (table["test_gap"] <= 1)).all()
