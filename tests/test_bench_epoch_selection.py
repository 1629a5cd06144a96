"""bench/epoch_selection.py: every epoch's test score beside the val scores that could choose it."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_bench_method import load

from landmarks import train, validation
from landmarks.config import section_settings
from landmarks.loader import ShardIndex

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
            "val_right": [9, 9, 8],
            "val_map": [0.5, 0.4, 0.7],
            "val_top1_cosine": [0.1, 0.2, 0.3],
            "test_gap": [0.6, 0.7, 0.5],
        }
    )
    picks = {rule: pick(table) for rule, pick in epoch_selection.RULES.items()}
    assert picks["val GAP (train's rule until the margin)"] == 1
    assert picks["val GAP, untrained only when 2+ val photos ahead (train's rule)"] == 1
    assert picks["val mAP"] == 2
    assert picks["val GAP, then val mAP on a tie"] == 0
    assert picks["oracle (best test GAP)"] == 1
    assert picks["val GAP, the trained epochs only"] == 1


@pytest.mark.parametrize(("untrained_right", "picked"), [(9, 2), (10, 0)])
def test_untrained_model_wins_only_when_two_val_photos_ahead(untrained_right, picked):
    table = pd.DataFrame(
        {
            "epoch": [0, 1, 2],
            "val_gap": [untrained_right / 10, 0.7, 0.8],
            "val_right": [untrained_right, 7, 8],
        }
    )
    assert epoch_selection.trained_unless_clearly_behind(table) == picked


def finished_run(shards, tmp_path, epochs: int, drop=()) -> Path:
    """A results folder as a finished run leaves it for this script: the shards and the finetuned
    experiment's train.json (its settings without the keys in `drop`)."""
    results = tmp_path / "results"
    (results / "experiments" / "finetuned" / "train").mkdir(parents=True)
    (results / "shards").symlink_to(shards)
    settings = section_settings(
        "train",
        {
            "epochs": epochs,
            "image_size": 64,
            "batch_size": 8,
            "workers": 0,
            "backbone": "simple_cnn",
            "pretrained": "none",
        },
        "test",
    )
    for key in drop:
        del settings[key]
    (results / "experiments" / "finetuned" / "train" / "train.json").write_text(json.dumps({"settings": settings}))
    return results


def test_each_epoch_is_scored_on_val_as_train_scores_it_and_on_test(shards, tmp_path):
    # a run trained before untrained_val_margin existed: today's default stands in
    results = finished_run(shards, tmp_path, epochs=1, drop=["untrained_val_margin"])
    table = epoch_selection.epochs_of_run(results, "finetuned", tmp_path / "again", threads=1)
    assert train.evaluate_val_gap is epoch_selection.EVALUATE_VAL_GAP  # put back
    assert validation.embed_for_training is epoch_selection.EMBED_FOR_TRAINING
    metrics = pd.read_csv(tmp_path / "again" / "metrics.csv")
    assert table["epoch"].tolist() == [0, 1]
    assert table["val_gap"].to_numpy() == pytest.approx(metrics["val_gap"].to_numpy())
    assert table[["val_map", "test_gap", "test_accuracy"]].notna().all().all()
    assert ((table["test_gap"] >= 0) & (table["test_gap"] <= 1)).all()


def test_with_sources_each_epoch_is_also_scored_over_the_folders_query_photos(shards, tmp_path):
    results = finished_run(shards, tmp_path, epochs=1)
    test_ids = ShardIndex.from_dirs(epoch_selection.split_dirs(results, "test")).table
    sources = pd.DataFrame(
        {"id": test_ids["id"], "source": np.where(test_ids["landmark_id"].isna(), "nonlandmark", "query")}
    )
    # A held-out photo that is not among these queries: the query photos are then every test query
    held_out = pd.DataFrame({"id": ["elsewhere"], "source": ["heldout"]})
    pd.concat([sources, held_out]).to_csv(tmp_path / "sources.csv", index=False)
    table = epoch_selection.epochs_of_run(results, "finetuned", tmp_path / "again", threads=1)
    assert table["test_gap_query"].to_numpy() == pytest.approx(table["test_gap"].to_numpy())
    # Half the landmark queries marked held out: they leave the query reading
    landmark_ids = sources.loc[sources["source"] == "query", "id"]
    sources.loc[sources["id"].isin(landmark_ids.iloc[::2]), "source"] = "heldout"
    sources.to_csv(tmp_path / "sources.csv", index=False)
    assert epoch_selection.query_photo_ids(results) == set(sources.loc[sources["source"] != "heldout", "id"])


