"""Tests of the select stage on generated manifests and scene tables."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from landmarks import places365, select, select_rules
from landmarks.common import StageError, read_table, write_table
from landmarks.config import ConfigError
from landmarks.tables import SELECTION_COLUMNS

# landmark_id -> number of downloaded images. Classes 2 and 6 tie at 10 images.
CLASS_SIZES = {1: 20, 2: 10, 3: 5, 4: 2, 5: 1, 6: 10}
N_NONLANDMARK = 10
N_FAILED = 3


def manifest_rows(class_sizes=CLASS_SIZES, n_nonlandmark=N_NONLANDMARK, n_failed=N_FAILED) -> list[dict]:
    rows = []

    def add(image_id, landmark_id, status="ok"):
        ok = status == "ok"
        rows.append(
            {
                "id": image_id,
                "url": f"http://example.org/{image_id}.jpg",
                "landmark_id": landmark_id,
                "split": None,
                "status": status,
                "reason": "" if ok else "not found",
                "http_status": 200 if ok else 404,
                "attempts": 1,
                "bytes": 1000 if ok else 0,
                "width": 640 if ok else None,
                "height": 480 if ok else None,
                "format": "JPEG" if ok else None,
                "sha256": f"sha-{image_id}" if ok else None,
                "elapsed_s": 0.1,
                "path": f"{image_id[0]}/{image_id[1]}/{image_id[2]}/{image_id}.jpg" if ok else None,
                "part": 0,
            }
        )

    for landmark_id, n in class_sizes.items():
        for i in range(n):
            add(f"L{landmark_id:03d}x{i:03d}", landmark_id)
    for i in range(n_nonlandmark):
        add(f"N00x{i:03d}", None)
    for i in range(n_failed):
        add(f"F00x{i:03d}", 1, status="http_404")
    return rows


def write_manifest(path: Path, rows: list[dict]) -> Path:
    frame = pd.DataFrame(rows)
    for column in ("landmark_id", "http_status", "attempts", "bytes", "width", "height", "part"):
        frame[column] = frame[column].astype("Int64")
    frame["split"] = frame["split"].astype("string")
    write_table(frame, path)
    return path


def write_scenes(
    path: Path,
    outdoor_by_id: dict[str, list[bool] | None],
    status_by_id: dict[str, str] | None = None,
    note: str | None = None,
) -> Path:
    """A scene table like places365 writes: None lists for rows that were not scored."""
    status_by_id = status_by_id or {}
    ids = list(outdoor_by_id)
    status = [status_by_id.get(i, "scored") for i in ids]
    lists = [v if s == "scored" else None for v, s in zip(outdoor_by_id.values(), status)]
    k = 10
    table = pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "scene_status": pa.array(status, pa.string()),
            "topk_index": pa.array([list(range(k)) if v is not None else None for v in lists], pa.list_(pa.int16())),
            "topk_prob": pa.array([[0.1] * k if v is not None else None for v in lists], pa.list_(pa.float32())),
            "topk_outdoor": pa.array(lists, pa.list_(pa.bool_())),
        }
    )
    meta = {"stage": "places365", "status": "no_weights" if note else "scored", "note": note or ""}
    write_table(table.replace_schema_metadata({places365.METADATA_KEY: json.dumps(meta).encode()}), path)
    return path


# The rules these tests were written for: no outdoor filter, no class-size minimum, 10 % test queries.
TEST_RULES = {"outdoor_rule": "none", "min_images_per_class": 1, "test_fraction": 0.1}


def run(
    tmp_path: Path, manifests: list[Path], scenes: list[Path] = (), **settings
) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    out, report, table = tmp_path / "selection.parquet", tmp_path / "report.md", tmp_path / "report.parquet"
    argv = [
        "--manifests",
        *map(str, manifests),
        "--out",
        str(out),
        "--report",
        str(report),
        "--report-table",
        str(table),
    ]
    if scenes:
        argv += ["--scenes", *map(str, scenes)]
    select.main([*argv, "--settings", json.dumps({**TEST_RULES, **settings})])
    return read_table(out), read_table(table), report.read_text()


def step(report_table: pd.DataFrame, name_prefix: str) -> pd.Series:
    rows = report_table[report_table["step"].str.startswith(name_prefix)]
    assert len(rows) == 1, f"no single step {name_prefix!r} in {list(report_table['step'])}"
    return rows.iloc[0]


def assert_counts_add_up(selection: pd.DataFrame, report_table: pd.DataFrame) -> None:
    filters = report_table[report_table["section"] == "filter"].reset_index(drop=True)
    splits = report_table[report_table["section"] == "split"].set_index("step")
    for previous, current in zip(filters.itertuples(), filters.iloc[1:].itertuples()):
        assert previous.images - current.dropped == current.images
    for row in filters.itertuples():
        assert row.landmark_images + row.nonlandmark_images == row.images
    assert splits.loc[["train", "val", "test", "nonlandmark"], "images"].sum() == splits.loc["total", "images"]
    assert splits.loc["total", "images"] == filters.iloc[-1]["images"] == len(selection)
    for split, count in selection["split"].value_counts().items():
        assert splits.loc[split, "images"] == count


@pytest.fixture
def manifest(tmp_path) -> Path:
    return write_manifest(tmp_path / "manifest.parquet", manifest_rows())


# ------------------------------------------------------------------------------------------------
# Filters and counts
# ------------------------------------------------------------------------------------------------


def test_failed_downloads_dropped_and_counts_add_up(tmp_path, manifest):
    selection, table, report = run(tmp_path, [manifest])
    total_ok = sum(CLASS_SIZES.values()) + N_NONLANDMARK
    assert step(table, "manifest rows")["images"] == total_ok + N_FAILED
    downloaded = step(table, "downloaded")
    assert downloaded["images"] == total_ok and downloaded["dropped"] == N_FAILED
    assert "http_404: 3" in downloaded["note"]
    assert len(selection) == total_ok and not selection["id"].str.startswith("F").any()
    assert_counts_add_up(selection, table)
    assert list(selection.columns) == list(SELECTION_COLUMNS)
    assert selection["id"].is_monotonic_increasing
    assert f"{total_ok + N_FAILED} → {total_ok} → " in report and "| downloaded (status ok) |" in report


def test_a_run_with_nothing_to_learn_stops_here_with_the_cause_and_the_counts(tmp_path):
    every_url_broken = write_manifest(tmp_path / "broken.parquet", manifest_rows({}, n_nonlandmark=0, n_failed=4))
    with pytest.raises(
        StageError,
        match=r"no landmark image is left to train on: step 'downloaded \(status ok\)' "
        r"removed the last landmark images \(http_404: 4\)\. Images left after "
        r"each step: manifest rows: 4 \(4 landmark\); downloaded \(status ok\): 0",
    ):
        run(tmp_path, [every_url_broken])
    no_landmarks = write_manifest(tmp_path / "nolabels.parquet", manifest_rows({}, n_nonlandmark=5, n_failed=0))
    with pytest.raises(StageError, match=r"the CSV has 5 rows and none with a landmark_id"):
        run(tmp_path, [no_landmarks])
    too_small = write_manifest(tmp_path / "small.parquet", manifest_rows({1: 2, 2: 1}, n_failed=0))
    with pytest.raises(StageError, match=r"step 'classes with >= 3 images' removed the last landmark images"):
        run(tmp_path, [too_small], min_images_per_class=3)


def test_exclude_classes(tmp_path, manifest):
    selection, table, _ = run(tmp_path, [manifest], exclude_classes=[1, 3, 999])
    assert not selection["landmark_id"].isin([1, 3]).any()
    row = step(table, "excluded classes")
    assert row["dropped"] == CLASS_SIZES[1] + CLASS_SIZES[3] and "3 classes listed, 2 present" in row["note"]
    assert_counts_add_up(selection, table)


def test_min_images_per_class(tmp_path, manifest):
    selection, table, _ = run(tmp_path, [manifest], min_images_per_class=5)
    assert set(selection["landmark_id"].dropna()) == {1, 2, 3, 6}
    assert step(table, "classes with >= 5 images")["dropped"] == CLASS_SIZES[4] + CLASS_SIZES[5]
    assert selection["landmark_id"].isna().sum() == N_NONLANDMARK  # non-landmarks are not a class
    assert_counts_add_up(selection, table)


def test_top_n_classes_breaks_ties_by_landmark_id(tmp_path, manifest):
    selection, table, _ = run(tmp_path, [manifest], top_n_classes=2)
    # 1 has 20 images; 2 and 6 tie at 10: the smaller landmark_id wins.
    assert set(selection["landmark_id"].dropna()) == {1, 2}
    row = step(table, "top 2 classes")
    assert row["classes"] == 2 and row["nonlandmark_images"] == N_NONLANDMARK
    assert_counts_add_up(selection, table)


def test_max_images_per_class_is_a_seeded_sample(tmp_path, manifest):
    selection, table, _ = run(tmp_path, [manifest], max_images_per_class=4, seed=1)
    counts = selection["landmark_id"].value_counts()
    assert counts[1] == 4 and counts[2] == 4 and counts[3] == 4 and counts[4] == 2 and counts[5] == 1
    assert step(table, "at most 4 images")["dropped"] == 16 + 6 + 1 + 6
    again, _, _ = run(tmp_path, [manifest], max_images_per_class=4, seed=1)
    other, _, _ = run(tmp_path, [manifest], max_images_per_class=4, seed=2)
    assert set(again["id"]) == set(selection["id"])
    assert set(other["id"]) != set(selection["id"])
    assert_counts_add_up(selection, table)


def test_class_rules_apply_in_order(tmp_path, manifest):
    # Exclude 1 first, so the top 2 by count are then 2 and 6 (tie at 10), capped at 3 each.
    selection, table, _ = run(
        tmp_path,
        [manifest],
        exclude_classes=[1],
        min_images_per_class=2,
        top_n_classes=2,
        max_images_per_class=3,
    )
    assert selection["landmark_id"].value_counts().to_dict() == {2: 3, 6: 3}
    steps = list(table.loc[table["section"] == "filter", "step"])
    assert steps == [
        "manifest rows",
        "downloaded (status ok)",
        "excluded classes removed",
        "classes with >= 2 images",
        "top 2 classes by image count",
        "at most 3 images per class",
    ]
    assert_counts_add_up(selection, table)


# ------------------------------------------------------------------------------------------------
# Splits
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, val, test, min_train, expected",
    [
        (20, 0.1, 0.1, 1, (2, 2)),
        (5, 0.1, 0.1, 1, (1, 1)),  # 0.5 rounds up
        (4, 0.1, 0.1, 1, (0, 0)),
        (1, 0.5, 0.4, 1, (0, 0)),  # tiny classes keep their train image
        (2, 0.3, 0.3, 1, (1, 0)),
        (10, 0.2, 0.2, 8, (1, 1)),
        (3, 0.2, 0.2, 5, (0, 0)),
    ],
)
def test_val_test_quota(n, val, test, min_train, expected):
    assert select.val_test_quota(n, val, test, min_train) == expected


@pytest.mark.parametrize(
    "n, val, test, min_train, min_class, given_test, expected",
    [
        (3, 0.1, 0.1, 1, 3, 0, (1, 0)),  # the fractions give no val; the floor gives 1, train keeps 2
        (2, 0.1, 0.1, 1, 3, 0, (0, 0)),  # below val_min_class_images: as before
        (2, 0.1, 0.1, 1, 2, 0, (1, 0)),
        (4, 0.1, 0.15, 1, 3, 0, (1, 1)),  # test 0.6 -> 1 first, then the val floor, train keeps 2
        (40, 0.1, 0.1, 1, 3, 0, (4, 4)),  # the fractions already give val: unchanged
        (3, 0.1, 0.5, 1, 3, 0, (0, 2)),  # test 1.5 -> 2 leaves 1 train: test wins over val
        (3, 0.1, 0.1, 2, 3, 0, (1, 0)),  # 1 val + 2 train
        (3, 0.1, 0.1, 3, 3, 0, (0, 0)),  # min_train_per_class wins
        (3, 0.1, 0.1, 1, 3, 2, (0, 0)),  # 2 pre-assigned test rows leave only the train image
        (3, 0.1, 0.1, 1, 3, 1, (1, 0)),
        (3, 0.0, 0.1, 1, 3, 0, (0, 0)),  # val_fraction 0: no val at all
        # Pre-assigned test rows count against the train minimum too: 19 of 21 leave 2 images.
        (21, 0.1, 0.0, 1, 3, 19, (1, 0)),  # 10% of 21 asks for 2 val: 1, and 1 train
        (21, 0.1, 0.0, 1, 3, 20, (0, 0)),  # the one image left trains
        (21, 0.1, 0.0, 2, 3, 19, (0, 0)),
        (21, 0.1, 0.1, 1, 3, 18, (2, 2)),  # the test quota (2) is below the given 18: train keeps 1
        (30, 0.1, 0.1, 1, 3, 9, (3, 3)),  # enough left: as without given rows
    ],
)
def test_val_quota_floor(n, val, test, min_train, min_class, given_test, expected):
    assert select.val_test_quota(n, val, test, min_train, min_class, given_test) == expected


def test_val_quota_floor_keeps_train_and_test_first():
    for n in range(1, 60):
        for val, test in ((0.1, 0.1), (0.02, 0.15), (0.3, 0.3), (0.05, 0.6)):
            for min_train in (1, 2, 5):
                old = select.val_test_quota(n, val, test, min_train)
                new = select.val_test_quota(n, val, test, min_train, 3)
                assert new[1] == old[1]  # test never gives way to the val floor
                assert new[0] == (old[0] or int(n >= 3 and n - old[1] - 1 >= min_train))
                assert n - sum(new) >= min(n, min_train)


def test_split_fractions_stratified(tmp_path, manifest):
    selection, table, report = run(
        tmp_path, [manifest], val_fraction=0.1, test_fraction=0.1, nonlandmark_test_fraction=0.5
    )
    landmark = selection[selection["landmark_id"].notna()]
    per_class = landmark.groupby(["landmark_id", "split"]).size().unstack(fill_value=0)
    assert per_class.loc[1].to_dict() == {"train": 16, "val": 2, "test": 2}
    assert per_class.loc[2].to_dict() == {"train": 8, "val": 1, "test": 1}
    assert per_class.loc[3].to_dict() == {"train": 3, "val": 1, "test": 1}
    assert per_class.loc[4].to_dict() == {"train": 2, "val": 0, "test": 0}
    assert per_class.loc[5].to_dict() == {"train": 1, "val": 0, "test": 0}
    assert per_class.loc[6].to_dict() == {"train": 8, "val": 1, "test": 1}
    nonlandmark = selection[selection["landmark_id"].isna()]
    assert nonlandmark["split"].value_counts().to_dict() == {"test": 5, "nonlandmark": 5}
    assert (selection["split_source"] == "random").all()
    splits = table[table["section"] == "split"].set_index("step")
    assert splits.loc["test", "landmark_images"] == 2 + 1 + 1 + 1 and splits.loc["test", "nonlandmark_images"] == 5
    assert "test (5 landmark + 5 non-landmark)" in report
    assert_counts_add_up(selection, table)


def test_min_train_per_class_wins_over_fractions(tmp_path, manifest):
    selection, table, _ = run(tmp_path, [manifest], val_fraction=0.4, test_fraction=0.4, min_train_per_class=3)
    train = selection[selection["split"] == "train"]["landmark_id"].value_counts()
    for landmark_id, n in CLASS_SIZES.items():
        assert train[landmark_id] >= min(n, 3)
    assert_counts_add_up(selection, table)


LONG_TAIL = {1: 40, 2: 3, 3: 2, 4: 4, 5: 3, 6: 3, 7: 1}


def long_tail_manifest(tmp_path, given=None, same_photo=()):
    rows = manifest_rows(class_sizes=LONG_TAIL, n_failed=0)
    for row in rows:
        row["split"] = (given or {}).get(row["id"])
        if row["id"] in same_photo:
            row["sha256"] = "sha-same"
    return write_manifest(tmp_path / "long_tail.parquet", rows)


def per_class_splits(selection: pd.DataFrame) -> dict[int, dict[str, int]]:
    landmark = selection[selection["landmark_id"].notna()]
    counts = landmark.groupby(["landmark_id", "split"]).size().unstack(fill_value=0)
    counts = counts.reindex(columns=["train", "val", "test"], fill_value=0)
    return {int(k): {s: int(n) for s, n in v.items()} for k, v in counts.iterrows()}


def test_val_covers_every_class_with_enough_images(tmp_path):
    # Class 5 has a pre-assigned test row, class 6 a pre-assigned val row.
    manifest = long_tail_manifest(tmp_path, given={"L005x000": "test", "L006x000": "val"})
    for seed in range(3):
        selection, table, report = run(tmp_path, [manifest], val_fraction=0.1, test_fraction=0.1, seed=seed)
        assert per_class_splits(selection) == {
            1: {"train": 32, "val": 4, "test": 4},  # round(0.1 x 40) each
            2: {"train": 2, "val": 1, "test": 0},  # 3 images: 1 val, train keeps 2
            3: {"train": 2, "val": 0, "test": 0},  # 2 images < val_min_class_images 3: as before
            4: {"train": 3, "val": 1, "test": 0},
            5: {"train": 1, "val": 1, "test": 1},  # the given test row counts as its test image
            6: {"train": 2, "val": 1, "test": 0},  # the given val row is its val image: no second one
            7: {"train": 1, "val": 0, "test": 0},
        }
        by_id = selection.set_index("id")
        assert by_id.loc["L005x000", "split"] == "test" and by_id.loc["L006x000", "split"] == "val"
        assert (by_id.loc[["L005x000", "L006x000"], "split_source"] == "manifest").all()
        assert_counts_add_up(selection, table)
        assert "Val coverage: val covers 5 of 7 classes (all 5 with >= 3 images)." in report
        assert "gets at least 1 val image" in report
        assert "| val | 8 | 8 | 0 | 5 |" in report  # the splits table is still there


def test_val_floor_gives_way_to_test_and_min_train(tmp_path):
    manifest = long_tail_manifest(tmp_path, given={"L005x000": "test", "L006x000": "val"})
    selection, table, report = run(tmp_path, [manifest], val_fraction=0.1, test_fraction=0.1, min_train_per_class=2)
    splits = per_class_splits(selection)
    # Class 5 (3 images, 1 given test) cannot spare a val image and keep 2 train.
    assert splits[5] == {"train": 2, "val": 0, "test": 1}
    assert splits[2] == {"train": 2, "val": 1, "test": 0} and splits[4] == {"train": 3, "val": 1, "test": 0}
    assert "val covers 4 of 7 classes (4 of the 5 with >= 3 images;" in report
    assert_counts_add_up(selection, table)


def test_val_min_class_images_option(tmp_path):
    manifest = long_tail_manifest(tmp_path)
    selection, _, report = run(tmp_path, [manifest], val_min_class_images=2)
    assert per_class_splits(selection)[3] == {"train": 1, "val": 1, "test": 0}
    assert "val covers 6 of 7 classes (all 6 with >= 2 images)" in report
    selection, _, report = run(tmp_path, [manifest], val_fraction=0)
    assert not (selection["split"] == "val").any()
    assert "val covers 0 of 7 classes (0 of the 5 with >= 3 images: val_fraction is 0)" in report
    with pytest.raises(ConfigError, match="key 'select.val_min_class_images'"):
        run(tmp_path, [manifest], val_min_class_images=1)


def test_preassigned_test_rows_never_leave_a_class_without_train_images(tmp_path):
    """A CSV that marks most of a small class's photos as test queries (its database is then a photo
    or two): val's share of the class must not take its last train image, as the report promises."""
    given = {f"L001x{i:03d}": "test" for i in range(2, 40)}  # class 1: 40 images, 38 of them test
    given |= {"L004x000": "test", "L004x001": "test", "L004x002": "test"}  # class 4: 1 of 4 left
    manifest = long_tail_manifest(tmp_path, given=given)
    for seed in range(3):
        selection, table, report = run(tmp_path, [manifest], val_fraction=0.1, test_fraction=0.0, seed=seed)
        splits = per_class_splits(selection)
        assert splits[1] == {"train": 1, "val": 1, "test": 38}  # 10% of 40 asks for 4 val
        assert splits[4] == {"train": 1, "val": 0, "test": 3}
        train = selection[selection["split"] == "train"]["landmark_id"].value_counts()
        assert set(train.index) == set(LONG_TAIL)  # every class keeps a train image
        assert "every class keeps at least 1 train image(s)" in report
        assert_counts_add_up(selection, table)


