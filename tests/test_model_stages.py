"""Entry points of shard -> train -> embed -> retrieve -> score -> summary on a tiny image set."""

import io
import json
import runpy
import sys
import tarfile

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from landmarks import embed, ranking, retrieve, score, shard, summary

STAGES = ["demo", "split", "download", "places365", "select", "shard", "train", "embed", "retrieve", "score", "summary"]


# runpy warns when a stage module was already imported by another test: harmless for --help.
@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")
def test_every_stage_entry_point_has_help(capsys, monkeypatch):
    for stage in STAGES:
        monkeypatch.setattr(sys, "argv", [f"landmarks.{stage}", "--help"])
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_module(f"landmarks.{stage}", run_name="__main__")
        assert exit_info.value.code == 0, stage
        assert "usage:" in capsys.readouterr().out, stage


def test_shards_are_webdataset_tars_with_an_index(shards):
    index = pd.read_parquet(shards / "train" / "part-00" / "index.parquet")
    assert len(index) == 30  # 6 x 5 train photos; the corrupt one is skipped
    assert index["shard"].nunique() == 2  # 16 per shard
    skipped = pd.read_parquet(shards / "train" / "part-00" / "skipped.parquet")
    assert skipped["id"].tolist() == ["broken"]
    first = shards / "train" / "part-00" / index["shard"].iloc[0]
    with tarfile.open(first) as tar:
        names = tar.getnames()
        key = index["key"].iloc[0]
        assert names[:3] == [f"{key}.jpg", f"{key}.cls", f"{key}.json"]
        meta = json.loads(tar.extractfile(f"{key}.json").read())
        assert meta["id"] == index["id"].iloc[0]
        assert int(tar.extractfile(f"{key}.cls").read()) == index["landmark_id"].iloc[0]
        image = Image.open(io.BytesIO(tar.extractfile(f"{key}.jpg").read()))
        assert min(image.size) == 64 and image.size == (index["width"].iloc[0], index["height"].iloc[0])


def test_shards_are_deterministic(tiny_set, shards, tmp_path):
    shard.main(
        [
            "--selection",
            str(tiny_set / "selection.parquet"),
            "--images",
            str(tiny_set / "images"),
            "--split",
            "train",
            "--out-dir",
            str(tmp_path),
            "--settings",
            json.dumps({"size": 64, "images_per_shard": 16}),
        ]
    )
    for name in ("shard-00-00000.tar", "shard-00-00001.tar"):
        assert (tmp_path / name).read_bytes() == (shards / "train" / "part-00" / name).read_bytes()


def test_resize_modes_and_colour_conversions(tmp_path):
    path = tmp_path / "wide.png"
    Image.new("RGBA", (400, 200), (0, 0, 0, 0)).save(path)  # fully transparent -> white
    assert shard.load_resized(path, "shorter_side", 100).size == (200, 100)
    assert shard.load_resized(path, "longer_side", 100).size == (100, 50)
    assert shard.load_resized(path, "center_crop", 100).size == (100, 100)
    padded = shard.load_resized(path, "pad", 100)
    assert padded.size == (100, 100) and padded.getpixel((50, 10)) == (0, 0, 0)
    assert shard.load_resized(path, "none", 100).size == (400, 200)
    assert shard.load_resized(path, "shorter_side", 1000).size == (400, 200)  # never upscale unless asked
    assert shard.load_resized(path, "shorter_side", 400, upscale=True).size == (800, 400)
    assert shard.load_resized(path, "none", 0).getpixel((5, 5)) == (255, 255, 255)
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (300, 120), (0, 255, 255, 0)).save(cmyk)  # red in CMYK
    red = shard.load_resized(cmyk, "shorter_side", 60)
    assert red.mode == "RGB" and red.size == (150, 60) and red.getpixel((70, 30))[0] > 200
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: displayed rotated by 90 degrees
    Image.new("RGB", (300, 100), (10, 200, 10)).save(rotated, exif=exif)
    assert shard.load_resized(rotated, "none", 0).size == (100, 300)


def test_loader_reads_every_image_once_across_workers(shards):
    from torch.utils.data import DataLoader

    from landmarks.loader import ShardDataset, ShardIndex

    index = ShardIndex.from_dirs([shards / "train" / "part-00"])
    dataset = ShardDataset(index, transform=lambda image: 0, shuffle=True, seed=3, shuffle_buffer=4)
    positions = [int(p) for _, _, batch in DataLoader(dataset, batch_size=5, num_workers=2) for p in batch]
    assert sorted(positions) == list(range(len(index)))
    ordered = ShardDataset(index, transform=lambda image: 0)
    assert [p for _, _, p in ordered] == list(range(len(index)))


