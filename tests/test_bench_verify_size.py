"""bench/verify_size.py: a finished run's test queries answered again under other verification settings."""

import numpy as np
import pandas as pd
import pytest
from conftest import write_image_set, write_shards
from PIL import Image
from test_bench_method import load
from test_verify import scene, second_view

from landmarks import retrieve
from landmarks.embed import write_embeddings

verify_size = load("verify_size")


def _results(folder):
    """Three database scenes; query q is another view of scene 2 but embedded nearest scene 1's photo, so
    only verification answers it right; q2 shows none of them."""
    photos = [
        ("db_a", scene(1), 1, "train"),
        ("db_b", scene(2), 2, "train"),
        ("db_c", scene(3), 3, "train"),
        ("q", Image.fromarray(second_view(scene(2))), 2, "test"),
        ("q2", scene(4), None, "test"),
        ("bank", scene(5), None, "nonlandmark"),
        ("v", Image.fromarray(second_view(scene(3))), 3, "val"),
    ]
    selection = write_image_set(folder, photos, selection_file=None, quality=95)
    (folder / "select").mkdir()
    selection.to_parquet(folder / "select" / "selection.parquet")
    splits = ("train", "test", "nonlandmark", "val")
    write_shards(selection, folder / "images", folder / "shards", splits, layout="{split}/part-00", size=300)
    embed = folder / "experiments" / "finetuned" / "embed"
    embed.mkdir(parents=True)
    unit = np.eye(4, dtype=np.float32)
    vectors = {
        "train": (unit[:3], ["db_a", "db_b", "db_c"], [1, 2, 3]),
        "test": (np.array([[0.8, 0.6, 0, 0], [0.4, 0.1, 0.1, 0.9]], np.float32), ["q", "q2"], [2, None]),
        "nonlandmark": (unit[3:], ["bank"], [None]),
        "val": (unit[2:3] + unit[3:] * 0.5, ["v"], [3]),
    }
    for name, (rows, ids, labels) in vectors.items():
        rows = rows / np.linalg.norm(rows, axis=1, keepdims=True)
        table = pd.DataFrame({"id": ids, "landmark_id": pd.array(labels, dtype="Int64")})
        write_embeddings(rows.astype(np.float32), table, embed / f"{name}.npy", dtype="float32")


def test_verification_settings_are_scored_on_the_runs_own_answers(tmp_path, monkeypatch):
    _results(tmp_path)
    calls = []
    original = retrieve.verify_neighbours_of
    monkeypatch.setattr(
        retrieve, "verify_neighbours_of", lambda *args: calls.append(args[4]["max_side"]) or original(*args)
    )
    rows = verify_size.run_settings(tmp_path, "finetuned", [224, 300], [10, 10_000], [40], threads=1)
    by_setting = {(row["max_side"], row["min_inliers"]): row for row in rows}
    # the inliers counted once per size (test queries, then val's), whatever min_inliers decides
    assert sorted(calls) == [224, 224, 300, 300]
    assert retrieve.verify_neighbours_of.__name__ == "<lambda>"  # the bench put back what it found
    for side in (224, 300):
        verified, unverified = by_setting[side, 10], by_setting[side, 10_000]
        assert verified["relabelled"] == 1 and verified["accuracy"] == 1.0 and verified["verified_wrong"] == 0
        assert unverified["relabelled"] == 0 and unverified["accuracy"] == 0.0 and unverified["verified"] == 0
        assert verified["gap"] == pytest.approx(1.0) and unverified["gap"] == pytest.approx(0.0)
        # val's right answer (0.89) and bank photo (0) put the threshold between q (0.8 or more) and q2 (0.4,
        # a non-landmark): verified, q is kept and right, q2 rejected; unverified, q is kept but wrong
        assert verified["verdict_right"] == 1.0 and verified["verdict_keeping_all"] == 0.5
        assert unverified["verdict_right"] == 0.5 and unverified["verdict_keeping_all"] == 0.0


def test_runs_without_shards_are_skipped_with_a_reason(tmp_path, capsys):
    (tmp_path / "experiments" / "finetuned" / "embed").mkdir(parents=True)
    (tmp_path / "experiments" / "finetuned" / "embed" / "test.npy").write_bytes(b"")
    assert verify_size.main([str(tmp_path), "--experiments", "finetuned"]) == 1
    assert "no embeddings or shards" in capsys.readouterr().err
