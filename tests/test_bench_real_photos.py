"""bench/real_photos.py: the CSVs it builds (on a stand-in photo list, no photos needed) and its skip."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "real_photos.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("real_photos", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stand_in_data(root: Path) -> Path:
    """labels.csv files in the format of ../shared/data: 3 landmarks x 9 photos + 2 web photos each,
    and non-landmark photos of 6 scenes (one scene of 4 frames)."""
    landmarks = [
        {"id": f"lm{lm}_{i}", "path": f"images/{lm}/{i}.jpg", "landmark_id": lm, "split": "paris6k"}
        for lm in range(3)
        for i in range(9)
    ]
    landmarks += [
        {"id": f"web{lm}_{i}", "path": f"web/{lm}_{i}.jpg", "landmark_id": lm, "split": "web_query"}
        for lm in range(3)
        for i in range(2)
    ]
    scenes = [("room0", 4), ("room1", 2), ("room2", 2), ("street", 1), ("office", 1), ("hall", 2)]
    distractors = [
        {"id": f"{scene}_{i}", "path": f"images/{scene}_{i}.jpg", "landmark_id": -1, "scene": scene}
        for scene, frames in scenes
        for i in range(frames)
    ]
    for folder, rows in (("paris6k_subset", landmarks), ("distractors", distractors)):
        (root / folder).mkdir(parents=True)
        pd.DataFrame(rows).to_csv(root / folder / "labels.csv", index=False)
    return root


def test_fewshot_csv_keeps_five_train_and_one_val_photo_per_landmark(tmp_path):
    bench = load_bench()
    data = stand_in_data(tmp_path / "data")
    for seed in (0, 1):
        table = bench.urls_table(data, "http://127.0.0.1:1", "fewshot", seed)
        photos = table[table["id"].str.startswith("lm")]
        assert photos.groupby(["landmark_id", "split"]).size().unstack().to_dict("list") == {
            "train": [5, 5, 5],
            "val": [1, 1, 1],
        }
        assert set(table.loc[table["id"].str.startswith("web"), "split"]) == {"test"}  # web photos are the queries
    picked = [set(bench.urls_table(data, "u", "fewshot", seed).query("split == 'train'")["id"]) for seed in (0, 1)]
    assert picked[0] != picked[1]  # the seed draws the few shots
    full = bench.urls_table(data, "u", "full", 0)
    assert (full.loc[full["id"].str.startswith("lm"), "split"] == "").all()  # select assigns val and train


def test_nonlandmark_scenes_never_straddle_queries_and_bank(tmp_path):
    bench = load_bench()
    data = stand_in_data(tmp_path / "data")
    table = bench.urls_table(data, "http://127.0.0.1:1", "full", 3)
    nonlandmark = table[table["landmark_id"] == ""].assign(scene=lambda t: t["id"].str.rsplit("_", n=1).str[0])
    assert (nonlandmark.groupby("scene")["split"].nunique() == 1).all()
    assert set(nonlandmark["split"]) == {"test", "nonlandmark"}
    assert table["id"].is_unique and (table["id"] == "broken_link_0").sum() == 1  # one broken link
    assert table["url"].str.startswith("http://127.0.0.1:1/").all()


def test_skips_with_the_reason_when_the_photos_are_absent(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--data", str(tmp_path / "absent")], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "SKIPPED: no real photos at" in result.stdout
    assert not (tmp_path / "absent").exists()
