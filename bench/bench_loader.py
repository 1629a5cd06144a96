"""Loader throughput: decoded, augmented images per second from tar shards vs from loose JPEG files,
and (on a GPU node) a ResNet-50 training step fed by the real loader vs synthetic in-memory tensors.

    .venv/bin/python bench/bench_loader.py                          # CPU part: shards vs loose files
    .venv/bin/python bench/bench_loader.py --workers 0 2 --rounds 2
    python bench/bench_loader.py --device cuda --workers 8 --images 4000 --train-steps 200   # GPU node

Inputs: --images photo-like pictures are generated once and sharded with the shard stage
(shorter side --shard-size, default 256) into bench/out/loader/shards; the very same JPEG bytes are
also written as loose files (a/b/c/<id>.jpg, the download layout), so both sides decode identical data.

CPU part, side by side in one run (rounds alternate the order; each dataset's median round, its wall
and CPU rates from that one round), one epoch each, same train-time
transform (RandomResizedCrop --image-size, flip, rotation, colour jitter, normalise):
  shards-stream  ShardDataset (sequential chunked reads, shuffle buffer)
  shards-random  ShardMapDataset (seek + read by byte offset, random order)
  loose-files    one open/read per image (a map-style dataset over the files, random order)
plus the raw read rate (bytes only, no decode) of the streaming reader and of the loose files. The page
cache is warm here, so these numbers are the CPU cost of each read path; on a cluster file system
(Lustre, NFS) per-file opens cost far more and the gap widens.

GPU part (--device cuda, --train-steps > 0): images/s of ResNet-50 (torchvision, random init,
bf16 autocast, channels_last, SGD) at --image-size on (a) one batch of random tensors already on the
GPU, (b) batches from make_loader(ShardDataset(...)) with --workers processes and pinned memory. Their
ratio says how much of the GPU the loader keeps busy. `--device cpu --arch resnet18 --train-steps 3`
exercises the same code without a GPU.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_resize import photo_like

from landmarks import loader, shard
from landmarks.common import image_relpath

OUT = Path(__file__).resolve().parent / "out" / "loader"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
AUGMENT = {
    "random_resized_crop_scale": [0.5, 1.0],
    "hflip": True,
    "rotation_degrees": 10,
    "translate": 0,
    "color_jitter": 0.2,
}


def build_inputs(count: int, shard_size: int, classes: int) -> tuple[loader.ShardIndex, Path]:
    """Shards (via the shard stage) and loose copies of the same JPEG bytes; reused when present."""
    folder = OUT / f"n{count}_s{shard_size}"
    shards, loose, sources = folder / "shards", folder / "loose", folder / "sources"
    if not (shards / "index.parquet").exists():
        sources.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        rows = []
        for n in range(count):
            width, height = int(rng.integers(shard_size * 5 // 4, shard_size * 2)), shard_size * 5 // 4
            if n % 3 == 0:
                width, height = height, width  # some portrait photos
            name = f"{n:06x}.jpg"
            photo_like(width, height, seed=n).save(sources / name, quality=90)
            rows.append({"id": f"{n:06x}", "landmark_id": n % classes, "split": "train", "path": name})
        selection = pd.DataFrame(rows)
        shard.shard_split(selection, sources, "train", 0, 1, shards, size=shard_size, images_per_shard=500, threads=2)
        index = loader.ShardIndex.from_dirs([shards])
        for image_id, data in zip(index.table["id"], loader.ShardDataset(index, None).read_samples(range(len(index)))):
            path = loose / image_relpath(image_id)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data[1])
    return loader.ShardIndex.from_dirs([shards]), loose


class LooseFiles(Dataset):
    """The usual alternative to shards: one JPEG file per image, opened and read per sample."""

    def __init__(self, index: loader.ShardIndex, root: Path, transform, labels: dict):
        self.paths = [root / image_relpath(i) for i in index.table["id"]]
        self.labels = [labels.get(int(x), -1) for x in index.table["landmark_id"]]
        self.transform = transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with open(self.paths[i], "rb") as fh:
            image = loader.decode_rgb(fh.read())
        return (self.transform(image) if self.transform else 0), self.labels[i], i


def epoch_rate(make, batch_size: int, workers: int) -> tuple[float, float]:
    """(images per wall second, images per CPU second of this process and its workers) over one epoch
    of the DataLoader that `make` builds, worker start-up included. The CPU rate is what a core delivers,
    whatever else runs on the machine."""
    dataset, shuffle = make()
    batches = DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=shuffle, persistent_workers=False)
    before = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    start = time.perf_counter()
    images = sum(len(b[2]) for b in batches)
    wall = time.perf_counter() - start
    del batches  # workers exit and are reaped: their CPU time lands in RUSAGE_CHILDREN
    after = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    cpu = sum(a.ru_utime + a.ru_stime - b.ru_utime - b.ru_stime for a, b in zip(after, before))
    return images / wall, images / cpu


def read_rates(index: loader.ShardIndex, loose: Path) -> dict[str, float]:
    """MB/s of raw bytes: streaming the shards vs opening every loose file (random order), no decode."""
    stream = loader.ShardDataset(index, None)
    start = time.perf_counter()
    total = sum(len(data) for _, data in stream.read_samples(stream.epoch_order()))
    shards_rate = total / (time.perf_counter() - start) / 1e6
    paths = [loose / image_relpath(i) for i in index.table["id"]]
    order = np.random.default_rng(0).permutation(len(paths))
    start = time.perf_counter()
    total = 0
    for i in order:
        with open(paths[i], "rb") as fh:
            total += len(fh.read())
    return {"shards-stream": shards_rate, "loose-files": total / (time.perf_counter() - start) / 1e6}


def cpu_part(index, loose, args) -> None:
    # DataLoader workers run torch single-threaded; the main process (workers=0) must too, or the tiny
    # per-image tensor ops of ToTensor/Normalize pay OpenMP hand-offs (8x slower on a busy machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _cpu_part(index, loose, args)
    finally:
        torch.set_num_threads(threads)


def _cpu_part(index, loose, args) -> None:
    labels = loader.class_mapping(index.table["landmark_id"])
    transform = loader.train_transform({"image_size": args.image_size, "augment": AUGMENT}, MEAN, STD)
    makers = {
        "shards-stream": lambda: (
            loader.ShardDataset(index, transform, labels, shuffle=True, shuffle_buffer=256),
            False,
        ),
        "shards-random": lambda: (loader.ShardMapDataset(index, transform, labels), True),
        "loose-files": lambda: (LooseFiles(index, loose, transform, labels), True),
    }
    print(
        f"{len(index)} images, {index.table['size'].mean() / 1e3:.1f} kB each "
        f"({index.table['width'].mean():.0f}x{index.table['height'].mean():.0f} px mean), train transform at "
        f"{args.image_size} px, batch {args.batch_size}"
    )
    for workers in args.workers:
        rates = {name: [] for name in makers}
        for r in range(args.rounds):
            for name in list(makers) if r % 2 == 0 else list(makers)[::-1]:
                rates[name].append(epoch_rate(makers[name], args.batch_size, workers))
        # Each dataset's median round by wall rate, with that same round's CPU rate (never the best
        # wall rate of one round next to the best CPU rate of another).
        median = {name: statistics.median_low(values) for name, values in rates.items()}
        wall = {name: w for name, (w, _) in median.items()}
        cpu = {name: c for name, (_, c) in median.items()}
        print(
            f"  workers={workers}, median of {args.rounds} rounds: "
            + ", ".join(f"{name} {wall[name]:6.1f} img/s ({cpu[name]:5.1f}/CPU-s)" for name in makers)
            + f"\n             stream / loose: {wall['shards-stream'] / wall['loose-files']:.2f}x wall, "
            f"{cpu['shards-stream'] / cpu['loose-files']:.2f}x per CPU-s"
        )
    reads = [read_rates(index, loose) for _ in range(args.rounds)]
    print(
        "  raw reads, no decode: " + ", ".join(f"{name} {max(r[name] for r in reads):7.1f} MB/s" for name in reads[0])
    )


def train_steps_per_second(model, optimizer, batches, steps: int, device, warmup: int = 10) -> float:
    """Images/s over `steps` training steps after `warmup` steps; `batches` yields (images, targets)."""
    criterion = torch.nn.CrossEntropyLoss()
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    seen, start = 0, None
    for step, (images, targets) in enumerate(batches):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start, seen = time.perf_counter(), 0
        if step == warmup + steps:
            break
        images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        targets = targets.to(device, non_blocking=True)
        with torch.autocast(**autocast):
            loss = criterion(model(images), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seen += len(images)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def gpu_part(index, args) -> None:
    import torchvision

    device = torch.device(args.device)
    labels = loader.class_mapping(index.table["landmark_id"])
    model = getattr(torchvision.models, args.arch)(num_classes=len(labels)).to(device)
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    size, batch = args.image_size, args.batch_size

    def synthetic():
        images = torch.randn(batch, 3, size, size, device=device)
        targets = torch.randint(0, len(labels), (batch,), device=device)
        while True:
            yield images, targets

    def real():
        transform = loader.train_transform({"image_size": size, "augment": AUGMENT}, MEAN, STD)
        dataset = loader.ShardDataset(index, transform, labels, shuffle=True, shuffle_buffer=512)
        batches = loader.make_loader(dataset, batch, workers=max(args.workers), device=device, drop_last=True)
        epoch = 0
        while True:
            dataset.set_epoch(epoch)
            for images, targets, _ in batches:
                yield images, targets
            epoch += 1

    print(
        f"\n{args.arch} training step at {size} px, batch {batch}, on {device} "
        f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
        f"{max(args.workers)} loader workers:"
    )
    results = {}
    for name, source in (("synthetic", synthetic), ("real loader", real), ("synthetic", synthetic)):
        rate = train_steps_per_second(
            model, optimizer, source(), args.train_steps, device, warmup=min(10, args.train_steps)
        )
        results.setdefault(name, []).append(rate)
        print(f"  {name:12s} {rate:8.1f} img/s")
    synthetic_rate = max(results["synthetic"])
    print(
        f"  real / synthetic = {results['real loader'][0] / synthetic_rate:.2f} "
        "(1.00 = the loader keeps the GPU fully fed)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--shard-size", type=int, default=256, help="shorter side stored in the shards")
    parser.add_argument("--image-size", type=int, default=224, help="training crop")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader workers (GPU part: the max)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cuda for the GPU part")
    parser.add_argument("--arch", default="resnet50", help="torchvision model of the GPU part")
    parser.add_argument(
        "--train-steps",
        type=int,
        default=None,
        help="timed training steps (default: 100 on cuda, 0 = no training part on cpu)",
    )
    parser.add_argument("--skip-cpu-part", action="store_true")
    args = parser.parse_args()
    if args.train_steps is None:
        args.train_steps = 100 if args.device.startswith("cuda") else 0
    index, loose = build_inputs(args.images, args.shard_size, args.classes)
    if not args.skip_cpu_part:
        cpu_part(index, loose, args)
    if args.train_steps:
        gpu_part(index, args)


if __name__ == "__main__":
    main()
