"""Stage `select`: from the download manifests (and scene votes) to one table of images and splits.

Steps, in order, each counted in the report:
  1. drop failed downloads (status != "ok");
  2. with scene tables: drop images Places365 could not decode, then drop *landmark* images its
     votes call indoor (only rows with scene_status "scored"; "no_weights" rows are kept and the
     report says why). Non-landmark photos are never scene-filtered: indoor photos are exactly the
     distractors a recognition system meets, so removing them would make the test set easier;
  3. class rules on landmark images: excluded classes, minimum images per class, the N most
     frequent classes (ties: smaller landmark_id first), at most M images per class (seeded sample);
  4. splits: val/test per class, stratified; non-landmark photos split between `test` queries and
     the `nonlandmark` reranking bank. Rows with a split in the manifest keep it.

Val and test quotas. Each class gets round-half-up(fraction x n) val and test images, shrunk until it
keeps `min_train_per_class` train images (test shrinks first on a tie). So that val represents the
long tail too, a class of at least `val_min_class_images` images whose fraction gives no val image
gets one anyway, if one is left after its min_train_per_class train images and its test quota (or
its pre-assigned test rows, if more): priority train minimum > test > val. Smaller classes, and
every class when val_fraction is 0, follow the fractions alone. Pre-assigned val/test rows count
towards the quotas.

Duplicates. Rows sharing a URL or a checksum (sha256) form a duplicate group and are split together,
so automatic splits never put the same image in test and in the nonlandmark bank (nor in train and
val). A group whose members carry different labels (two landmarks, or landmark and non-landmark)
is contradictory: it is kept out of evaluation (landmark rows -> train, non-landmark -> nonlandmark).
Unassigned members of a group with pre-assigned rows follow them (test if any member is test).
Only pre-assigned splits can therefore put one image in test and in the bank: that is refused.

Randomness is a hash of (seed, id), so the result depends on the seed and the set of rows,
never on the order of the manifests.

    python -m landmarks.select --manifests results/download/part-*/manifest.parquet \
        --scenes results/places365/part-*.parquet --out results/select/selection.parquet \
        --report results/select/report.md --report-table results/select/report.parquet \
        --settings '{"outdoor_rule": "votes", "seed": 0}'   # config.yaml's select section; defaults fill the rest
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from .common import StageError, read_table, run_cli, setup_logging, write_table, write_text_atomic
from .config import ConfigError, add_settings_argument, parse_settings
from .places365 import STATUS_NO_WEIGHTS, STATUS_SCORED, STATUS_UNREADABLE, read_metadata
from .select_rules import decide_outdoor
from .tables import NONLANDMARK_SPLITS, OK, SELECTION_COLUMNS, SELECTION_SCHEMA, SPLITS

log = logging.getLogger("landmarks.select")

MANIFEST_COLUMNS = ("id", "url", "landmark_id", "status", "path", "sha256", "width", "height", "part")
SCENE_COLUMNS = ("id", "scene_status", "topk_outdoor")


@dataclass
class Rules:
    outdoor_rule: str = "votes"
    min_outdoor_votes: int = 3
    outdoor_top_k: int = 5
    min_images_per_class: int = 1
    top_n_classes: int = 0  # 0 = all classes
    max_images_per_class: int = 0  # 0 = no cap
    exclude_classes: list[int] = field(default_factory=list)
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    nonlandmark_test_fraction: float = 0.5
    min_train_per_class: int = 1
    val_min_class_images: int = 3  # classes this large get >= 1 val image when room is left
    seed: int = 0


# --------------------------------------------------------------------------------------------
# Reading inputs
# --------------------------------------------------------------------------------------------


def _ids_preview(ids, limit: int = 10) -> str:
    ids = sorted(map(str, ids))
    more = f" and {len(ids) - limit} more" if len(ids) > limit else ""
    return ", ".join(ids[:limit]) + more


def read_manifest(path: Path) -> pd.DataFrame:
    """One manifest, checked for the columns and types `select` relies on."""
    frame = read_table(path)
    missing = [c for c in MANIFEST_COLUMNS if c not in frame.columns]
    if missing:
        raise StageError(
            f"{path}: not a download manifest: missing columns {', '.join(missing)} "
            f"(expected at least {', '.join(MANIFEST_COLUMNS)})"
        )
    if "split" not in frame.columns:
        frame["split"] = pd.NA
    if frame["id"].isna().any() or (len(frame) and not pd.api.types.is_string_dtype(frame["id"])):
        raise StageError(f"{path}: column id must hold non-null strings (found {frame['id'].dtype})")
    landmark = frame["landmark_id"]
    if not (pd.api.types.is_integer_dtype(landmark) or landmark.isna().all()):
        integral = pd.api.types.is_float_dtype(landmark) and (landmark.dropna() % 1 == 0).all()
        if not integral:
            raise StageError(f"{path}: column landmark_id must hold integers or nulls (found {landmark.dtype})")
    frame["landmark_id"] = landmark.astype("Int64")
    frame["source_manifest"] = str(path)
    return frame


def read_manifests(paths: list[Path]) -> pd.DataFrame:
    frame = pd.concat([read_manifest(p) for p in paths], ignore_index=True)
    duplicated = frame["id"][frame["id"].duplicated()]
    if len(duplicated):
        raise StageError(f"ids appear more than once across the manifests: {_ids_preview(set(duplicated))}")
    check_preassigned_splits(frame)
    # Sorting by id makes every later step independent of the order of files and rows.
    return frame.sort_values("id", kind="stable").reset_index(drop=True)


def check_preassigned_splits(frame: pd.DataFrame) -> None:
    split = frame["split"]
    given = split.notna()
    bad_value = given & ~split.isin(SPLITS)
    is_landmark = frame["landmark_id"].notna()
    bad_landmark = given & is_landmark & (split == "nonlandmark")
    bad_nonlandmark = given & ~is_landmark & ~split.isin(NONLANDMARK_SPLITS)
    problems = []
    for mask, what in (
        (bad_value, f"split values not in {', '.join(SPLITS)}"),
        (bad_landmark, "landmark rows pre-assigned to 'nonlandmark'"),
        (bad_nonlandmark & ~bad_value, "non-landmark rows pre-assigned to train/val (only test or nonlandmark)"),
    ):
        if mask.any():
            rows = frame[mask]
            files = ", ".join(sorted(set(rows["source_manifest"])))
            problems.append(f"{what} in {files}: ids {_ids_preview(rows['id'])}")
    if problems:
        raise StageError("invalid pre-assigned split: " + "; ".join(problems))


@dataclass
class Scenes:
    table: pd.DataFrame  # id, scene_status, topk_outdoor (object column of bool arrays)
    notes: list[str]  # the places365 stage's notes of files that had no weights


def read_scenes(paths: list[Path]) -> Scenes:
    frames, notes = [], []
    for path in paths:
        frame = read_table(path)
        missing = [c for c in SCENE_COLUMNS if c not in frame.columns]
        if missing:
            raise StageError(f"{path}: not a places365 scene table: missing columns {', '.join(missing)}")
        bad = set(frame["scene_status"].dropna()) - {STATUS_SCORED, STATUS_NO_WEIGHTS, STATUS_UNREADABLE}
        if bad or frame["scene_status"].isna().any():
            raise StageError(f"{path}: unknown scene_status values {sorted(bad) or ['null']}")
        if (frame["scene_status"] == STATUS_NO_WEIGHTS).any():
            note = read_metadata(path).get("note")
            # Parts differ only in their image count ("kept all 208 images ..."): keep one of each.
            generic = re.sub(r"kept all [\d,]+ images", "kept all images", note or "")
            if generic and generic not in notes:
                notes.append(generic)
        frame["source_scenes"] = str(path)
        frames.append(frame[list(SCENE_COLUMNS) + ["source_scenes"]])
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(SCENE_COLUMNS))
    duplicated = table["id"][table["id"].duplicated()]
    if len(duplicated):
        raise StageError(f"ids appear more than once across the scene tables: {_ids_preview(set(duplicated))}")
    return Scenes(table, notes)


# --------------------------------------------------------------------------------------------
# Counting for the report
# --------------------------------------------------------------------------------------------


@dataclass
class Report:
    steps: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    val_coverage: dict | None = None  # see val_coverage()

    def count(self, step: str, frame: pd.DataFrame, note: str = "") -> None:
        landmark = frame["landmark_id"].notna()
        previous = self.steps[-1]["images"] if self.steps else len(frame)
        self.steps.append(
            {
                "section": "filter",
                "step": step,
                "images": len(frame),
                "landmark_images": int(landmark.sum()),
                "nonlandmark_images": int((~landmark).sum()),
                "classes": int(frame["landmark_id"].nunique()),
                "dropped": previous - len(frame),
                "note": note,
            }
        )


def val_coverage(selection: pd.DataFrame, min_class_images: int, val_fraction: float) -> dict:
    """How many landmark classes val covers: of all kept classes, and of those with >= min_class_images."""
    landmark = selection[selection["landmark_id"].notna()]
    sizes = landmark["landmark_id"].value_counts()
    covered = set(landmark.loc[landmark["split"] == "val", "landmark_id"])
    eligible = set(sizes[sizes >= min_class_images].index)
    return {
        "classes": len(sizes),
        "covered": len(covered),
        "eligible": len(eligible),
        "eligible_covered": len(covered & eligible),
        "min_class_images": min_class_images,
        "val_fraction": val_fraction,
    }


def describe_val_coverage(c: dict) -> str:
    """E.g. "val covers 412 of 1,203 classes (all 412 with >= 3 images)"."""
    text = f"val covers {c['covered']:,} of {c['classes']:,} classes"
    k, eligible, hit = c["min_class_images"], c["eligible"], c["eligible_covered"]
    if eligible == 0:
        return text + f" (none has >= {k} images)"
    if hit == eligible:
        return text + f" (all {eligible:,} with >= {k} images)"
    if c["val_fraction"] == 0:
        return text + f" ({hit:,} of the {eligible:,} with >= {k} images: val_fraction is 0)"
    return (
        text + f" ({hit:,} of the {eligible:,} with >= {k} images; the others have no image left after "
        f"their test images and min_train_per_class train images, or only duplicate groups too large to move)"
    )


def split_counts(selection: pd.DataFrame) -> list[dict]:
    rows = []
    landmark = selection["landmark_id"].notna()
    for split in SPLITS:
        in_split = selection["split"] == split
        rows.append(
            {
                "section": "split",
                "step": split,
                "images": int(in_split.sum()),
                "landmark_images": int((in_split & landmark).sum()),
                "nonlandmark_images": int((in_split & ~landmark).sum()),
                "classes": int(selection.loc[in_split, "landmark_id"].nunique()),
                "dropped": 0,
                "note": "",
            }
        )
    rows.append(
        {
            "section": "split",
            "step": "total",
            "images": len(selection),
            "landmark_images": int(landmark.sum()),
            "nonlandmark_images": int((~landmark).sum()),
            "classes": int(selection["landmark_id"].nunique()),
            "dropped": 0,
            "note": "",
        }
    )
    return rows


# --------------------------------------------------------------------------------------------
# Filters
# --------------------------------------------------------------------------------------------


def random_rank(ids: pd.Series, seed: int, purpose: str) -> np.ndarray:
    """A pseudo-random uint64 per id, fixed by (seed, purpose, id): order-independent sampling."""
    salt = f"{seed}:{purpose}:".encode()
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(salt + i.encode(), digest_size=8).digest(), "big") for i in ids),
        dtype=np.uint64,
        count=len(ids),
    )


def drop_failed_downloads(frame: pd.DataFrame, report: Report) -> pd.DataFrame:
    failed = frame[frame["status"] != OK]
    kinds = failed["status"].fillna("null").value_counts()
    note = ", ".join(f"{kind}: {n:,}" for kind, n in sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0])))
    kept = frame[frame["status"] == OK]
    report.count("downloaded (status ok)", kept, note)
    return kept


def attach_scenes(frame: pd.DataFrame, scenes: Scenes) -> pd.DataFrame:
    table = scenes.table
    missing = ~frame["id"].isin(table["id"])
    if missing.any():
        raise StageError(
            f"{int(missing.sum())} downloaded images have no scene result (ids {_ids_preview(frame.loc[missing, 'id'])}); "
            f"pass the places365 table of every partition to --scenes"
        )
    extra = ~table["id"].isin(frame["id"])
    if extra.any():
        log.warning("%d scene rows have no downloaded image in the manifests (ignored)", int(extra.sum()))
    return frame.merge(table[list(SCENE_COLUMNS)], on="id", how="left", validate="one_to_one")


def outdoor_matrix(topk_outdoor: pd.Series, need: int) -> np.ndarray:
    """Stack the scored rows' top-k outdoor flags into an (images, k) matrix."""
    if len(topk_outdoor) == 0:
        return np.zeros((0, need), dtype=bool)
    lengths = topk_outdoor.map(len)
    if lengths.min() < need:
        raise StageError(
            f"scene tables store only the top {int(lengths.min())} categories; "
            f"the outdoor rule needs {need} (rerun places365 with a larger places365.top_k)"
        )
    k = int(lengths.min())
    return np.stack([np.asarray(v[:k], dtype=bool) for v in topk_outdoor])