def test_val_floor_never_tears_a_duplicate_group(tmp_path):
    # All 3 photos of class 2 are the same image: the group cannot move to val whole (1 val wanted).
    manifest = long_tail_manifest(tmp_path, same_photo={"L002x000", "L002x001", "L002x002"})
    selection, table, report = run(tmp_path, [manifest])
    assert per_class_splits(selection)[2] == {"train": 3, "val": 0, "test": 0}
    assert "val covers 4 of 7 classes (4 of the 5 with >= 3 images;" in report
    assert_counts_add_up(selection, table)


def test_deterministic_and_independent_of_manifest_order(tmp_path):
    rows = manifest_rows()
    one = write_manifest(tmp_path / "one.parquet", rows)
    shuffled = [rows[i] for i in np.random.default_rng(7).permutation(len(rows))]
    a = write_manifest(tmp_path / "a.parquet", shuffled[:20])
    b = write_manifest(tmp_path / "b.parquet", shuffled[20:])
    first, _, report1 = run(tmp_path, [one], seed=3)
    second, _, report2 = run(tmp_path, [b, a], seed=3)
    pd.testing.assert_frame_equal(first.drop(columns=["part"]), second.drop(columns=["part"]))
    other, _, _ = run(tmp_path, [one], seed=4)
    assert not first["split"].equals(other["split"])


