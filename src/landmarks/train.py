"""Stage `train`: fine-tune backbone + GeM + embedding with a metric-learning head on the train shards.

Each epoch ends with an evaluation on `val`: val images are embedded, matched against the train
images (top-1 neighbour) and scored with GAP; the best epoch's weights are `model.pt`. Checkpoints
(`last.ckpt`, written atomically every N steps and at each epoch's end) let a killed job resume.

    python -m landmarks.train --train-shards results/shards/train/part-00 --val-shards results/shards/val/part-00 \
        --out-dir results/experiments/X/train --settings '{"epochs": 3}'
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from torchvision import transforms
from tqdm import tqdm

from .common import StageError, atomic_path, run_cli, setup_logging, write_json_atomic
from .config import ConfigError, section_settings
from .embed import compute_embeddings, pick_device
from .loader import ShardDataset, ShardIndex, class_mapping
from .losses import build_head
from .model import LandmarkModel

log = logging.getLogger("landmarks.train")


def train_transform(settings: dict, mean, std):
    aug = settings["augment"]
    steps = [transforms.RandomResizedCrop(settings["image_size"], scale=tuple(aug["random_resized_crop_scale"]),
                                          interpolation=transforms.InterpolationMode.BICUBIC)]
    if aug["hflip"]:
        steps.append(transforms.RandomHorizontalFlip())
    if aug["rotation_degrees"]:
        steps.append(transforms.RandomRotation(aug["rotation_degrees"]))
    if aug["color_jitter"]:
        j = aug["color_jitter"]
        steps.append(transforms.ColorJitter(j, j, j))
    steps += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    return transforms.Compose(steps)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def warmup_cosine(step: int, total_steps: int, warmup_steps: int) -> float:
    """Learning-rate factor: linear warm-up, then cosine decay to zero."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def settings_digest(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def evaluate_val_gap(model, train_index: ShardIndex, val_index: ShardIndex, settings: dict, device) -> dict:
    """GAP / accuracy of top-1 kNN on val against train, as the model selection criterion."""
    from .metrics import score_predictions
    from .retrieve import knn
    if len(val_index) == 0 or len(train_index) == 0:
        return {"val_gap": float("nan"), "val_accuracy": float("nan")}
    size = settings["image_size"]
    db = compute_embeddings(model, train_index, size, device=device, progress=False,
                            batch_size=settings["batch_size"] * 2)
    queries = compute_embeddings(model, val_index, size, device=device, progress=False,
                                 batch_size=settings["batch_size"] * 2)
    cosines, positions = knn(db, queries, 1)
    db_labels = train_index.table["landmark_id"].to_numpy(dtype=np.int64)
    predictions = pd.DataFrame({"id": val_index.table["id"], "landmark_id": db_labels[positions[:, 0]],
                                "score": cosines[:, 0]})
    truth = pd.DataFrame({"id": val_index.table["id"],
                          "landmarks": [[int(x)] for x in val_index.table["landmark_id"]]})
    result = score_predictions(predictions, truth)
    return {"val_gap": result.gap, "val_accuracy": result.accuracy}


def save_checkpoint(path: Path, state: dict) -> None:
    with atomic_path(path, suffix=".pt.part") as tmp:
        torch.save(state, tmp)