def apply_scene_filter(frame: pd.DataFrame, scenes: Scenes | None, rules: Rules, report: Report) -> pd.DataFrame:
    """Drop undecodable images, then indoor landmark images; adds scene_status, outdoor_votes, is_outdoor."""
    if scenes is None:
        if rules.outdoor_rule != "none":
            raise StageError(
                f"select.outdoor_rule {rules.outdoor_rule} needs the places365 tables (--scenes); "
                f"pass them or set outdoor_rule none"
            )
        report.notes.append("Outdoor filter: off (no scene tables, --outdoor-rule none).")
        frame = frame.assign(scene_status=pd.NA, topk_outdoor=None)
    else:
        frame = attach_scenes(frame, scenes)
        frame = frame[frame["scene_status"] != STATUS_UNREADABLE]
        report.count("decodable (Places365 could read it)", frame, "images Places365 could not decode")
    frame = frame.assign(
        outdoor_votes=pd.array([pd.NA] * len(frame), dtype="Int16"),
        is_outdoor=pd.array([pd.NA] * len(frame), dtype="boolean"),
    )
    if scenes is None:
        return frame.drop(columns=["topk_outdoor"])
    if rules.outdoor_rule == "none":
        report.count("outdoor filter: off", frame, "--outdoor-rule none")
        report.notes.append(
            "Outdoor filter: off (--outdoor-rule none); scene tables only used to drop undecodable images."
        )
        return frame.drop(columns=["topk_outdoor"])

    need = rules.outdoor_top_k if rules.outdoor_rule == "votes" else 10
    scored = (frame["scene_status"] == STATUS_SCORED).to_numpy()
    votes, outdoor = decide_outdoor(
        outdoor_matrix(frame.loc[scored, "topk_outdoor"], need),
        rules.outdoor_rule,
        rules.min_outdoor_votes,
        rules.outdoor_top_k,
    )
    frame.loc[scored, "outdoor_votes"] = votes
    frame.loc[scored, "is_outdoor"] = outdoor
    is_landmark = frame["landmark_id"].notna()
    indoor_landmark = is_landmark & frame["is_outdoor"].eq(False).fillna(False).astype(bool)
    unscored = is_landmark & (frame["scene_status"] == STATUS_NO_WEIGHTS)
    rule_text = (
        f">= {rules.min_outdoor_votes} outdoor of the top {rules.outdoor_top_k} categories"
        if rules.outdoor_rule == "votes"
        else "official: mean IO label of the top 10 >= 0.5"
    )
    note = f"rule {rules.outdoor_rule} ({rule_text}); landmark images only"
    if unscored.any():
        note += f"; {int(unscored.sum()):,} landmark images kept unscored (no weights)"
    frame = frame[~indoor_landmark]
    report.count("outdoor (indoor landmark images dropped)", frame, note)
    report.notes.append(f"Outdoor filter: {note}. Non-landmark photos are never scene-filtered.")
    if unscored.any():
        report.notes.append(
            f"**The outdoor filter was skipped for {int(unscored.sum()):,} landmark images** because the "
            f"places365 stage found no weights. Its explanation: " + " / ".join(scenes.notes or ["(no note)"])
        )
    return frame.drop(columns=["topk_outdoor"])


