"""Stage `embed`: L2-normalised embeddings of one split's images with a trained model.

Writes `<split>.npy` (float16 by default, rows in the order of the shards' index) and
`<split>.ids.parquet` (id, landmark_id) in the same order. Optional test-time augmentation: horizontal
flip and several scales, averaged and then L2-normalised again.

    python -m landmarks.embed --model results/experiments/X/train/model.pt \
        --shards results/shards/test/part-00 --out results/experiments/X/embed/test.npy
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision import transforms
from tqdm import tqdm

from .common import StageError, atomic_path, run_cli, setup_logging, write_table
from .loader import ShardDataset, ShardIndex

log = logging.getLogger("landmarks.embed")


def eval_transform(image_size: int, mean, std):
    """Shorter side to `image_size`, centre crop, normalise: no augmentation at evaluation time."""
    return transforms.Compose([
        transforms.Resize(image_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise StageError(f"device {name!r} requested but no CUDA GPU is visible")
    return torch.device(name)


@torch.no_grad()
def compute_embeddings(model, index: ShardIndex, image_size: int, *, batch_size: int = 64, workers: int = 0,
                       device: torch.device | None = None, flip: bool = False, scales=(1.0,),
                       progress: bool = True) -> np.ndarray:
    """float32 array (len(index), dim) of L2-normalised embeddings in index order."""
    device = device or torch.device("cpu")
    was_training = model.training
    model.eval().to(device)
    total = torch.zeros(len(index), model.embedding_dim)
    for scale in scales:
        size = max(16, int(round(image_size * scale)))
        transform = eval_transform(size, model.data_config["mean"], model.data_config["std"])
        loader = DataLoader(ShardDataset(index, transform), batch_size=batch_size, num_workers=workers,
                            pin_memory=device.type == "cuda")
        bar = tqdm(loader, total=-(-len(index) // batch_size), desc=f"embed @{size}px", unit="batch",
                   disable=not progress, mininterval=2.0)
        for images, _, positions in bar:
            images = images.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                views = [images, torch.flip(images, dims=[3])] if flip else [images]
                for view in views:
                    total[positions] += F.normalize(model(view).float(), dim=1).cpu()
    model.train(was_training)
    return F.normalize(total, dim=1).numpy()


def write_embeddings(embeddings: np.ndarray, ids: pd.DataFrame, out: Path, dtype: str = "float16") -> None:
    """Array and id table side by side, each written atomically; the id table is the second file."""
    with atomic_path(out, suffix=".npy") as tmp:
        np.save(tmp, embeddings.astype(dtype))
    write_table(ids.reset_index(drop=True), ids_path(out))


def ids_path(embeddings_path: str | Path) -> Path:
    embeddings_path = Path(embeddings_path)
    return embeddings_path.with_name(embeddings_path.stem + ".ids.parquet")


def load_embeddings(path: str | Path) -> tuple[np.ndarray, pd.DataFrame]:
    """(float32 embeddings, id table) and a check that they line up."""
    path = Path(path)
    if not path.exists():
        raise StageError(f"{path}: embeddings not found")
    embeddings = np.load(path).astype(np.float32)
    ids = pd.read_parquet(ids_path(path))
    if len(ids) != len(embeddings):
        raise StageError(f"{path}: {len(embeddings)} embeddings but {len(ids)} ids in {ids_path(path)}")
    return embeddings, ids


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m landmarks.embed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model.pt written by the train stage")
    parser.add_argument("--shards", nargs="+", required=True, help="shard folders of the split (each with index.parquet)")
    parser.add_argument("--out", required=True, help="output .npy (the id table goes beside it as .ids.parquet)")
    parser.add_argument("--image-size", type=int, default=None, help="default: the training image size")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--flip-tta", action="store_true", help="average with the horizontally flipped image")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0], help="multi-scale TTA factors")
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    args = parser.parse_args(argv)
    setup_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    from .model import model_from_checkpoint
    device = pick_device(args.device)
    model, checkpoint = model_from_checkpoint(args.model)
    image_size = args.image_size or checkpoint["settings"]["image_size"]
    index = ShardIndex.from_dirs(args.shards)
    started = time.perf_counter()
    embeddings = compute_embeddings(model, index, image_size, batch_size=args.batch_size, workers=args.workers,
                                    device=device, flip=args.flip_tta, scales=args.scales)
    elapsed = time.perf_counter() - started
    write_embeddings(embeddings, index.table[["id", "landmark_id"]], Path(args.out), args.dtype)
    log.info("embedded %d images (%d-d, %s) on %s in %.1f s (%.1f images/s); TTA flip=%s scales=%s",
             len(index), embeddings.shape[1] if len(embeddings.shape) == 2 else 0, args.dtype, device, elapsed,
             len(index) / max(elapsed, 1e-9), args.flip_tta, args.scales)
    return 0


if __name__ == "__main__":
    run_cli(main)