def test_preassigned_splits_are_kept_and_counted(tmp_path):
    rows = manifest_rows()
    given = {
        "L001x000": "test",
        "L001x001": "test",
        "L001x002": "test",
        "L005x000": "val",
        "N00x000": "nonlandmark",
        "N00x001": "test",
    }
    for row in rows:
        row["split"] = given.get(row["id"])
    selection, table, _ = run(tmp_path, [write_manifest(tmp_path / "m.parquet", rows)])
    by_id = selection.set_index("id")
    for image_id, split in given.items():
        assert by_id.loc[image_id, "split"] == split and by_id.loc[image_id, "split_source"] == "manifest"
    class1 = selection[selection["landmark_id"] == 1]["split"].value_counts()
    # The 3 given test rows already exceed class 1's 2 test images: no automatic test rows are added.
    assert class1.to_dict() == {"train": 15, "test": 3, "val": 2}
    assert selection[selection["landmark_id"].isna()]["split"].value_counts().to_dict() == {"test": 5, "nonlandmark": 5}
    assert_counts_add_up(selection, table)


@pytest.mark.parametrize(
    "image_id, split, message",
    [
        ("L001x000", "holdout", "split values not in train, val, test, nonlandmark"),
        ("L001x000", "nonlandmark", "landmark rows pre-assigned to 'nonlandmark'"),
        ("N00x000", "train", "non-landmark rows pre-assigned to train/val"),
    ],
)
def test_invalid_preassigned_split_names_file_and_id(tmp_path, image_id, split, message):
    rows = manifest_rows()
    for row in rows:
        if row["id"] == image_id:
            row["split"] = split
    path = write_manifest(tmp_path / "m.parquet", rows)
    with pytest.raises(StageError) as err:
        run(tmp_path, [path])
    assert message in str(err.value) and image_id in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize("shared", ["sha256", "url"])