def test_train_writes_model_metrics_and_curves(trained):
    metrics = pd.read_csv(trained / "metrics.csv")
    assert metrics["epoch"].tolist() == [0, 1, 2]  # epoch 0: the untrained model, evaluated like the others
    assert metrics["train_loss"].isna().tolist() == [True, False, False]
    summary = json.loads((trained / "train.json").read_text())
    assert summary["untrained_val_gap"] == metrics["val_gap"][0]
    assert summary["selected"] == ("pretrained" if summary["best_epoch"] == 0 else f"epoch {summary['best_epoch']}")
    assert summary["classes"] == 6 and summary["train_images"] == 30
    assert 0 <= summary["best_val_gap"] <= 1
    assert (trained / "model.pt").exists() and (trained / "last.ckpt").exists()
    assert (trained / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_embed_retrieve_score_summary_chain(shards, trained, tiny_set, tmp_path):
    for split in ("train", "test", "nonlandmark"):
        assert (
            embed.main(
                [
                    "--model",
                    str(trained / "model.pt"),
                    "--shards",
                    str(shards / split / "part-00"),
                    "--out",
                    str(tmp_path / f"{split}.npy"),
                    "--settings",
                    json.dumps({"flip_tta": True, "workers": 0}),
                ]
            )
            == 0
        )
    vectors, ids = embed.load_embeddings(tmp_path / "test.npy")
    assert vectors.shape == (10, 64) and len(ids) == 10
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-2)  # float16 storage
    assert (
        retrieve.main(
            [
                "--database",
                str(tmp_path / "train.npy"),
                "--queries",
                str(tmp_path / "test.npy"),
                "--bank",
                str(tmp_path / "nonlandmark.npy"),
                "--out-dir",
                str(tmp_path / "retrieve"),
                "--settings",
                '{"k": 5, "bank_k": 3}',
                "--shards",
                str(shards / "test" / "part-00"),
                str(shards / "train" / "part-00"),
            ]
        )
        == 0
    )
    submission = pd.read_csv(tmp_path / "retrieve" / "submission.csv", dtype=str, keep_default_na=False)
    assert sorted(submission["id"]) == sorted(ids["id"])
    assert submission["landmarks"].str.fullmatch(r"\d+ -?[\d.e-]+").all()
    neighbours = pd.read_parquet(tmp_path / "retrieve" / "neighbours.parquet")
    assert (neighbours.groupby("query_id")["rank"].max() == 5).all()
    assert (
        score.main(
            [
                "--predictions",
                str(tmp_path / "retrieve" / "predictions.parquet"),
                "--neighbours",
                str(tmp_path / "retrieve" / "neighbours.parquet"),
                "--selection",
                str(tiny_set / "selection.parquet"),
                "--shards",
                str(shards / "test" / "part-00"),
                str(shards / "train" / "part-00"),
                "--train-summary",
                str(trained / "train.json"),
                "--experiment",
                "tiny",
                "--out-dir",
                str(tmp_path / "score"),
            ]
        )
        == 0
    )
    metrics = json.loads((tmp_path / "score" / "metrics.json").read_text())
    assert metrics["queries"] == 10 and metrics["landmark_queries"] == 6
    assert metrics["accuracy"] >= 0.5  # six flat-colour classes: nearly trivial after two epochs
    assert 0 <= metrics["gap"] <= metrics["gap_landmarks_only"] <= 1
    for figure in score.FIGURES:
        assert (tmp_path / "score" / figure).read_bytes()[:4] == b"\x89PNG"
    assert summary.main(["--metrics", str(tmp_path / "score" / "metrics.json"), "--out", str(tmp_path / "s.md")]) == 0
    assert "| tiny |" in (tmp_path / "s.md").read_text()


def test_reranking_rules_by_hand():
    # Two queries, three neighbours each; database labels 7, 7, 9 and 9, 7, 7.
    cosines = np.array([[0.9, 0.8, 0.7], [0.6, 0.5, 0.4]], np.float32)
    positions = np.array([[0, 1, 2], [2, 3, 0]])
    db_labels = np.array([7, 7, 9, 7])
    query_bank = np.array([0.5, 0.1], np.float32)
    labels, confidence, _, _, _ = ranking.predict(
        cosines, positions, db_labels, rerank="seed004", query_bank=query_bank
    )
    assert labels.tolist() == [7, 9]
    assert confidence == pytest.approx([0.9 - 0.5, 0.6 - 0.1])
    labels, confidence, _, _, _ = ranking.predict(cosines, positions, db_labels, prediction="vote", rerank="none")
    assert labels.tolist() == [7, 7]  # query 2: label 7 has 0.5 + 0.4 > 0.6
    assert confidence == pytest.approx([0.9, 0.5])
    db_bank = np.array([0.2, 0.1, 0.0, 0.3], np.float32)
    labels, confidence, _, _, _ = ranking.predict(
        cosines, positions, db_labels, rerank="glr2020", query_bank=query_bank, db_bank=db_bank, neighbours_per_label=3
    )
    # query 1: label 7 -> (0.9-0.2)+(0.8-0.1)=1.4, label 9 -> 0.7-0.0; minus C=0.5
    # query 2: label 9 -> 0.6-0.0=0.6, label 7 -> (0.5-0.3)+(0.4-0.2)=0.4; minus C=0.1
    assert labels.tolist() == [7, 9]
    assert confidence == pytest.approx([1.4 - 0.5, 0.6 - 0.1])


def test_random_access_by_offset_matches_streaming(shards):
    from landmarks.loader import ShardDataset, ShardIndex, ShardMapDataset

    index = ShardIndex.from_dirs([shards / "train" / "part-00"])

    def as_bytes(image):
        return image.tobytes()

    streamed = {p: data for data, _, p in ShardDataset(index, as_bytes)}
    mapped = ShardMapDataset(index, as_bytes)
    assert len(mapped) == len(streamed)
    for position in (0, 7, len(index) - 1):
        assert mapped[position][0] == streamed[position]
