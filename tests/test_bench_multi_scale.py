"""bench/multi_scale.py: multi-scale embeddings of finished runs, as bench/real_photos.md reports them."""

import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import load_bench_script, save_tiny_model

from landmarks.embed import compute_embeddings
from landmarks.loader import ShardIndex
from landmarks.metrics import score_predictions
from landmarks.model import model_from_checkpoint
from landmarks.score import truth_from_selection

multi_scale = load_bench_script("multi_scale")
SIZE = 48  # the simple CNN pools 5 times: 32 px at least


@pytest.fixture(scope="module")
def finished_run(tiny_set, shards, tmp_path_factory):
    """A results folder as the benchmark leaves it: selection, train/test shards, one experiment's model.pt,
    and config.yaml and sources.csv beside it."""
    root = tmp_path_factory.mktemp("run")
    results = root / "results"
    (results / "select").mkdir(parents=True)
    shutil.copy(tiny_set / "selection.parquet", results / "select" / "selection.parquet")
    for split in ("train", "test"):
        shutil.copytree(shards / split, results / "shards" / split)
    (results / "experiments" / "untrained" / "train").mkdir(parents=True)
    save_tiny_model(results / "experiments" / "untrained" / "train" / "model.pt", SIZE)
    (root / "config.yaml").write_text("experiments:\n  untrained:\n    train: {epochs: 0}\n")
    return results


def test_the_scales_combine_exactly_as_the_embed_stage_embeds_at_several_scales(finished_run):
    model, _ = model_from_checkpoint(finished_run / "experiments" / "untrained" / "train" / "model.pt")
    shards = finished_run / "shards" / "test"
    views, table = multi_scale.embeddings_by_scale(model, shards, SIZE, (0.75, 1.0, 1.5))
    index = ShardIndex.from_dirs(sorted(shards.glob("part-*")))
    assert table["id"].tolist() == index.table["id"].tolist()
    for scales in ((1.0,), (1.0, 0.75), (0.75, 1.0, 1.5)):
        stage = compute_embeddings(model, index, SIZE, scales=scales, progress=False)
        np.testing.assert_allclose(multi_scale.combine(views, scales), stage, atol=1e-5)
    assert not np.allclose(views[0.75], views[1.0], atol=1e-3)  # the scales do differ


def test_plain_is_the_runs_own_nearest_neighbour_gap_and_the_query_photos_are_read_apart(finished_run):
    sources = pd.read_parquet(finished_run / "select" / "selection.parquet")[["id", "split", "landmark_id"]]
    sources["source"] = np.where(sources["landmark_id"].isna(), "nonlandmark", "database")
    test_landmarks = sources["split"].eq("test") & sources["landmark_id"].notna()
    sources.loc[test_landmarks & sources["id"].str.startswith(("lm0", "lm1", "lm2")), "source"] = "query"
    sources.loc[test_landmarks & ~sources["id"].str.startswith(("lm0", "lm1", "lm2")), "source"] = "heldout"
    sources[["id", "source"]].to_csv(finished_run.parent / "sources.csv", index=False)

    gaps = multi_scale.run_gaps(finished_run, "untrained")

    assert set(gaps) == {name + suffix for name in multi_scale.SETTINGS for suffix in ("", "_query")}
    model, _ = model_from_checkpoint(finished_run / "experiments" / "untrained" / "train" / "model.pt")
    embed = {
        split: compute_embeddings(model, ShardIndex.from_dirs([finished_run / "shards" / split / "part-00"]), SIZE)
        for split in ("train", "test")
    }
    tables = {split: ShardIndex.from_dirs([finished_run / "shards" / split / "part-00"]).table for split in embed}
    cosines = embed["test"] @ embed["train"].T
    pred = pd.DataFrame(
        {
            "id": tables["test"]["id"],
            "landmark_id": tables["train"]["landmark_id"].to_numpy().astype(int)[cosines.argmax(axis=1)],
            "score": cosines.max(axis=1),
        }
    )
    truth = truth_from_selection(pd.read_parquet(finished_run / "select" / "selection.parquet"))
    assert gaps["plain"] == pytest.approx(score_predictions(pred, truth).gap)
    kept = ~truth["id"].isin(sources.loc[sources["source"] == "heldout", "id"])
    assert kept.sum() < len(truth)  # the held-out photos are left out of the `_query` reading
    assert gaps["plain_query"] == pytest.approx(
        score_predictions(pred[pred["id"].isin(truth["id"][kept])], truth[kept]).gap
    )
