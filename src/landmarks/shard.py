"""Stage `shard`: resize the selected images once and pack them into WebDataset tar shards.

One job handles part k of K of one split. It writes `shard-<k>-<n>.tar` files (each `<key>.jpg`,
`<key>.cls`, `<key>.json`) and `index.parquet` (shard, key, id, landmark_id, width, height, offset, size) into its
output folder. Images that cannot be decoded are recorded in `skipped.parquet`, never fatal.

    python -m landmarks.shard --selection results/select/selection.parquet --images results/download/images \
        --split train --part 0 --parts 1 --out-dir results/shards/train/part-00
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import tarfile
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageOps
from tqdm import tqdm

from .common import StageError, atomic_path, read_table, run_cli, setup_logging, write_table

log = logging.getLogger("landmarks.shard")

RESIZE_MODES = ("shorter_side", "longer_side", "center_crop", "pad", "none")
SPLITS = ("train", "val", "test", "nonlandmark")
# offset/size locate the JPEG bytes inside the tar, for random access (e.g. P x K class sampling).
INDEX_COLUMNS = ["shard", "key", "id", "landmark_id", "width", "height", "offset", "size"]
# Pillow refuses images above this many pixels by default; the download stage already rejects bombs.
Image.MAX_IMAGE_PIXELS = 200_000_000


def target_scale(width: int, height: int, mode: str, size: int, upscale: bool) -> float:
    """The factor the image is scaled by (1.0 = unchanged); rotation by EXIF doesn't change it."""
    if mode == "none":
        return 1.0
    side = max(width, height) if mode in ("longer_side", "pad") else min(width, height)
    scale = size / side
    return scale if (scale < 1.0 or upscale) else 1.0


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB for every input mode: CMYK, 16-bit, palette, grayscale; transparency composited onto white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grayscale: keep the top 8 bits instead of clipping everything to white.
        array = np.asarray(image, dtype=np.uint32) >> 8 if image.mode != "I" else np.asarray(image)
        image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode != "RGB":
        return image.convert("RGB")
    return image