def test_overlap_between_test_and_bank_is_refused_with_ids(tmp_path, shared):
    rows = manifest_rows()
    by_id = {r["id"]: r for r in rows}
    by_id["N00x003"]["split"], by_id["N00x007"]["split"] = "test", "nonlandmark"
    by_id["N00x007"][shared] = by_id["N00x003"][shared]
    with pytest.raises(StageError, match="test and the nonlandmark bank overlap") as err:
        run(tmp_path, [write_manifest(tmp_path / "m.parquet", rows)])
    assert "N00x003" in str(err.value) and "N00x007" in str(err.value)
    assert ("image content" if shared == "sha256" else "URL") in str(err.value)


def test_automatic_splits_keep_duplicates_together(tmp_path):
    rows = manifest_rows(n_nonlandmark=40)
    by_id = {r["id"]: r for r in rows}
    # Pairs of non-landmark photos with the same bytes, a URL chain, and a landmark pair.
    for i in range(0, 20, 2):
        by_id[f"N00x{i + 1:03d}"]["sha256"] = by_id[f"N00x{i:03d}"]["sha256"]
    by_id["N00x021"]["url"] = by_id["N00x020"]["url"]
    by_id["N00x022"]["sha256"] = by_id["N00x021"]["sha256"]  # 20 ~ 21 by URL, 21 ~ 22 by bytes
    by_id["L001x001"]["sha256"] = by_id["L001x000"]["sha256"]
    # A contradictory pair: the same photo labelled landmark 2 and non-landmark.
    by_id["N00x030"]["sha256"] = by_id["L002x000"]["sha256"]
    for seed in range(5):
        selection, table, _ = run(tmp_path, [write_manifest(tmp_path / "m.parquet", rows)], seed=seed)
        split = selection.set_index("id")["split"]
        for i in range(0, 20, 2):
            assert split[f"N00x{i:03d}"] == split[f"N00x{i + 1:03d}"]
        assert split["N00x020"] == split["N00x021"] == split["N00x022"]
        assert split["L001x000"] == split["L001x001"]
        assert (split["L002x000"], split["N00x030"]) == ("train", "nonlandmark")
        assert_counts_add_up(selection, table)


