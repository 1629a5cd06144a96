"""Stage `embed`: L2-normalised embeddings of one split's images with a trained model.

Writes `<split>.npy` (float16 by default; row i is the i-th image of the shards' index) and
`<split>.ids.parquet` with the same rows in the same order (id, landmark_id, and the shard and key each
row came from). Images are read once, in batches; on a GPU the model runs under bf16 autocast (AMP).

Test-time augmentation (optional): the image at several scales (embed.scales `[1.0, 0.75]`) and, with
embed.flip_tta, each of those mirrored. Every view's embedding is L2-normalised, the views are averaged,
and the average is L2-normalised again, so every stored row has unit length. With embed.whole_image, each
photo is embedded whole at its aspect ratio instead of as its centred square.

The array is written straight into a memory-mapped temporary file (renamed into place at the end), so
memory stays flat however many images the split holds.

    python -m landmarks.embed --model results/experiments/X/train/model.pt \
        --shards results/shards/test/part-00 --out results/experiments/X/embed/test.npy \
        --settings '{"flip_tta": true}'   # config.yaml's embed section; defaults fill the rest
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .common import StageError, atomic_path, read_table, run_cli, setup_logging, write_table
from .config import add_settings_argument, parse_settings
from .device import pick_device
from .embedding import MultiScaleTransform, embed_dataset, embed_views, tta_sizes
from .loader import ShardDataset, ShardIndex
from .tables import EMBEDDING_IDS_COLUMNS

log = logging.getLogger("landmarks.embed")


@torch.no_grad()
def compute_embeddings(
    model,
    index: ShardIndex,
    image_size: int,
    *,
    batch_size: int = 64,
    workers: int = 0,
    device: torch.device | None = None,
    flip: bool = False,
    scales=(1.0,),
    whole_image: bool = False,
    progress: bool = True,
    amp: bool = True,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """L2-normalised embeddings (len(index), dim) in index order.

    `out`, when given, is filled and returned (e.g. a float16 memory map); otherwise a float32 array is
    allocated. Each view (scale x flip) is normalised, the views averaged, the average normalised.
    """
    device = device or torch.device("cpu")
    sizes = tta_sizes(image_size, scales)
    n, dim = len(index), model.embedding_dim
    if out is None:
        out = np.zeros((n, dim), np.float32)
    elif out.shape != (n, dim):
        raise StageError(f"embed: output array has shape {out.shape}, expected {(n, dim)}")
    model.to(device)
    model.to(memory_format=torch.channels_last)  # faster on GPUs and CPUs alike (oneDNN's NHWC kernels)

    def refuse_non_finite(batch: np.ndarray, rows: np.ndarray) -> None:
        if not np.isfinite(batch).all():
            bad = index.table["id"].to_numpy()[rows[~np.isfinite(batch).all(axis=1)]]
            raise StageError(f"embed: non-finite embeddings for images {bad.tolist()[:5]}")

    written = embed_dataset(
        model,
        ShardDataset(
            index,
            MultiScaleTransform(sizes, model.data_config["mean"], model.data_config["std"], whole_image=whole_image),
        ),
        lambda views_by_scale: embed_views(model, views_by_scale, device, flip=flip, amp=amp),
        out,
        batch_size=batch_size,
        workers=workers,
        device=device,
        progress=progress,
        desc=f"embed {n} images @{'/'.join(map(str, sizes))}px",
        check=refuse_non_finite,
    )
    if not written.all():
        missing = index.table.loc[~written, ["id", "shard", "key"]].head(3).to_dict("records")
        raise StageError(
            f"embed: {int((~written).sum())} images of the index were not found in their shards, e.g. {missing}"
        )
    return out


def ids_path(embeddings_path: str | Path) -> Path:
    embeddings_path = Path(embeddings_path)
    return embeddings_path.with_name(embeddings_path.stem + ".ids.parquet")


def id_table(index: ShardIndex) -> pd.DataFrame:
    """The rows of the embedding array: id, landmark_id (nullable) and where each image came from."""
    table = index.table
    ids = pd.DataFrame(
        {
            "id": table["id"].astype(str).to_numpy(),
            "landmark_id": table["landmark_id"].astype("Int64").to_numpy(),
            "shard": table["shard"].astype(str).to_numpy(),
            "key": table["key"].astype(str).to_numpy(),
        }
    )
    return ids[EMBEDDING_IDS_COLUMNS]


def write_embeddings(embeddings: np.ndarray, ids: pd.DataFrame, out: Path, dtype: str = "float16") -> None:
    """Array and id table side by side, each written atomically; the id table is the second file."""
    if len(ids) != len(embeddings):
        raise StageError(f"{out}: {len(embeddings)} embeddings but {len(ids)} ids")
    with atomic_path(out, suffix=".npy") as tmp:
        np.save(tmp, np.asarray(embeddings).astype(dtype))
    write_table(ids.reset_index(drop=True), ids_path(out))


def embed_to_file(model, index: ShardIndex, image_size: int, out: Path, *, dtype: str = "float16", **options) -> None:
    """Embed `index` into `out` (.npy, via a memory map renamed into place) and its id table beside it."""
    if dtype not in ("float16", "float32"):
        raise StageError(f"embed.dtype: {dtype!r} is not float16 or float32")
    with atomic_path(out, suffix=".npy") as tmp:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(len(index), model.embedding_dim))
        compute_embeddings(model, index, image_size, out=array, **options)
        array.flush()
        del array
    write_table(id_table(index), ids_path(out))


def load_embeddings(path: str | Path, *, mmap: bool = False) -> tuple[np.ndarray, pd.DataFrame]:
    """(embeddings, id table), checked to line up.

    float32 by default; with `mmap`, the array as stored (float16 or float32), memory-mapped, for
    callers that stream through databases larger than memory.
    """
    path = Path(path)
    if not path.exists():
        raise StageError(f"{path}: embeddings not found")
    if not ids_path(path).exists():
        raise StageError(f"{path}: its id table {ids_path(path)} is missing")
    try:
        embeddings = np.load(path, mmap_mode="r" if mmap else None)
    except (ValueError, OSError) as err:
        raise StageError(f"{path}: not a readable .npy array ({err})") from err
    if embeddings.ndim != 2:
        raise StageError(f"{path}: expected a 2-d array (images x dimensions), got shape {embeddings.shape}")
    if not mmap:
        embeddings = embeddings.astype(np.float32)
    ids = read_table(ids_path(path))
    if len(ids) != len(embeddings):
        raise StageError(f"{path}: {len(embeddings)} embeddings but {len(ids)} ids in {ids_path(path)}")
    if "id" not in ids.columns or "landmark_id" not in ids.columns:
        raise StageError(f"{ids_path(path)}: expected columns id and landmark_id, found {list(ids.columns)}")
    return embeddings, ids


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m landmarks.embed", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="model.pt written by the train stage")
    parser.add_argument(
        "--shards", nargs="+", required=True, help="shard folders of the split (each with index.parquet)"
    )
    parser.add_argument("--out", required=True, help="output .npy (the id table goes beside it as .ids.parquet)")
    add_settings_argument(parser, "embed")  # image_size null: the training image size
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    setup_logging()
    settings = parse_settings(args.settings, "embed")
    settings["scales"] = [float(scale) for scale in settings["scales"]]  # 1 in config.yaml is 1.0
    if args.threads:
        torch.set_num_threads(args.threads)
    from .model import model_from_checkpoint

    if not Path(args.model).exists():
        raise StageError(f"{args.model}: model checkpoint not found")
    device = pick_device(args.device)
    model, checkpoint = model_from_checkpoint(args.model)
    image_size = settings["image_size"] or checkpoint["settings"]["image_size"]
    index = ShardIndex.from_dirs(args.shards)
    started = time.perf_counter()
    embed_to_file(
        model,
        index,
        image_size,
        Path(args.out),
        dtype=settings["dtype"],
        batch_size=settings["batch_size"],
        workers=settings["workers"],
        device=device,
        flip=settings["flip_tta"],
        scales=settings["scales"],
        whole_image=settings["whole_image"],
        progress=not args.no_progress,
        amp=settings["amp"],
    )
    elapsed = time.perf_counter() - started
    views = len(settings["scales"]) * (2 if settings["flip_tta"] else 1)
    log.info(
        "embedded %d images (%d-d, %s, %d view(s) each: scales %s, flip %s, %s) on %s%s in %.1f s (%.1f images/s) -> %s",
        len(index),
        model.embedding_dim,
        settings["dtype"],
        views,
        settings["scales"],
        settings["flip_tta"],
        "whole photos" if settings["whole_image"] else "centred squares",
        device,
        " with bf16 AMP" if settings["amp"] and device.type == "cuda" else "",
        elapsed,
        len(index) / max(elapsed, 1e-9),
        args.out,
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