def apply_class_rules(frame: pd.DataFrame, rules: Rules, report: Report) -> pd.DataFrame:
    landmark = frame["landmark_id"].notna()

    excluded = {int(c) for c in rules.exclude_classes}
    present = set(frame.loc[landmark, "landmark_id"].astype(int)) & excluded
    frame = frame[~frame["landmark_id"].isin(excluded).fillna(False).astype(bool)]
    if excluded:
        report.count(
            "excluded classes removed",
            frame,
            f"{len(excluded)} classes listed, {len(present)} present: {', '.join(map(str, sorted(excluded)[:20]))}",
        )

    if rules.min_images_per_class > 1:
        counts = frame["landmark_id"].value_counts()
        small = set(counts[counts < rules.min_images_per_class].index)
        frame = frame[~frame["landmark_id"].isin(small).fillna(False).astype(bool)]
        report.count(f"classes with >= {rules.min_images_per_class} images", frame, f"{len(small):,} classes removed")

    if rules.top_n_classes:
        counts = frame["landmark_id"].value_counts().rename("n").reset_index()
        # Most images first; equal counts keep the smaller landmark_id, so the cut is deterministic.
        counts = counts.sort_values(["n", "landmark_id"], ascending=[False, True], kind="stable")
        top = set(counts["landmark_id"].head(rules.top_n_classes))
        is_landmark = frame["landmark_id"].notna()
        frame = frame[~is_landmark | frame["landmark_id"].isin(top).fillna(False).astype(bool)]
        report.count(
            f"top {rules.top_n_classes:,} classes by image count",
            frame,
            f"{max(0, len(counts) - len(top)):,} classes removed; ties: smaller landmark_id first",
        )

    if rules.max_images_per_class:
        # Pre-assigned rows are kept first (a given test set should not be sampled away).
        order = frame.assign(_not_given=frame["split"].isna(), _rank=random_rank(frame["id"], rules.seed, "cap"))
        order = order.sort_values(["landmark_id", "_not_given", "_rank", "id"], kind="stable")
        position = order.groupby("landmark_id", dropna=True).cumcount()
        keep_ids = set(order.loc[order["landmark_id"].isna() | (position < rules.max_images_per_class), "id"])
        frame = frame[frame["id"].isin(keep_ids)]
        report.count(
            f"at most {rules.max_images_per_class:,} images per class", frame, f"seeded sample (seed {rules.seed})"
        )
    return frame


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------