# ------------------------------------------------------------------------------------------------
# Outdoor filter from scene tables
# ------------------------------------------------------------------------------------------------

INDOOR_BY_VOTES = [True, False, False, False, False] + [True] * 5  # votes 1/5 indoor; official 6/10 outdoor
OUTDOOR_VOTES_ONLY = [True, True, True, False, False] + [False] * 5  # votes 3/5 outdoor; official 3/10 indoor
OUTDOOR_BOTH = [True] * 10
TIE = [True, False] * 5  # official 5/10: outdoor; votes 3/5: outdoor


@pytest.fixture
def scene_inputs(tmp_path):
    rows = manifest_rows(class_sizes={1: 6}, n_nonlandmark=2, n_failed=0)
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    outdoor = {
        "L001x000": INDOOR_BY_VOTES,
        "L001x001": OUTDOOR_VOTES_ONLY,
        "L001x002": OUTDOOR_BOTH,
        "L001x003": TIE,
        "L001x004": OUTDOOR_BOTH,
        "L001x005": OUTDOOR_BOTH,
        "N00x000": [False] * 10,
        "N00x001": OUTDOOR_BOTH,  # an indoor non-landmark photo stays
    }
    status = {"L001x004": "unreadable", "L001x005": "no_weights"}
    scenes = write_scenes(
        tmp_path / "scenes.parquet",
        outdoor,
        status,
        note="kept all images unscored because no Places365 weights were found: tried http://x",
    )
    return manifest, scenes