def load_resized(path: str | Path, mode: str, size: int, upscale: bool = False) -> Image.Image:
    """Decode `path` to an upright RGB image resized per `mode`.

    For JPEGs, `draft` lets libjpeg decode at 1/2, 1/4 or 1/8 scale (DCT scaling), so a 4000-px photo
    is never fully decoded to make a 256-px image.
    """
    with Image.open(path) as image:
        scale = target_scale(image.width, image.height, mode, size, upscale)
        if scale < 1.0 and image.format == "JPEG":
            image.draft("RGB", (math.ceil(image.width * scale), math.ceil(image.height * scale)))
        image = ImageOps.exif_transpose(image)
        image = to_rgb(image)
    if mode == "none":
        return image
    scale = target_scale(image.width, image.height, mode, size, upscale)
    new_size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    if new_size != image.size:
        image = image.resize(new_size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    if mode == "center_crop":
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    elif mode == "pad":
        side = max(image.size)
        canvas = Image.new("RGB", (side, side), (0, 0, 0))
        canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        image = canvas
    return image


def _encode_one(task):
    """Worker: (row index, path, settings) -> (row index, jpeg bytes, width, height, error)."""
    index, path, mode, size, upscale, quality = task
    try:
        image = load_resized(path, mode, size, upscale)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        return index, buffer.getvalue(), image.width, image.height, None
    except Exception as err:  # any decode failure is recorded and skipped, never fatal
        return index, None, None, None, f"{type(err).__name__}: {err}"


def webdataset_key(image_id: str) -> str:
    """WebDataset splits a member name at its first '.', so keys carry no dots."""
    return image_id.replace(".", "_")


def part_rows(selection: pd.DataFrame, split: str, part: int, parts: int, seed: int) -> pd.DataFrame:
    """Rows of `split` handled by job `part`: a seeded shuffle (mixes classes across shards), then every
    `parts`-th row. Sorting by id first makes the result independent of the selection's row order."""
    rows = selection[selection["split"] == split].sort_values("id", kind="stable")
    order = np.random.default_rng(seed).permutation(len(rows))
    rows = rows.iloc[order]
    return rows.iloc[part::parts].reset_index(drop=True)


class ShardWriter:
    """Writes numbered tar shards atomically, starting a new one at a count or byte limit."""

    def __init__(self, out_dir: Path, prefix: str, max_count: int, max_bytes: int):
        self.out_dir, self.prefix = out_dir, prefix
        self.max_count, self.max_bytes = max_count, max_bytes
        self.number, self.count, self.size = 0, 0, 0
        self.tar = None
        self._atomic = None
        self.name = None

    def _open(self):
        self.name = f"{self.prefix}-{self.number:05d}.tar"
        self._atomic = atomic_path(self.out_dir / self.name)
        tmp = self._atomic.__enter__()
        self.tar = tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT)  # PAX: ids longer than 100 characters
        self.count, self.size = 0, 0

    def _close(self):
        if self.tar is not None:
            self.tar.close()
            self._atomic.__exit__(None, None, None)
            self.tar, self.number = None, self.number + 1

    def write(self, key: str, members: dict[str, bytes]) -> tuple[str, int, int]:
        """Add one sample; returns (shard name, byte offset, size) of its first member's data, so
        readers can also fetch the image by seeking instead of streaming the whole tar."""
        sample_bytes = sum(len(v) for v in members.values())
        if self.tar is not None and (self.count >= self.max_count or
                                     self.size + sample_bytes > self.max_bytes):
            self._close()
        if self.tar is None:
            self._open()
        first = None
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed mtime: reproducible bytes
            self.tar.addfile(info, io.BytesIO(data))
            if first is None:  # the data ends at tar.offset, padded to a 512-byte block
                first = self.tar.offset - tarfile.BLOCKSIZE * -(-len(data) // tarfile.BLOCKSIZE), len(data)
        self.count += 1
        self.size += sample_bytes
        return self.name, first[0], first[1]

    def close(self):
        self._close()

    def abort(self):
        """Drop the shard being written (its temporary file); finished shards stay."""
        if self.tar is not None:
            self.tar.close()
            error = RuntimeError("aborted")
            self._atomic.__exit__(type(error), error, None)
            self.tar = None


def shard_split(selection: pd.DataFrame, images_root: Path, split: str, part: int, parts: int,
                out_dir: Path, *, resize_mode: str = "shorter_side", size: int = 160,
                upscale: bool = False, jpeg_quality: int = 90, images_per_shard: int = 1000,
                max_shard_bytes: int = 1_000_000_000, seed: int = 0, threads: int = 1) -> dict:
    """Resize and shard one part of one split; returns counts. Writes index.parquet last."""
    if resize_mode not in RESIZE_MODES:
        raise StageError(f"unknown resize mode {resize_mode!r} (choose from {', '.join(RESIZE_MODES)})")
    rows = part_rows(selection, split, part, parts, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = [(i, str(images_root / p), resize_mode, size, upscale, jpeg_quality)
             for i, p in enumerate(rows["path"])]
    writer = ShardWriter(out_dir, f"shard-{part:02d}", images_per_shard, max_shard_bytes)
    index, skipped = [], []
    started = time.perf_counter()
    pool = get_context("spawn").Pool(threads) if threads > 1 and len(tasks) > 1 else None
    try:
        results = pool.imap(_encode_one, tasks, chunksize=8) if pool else map(_encode_one, tasks)
        for i, data, width, height, error in tqdm(results, total=len(tasks), desc=f"shard {split}/{part}",
                                                  unit="img", mininterval=2.0):
            row = rows.iloc[i]
            if error is not None:
                skipped.append({"id": row["id"], "path": row["path"], "error": error})
                log.warning("skipping %s (%s): %s", row["id"], row["path"], error)
                continue
            landmark = None if pd.isna(row["landmark_id"]) else int(row["landmark_id"])
            key = webdataset_key(row["id"])
            meta = {"id": row["id"], "landmark_id": landmark, "split": split,
                    "width": width, "height": height}
            shard_name, offset, size = writer.write(key, {
                "jpg": data,
                "cls": str(-1 if landmark is None else landmark).encode(),
                "json": json.dumps(meta, sort_keys=True).encode(),
            })
            index.append({"shard": shard_name, "key": key, "id": row["id"], "landmark_id": landmark,
                          "width": width, "height": height, "offset": offset, "size": size})
    except BaseException:
        writer.abort()
        raise
    else:
        writer.close()
    finally:
        if pool:
            pool.close()
            pool.join()
    elapsed = time.perf_counter() - started
    index_df = pd.DataFrame(index, columns=INDEX_COLUMNS)
    index_df["landmark_id"] = index_df["landmark_id"].astype("Int64")
    write_table(pd.DataFrame(skipped, columns=["id", "path", "error"]), out_dir / "skipped.parquet")
    write_table(index_df, out_dir / "index.parquet")
    counts = {"split": split, "part": part, "rows": len(rows), "written": len(index_df),
              "skipped": len(skipped), "shards": writer.number, "seconds": round(elapsed, 2)}
    log.info("%s part %d: %d rows -> %d images in %d shards, %d skipped (%.1f images/s)", split, part,
             len(rows), len(index_df), writer.number, len(skipped), len(index_df) / max(elapsed, 1e-9))
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m landmarks.shard", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--selection", required=True, help="selection.parquet from the select stage")
    parser.add_argument("--images", required=True, help="images root the selection's paths are relative to")
    parser.add_argument("--split", required=True, choices=SPLITS)
    parser.add_argument("--part", type=int, default=0, help="which part of the split this job writes")
    parser.add_argument("--parts", type=int, default=1, help="how many shard jobs share the split")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--resize-mode", default="shorter_side", choices=RESIZE_MODES)
    parser.add_argument("--size", type=int, default=160, help="target side in pixels (see --resize-mode)")
    parser.add_argument("--upscale", action="store_true", help="also enlarge images smaller than --size")
    parser.add_argument("--jpeg-quality", type=int, default=90)
    parser.add_argument("--images-per-shard", type=int, default=1000)
    parser.add_argument("--max-shard-bytes", type=int, default=1_000_000_000)
    parser.add_argument("--seed", type=int, default=0, help="order of images in the shards")
    parser.add_argument("--threads", type=int, default=1, help="decode/resize processes")
    args = parser.parse_args(argv)
    setup_logging()
    if not 0 <= args.part < args.parts:
        raise StageError(f"--part {args.part} is outside 0..{args.parts - 1}")
    selection = read_table(args.selection)
    missing = {"id", "landmark_id", "split", "path"} - set(selection.columns)
    if missing:
        raise StageError(f"{args.selection}: missing columns {sorted(missing)}")
    shard_split(selection, Path(args.images), args.split, args.part, args.parts, Path(args.out_dir),
                resize_mode=args.resize_mode, size=args.size, upscale=args.upscale,
                jpeg_quality=args.jpeg_quality, images_per_shard=args.images_per_shard,
                max_shard_bytes=args.max_shard_bytes, seed=args.seed, threads=args.threads)
    return 0


if __name__ == "__main__":
    run_cli(main)