def test_soups_average_the_last_epochs_and_training_goes_on_unchanged(shards, tmp_path):
    results = finished_run(shards, tmp_path, epochs=2)
    soups: list[dict] = []
    table = epoch_selection.epochs_of_run(results, "finetuned", tmp_path / "again", threads=1, soups=soups)
    soups = pd.DataFrame(soups)
    assert soups[["first_epoch", "last_epoch"]].values.tolist() == [[1, 2], [2, 2]]
    # the average of the last epoch alone is that epoch's model: the same scores
    last = table.set_index("epoch").loc[2]
    assert soups.iloc[1][["val_gap", "test_gap"]].to_numpy(float) == pytest.approx(
        last[["val_gap", "test_gap"]].to_numpy(float)
    )
    # scoring the soups put the trained weights back: train's own record of the last epoch is unchanged
    metrics = pd.read_csv(tmp_path / "again" / "metrics.csv")
    assert table["val_gap"].to_numpy() == pytest.approx(metrics["val_gap"].to_numpy())
    picks = epoch_selection.soup_rules(soups)
    assert set(picks) == {"average of epochs 1-2", "average of epochs 2-2", "the average val GAP picks"}


def test_average_weights_means_floats_and_keeps_counters():
    first = {"w": torch.tensor([1.0, 3.0]), "n": torch.tensor(1)}
    second = {"w": torch.tensor([3.0, 5.0]), "n": torch.tensor(2)}
    averaged = epoch_selection.average_weights([first, second])
    assert averaged["w"].tolist() == [2.0, 4.0]
    assert int(averaged["n"]) == 2


def test_val_scores_use_trains_whitening_and_test_scores_model_pts(monkeypatch):
    """val mAP and the val top-1 cosine are judged as val GAP is (the whitening of the train photos alone);
    the test queries with the whitening model.pt carries (here none), each split with its own."""
    from types import SimpleNamespace

    from landmarks.whitening import apply_whitening, fit_whitening

    rng = np.random.default_rng(0)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    centres = unit(rng.normal(size=(3, 6)))
    db_labels = np.repeat([0, 1, 2], 4)
    db = unit(centres[db_labels] + 0.4 * rng.normal(size=(12, 6)))
    val = unit(centres[[0, 1, 2]] + 0.4 * rng.normal(size=(3, 6)))
    test = unit(centres[[2, 0, 1]] + 0.4 * rng.normal(size=(3, 6)))
    indexes = {
        "train": SimpleNamespace(table=pd.DataFrame({"landmark_id": db_labels.astype(float)})),
        "val": SimpleNamespace(table=pd.DataFrame({"landmark_id": [0.0, 1.0, 2.0]})),
        "test": SimpleNamespace(table=pd.DataFrame({"id": ["a", "b", "c"], "landmark_id": [2.0, 0.0, 1.0]})),
    }
    arrays = {id(indexes["train"]): db, id(indexes["val"]): val, id(indexes["test"]): test}
    monkeypatch.setattr(epoch_selection, "EMBED_FOR_TRAINING", lambda model, index, *args: arrays[id(index)])
    # score_model puts EMBED_FOR_TRAINING (the fake) back into validation: monkeypatch restores the real one
    monkeypatch.setattr(validation, "embed_for_training", validation.embed_for_training)

    def evaluate(model, train_index, val_index, settings, device, dist):  # train's: train photos, then val
        validation.embed_for_training(model, train_index, settings, device, dist)
        validation.embed_for_training(model, val_index, settings, device, dist)
        return {"val_gap": 1.0, "val_accuracy": 1.0, "val_right": 3, "whitening": None}

    monkeypatch.setattr(epoch_selection, "EVALUATE_VAL_GAP", evaluate)
    settings = section_settings("train", {"whitening": "learned"}, "test")
    _, row = epoch_selection.score_model(
        None, indexes["train"], indexes["val"], indexes["test"], settings, torch.device("cpu"), dist=None
    )
    whitening = fit_whitening(db, db_labels, settings["whitening_shrinkage"], settings["whitening_power"])
    white_db, white_val = apply_whitening(db, whitening), apply_whitening(val, whitening)
    assert row["val_map"] == pytest.approx(
        epoch_selection.mean_average_precision(white_db, db_labels, white_val, [0, 1, 2])
    )
    assert row["val_top1_cosine"] == pytest.approx(float(np.mean((white_val @ white_db.T).max(axis=1))), abs=1e-5)
    expected_test = validation.top1_scores(db, db_labels, test, indexes["test"].table)  # model.pt: no whitening
    assert row["test_gap"] == pytest.approx(expected_test["val_gap"])