def test_votes_rule_drops_indoor_landmark_images(tmp_path, scene_inputs):
    manifest, scenes = scene_inputs
    selection, table, report = run(
        tmp_path,
        [manifest],
        outdoor_rule="votes",
        min_outdoor_votes=3,
        outdoor_top_k=5,
        scenes=[scenes],
    )
    assert set(selection["id"]) == {"L001x001", "L001x002", "L001x003", "L001x005", "N00x000", "N00x001"}
    by_id = selection.set_index("id")
    assert by_id.loc["L001x001", "outdoor_votes"] == 3 and bool(by_id.loc["L001x001", "is_outdoor"])
    assert by_id.loc["L001x005", "scene_status"] == "no_weights" and pd.isna(by_id.loc["L001x005", "is_outdoor"])
    assert step(table, "decodable")["dropped"] == 1
    assert step(table, "outdoor")["dropped"] == 1
    assert "outdoor filter was skipped for 1 landmark images" in report and "no Places365 weights" in report
    assert_counts_add_up(selection, table)


def test_official_rule_drops_by_top10_mean(tmp_path, scene_inputs):
    manifest, scenes = scene_inputs
    selection, table, _ = run(tmp_path, [manifest], outdoor_rule="official", scenes=[scenes])
    # INDOOR_BY_VOTES has 6/10 outdoor -> kept by the official rule; OUTDOOR_VOTES_ONLY 3/10 -> dropped.
    assert set(selection["id"]) == {"L001x000", "L001x002", "L001x003", "L001x005", "N00x000", "N00x001"}
    assert selection.set_index("id").loc["L001x003", "outdoor_votes"] == 5  # the 5/5 tie is outdoor
    assert_counts_add_up(selection, table)