def duplicate_groups(frame: pd.DataFrame) -> np.ndarray:
    """Connected components of rows sharing a URL or a sha256: one group label per row."""
    group = pd.Series(np.arange(len(frame)), index=frame.index)
    keys = [frame[c].astype("string").str.strip() for c in ("url", "sha256")]
    while True:
        before = group.copy()
        for key in keys:
            known = key.notna() & (key != "")
            if known.any():
                group[known] = group[known].groupby(key[known]).transform("min")
        if group.equals(before):
            return group.to_numpy()


def val_test_quota(
    n: int,
    val_fraction: float,
    test_fraction: float,
    min_train: int,
    val_min_class_images: int = 0,
    given_test: int = 0,
) -> tuple[int, int]:
    """Val and test sizes of a class of n images: fractions rounded half up, shrunk until train
    keeps `min_train` images (tiny classes lose val/test, never train). A class's test images are
    its quota, or its `given_test` pre-assigned test rows when there are more: a class of 21 images
    with 19 given test rows keeps 1 train image of the 2 left, however many val 10% of 21 asks for.

    With `val_min_class_images` (0 = off) a class of at least that many images that the fractions
    leave without val gets 1 val image, if one remains after `min_train` train images and its test
    images."""
    val = math.floor(n * val_fraction + 0.5 + 1e-9)
    test = math.floor(n * test_fraction + 0.5 + 1e-9)
    while n - val - max(test, given_test) < min_train and (val > 0 or test > given_test):
        if test > given_test and test >= val:  # test shrinks first on a tie, while it is the quota that counts
            test -= 1
        else:
            val -= 1
    if (
        val == 0
        and val_fraction > 0
        and val_min_class_images
        and n >= val_min_class_images
        and n - max(test, given_test) - 1 >= min_train
    ):
        val = 1
    return val, test


