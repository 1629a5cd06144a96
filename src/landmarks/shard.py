"""Stage `shard`: resize the selected images once and pack them into WebDataset tar shards.

One job handles part k of K of one split. It writes `shard-<k>-<n>.tar` files (each sample is
`<key>.jpg`, `<key>.cls`, `<key>.json`), `index.parquet` (shard, key, id, landmark_id, width, height,
offset, size; offset/size locate the JPEG bytes inside the tar), `skipped.parquet` (images that could
not be decoded, with the reason: recorded, never fatal) and `shard.json` (settings and counts) into its
output folder. index.parquet is written last: a folder without it is unfinished.

Resize modes (`resize_mode`, never enlarging unless `upscale`):
  shorter_side  shorter side to `size`, aspect ratio kept
  longer_side   longer side to `size`, aspect ratio kept
  center_crop   shorter side to `size`, then the centred square
  pad           longer side to `size`, then padded with black borders to a square
  none          decoded and re-encoded at its own size (an upright RGB JPEG is copied as it is)

    python -m landmarks.shard --selection results/select/selection.parquet --images results/download/images \
        --split train --part 0 --out-dir results/shards/train/part-00 --settings '{"size": 160, "parts": 1}'

takes config.yaml's shard section as `--settings` (its `size` must be a number here: the workflow resolves
null to the largest size an experiment reads); the job's processes come from `--threads`.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import tarfile
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, JpegImagePlugin
from tqdm import tqdm

from .common import StageError, atomic_path, read_table, run_cli, setup_logging, write_json_atomic, write_table
from .config import ConfigError, add_settings_argument, parse_settings
from .images import exif_orientation, to_rgb, turn_upright
from .tables import SHARD_INDEX_COLUMNS, SHARD_SKIPPED_COLUMNS, SPLITS

log = logging.getLogger("landmarks.shard")

RESIZE_MODES = ("shorter_side", "longer_side", "center_crop", "pad", "none")
# Pillow refuses images above this many pixels by default; the download stage already rejects bombs.
Image.MAX_IMAGE_PIXELS = 200_000_000

SHARD_NAME = re.compile(r"^shard-(\d{2,})-(\d{5,})\.tar$")


# ---------------------------------------------------------------------------------------------------
# Decoding and resizing one image


def target_scale(width: int, height: int, mode: str, size: int, upscale: bool) -> float:
    """The factor an upright image of this size is scaled by (1.0 = unchanged)."""
    if mode == "none":
        return 1.0
    side = max(width, height) if mode in ("longer_side", "pad") else min(width, height)
    scale = size / side
    return scale if (scale < 1.0 or upscale) else 1.0


def output_size(width: int, height: int, mode: str, size: int, upscale: bool) -> tuple[int, int]:
    """Size after scaling (before the square crop or padding of center_crop/pad)."""
    scale = target_scale(width, height, mode, size, upscale)
    if scale == 1.0:
        return width, height
    return max(1, round(width * scale)), max(1, round(height * scale))


def _square(image: Image.Image, mode: str) -> Image.Image:
    if mode == "center_crop" and image.width != image.height:
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        return image.crop((left, top, left + side, top + side))
    if mode == "pad" and image.width != image.height:
        side = max(image.size)
        canvas = Image.new("RGB", (side, side), (0, 0, 0))
        canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        return canvas
    return image


def _decode(image: Image.Image, mode: str, size: int, upscale: bool, draft: bool) -> tuple[Image.Image, bool]:
    """(upright RGB image in its final size, whether the pixels are the file's own, untouched).

    The rules of `images.decode_rgb`, with a resize between decoding and turning upright. For JPEGs,
    `draft` lets libjpeg decode at 1/2, 1/4 or 1/8 scale (DCT scaling), so a 4000-px photo
    is never fully decoded to make a 256-px image; the exact size then comes from a small resize.
    """
    orientation = exif_orientation(image)
    swapped = orientation in (5, 6, 7, 8)
    stored_w, stored_h = image.size
    upright_w, upright_h = (stored_h, stored_w) if swapped else (stored_w, stored_h)
    target_w, target_h = output_size(upright_w, upright_h, mode, size, upscale)
    stored_target = (target_h, target_w) if swapped else (target_w, target_h)
    original_mode = image.mode
    if draft and isinstance(image, JpegImagePlugin.JpegImageFile) and stored_target[0] < stored_w:  # MPO too
        image.draft("RGB", stored_target)  # picks the largest DCT scale that stays >= the target
    image.load()
    drafted = image.size != (stored_w, stored_h)
    image = to_rgb(image)
    resized = image.size != stored_target
    if resized:
        image = image.resize(stored_target, Image.Resampling.BICUBIC, reducing_gap=3.0)
    image = turn_upright(image, orientation)
    squared = _square(image, mode)
    untouched = original_mode == "RGB" and not (drafted or resized) and orientation == 1 and squared is image
    return squared, untouched


def load_resized(path: str | Path, mode: str, size: int, upscale: bool = False, *, draft: bool = True) -> Image.Image:
    """Decode `path` to an upright RGB image resized per `mode` (see the module docstring)."""
    with Image.open(path) as image:
        result, _ = _decode(image, mode, size, upscale, draft)
    return result


def encode_resized(
    path: str | Path, mode: str, size: int, upscale: bool = False, quality: int = 90, *, draft: bool = True
) -> tuple[bytes, int, int]:
    """(JPEG bytes, width, height) of the resized image. A JPEG that needs no change (upright RGB at its
    target size) is stored as it is: re-encoding it would only lose quality."""
    with open(path, "rb") as fh:
        data = fh.read()
    with Image.open(io.BytesIO(data)) as image:
        source_format = image.format
        result, untouched = _decode(image, mode, size, upscale, draft)
    if untouched and source_format == "JPEG":
        return data, result.width, result.height
    buffer = io.BytesIO()
    result.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue(), result.width, result.height


def _encode_one(task):
    """Worker: (row, path, mode, size, upscale, quality) -> (row, jpeg bytes, width, height, error)."""
    row, path, mode, size, upscale, quality = task
    if path is None:
        return row, None, None, None, "no image path in the selection"
    try:
        data, width, height = encode_resized(path, mode, size, upscale, quality)
        return row, data, width, height, None
    except Exception as err:
        return row, None, None, None, f"{type(err).__name__}: {err}"


def _encode_chunk(tasks):
    return [_encode_one(task) for task in tasks]


def encode_all(tasks: list, processes: int, chunk: int = 8):
    """Yield `_encode_one` results in task order, decoding in `processes` worker processes.

    At most a few chunks per process are in flight, so memory stays flat however long the split is; a
    crashed worker raises BrokenProcessPool instead of hanging the stage.
    """
    if processes <= 1 or len(tasks) <= chunk:
        yield from map(_encode_one, tasks)
        return
    # forkserver, not fork: the parent may hold threads (pyarrow's pool) that make fork unsafe. The server
    # imports the heavy dependencies once and forks the workers from it, so each starts in a fraction of
    # the second a fresh interpreter needs to import pandas (this module itself is re-run per worker).
    context = get_context("forkserver")
    context.set_forkserver_preload(["numpy", "pandas", "PIL.Image", "landmarks.common"])
    pool = ProcessPoolExecutor(processes, mp_context=context)
    try:
        in_flight = deque()
        for start in range(0, len(tasks), chunk):
            in_flight.append(pool.submit(_encode_chunk, tasks[start : start + chunk]))
            if len(in_flight) >= 4 * processes:
                yield from in_flight.popleft().result()
        while in_flight:
            yield from in_flight.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def usable_cores() -> int:
    """Cores this job may use (SLURM and taskset restrict the affinity mask, not os.cpu_count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------------
# Which rows a job writes


def webdataset_key(image_id: str) -> str:
    """WebDataset splits a member name at its first '.', so keys carry no dots."""
    return image_id.replace(".", "_")


def split_rows(selection: pd.DataFrame, split: str, seed: int) -> pd.DataFrame:
    """All rows of `split` in shard order: sorted by id (independent of the selection's row order), then
    a seeded shuffle, which mixes classes across shards. Duplicate ids or colliding keys are errors."""
    rows = selection[selection["split"] == split].sort_values("id", kind="stable").reset_index(drop=True)
    duplicated = rows.loc[rows["id"].duplicated(), "id"]
    if len(duplicated):
        raise StageError(
            f"selection: id {duplicated.iloc[0]!r} appears more than once in split {split!r} "
            f"({len(duplicated)} duplicated ids)"
        )
    keys = rows["id"].map(webdataset_key)
    clash = keys.duplicated(keep=False)
    if clash.any():
        ids = rows.loc[clash, "id"].tolist()[:2]
        raise StageError(
            f"selection: ids {ids[0]!r} and {ids[1]!r} map to the same WebDataset key "
            f"{webdataset_key(ids[0])!r} ('.' becomes '_'); rename one of them"
        )
    order = np.random.default_rng(seed).permutation(len(rows))
    return rows.iloc[order].reset_index(drop=True)


def part_rows(selection: pd.DataFrame, split: str, part: int, parts: int, seed: int) -> pd.DataFrame:
    """Rows of `split` that job `part` of `parts` writes: every `parts`-th row of the shard order, so the
    parts are disjoint, cover the split, and differ in size by at most one image."""
    if not 0 <= part < parts:
        raise StageError(f"--part {part} is outside 0..{parts - 1} (shard.parts {parts})")
    return split_rows(selection, split, seed).iloc[part::parts].reset_index(drop=True)


# ---------------------------------------------------------------------------------------------------
# Writing tar shards


def _padded(size: int) -> int:
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


class ShardWriter:
    """Writes numbered tar shards atomically, starting a new one before a sample would break the image
    count or the byte limit. The byte limit is the tar file's size on disk (headers, padding and the
    end-of-archive record included); a single sample larger than the limit gets a shard of its own."""

    ENCODING = "utf-8"

    def __init__(self, out_dir: Path, prefix: str, max_count: int, max_bytes: int):
        self.out_dir, self.prefix = out_dir, prefix
        self.max_count, self.max_bytes = max_count, max_bytes
        self.number, self.count = 0, 0
        self.names: list[str] = []
        self.tar = None
        self._atomic = None
        self.name = None

    def _open(self):
        self.name = f"{self.prefix}-{self.number:05d}.tar"
        self._atomic = atomic_path(self.out_dir / self.name)
        tmp = self._atomic.__enter__()
        # PAX: ids longer than 100 characters; a fixed encoding keeps the bytes the same everywhere.
        self.tar = tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT, encoding=self.ENCODING)
        self.count = 0

    def _close(self):
        if self.tar is not None:
            self.tar.close()
            self._atomic.__exit__(None, None, None)
            self.names.append(self.name)
            self.tar, self.number = None, self.number + 1

    def _file_size_with(self, extra: int) -> int:
        """The shard's size on disk if it were closed after `extra` more bytes of members."""
        end = self.tar.offset + extra + 2 * tarfile.BLOCKSIZE
        return -(-end // tarfile.RECORDSIZE) * tarfile.RECORDSIZE

    def write(self, key: str, members: dict[str, bytes]) -> tuple[str, int, int]:
        """Add one sample; returns (shard name, byte offset, size) of its first member's data, so
        readers can fetch or range-read the image without parsing the tar."""
        entries = []
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed mtime: reproducible bytes
            entries.append((info, data, info.tobuf(tarfile.PAX_FORMAT, self.ENCODING, "surrogateescape")))
        sample_bytes = sum(len(header) + _padded(len(data)) for _, data, header in entries)
        if self.tar is not None and (
            self.count >= self.max_count or self._file_size_with(sample_bytes) > self.max_bytes
        ):
            self._close()
        if self.tar is None:
            self._open()
            if self._file_size_with(sample_bytes) > self.max_bytes:
                log.warning(
                    "%s alone (%d bytes in tar) exceeds max_shard_bytes=%d: it gets a shard of its own",
                    key,
                    sample_bytes,
                    self.max_bytes,
                )
        offset = self.tar.offset + len(entries[0][2])  # the first member's data follows its header
        for info, data, _ in entries:
            self.tar.addfile(info, io.BytesIO(data))
        self.count += 1
        return self.name, offset, len(entries[0][1])

    def close(self):
        self._close()

    def abort(self):
        """Drop the shard being written (its temporary file); finished shards stay."""
        if self.tar is not None:
            self.tar.close()
            error = RuntimeError("aborted")
            self._atomic.__exit__(type(error), error, None)
            self.tar = None


def _remove_stale_outputs(out_dir: Path, part: int) -> list[Path]:
    """Remove the earlier tables of this part in `out_dir`; returns its earlier numbered shards, which
    this run overwrites or, when it writes fewer, `_remove_unreplaced` removes after it."""
    stale = [out_dir / name for name in ("index.parquet", "skipped.parquet", "shard.json")]
    stale += [p for p in out_dir.glob(f"shard-{part:02d}-*.tar") if SHARD_NAME.match(p.name)]
    stale = [p for p in stale if p.exists()]
    for path in stale:
        if path.suffix != ".tar":
            path.unlink()
    return [p for p in stale if p.suffix == ".tar"]


def _remove_unreplaced(stale_shards: list[Path], written: list[str]) -> None:
    """Shards of an earlier, longer run that this one did not overwrite."""
    for path in stale_shards:
        if path.name not in written:
            path.unlink()


# shard_split's keyword arguments that config.yaml's shard section holds
RESIZE_SETTINGS = ("resize_mode", "size", "upscale", "jpeg_quality", "images_per_shard", "max_shard_bytes", "seed")


def check_settings(resize_mode: str, size: int, jpeg_quality: int, images_per_shard: int, max_shard_bytes: int):
    """A StageError naming the first shard setting out of range."""
    if resize_mode not in RESIZE_MODES:
        raise StageError(f"shard.resize_mode: unknown mode {resize_mode!r} (choose from {', '.join(RESIZE_MODES)})")
    for name, value, low in (
        ("size", size, 1),
        ("jpeg_quality", jpeg_quality, 1),
        ("images_per_shard", images_per_shard, 1),
        ("max_shard_bytes", max_shard_bytes, 1),
    ):
        if value < low:
            raise StageError(f"shard.{name}: must be at least {low}, got {value}")
    if not 1 <= jpeg_quality <= 100:
        raise StageError(f"shard.jpeg_quality: must be 1..100, got {jpeg_quality}")


def shard_split(
    selection: pd.DataFrame,
    images_root: Path,
    split: str,
    part: int,
    parts: int,
    out_dir: Path,
    *,
    resize_mode: str = "shorter_side",
    size: int = 160,
    upscale: bool = False,
    jpeg_quality: int = 90,
    images_per_shard: int = 1000,
    max_shard_bytes: int = 1_000_000_000,
    seed: int = 0,
    threads: int = 1,
) -> dict:
    """Resize and shard one part of one split; returns counts. Writes index.parquet last."""
    check_settings(resize_mode, size, jpeg_quality, images_per_shard, max_shard_bytes)
    rows = part_rows(selection, split, part, parts, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The old index must go first: it would describe shards that this run overwrites.
    stale_shards = _remove_stale_outputs(out_dir, part)
    processes = max(1, min(threads, usable_cores()))
    tasks = [
        (i, None if pd.isna(p) else str(images_root / p), resize_mode, size, upscale, jpeg_quality)
        for i, p in enumerate(rows["path"])
    ]
    writer = ShardWriter(out_dir, f"shard-{part:02d}", images_per_shard, max_shard_bytes)
    started = time.perf_counter()
    index, skipped = write_shards(writer, rows, tasks, processes, split, part)
    _remove_unreplaced(stale_shards, writer.names)
    elapsed = time.perf_counter() - started
    counts = {
        "split": split,
        "part": part,
        "parts": parts,
        "rows": len(rows),
        "written": len(index),
        "skipped": len(skipped),
        "shards": writer.number,
        "processes": processes,
        "seconds": round(elapsed, 2),
    }
    settings = dict(
        zip(RESIZE_SETTINGS, (resize_mode, size, upscale, jpeg_quality, images_per_shard, max_shard_bytes, seed))
    )
    write_part_tables(out_dir, index, skipped, {**counts, "settings": settings, "shard_files": writer.names})
    log.info(
        "%s part %d/%d: %d rows -> %d images in %d shards, %d skipped (%.1f images/s on %d processes)",
        *(counts[key] for key in ("split", "part", "parts", "rows", "written", "shards", "skipped")),
        len(index) / max(elapsed, 1e-9),
        processes,
    )
    return counts


def write_part_tables(out_dir: Path, index: list[dict], skipped: list[dict], record: dict) -> None:
    """skipped.parquet, shard.json and, last, index.parquet (its presence marks the part complete)."""
    index_df = pd.DataFrame(index, columns=SHARD_INDEX_COLUMNS)
    index_df["landmark_id"] = index_df["landmark_id"].astype("Int64")
    write_table(pd.DataFrame(skipped, columns=SHARD_SKIPPED_COLUMNS), out_dir / "skipped.parquet")
    write_json_atomic(out_dir / "shard.json", record)
    write_table(index_df, out_dir / "index.parquet")


def write_shards(writer: ShardWriter, rows: pd.DataFrame, tasks: list, processes: int, split: str, part: int):
    """(index rows, skipped rows): encode the tasks (one per row) and write each image that decodes into
    the shards, in row order; closes the writer, or aborts it on any error."""
    index, skipped = [], []
    try:
        for i, data, width, height, error in tqdm(
            encode_all(tasks, processes), total=len(tasks), desc=f"shard {split}/{part}", unit="img", mininterval=2.0
        ):
            row = rows.iloc[i]
            if error is not None:
                skipped.append({"id": row["id"], "path": row["path"], "error": error})
                log.warning("skipping %s (%s): %s", row["id"], row["path"], error)
                continue
            index.append(write_sample(writer, row, split, data, width, height))
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return index, skipped


def write_sample(writer: ShardWriter, row: pd.Series, split: str, data: bytes, width: int, height: int) -> dict:
    """Write one encoded image with its label and metadata as a webdataset sample; its index row."""
    landmark = None if pd.isna(row["landmark_id"]) else int(row["landmark_id"])
    key = webdataset_key(row["id"])
    meta = {"id": row["id"], "landmark_id": landmark, "split": split, "width": width, "height": height}
    shard_name, offset, nbytes = writer.write(
        key,
        {
            "jpg": data,
            "cls": str(-1 if landmark is None else landmark).encode(),
            "json": json.dumps(meta, sort_keys=True).encode(),
        },
    )
    return {
        "shard": shard_name,
        "key": key,
        "id": row["id"],
        "landmark_id": landmark,
        "width": width,
        "height": height,
        "offset": offset,
        "size": nbytes,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m landmarks.shard", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--selection", required=True, help="selection.parquet from the select stage")
    parser.add_argument("--images", required=True, help="images root the selection's paths are relative to")
    parser.add_argument("--split", required=True, choices=SPLITS)
    parser.add_argument("--part", type=int, default=0, help="which of the split's `parts` this job writes (0-based)")
    parser.add_argument("--out-dir", required=True)
    add_settings_argument(parser, "shard")
    parser.add_argument(
        "--threads", type=int, default=1, help="decode/resize processes (capped at the cores this job may use)"
    )
    args = parser.parse_args(argv)
    setup_logging()
    settings = parse_settings(args.settings, "shard")
    parts = settings["parts"]
    if not 0 <= args.part < parts:
        raise StageError(f"--part {args.part} is outside 0..{parts - 1} (shard.parts {parts})")
    if settings["size"] is None:
        raise ConfigError("--settings: key 'shard.size': give the side in pixels (the workflow fills in null)")
    selection = read_table(args.selection)
    missing = {"id", "landmark_id", "split", "path"} - set(selection.columns)
    if missing:
        raise StageError(f"{args.selection}: missing columns {sorted(missing)}")
    shard_split(
        selection,
        Path(args.images),
        args.split,
        args.part,
        parts,
        Path(args.out_dir),
        **{key: settings[key] for key in RESIZE_SETTINGS},
        threads=args.threads,
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