def test_rule_none_keeps_indoor_but_drops_undecodable(tmp_path, scene_inputs):
    manifest, scenes = scene_inputs
    selection, table, _ = run(tmp_path, [manifest], outdoor_rule="none", scenes=[scenes])
    assert len(selection) == 7 and "L001x004" not in set(selection["id"])
    assert selection["outdoor_votes"].isna().all()
    assert_counts_add_up(selection, table)


def test_outdoor_rule_needs_scenes(tmp_path, manifest):
    with pytest.raises(StageError, match="needs the places365 tables"):
        run(tmp_path, [manifest], outdoor_rule="votes")


def test_image_without_scene_row_is_an_error(tmp_path, scene_inputs):
    manifest, _ = scene_inputs
    partial = write_scenes(tmp_path / "partial.parquet", {"L001x000": OUTDOOR_BOTH})
    with pytest.raises(StageError, match="have no scene result .*L001x001"):
        run(tmp_path, [manifest], outdoor_rule="votes", scenes=[partial])


def test_scene_table_with_too_few_categories(tmp_path, scene_inputs):
    manifest, scenes = scene_inputs
    with pytest.raises(StageError, match="only the top 10 categories; the outdoor rule needs 12"):
        run(tmp_path, [manifest], outdoor_rule="votes", outdoor_top_k=12, scenes=[scenes])


# ------------------------------------------------------------------------------------------------
# Bad inputs and the CLI
# ------------------------------------------------------------------------------------------------


def test_manifest_of_wrong_shape_names_file(tmp_path, manifest):
    bad = tmp_path / "bad.parquet"
    write_table(pd.DataFrame({"id": ["a"], "url": ["u"], "landmark": [1]}), bad)
    with pytest.raises(StageError, match=f"{bad}: not a download manifest: missing columns landmark_id, status"):
        run(tmp_path, [manifest, bad])


def test_manifest_with_text_landmark_ids_names_file(tmp_path):
    rows = manifest_rows()
    frame = pd.DataFrame(rows).assign(landmark_id=lambda f: f["landmark_id"].astype(str))
    bad = tmp_path / "text.parquet"
    write_table(frame, bad)
    with pytest.raises(StageError, match=f"{bad}: column landmark_id must hold integers"):
        run(tmp_path, [bad])


def test_duplicate_ids_across_manifests(tmp_path, manifest):
    copy = write_manifest(tmp_path / "copy.parquet", manifest_rows()[:2])
    with pytest.raises(StageError, match="ids appear more than once.*L001x000"):
        run(tmp_path, [manifest, copy])


