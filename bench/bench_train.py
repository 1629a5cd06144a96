"""Benchmark: images/s of the train stage's loop, fed by the shard loader, against a plain loop.

Both sides train the same model (backbone + GeM + 512-d embedding + ArcFace head) with the same
optimizer, batch size, AMP and channels_last settings, in one run:
  stage   `landmarks.train.train` on real tar shards (random access, JPEG decoding, augmentation,
          per-image seeds, checkpointing at the epoch's end), 2 epochs, no validation set; the images/s
          of its second epoch (the first one includes DataLoader start-up and cuDNN autotuning)
  plain   forward + backward + optimizer step on one synthetic batch already on the device (the
          upper bound when data loading costs nothing), after warm-up steps
The ratio stage / plain is how much of the achievable speed the loop keeps; peak GPU memory is
printed for both. The shards (synthetic photos, shorter side --shard-size px) are built once with
the shard stage into --work-dir. Not part of the test run:

    .venv/bin/python bench/bench_train.py                                    # CPU, small model
    .venv/bin/python bench/bench_train.py --device cuda --model resnet50 --size 224 --batch 64 \\
        --images 4096 --workers 8 --threads 8
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw

from landmarks import shard, train
from landmarks.config import section_settings
from landmarks.losses import build_head
from landmarks.model import LandmarkModel


def make_shards(work: Path, images: int, classes: int, size: int, seed: int = 0) -> Path:
    out = work / f"shards-{images}-{classes}-{size}"
    if (out / "train" / "index.parquet").exists():
        return out
    folder = work / "images"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(images):
        landmark = i % classes
        width, height = int(size * rng.uniform(1.0, 1.5)), size
        base = np.linspace(0, 255, width, dtype=np.float32)[None, :, None] * rng.uniform(0.2, 1.0, 3)
        pixels = np.clip(base + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels)
        draw = ImageDraw.Draw(image)
        for _ in range(4):
            x, y = rng.integers(0, width - 20), rng.integers(0, height - 20)
            draw.rectangle(
                [x, y, x + rng.integers(10, size // 3), y + rng.integers(10, size // 3)],
                fill=tuple(int(c) for c in rng.integers(0, 256, 3)),
            )
        image.save(folder / f"img{i:06d}.jpg", quality=90)
        rows.append({"id": f"img{i:06d}", "landmark_id": landmark, "split": "train", "path": f"img{i:06d}.jpg"})
    selection = pd.DataFrame(rows)
    selection["landmark_id"] = selection["landmark_id"].astype("Int64")
    selection.to_parquet(work / "selection.parquet")
    assert (
        shard.main(
            [
                "--selection",
                str(work / "selection.parquet"),
                "--images",
                str(folder),
                "--split",
                "train",
                "--out-dir",
                str(out / "train"),
                "--threads",
                "4",
                "--settings",
                json.dumps({"size": size, "images_per_shard": 1000}),
            ]
        )
        == 0
    )
    return out


def plain_loop(settings: dict, classes: int, device: torch.device, steps: int, warmup: int) -> float:
    model = LandmarkModel(settings["backbone"], "none", settings["embedding_dim"], settings["gem_p"]).to(device)
    head = build_head(settings, classes, torch.ones(classes), model.embedding_dim).to(device)
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=settings["amp"] and device.type == "cuda")
    channels_last = settings["channels_last"] and device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(list(model.parameters()) + list(head.parameters()), lr=settings["lr"])
    size, batch = settings["image_size"], settings["batch_size"]
    images = torch.randn(batch, 3, size, size, device=device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    targets = torch.randint(0, classes, (batch,), device=device)
    for step in range(warmup + steps):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
        with torch.autocast(**autocast):
            embeddings = model(images)
        loss = head(embeddings.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(head.parameters()), 5.0)
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=64, help="training image size")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--images", type=int, default=384, help="training images in the shards")
    parser.add_argument("--classes", type=int, default=48)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers of the stage")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--plain-steps", type=int, default=None, help="default: the stage's steps per epoch")
    parser.add_argument("--work-dir", default=None, help="where the synthetic shards go (default: a temp folder)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_train_"))
    shards = make_shards(work, args.images, args.classes, max(args.size + args.size // 4, 32))
    settings = section_settings(
        "train",
        {
            "backbone": args.model,
            "pretrained": "none",
            "image_size": args.size,
            "batch_size": args.batch,
            "epochs": 2,
            "workers": args.workers,
            "loss": "arcface",
            "checkpoint_every_steps": 0,
            "lr": 1e-4,
        },
    )
    print(
        f"{args.model} @ {args.size} px, batch {args.batch}, {args.images} images, device {device}, "
        f"AMP {'bf16' if device.type == 'cuda' else 'off'}, {args.workers} workers, {args.threads} threads"
    )

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    shutil.rmtree(work / "run", ignore_errors=True)  # a finished run in the folder would just be resumed
    metrics = train.train([shards / "train"], [], work / "run", settings, device=device, threads=args.threads)
    stage_speed = metrics[-1]["images_per_s"]
    stage_memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    steps = args.plain_steps or json.loads((work / "run" / "train.json").read_text())["steps_per_epoch"]

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    plain_speed = plain_loop(settings, args.classes, device, steps=steps, warmup=max(3, steps // 10))
    plain_memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")

    print(f"stage loop (shards, epoch 2): {stage_speed:8.1f} images/s   peak GPU memory {stage_memory:.2f} GiB")
    print(f"plain loop (synthetic)      : {plain_speed:8.1f} images/s   peak GPU memory {plain_memory:.2f} GiB")
    print(f"ratio stage / plain         : {stage_speed / plain_speed:.2f}")


if __name__ == "__main__":
    main()