def _take_prefix(groups: pd.DataFrame, by: str, need: pd.Series) -> pd.Series:
    """In each `by` block (already sorted by rank), take groups while their running size fits `need`.

    Groups are mostly single images; a large duplicate group that does not fit ends the block
    (slightly fewer val/test images rather than a group torn across splits)."""
    running = groups.groupby(by, dropna=False)["size"].cumsum()
    return running <= groups[by].map(need).fillna(0)


def assign_splits(frame: pd.DataFrame, rules: Rules) -> pd.DataFrame:
    """Return `frame` with `split` filled in and `split_source` saying how (see module doc)."""
    frame = frame.copy()
    frame["group"] = duplicate_groups(frame)
    frame["rank"] = random_rank(frame["id"], rules.seed, "split")
    is_landmark = frame["landmark_id"].notna()
    given = frame["split"].notna()
    frame["split_source"] = np.where(given, "manifest", "")

    # A group's labels: a landmark_id, or -1 for "non-landmark"; more than one is contradictory.
    label = frame["landmark_id"].astype("float").fillna(-1)
    n_labels = label.groupby(frame["group"]).transform("nunique")
    contradictory = n_labels > 1

    # Groups with pre-assigned rows: the others follow (test wins, so test never meets the bank).
    given_splits = frame.loc[given].groupby("group")["split"].agg(set)
    in_given_group = frame["group"].isin(given_splits.index) & ~given
    for index in frame.index[in_given_group]:
        splits = given_splits[frame.at[index, "group"]]
        if "test" in splits:
            split = "test"
        elif is_landmark[index]:
            split = "val" if "val" in splits else "train"
        else:
            split = "nonlandmark"
        frame.at[index, "split"] = split
        frame.at[index, "split_source"] = "duplicate"

    free = frame["split"].isna()
    loose = free & contradictory
    frame.loc[loose & is_landmark, "split"] = "train"
    frame.loc[loose & ~is_landmark, "split"] = "nonlandmark"
    frame.loc[loose, "split_source"] = "contradictory-duplicate"

    free = frame["split"].isna()
    _stratify_landmarks(frame, free & is_landmark, rules)
    _split_nonlandmarks(frame, free & ~is_landmark, rules)
    frame.loc[free, "split_source"] = "random"
    return frame.drop(columns=["group", "rank"])


