"""bench/real_photos.py: the CSVs it builds (on a stand-in photo list, no photos needed) and its skip."""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import load_bench_script

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "real_photos.py"


def load_bench():
    return load_bench_script("real_photos")


def stand_in_data(root: Path) -> Path:
    """labels.csv files in the format of ../shared/data: 3 landmarks x 9 photos (one a junk view) + 2 web photos each,
    and non-landmark photos of 6 scenes (one scene of 4 frames)."""
    landmarks = [
        {
            "id": f"lm{lm}_{i}",
            "path": f"images/{lm}/{i}.jpg",
            "landmark_id": lm,
            "split": "paris6k",
            "paris6k_gt": "junk" if i == 8 else "ok",
        }
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


def folders(data: Path):
    return load_bench().PhotoFolders(data / "paris6k_subset", data / "distractors")


def test_fewshot_csv_keeps_five_train_and_one_val_photo_per_landmark_and_queries_the_rest(tmp_path):
    bench = load_bench()
    data = stand_in_data(tmp_path / "data")
    for seed in (0, 1):
        table = bench.urls_table(folders(data), "http://127.0.0.1:1", "fewshot", seed)
        photos = table[table["id"].str.startswith("lm")]
        counts = photos.groupby(["landmark_id", "split"]).size().unstack()
        assert counts[["train", "val"]].to_dict("list") == {"train": [5, 5, 5], "val": [1, 1, 1]}
        # the photos left over are queries, except the junk views (which may be drawn for training)
        junk_left_over = 1 - photos["id"].str.endswith("_8").groupby(photos["landmark_id"]).sum()
        assert (counts["test"] == 3 - junk_left_over).all()
        assert not photos.loc[photos["split"] == "test", "id"].str.endswith("_8").any()
        assert set(table.loc[table["id"].str.startswith("web"), "split"]) == {"test"}  # web photos are queries
        sources = table[table["split"] == "test"].groupby("source").size().to_dict()
        assert (sources["heldout"], sources["query"]) == (counts["test"].sum(), 6) and sources["nonlandmark"] > 0
    picked = [
        set(bench.urls_table(folders(data), "u", "fewshot", seed).query("split == 'train'")["id"]) for seed in (0, 1)
    ]
    assert picked[0] != picked[1]  # the seed draws the few shots
    oneshot = bench.urls_table(folders(data), "u", "oneshot", 0)
    assert oneshot.query("split == 'train'").groupby("landmark_id").size().tolist() == [1, 1, 1]
    full = bench.urls_table(folders(data), "u", "full", 0)
    assert (full.loc[full["id"].str.startswith("lm"), "split"] == "").all()  # select assigns val and train


def test_longtail_keeps_a_seeded_number_of_photos_per_landmark_from_two_to_all_and_queries_the_rest(tmp_path):
    """Google Landmarks' head and tail in one database: most landmarks keep a few photos, some many;
    val is select's default share of them (10%, and 1 from 3 photos up), and the photos left over
    are queries."""
    bench = load_bench()
    data = tmp_path / "data"
    stand_in_data(data)
    rows = [{"id": f"p{lm}_{i}", "path": f"{lm}/{i}.jpg", "landmark_id": lm} for lm in range(40) for i in range(30)]
    pd.DataFrame(rows).to_csv(data / "paris6k_subset" / "labels.csv", index=False)  # 40 landmarks x 30 photos
    kept = {}
    for seed in (0, 1):
        table = bench.urls_table(folders(data), "u", "longtail", seed)
        landmarks = table[table["id"].str.startswith("p")]
        counts = landmarks.groupby(["landmark_id", "split"]).size().unstack(fill_value=0)
        assert (counts.sum(axis=1) == 30).all()  # nothing unused: no junk views here
        kept_count = counts["train"] + counts["val"]
        expected_val = ((kept_count * 0.1 + 0.5).astype(int)).clip(lower=(kept_count >= 3).astype(int))
        assert counts["val"].tolist() == expected_val.tolist()
        assert landmarks.query("split == 'test'")["source"].value_counts().to_dict() == {
            "query": 40 * 9,  # ceil(0.3 x 30) drawn queries per landmark, as in full
            "heldout": (21 - kept_count).sum(),  # the rest of the 21 database photos
        }
        assert kept_count.between(2, 21).all()
        assert kept_count.median() <= 10 and (kept_count >= 15).sum() >= 2  # a long tail and a head
        kept[seed] = set(landmarks.query("split in ['train', 'val']")["id"])
    assert kept[0] != kept[1]  # the seed draws how many and which
    assert bench.long_tail_count(0, "x", 1) == 1 and bench.long_tail_count(0, "x", 2) == 2


def test_gap_by_query_source_scores_each_kind_of_landmark_query_with_every_nonlandmark_query(tmp_path):
    bench = load_bench()
    table = pd.DataFrame(
        {
            "id": ["web_a", "held_b", "nl_c", "train_d"],
            "landmark_id": ["1", "2", "", "1"],
            "split": ["test", "test", "test", "train"],
            "source": ["query", "heldout", "nonlandmark", "database"],
        }
    )
    # web_a right but ranked below the non-landmark query; held_b right and first; by top-1 cosine reversed
    predictions = pd.DataFrame(
        {"id": ["web_a", "held_b", "nl_c"], "landmark_id": [1, 2, 1], "score": [0.2, 0.9, 0.5]}
    ).assign(top_cosine=[0.9, 0.1, 0.5])
    gaps = bench.gaps_by_query_source(predictions, table)
    assert gaps == {"gap_query": 0.5, "gap_query_raw": 1.0, "gap_heldout": 1.0, "gap_heldout_raw": 0.5}


def test_nonlandmark_scenes_never_straddle_queries_and_bank(tmp_path):
    bench = load_bench()
    data = stand_in_data(tmp_path / "data")
    table = bench.urls_table(folders(data), "http://127.0.0.1:1", "full", 3)
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


def test_a_folder_without_queries_of_its_own_lends_a_share_of_each_landmark_to_the_queries(tmp_path):
    bench = load_bench()
    data = stand_in_data(tmp_path / "data")
    other = tmp_path / "other"
    other.mkdir()
    rows = [{"id": f"p{lm}_{i}", "path": f"{lm}/{i}.jpg", "landmark_id": lm} for lm in range(2) for i in range(10)]
    pd.DataFrame(rows).to_csv(other / "labels.csv", index=False)  # no split column: every photo is "all"
    photos = bench.PhotoFolders(other, data / "distractors")
    full = bench.urls_table(photos, "http://127.0.0.1:1", "full", 0)
    landmarks = full[full["id"].str.startswith("p")]
    assert landmarks.groupby(["landmark_id", "split"]).size().to_dict() == {
        ("0", ""): 7,
        ("0", "test"): 3,  # ceil(0.3 x 10) queries per landmark
        ("1", ""): 7,
        ("1", "test"): 3,
    }
    assert full["url"].str.startswith("http://127.0.0.1:1/other/").sum() == 21  # 20 photos and the broken link
    fewshot = bench.urls_table(photos, "u", "fewshot", 0)
    assert fewshot.query("split == 'test' and source == 'heldout'").groupby("landmark_id").size().tolist() == [1, 1]
    queries = [set(bench.urls_table(photos, "u", "full", seed).query("source == 'query'")["id"]) for seed in (0, 1)]
    assert queries[0] != queries[1]  # the seed draws them

    pd.DataFrame(rows).assign(split="holdout").to_csv(other / "labels.csv", index=False)
    with pytest.raises(SystemExit, match=r"labels.csv: unknown split value\(s\) \['holdout'\]"):
        bench.urls_table(photos, "u", "full", 0)


def test_a_folder_of_one_subfolder_per_landmark_needs_no_labels_csv_and_serves_every_photo(tmp_path):
    """The layout photo collections come in: landmark names with spaces, photos nested and in any
    accepted format; other files and hidden folders are not photos. Every URL it builds is fetched back."""
    import urllib.request

    bench = load_bench()
    data = stand_in_data(tmp_path / "data")
    collection = tmp_path / "my photos"
    files = {"Notre Dame/a.jpg": 6, "Notre Dame/2019 trip/b c.JPEG": 1, "Tower Bridge/d.png": 3}
    for name, copies in files.items():
        for i in range(copies):
            path = collection / name.replace(".", f"{i}.")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(f"photo {name} {i}".encode())
    (collection / "Tower Bridge" / "notes.txt").write_text("not a photo")
    (collection / ".thumbnails").mkdir()
    (collection / ".thumbnails" / "x.jpg").write_bytes(b"a cache")
    photos = bench.PhotoFolders(collection, data / "distractors")
    server, base_url = bench.serve(photos, tmp_path / "www", 0)
    try:
        table = bench.urls_table(photos, base_url, "full", 0)
        landmarks = table[table["source"].isin(["database", "query"])]
        assert landmarks.groupby("landmark_id").size().to_dict() == {"0": 7, "1": 3}  # in name order
        assert landmarks.groupby("landmark_id")["split"].apply(lambda s: (s == "test").sum()).tolist() == [3, 1]
        assert landmarks["id"].is_unique and landmarks["id"].str.fullmatch(r"[0-9a-f]{20}").all()
        for url in landmarks["url"]:
            with urllib.request.urlopen(url, timeout=10) as response:
                assert response.read().startswith(b"photo ")
    finally:
        server.shutdown()
    empty = tmp_path / "empty"
    (empty / "a landmark").mkdir(parents=True)
    with pytest.raises(SystemExit, match="no labels.csv and no photos in subfolders"):
        bench.urls_table(bench.PhotoFolders(empty, data / "distractors"), "u", "full", 0)


def test_the_tables_are_written_whole_after_each_run_and_hold_every_finished_seed(tmp_path):
    bench = load_bench()
    catalogue = {"pretrained": bench.EXPERIMENTS["pretrained"], "finetuned": bench.EXPERIMENTS["finetuned"]}
    rows = [
        {"regime": "fewshot", "seed": seed, "experiment": name, "selected": "epoch 0", "gap": gap, "accuracy": 0.5}
        for seed, gaps in ((0, (0.40, 0.52)), (1, (0.44, 0.50)))
        for name, gap in zip(catalogue, gaps)
    ]
    stem = tmp_path / "results-fewshot"
    bench.write_tables(pd.DataFrame(rows[:2]), catalogue, stem)  # after the first seed's run
    text = bench.write_tables(pd.DataFrame(rows), catalogue, stem)  # after the second

    assert sorted(p.name for p in tmp_path.iterdir()) == ["results-fewshot.csv", "results-fewshot.md"]
    assert pd.read_csv(tmp_path / "results-fewshot.csv")["seed"].tolist() == [0, 0, 1, 1]
    assert (tmp_path / "results-fewshot.md").read_text() == text
    finetuned = next(line for line in text.splitlines() if line.startswith("| finetuned | 0.510"))
    assert finetuned.endswith("| 0.090 ± 0.030 |")  # gains per seed +0.12 and +0.06 (sd over the seeds)


def test_with_held_out_queries_the_table_also_gives_the_gain_on_the_folders_own_query_photos(tmp_path):
    bench = load_bench()
    catalogue = {"pretrained": bench.EXPERIMENTS["pretrained"], "finetuned": bench.EXPERIMENTS["finetuned"]}
    rows = [
        {"regime": "fewshot", "seed": seed, "experiment": name, "selected": "epoch 1", "gap": gap}
        | {"gap_query": query, "gap_heldout": 0.9}
        for seed, results in ((0, ((0.90, 0.80), (0.92, 0.86))), (1, ((0.95, 0.90), (0.94, 0.92))))
        for name, (gap, query) in zip(catalogue, results)
    ]
    text = bench.render(pd.DataFrame(rows), catalogue)

    header = next(line for line in text.splitlines() if line.startswith("| experiment | GAP |"))
    assert header.endswith("| GAP − pretrained | GAP query photos − pretrained |")
    finetuned = next(line for line in text.splitlines() if line.startswith("| finetuned | 0.930"))
    assert finetuned.endswith("| 0.005 ± 0.015 | 0.040 ± 0.020 |")  # GAP +0.02 / -0.01, query photos +0.06 / +0.02
    full = bench.render(pd.DataFrame(rows).assign(regime="full", gap_heldout=None), catalogue)
    assert "query photos − pretrained" not in full  # the queries are the folder's own: the same gain


def test_embed_settings_reach_every_experiment_and_size_the_shards_for_the_largest_scale(tmp_path):
    from landmarks.config import experiment_settings, shard_size, validate_config

    bench = load_bench()
    config = bench.run_config("fewshot", 0, tmp_path / "urls.csv", bench.EXPERIMENTS, {}, {"scales": [1.0, 1.414]})
    config = validate_config(config)
    for name in bench.EXPERIMENTS:
        assert experiment_settings(config, name)["embed"]["scales"] == [1.0, 1.414]
    # trained at 384 px (the default), embedded at 384 and 543 px: the shards keep 543 px
    assert shard_size(config) == 543


def test_every_experiment_the_benchmark_offers_is_a_valid_config(tmp_path):
    # a misspelt key in a variant would otherwise surface only when a user runs it, an hour in
    from landmarks.config import experiment_settings, validate_config

    bench = load_bench()
    offered = {**bench.EXPERIMENTS, **bench.VARIANTS, **bench.TEST_TIME}
    config = validate_config(bench.run_config("fewshot", 0, tmp_path / "urls.csv", offered, {}, {}))
    crops = {
        name: experiment_settings(config, name)["train"]["augment"]["random_resized_crop_scale"]
        for name in ("finetuned", "crop_0.25", "crop_0.8")
    }
    assert crops == {"finetuned": [0.5, 1.0], "crop_0.25": [0.25, 1.0], "crop_0.8": [0.8, 1.0]}