def test_output_schema_and_metadata(tmp_path, manifest):
    run(tmp_path, [manifest], seed=5)
    table = pq.read_table(tmp_path / "selection.parquet")
    types = {f.name: str(f.type) for f in table.schema}
    assert types["id"] == "string" and types["landmark_id"] == "int64" and types["split"] == "string"
    assert types["outdoor_votes"] == "int16" and types["is_outdoor"] == "bool"
    meta = json.loads(table.schema.metadata[b"landmarks.select"])
    assert meta["rules"]["seed"] == 5 and meta["manifests"] == [str(manifest)]


def test_cli_help_and_exit_code(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "landmarks.select", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0
    for option in ["--manifests", "--scenes", "--out", "--report", "--report-table", "--settings"]:
        assert option in result.stdout
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "landmarks.select",
            "--manifests",
            str(tmp_path / "none.parquet"),
            "--out",
            str(tmp_path / "o.parquet"),
            "--report",
            str(tmp_path / "r.md"),
            "--settings",
            '{"outdoor_rule": "none"}',
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "none.parquet: file not found" in result.stderr


@pytest.mark.parametrize(
    "settings, error",
    [
        ({"seed": "x"}, "key 'select.seed'"),
        ({"outdoor_rulez": "none"}, "unknown key 'outdoor_rulez'"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "val_fraction \\+ test_fraction must be below 1"),
        ({"outdoor_rule": "votes", "min_outdoor_votes": 6}, "min_outdoor_votes must be between 0 and outdoor_top_k"),
    ],
)
def test_settings_are_checked_against_the_config_schema(tmp_path, manifest, settings, error):
    with pytest.raises(ConfigError, match=error):
        run(tmp_path, [manifest], **settings)


def test_settings_left_out_take_config_defaults(tmp_path, manifest):
    select.main(
        ["--manifests", str(manifest), "--out", str(tmp_path / "s.parquet"), "--report", str(tmp_path / "r.md")]
        + ["--settings", '{"outdoor_rule": "none"}']
    )
    rules = json.loads(pq.read_table(tmp_path / "s.parquet").schema.metadata[b"landmarks.select"])["rules"]
    assert rules["min_images_per_class"] == 2 and rules["test_fraction"] == 0.15 and rules["top_n_classes"] == 0


def test_fractions_are_recorded_as_floats_as_the_flags_gave_them(tmp_path, manifest):
    run(tmp_path, [manifest], val_fraction=0, nonlandmark_test_fraction=1)
    rules = json.loads(pq.read_table(tmp_path / "selection.parquet").schema.metadata[b"landmarks.select"])["rules"]
    assert json.dumps([rules["val_fraction"], rules["nonlandmark_test_fraction"]]) == "[0.0, 1.0]"


def test_selection_reads_back_with_nullable_types(tmp_path, manifest):
    selection, _, _ = run(tmp_path, [manifest])
    assert str(selection["landmark_id"].dtype) == "Int64" and selection["landmark_id"].isna().sum() == N_NONLANDMARK


# ---- the indoor/outdoor vote rules ----------------------------------------------------------------------------


def test_votes_rule():
    assert select_rules.outdoor_by_votes([1, 1, 1, 0, 0, 0, 0, 0, 0, 0], min_votes=3, top_k=5)
    assert not select_rules.outdoor_by_votes([1, 1, 0, 0, 0, 1, 1, 1, 1, 1], min_votes=3, top_k=5)
    assert select_rules.outdoor_by_votes([0, 0, 0, 0, 1], min_votes=1, top_k=5)
    with pytest.raises(ValueError):
        select_rules.outdoor_by_votes([True] * 3, top_k=5)


def test_official_rule_counts_top10_and_tie_is_outdoor():
    assert select_rules.outdoor_by_official([1] * 5 + [0] * 5)  # 5/5 tie -> outdoor
    assert not select_rules.outdoor_by_official([1] * 4 + [0] * 6)
    assert not select_rules.outdoor_by_official([0] * 6 + [1] * 4 + [1] * 10)  # only the top 10 count
    with pytest.raises(ValueError):
        select_rules.outdoor_by_official([True] * 9)


def test_vectorised_rules_agree_with_pure_functions():
    rng = np.random.default_rng(0)
    matrix = rng.random((500, 12)) < 0.5
    votes, outdoor = select_rules.decide_outdoor(matrix, "votes", min_votes=3, top_k=5)
    assert list(outdoor) == [select_rules.outdoor_by_votes(list(r), 3, 5) for r in matrix]
    assert list(votes) == [int(r[:5].sum()) for r in matrix]
    votes, outdoor = select_rules.decide_outdoor(matrix, "official")
    assert list(outdoor) == [select_rules.outdoor_by_official(list(r)) for r in matrix]
    with pytest.raises(ValueError):
        select_rules.decide_outdoor(matrix, "majority")