def _free_groups(frame: pd.DataFrame, free: pd.Series, by: str | None) -> pd.DataFrame:
    """One row per free duplicate group (size, best rank), sorted by rank within `by`."""
    rows = frame.loc[free]
    groups = (
        rows.groupby("group")
        .agg(size=("id", "size"), rank=("rank", "min"), **({by: (by, "first")} if by else {}))
        .reset_index()
    )
    sort = ([by] if by else []) + ["rank", "group"]
    return groups.sort_values(sort, kind="stable").reset_index(drop=True)


def _stratify_landmarks(frame: pd.DataFrame, free: pd.Series, rules: Rules) -> None:
    landmark_rows = frame[frame["landmark_id"].notna()]
    sizes = landmark_rows["landmark_id"].value_counts()
    assigned = landmark_rows[~free[landmark_rows.index]]
    have_val = assigned[assigned["split"] == "val"]["landmark_id"].value_counts()
    have_test = assigned[assigned["split"] == "test"]["landmark_id"].value_counts()
    given_test = have_test.reindex(sizes.index, fill_value=0)
    # One quota per distinct (size, pre-assigned test rows): few pairs even with 100k classes.
    keys = pd.Series(list(zip(sizes, given_test)), index=sizes.index)
    quotas = {
        key: val_test_quota(
            key[0],
            rules.val_fraction,
            rules.test_fraction,
            rules.min_train_per_class,
            rules.val_min_class_images,
            key[1],
        )
        for key in keys.unique()
    }
    val_target = keys.map(lambda key: quotas[key][0])
    test_target = keys.map(lambda key: quotas[key][1])
    need_val = (val_target - have_val.reindex(val_target.index, fill_value=0)).clip(lower=0)
    need_test = (test_target - have_test.reindex(test_target.index, fill_value=0)).clip(lower=0)

    groups = _free_groups(frame, free, "landmark_id")
    if groups.empty:
        return
    to_val = _take_prefix(groups, "landmark_id", need_val)
    # Test takes the next groups in rank order, after what val took in the same class.
    val_taken = groups["size"].where(to_val, 0).groupby(groups["landmark_id"]).sum()
    to_test = ~to_val & _take_prefix(
        groups, "landmark_id", val_taken + need_test.reindex(val_taken.index, fill_value=0)
    )
    split_of_group = pd.Series(np.select([to_val, to_test], ["val", "test"], "train"), index=groups["group"])
    frame.loc[free, "split"] = frame.loc[free, "group"].map(split_of_group)


def _split_nonlandmarks(frame: pd.DataFrame, free: pd.Series, rules: Rules) -> None:
    nonlandmark = frame["landmark_id"].isna()
    target = math.floor(int(nonlandmark.sum()) * rules.nonlandmark_test_fraction + 0.5 + 1e-9)
    have = int((nonlandmark & ~free & (frame["split"] == "test")).sum())
    groups = _free_groups(frame, free, None)
    if groups.empty:
        return
    groups["all"] = 0
    to_test = _take_prefix(groups, "all", pd.Series({0: max(0, target - have)}))
    split_of_group = pd.Series(np.where(to_test, "test", "nonlandmark"), index=groups["group"])
    frame.loc[free, "split"] = frame.loc[free, "group"].map(split_of_group)


def check_no_test_bank_overlap(selection: pd.DataFrame) -> None:
    """The nonlandmark bank must share no id, URL or image content with test."""
    test = selection[selection["split"] == "test"]
    bank = selection[selection["split"] == "nonlandmark"]
    problems = []
    for column, what in (("id", "id"), ("url", "URL"), ("sha256", "image content (sha256)")):
        shared = set(test[column].dropna()) & set(bank[column].dropna())
        if shared:
            ids = set(test.loc[test[column].isin(shared), "id"]) | set(bank.loc[bank[column].isin(shared), "id"])
            problems.append(f"same {what}: ids {_ids_preview(ids)}")
    if problems:
        raise StageError(
            "test and the nonlandmark bank overlap (a query would find its own answer in the bank); "
            "fix the pre-assigned splits in the input: " + "; ".join(problems)
        )


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _n(value: int) -> str:
    return f"{value:,}"