def plot_curves(metrics: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    frame = pd.DataFrame(metrics)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    if len(frame):
        axes[0].plot(frame["epoch"], frame["train_loss"], marker="o")
        axes[1].plot(frame["epoch"], frame["val_gap"], marker="o", label="val GAP")
        axes[1].plot(frame["epoch"], frame["val_accuracy"], marker="s", label="val top-1 accuracy")
        axes[1].legend()
    axes[0].set(title="training loss", xlabel="epoch")
    axes[1].set(title="validation (kNN vs train)", xlabel="epoch", ylim=(0, 1))
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def train(train_dirs, val_dirs, out_dir: Path, settings: dict, *, device: torch.device, threads: int | None = None):
    out_dir.mkdir(parents=True, exist_ok=True)
    if threads:
        torch.set_num_threads(threads)
    seed_everything(settings["seed"])
    train_index = ShardIndex.from_dirs(train_dirs)
    val_index = ShardIndex.from_dirs(val_dirs) if val_dirs else ShardIndex.from_dirs([])
    if len(train_index) == 0:
        raise StageError(f"no training images in {', '.join(map(str, train_dirs))}")
    labels = class_mapping(train_index.table["landmark_id"])
    counts = torch.bincount(torch.tensor([labels[int(x)] for x in train_index.table["landmark_id"]]),
                            minlength=len(labels))
    model = LandmarkModel(settings["backbone"], settings["pretrained"], settings["embedding_dim"], settings["gem_p"])
    head = build_head(settings, len(labels), counts)
    model.to(device)
    head.to(device)
    if settings["channels_last"] and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)

    dataset = ShardDataset(train_index, train_transform(settings, model.data_config["mean"], model.data_config["std"]),
                           labels=labels, shuffle=True, seed=settings["seed"],
                           shuffle_buffer=settings["shuffle_buffer"])
    loader = DataLoader(dataset, batch_size=settings["batch_size"], num_workers=settings["workers"],
                        pin_memory=device.type == "cuda", drop_last=len(train_index) > settings["batch_size"],
                        persistent_workers=settings["workers"] > 0)
    steps_per_epoch = max(1, len(train_index) // settings["batch_size"]) // settings["grad_accumulation"] or 1
    total_steps = steps_per_epoch * settings["epochs"]
    warmup_steps = int(settings["warmup_epochs"] * steps_per_epoch)

    head_params = list(head.parameters()) + list(model.neck.parameters()) + list(model.bn.parameters()) + \
        list(model.pool.parameters())
    groups = [{"params": list(model.backbone.parameters()), "lr": settings["lr"]},
              {"params": head_params, "lr": settings["lr"] * settings["head_lr_multiplier"]}]
    if settings["optimizer"] == "sgd":
        optimizer = torch.optim.SGD(groups, momentum=settings["momentum"], weight_decay=settings["weight_decay"])
    elif settings["optimizer"] == "adam":
        optimizer = torch.optim.Adam(groups, weight_decay=settings["weight_decay"])
    else:
        optimizer = torch.optim.AdamW(groups, weight_decay=settings["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, total_steps, warmup_steps))

    digest = settings_digest(settings)
    last_path, best_path = out_dir / "last.ckpt", out_dir / "model.pt"
    start_epoch, metrics, best_gap = 0, [], -1.0
    if last_path.exists():
        state = torch.load(last_path, map_location="cpu", weights_only=False)
        if state.get("digest") == digest:
            model.load_state_dict(state["model"])
            head.load_state_dict(state["head"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start_epoch, metrics, best_gap = state["epoch"], state["metrics"], state["best_gap"]
            torch.set_rng_state(state["torch_rng"])
            log.info("resuming from %s after epoch %d", last_path, start_epoch)
        else:
            log.info("ignoring %s: it was written with other settings", last_path)

    def model_state(epoch: int) -> dict:
        return {"model": model.state_dict(), "settings": settings, "data_config": model.data_config,
                "classes": {str(k): v for k, v in labels.items()}, "epoch": epoch}

    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=settings["amp"] and device.type == "cuda")
    started = time.perf_counter()
    for epoch in range(start_epoch, settings["epochs"]):
        dataset.set_epoch(epoch)
        model.train()
        head.train()
        losses, seen, epoch_started = [], 0, time.perf_counter()
        bar = tqdm(loader, total=len(train_index) // settings["batch_size"] or 1, desc=f"epoch {epoch + 1}",
                   unit="batch", mininterval=2.0)
        optimizer.zero_grad(set_to_none=True)
        for step, (images, targets, _) in enumerate(bar):
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            if settings["channels_last"] and device.type == "cuda":
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(**autocast):
                loss = head(model(images), targets) / settings["grad_accumulation"]
            loss.backward()
            if (step + 1) % settings["grad_accumulation"] == 0:
                if settings["grad_clip"]:
                    torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(head.parameters()),
                                                   settings["grad_clip"])
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
            losses.append(loss.item() * settings["grad_accumulation"])
            seen += len(images)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}",
                            img_s=f"{seen / (time.perf_counter() - epoch_started):.1f}")
        val = evaluate_val_gap(model, train_index, val_index, settings, device)
        row = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)) if losses else float("nan"),
               "lr": scheduler.get_last_lr()[0], "images_per_s": seen / (time.perf_counter() - epoch_started), **val}
        metrics.append(row)
        log.info("epoch %d: loss %.4f, val GAP %.4f, val accuracy %.4f, %.1f images/s", row["epoch"],
                 row["train_loss"], row["val_gap"], row["val_accuracy"], row["images_per_s"])
        score = row["val_gap"] if not math.isnan(row["val_gap"]) else epoch  # no val: keep the last epoch
        if score > best_gap:
            best_gap = score
            save_checkpoint(best_path, model_state(epoch + 1))
        save_checkpoint(last_path, {"model": model.state_dict(), "head": head.state_dict(),
                                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                    "epoch": epoch + 1, "metrics": metrics, "best_gap": best_gap,
                                    "torch_rng": torch.get_rng_state(), "digest": digest})
    if settings["epochs"] == 0 or not best_path.exists():
        # No training (a baseline of the pretrained or random backbone): still evaluate and save it.
        val = evaluate_val_gap(model, train_index, val_index, settings, device)
        metrics = [{"epoch": 0, "train_loss": float("nan"), "lr": 0.0, "images_per_s": float("nan"), **val}]
        save_checkpoint(best_path, model_state(0))
    write_metrics_csv(metrics, out_dir / "metrics.csv")
    plot_curves(metrics, out_dir / "curves.png")
    best = max(metrics, key=lambda r: (-1 if math.isnan(r["val_gap"]) else r["val_gap"], r["epoch"]))
    write_json_atomic(out_dir / "train.json", {
        "classes": len(labels), "train_images": len(train_index), "val_images": len(val_index),
        "best_epoch": best["epoch"], "best_val_gap": best["val_gap"], "best_val_accuracy": best["val_accuracy"],
        "seconds": round(time.perf_counter() - started, 1), "device": str(device), "settings": settings})
    return metrics


def write_metrics_csv(metrics: list[dict], path: Path) -> None:
    with atomic_path(path, suffix=".csv") as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(metrics[0]) if metrics else ["epoch"])
            writer.writeheader()
            writer.writerows(metrics)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m landmarks.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-shards", nargs="+", required=True, help="shard folders of the train split")
    parser.add_argument("--val-shards", nargs="*", default=[], help="shard folders of the val split")
    parser.add_argument("--out-dir", required=True, help="model.pt, last.ckpt, metrics.csv, curves.png go here")
    parser.add_argument("--settings", default="{}",
                        help="JSON object of train settings (config.yaml's train section); defaults fill the rest")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        settings = section_settings("train", json.loads(args.settings), "--settings")
    except json.JSONDecodeError as err:
        raise ConfigError(f"--settings is not valid JSON: {err}") from err
    train(args.train_shards, args.val_shards, Path(args.out_dir), settings, device=pick_device(args.device),
          threads=args.threads)
    return 0


if __name__ == "__main__":
    run_cli(main)
