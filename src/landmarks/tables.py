"""The tables stages hand each other: split names, schemas and column lists, in one place.

Every stage that writes or reads one of these tables takes its contract from here, so a column
added to a table is added once. The file I/O itself (atomic Parquet writes, reads that name the
file on failure) is `common.write_table` / `common.read_table`.

    split      part-NNN.parquet       PART_SCHEMA            one row per CSV row
    download   manifest.parquet       MANIFEST_SCHEMA        one row per part row, success or not
    gldv2      images_NNN.parquet     GLDV2_INDEX_SCHEMA     one row per image of a GLDv2 tar shard
    places365  scenes.parquet         SCENES_SCHEMA          one row per downloaded image
    select     selection.parquet      SELECTION_SCHEMA       one row per image kept, with its split
    shard      index.parquet          SHARD_INDEX_COLUMNS    one row per image in the tar shards
               skipped.parquet        SHARD_SKIPPED_COLUMNS  one row per image that could not be decoded
"""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .common import StageError

# ----------------------------------------------------------------------------- splits

# train: what the model learns from (and the kNN database); val: held-out images of train landmarks;
# test: scored queries, landmark and non-landmark; nonlandmark: the distractor bank of reranking.
SPLITS = ("train", "val", "test", "nonlandmark")
LANDMARK_SPLITS = ("train", "val", "test")
NONLANDMARK_SPLITS = ("test", "nonlandmark")  # a non-landmark photo is a test query or in the bank

# ----------------------------------------------------------------------------- split: part files

PART_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("url", pa.string()),
        ("landmark_id", pa.int64()),
        ("split", pa.string()),
        ("row", pa.int64()),  # 1-based data row of the CSV
    ]
)


def part_name(index: int) -> str:
    return f"part-{index:03d}.parquet"


def part_index_from_name(path: Path) -> int:
    """`.../part-007.parquet` -> 7 (0 when the name has no part number)."""
    match = re.search(r"part-(\d+)", path.name)
    return int(match.group(1)) if match else 0


def read_part(path: Path) -> dict[str, list]:
    """The part file's columns as Python lists (landmark_id, split and row may be absent)."""
    if not path.exists():
        raise StageError(f"{path}: file not found")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise StageError(f"{path}: not a readable Parquet table ({err})") from err
    missing = [c for c in ("id", "url") if c not in table.column_names]
    if missing:
        raise StageError(f"{path}: missing column(s) {', '.join(missing)} (is it a split part file?)")
    n = table.num_rows
    rows = {
        "id": table.column("id").cast(pa.string()).to_pylist(),
        "url": table.column("url").cast(pa.string()).to_pylist(),
        "landmark_id": table.column("landmark_id").cast(pa.int64()).to_pylist()
        if "landmark_id" in table.column_names
        else [None] * n,
        "split": table.column("split").cast(pa.string()).to_pylist() if "split" in table.column_names else [None] * n,
        "row": table.column("row").cast(pa.int64()).to_pylist()
        if "row" in table.column_names
        else list(range(1, n + 1)),
    }
    rows["id"] = ["" if v is None else v for v in rows["id"]]
    rows["url"] = ["" if v is None else v for v in rows["url"]]
    seen: dict[str, int] = {}
    for i, image_id in enumerate(rows["id"]):
        if image_id and seen.setdefault(image_id, i) != i:
            raise StageError(
                f"{path}: duplicate id {image_id!r} at rows {rows['row'][seen[image_id]]} and {rows['row'][i]}"
            )
    return rows


# ----------------------------------------------------------------------------- download: manifests

OK = "ok"  # a manifest row's status when its image is in place; every other status is a failure
MANIFEST_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("url", pa.string()),
        ("landmark_id", pa.int64()),
        ("split", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("http_status", pa.int64()),
        ("attempts", pa.int64()),
        ("bytes", pa.int64()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("format", pa.string()),
        ("sha256", pa.string()),
        ("elapsed_s", pa.float64()),
        ("path", pa.string()),
        ("part", pa.int64()),
        ("row", pa.int64()),
    ]
)
GLDV2_INDEX_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("bytes", pa.int64()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("format", pa.string()),
        ("sha256", pa.string()),
        ("path", pa.string()),
        ("shard", pa.int64()),
    ]
)

# ----------------------------------------------------------------------------- places365: scenes

SCENES_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("scene_status", pa.string()),  # scored | no_weights | unreadable
        ("topk_index", pa.list_(pa.int16())),  # null unless scored
        ("topk_prob", pa.list_(pa.float32())),
        ("topk_outdoor", pa.list_(pa.bool_())),
        ("scene_error", pa.string()),
    ]
)

# ----------------------------------------------------------------------------- select: the selection

SELECTION_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("landmark_id", pa.int64()),
        ("split", pa.string()),
        ("split_source", pa.string()),  # manifest | random | duplicate | contradictory-duplicate
        ("path", pa.string()),
        ("part", pa.int64()),
        ("url", pa.string()),
        ("sha256", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("scene_status", pa.string()),
        ("outdoor_votes", pa.int16()),
        ("is_outdoor", pa.bool_()),
    ]
)
SELECTION_COLUMNS = tuple(SELECTION_SCHEMA.names)

# ----------------------------------------------------------------------------- shard: index and skipped

# offset/size locate the JPEG bytes inside the tar; shard is the tar's file name (its folder's own).
SHARD_INDEX_COLUMNS = ["shard", "key", "id", "landmark_id", "width", "height", "offset", "size"]
SHARD_SKIPPED_COLUMNS = ["id", "path", "error"]

# ----------------------------------------------------------------------------- embed and retrieve

# embed -> retrieve, predict: <split>.ids.parquet, one row per row of <split>.npy, in the same order.
EMBEDDING_IDS_COLUMNS = ["id", "landmark_id", "shard", "key"]

# retrieve -> score, report: neighbours.parquet (k rows per query) and predictions.parquet (one row per
# query; landmark_id and score null when there is no answer). Both gain `inliers` when verification is on.
NEIGHBOURS_COLUMNS = ["query_id", "rank", "neighbour_id", "neighbour_landmark_id", "cosine"]
PREDICTIONS_COLUMNS = ["id", "landmark_id", "score", "top_cosine", "other_cosine", "bank_cosine", "impostor_cosine"]
# What score needs of a predictions table (one from elsewhere, in Kaggle's terms, has no cosines).
SCORED_PREDICTIONS_COLUMNS = ["id", "landmark_id", "score"]