def render_report(report: Report, splits: list[dict], rules: Rules, inputs: dict, sources: dict[str, int]) -> str:
    by_split = {row["step"]: row for row in splits}
    chain = " → ".join(_n(step["images"]) for step in report.steps)
    test = by_split["test"]
    chain += (
        f" → {_n(by_split['train']['images'])} train / {_n(by_split['val']['images'])} val / "
        f"{_n(test['images'])} test ({_n(test['landmark_images'])} landmark + "
        f"{_n(test['nonlandmark_images'])} non-landmark) / {_n(by_split['nonlandmark']['images'])} nonlandmark"
    )
    lines = [
        "# Selection report",
        "",
        f"Inputs: {inputs['manifests']} manifest(s), {inputs['scenes']} scene table(s). Seed {rules.seed}.",
        "",
        chain,
        "",
    ]
    if report.val_coverage is not None:  # val chooses the best epoch: say which classes it speaks for
        lines += [f"Val coverage: {describe_val_coverage(report.val_coverage)}.", ""]
    lines += [
        "## Images left after each step",
        "",
        "| step | images | landmark | non-landmark | classes | dropped | note |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for s in report.steps:
        lines.append(
            f"| {s['step']} | {_n(s['images'])} | {_n(s['landmark_images'])} | {_n(s['nonlandmark_images'])} "
            f"| {_n(s['classes'])} | {_n(s['dropped'])} | {s['note']} |"
        )
    lines += [
        "",
        "## Splits",
        "",
        "| split | images | landmark | non-landmark | classes |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for s in splits:
        lines.append(
            f"| {s['step']} | {_n(s['images'])} | {_n(s['landmark_images'])} | "
            f"{_n(s['nonlandmark_images'])} | {_n(s['classes'])} |"
        )
    lines += ["", "## Rules and notes", ""]
    lines += [f"- {note}" for note in report.notes]
    lines += [
        f"- Splits: val {rules.val_fraction:g} and test {rules.test_fraction:g} of each class (rounded half up; "
        f"every class keeps at least {rules.min_train_per_class} train image(s), so tiny classes get no val/test); "
        + (
            f"a class of >= {rules.val_min_class_images} images gets at least 1 val image when one is left after its "
            f"test images and train minimum; "
            if rules.val_fraction > 0
            else ""
        )
        + f"non-landmark photos: {rules.nonlandmark_test_fraction:g} become test queries, the rest the nonlandmark bank.",
        "- Duplicates (same URL or sha256) are split together; duplicates with contradictory labels are kept "
        "out of val/test (landmark → train, non-landmark → nonlandmark).",
        "- How each split was decided: "
        + ", ".join(f"{source} {_n(n)}" for source, n in sorted(sources.items()))
        + ".",
        "- Checked: test and nonlandmark share no id, URL or image content; the splits add up to the selected images.",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def select(manifests: list[Path], scenes: list[Path] | None, rules: Rules) -> tuple[pd.DataFrame, Report, list[dict]]:
    """The whole stage without writing: (selection, report, split counts)."""
    frame = read_manifests(manifests)
    report = Report()
    report.count("manifest rows", frame, f"{len(manifests)} manifest(s)")
    frame = drop_failed_downloads(frame, report)
    frame = apply_scene_filter(frame, read_scenes(scenes) if scenes else None, rules, report)
    frame = apply_class_rules(frame, rules, report)
    frame = assign_splits(frame, rules)
    check_no_test_bank_overlap(frame)

    selection = frame[list(SELECTION_COLUMNS)].sort_values("id", kind="stable").reset_index(drop=True)
    selection["landmark_id"] = selection["landmark_id"].astype("Int64")
    for column in ("part", "width", "height"):
        selection[column] = selection[column].astype("Int64")
    selection["scene_status"] = selection["scene_status"].astype("string")
    splits = split_counts(selection)
    report.val_coverage = val_coverage(selection, rules.val_min_class_images, rules.val_fraction)
    total = splits[-1]
    if next(row for row in splits if row["step"] == "train")["landmark_images"] == 0:
        raise StageError(nothing_to_learn(report))
    # Counts must add up: every selected row is in exactly one split, every step explains its drop.
    if not (
        sum(row["images"] for row in splits[:-1]) == total["images"] == report.steps[-1]["images"]
        and all(a["images"] - b["dropped"] == b["images"] for a, b in zip(report.steps, report.steps[1:]))
    ):
        raise RuntimeError(f"internal error: report counts do not add up ({report.steps}, {splits})")
    return selection, report, splits


def nothing_to_learn(report: Report) -> str:
    """Why no landmark image is left for train, with the counts of every step: the run stops here
    rather than four stages later in train."""
    counts = "; ".join(f"{row['step']}: {row['images']} ({row['landmark_images']} landmark)" for row in report.steps)
    first = report.steps[0]
    emptied = next((row for row in report.steps if row["landmark_images"] == 0), None)
    if first["landmark_images"] == 0:
        cause = (
            f"the CSV has {first['images']} rows and none with a landmark_id"
            if first["images"]
            else "the manifests have no rows (is the CSV empty?)"
        )
    elif emptied is not None:
        cause = f"step '{emptied['step']}' removed the last landmark images" + (
            f" ({emptied['note']})" if emptied["note"] else ""
        )
    else:
        cause = (
            "every landmark image went to val or test (select.val_fraction / select.test_fraction, or the "
            "CSV's split column)"
        )
    return f"select: no landmark image is left to train on: {cause}. Images left after each step: {counts}"


def parse_args(argv=None) -> tuple[argparse.Namespace, Rules]:
    p = argparse.ArgumentParser(
        prog="python -m landmarks.select",
        description="Filter the downloaded images (failed downloads, indoor scenes, class rules) and assign splits.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--manifests", nargs="+", required=True, type=Path, help="download manifests (Parquet)")
    p.add_argument("--scenes", nargs="*", default=[], type=Path, help="places365 scene tables (Parquet)")
    p.add_argument("--out", required=True, type=Path, help="selection table (Parquet)")
    p.add_argument("--report", required=True, type=Path, help="filter report (Markdown)")
    p.add_argument("--report-table", type=Path, default=None, help="the report's counts as Parquet")
    add_settings_argument(p, "select")
    p.add_argument("--verbose", action="store_true", help="debug logging")
    args = p.parse_args(argv)
    return args, rules_from_settings(parse_settings(args.settings, "select"))


def rules_from_settings(settings: dict) -> Rules:
    """The select section (validated by config) as Rules, with the checks that span two keys."""
    if settings["val_fraction"] + settings["test_fraction"] >= 1:
        raise ConfigError("select: val_fraction + test_fraction must be below 1 (the rest of each class is train)")
    if settings["outdoor_rule"] == "votes" and settings["min_outdoor_votes"] > settings["outdoor_top_k"]:
        raise ConfigError("select: min_outdoor_votes must be between 0 and outdoor_top_k")
    # null in config.yaml ("all classes", "no cap") is 0 in Rules
    nulls_as_zero = {key: settings[key] or 0 for key in ("top_n_classes", "max_images_per_class")}
    # fractions as floats even when config.yaml writes 0 or 1: the selection's metadata records them
    fractions = {key: float(settings[key]) for key in ("val_fraction", "test_fraction", "nonlandmark_test_fraction")}
    return Rules(**{**settings, **nulls_as_zero, **fractions})


def main(argv=None) -> int:
    args, rules = parse_args(argv)
    setup_logging(args.verbose)
    selection, report, splits = select(args.manifests, args.scenes, rules)

    metadata = {
        "stage": "select",
        "rules": asdict(rules),
        "manifests": [str(p) for p in args.manifests],
        "scenes": [str(p) for p in args.scenes],
    }
    table = pa.Table.from_pandas(selection, schema=SELECTION_SCHEMA, preserve_index=False)
    # Keep pandas' own metadata too, so nullable columns read back as Int64/boolean, not float/object.
    table = table.replace_schema_metadata(
        {**(table.schema.metadata or {}), b"landmarks.select": json.dumps(metadata).encode()}
    )
    write_table(table, args.out)
    inputs = {"manifests": len(args.manifests), "scenes": len(args.scenes)}
    sources = selection["split_source"].value_counts().to_dict()
    write_text_atomic(args.report, render_report(report, splits, rules, inputs, sources))
    if args.report_table:
        write_table(pd.DataFrame(report.steps + splits), args.report_table)
    for row in splits:
        log.info(
            "%-11s %9s images (%s landmark, %s non-landmark, %s classes)",
            row["step"],
            _n(row["images"]),
            _n(row["landmark_images"]),
            _n(row["nonlandmark_images"]),
            _n(row["classes"]),
        )
    log.info("%s", describe_val_coverage(report.val_coverage))
    log.info("wrote %s and %s", args.out, args.report)
    return 0


if __name__ == "__main__":
    run_cli(main)
