"""Resize throughput per core: the shard stage's decoder vs a naive Pillow full decode + resize.

    .venv/bin/python bench/bench_resize.py                      # 24 generated 1000-4000 px JPEGs
    .venv/bin/python bench/bench_resize.py --size 256 --rounds 3 --processes 1 2

Both methods run side by side in one process on the same files, in alternating order each round, and
do the whole job (decode, upright, RGB, shorter side to --size, JPEG encode at quality 90):
  naive  Image.open -> convert("RGB") -> resize(BICUBIC) -> save (no EXIF handling: flatters naive)
  shard  landmarks.shard.encode_resized: JPEG draft mode (DCT-domain 1/2, 1/4, 1/8 decode), then a
         small BICUBIC resize to the exact size
Per-core throughput = images / CPU seconds of this process (robust to other jobs on a shared machine);
wall-clock figures are printed too. Then the whole stage (`shard_split`) with 1..N processes.

Inputs: photo-like JPEGs generated once into bench/out/resize_inputs (smooth colour fields, edges and
grain at 1000-4000 px, ~2-4 bits per pixel like camera JPEGs). With --real DIR (default: the shared
Paris6k photos when present, skipped cleanly when absent) the real photos are measured as a second set.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from landmarks import shard

OUT = Path(__file__).resolve().parent / "out"
SIZES = [(1024, 768), (1600, 1200), (2048, 1536), (3000, 2000), (4000, 3000), (1000, 1500), (2448, 3264)]
REAL_DEFAULT = Path("/work/shared/data/paris6k_subset/images")


def photo_like(width: int, height: int, seed: int) -> Image.Image:
    """Smooth colour fields, hard-edged shapes and sensor grain: entropy close to a camera photo."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 96 + 2, width // 96 + 2, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(60):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        w, h = int(rng.integers(width // 40, width // 6)), int(rng.integers(height // 40, height // 6))
        draw.rectangle([x, y, x + w, y + h], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    array = np.asarray(image, dtype=np.int16)
    grain = rng.normal(0, 6, (height, width, 1)).astype(np.int16)
    return Image.fromarray(np.clip(array + grain, 0, 255).astype(np.uint8))


def generated_inputs(count: int) -> list[Path]:
    folder = OUT / "resize_inputs"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n in range(count):
        width, height = SIZES[n % len(SIZES)]
        path = folder / f"photo{n:03d}_{width}x{height}.jpg"
        if not path.exists():
            photo_like(width, height, seed=n).save(path, quality=90)
        paths.append(path)
    return paths


def naive(path: Path, size: int, quality: int = 90) -> bytes:
    """What a first script does: full decode, convert, resize, encode (no EXIF handling: flattering)."""
    with Image.open(path) as image:
        image = image.convert("RGB")
    scale = size / min(image.size)
    if scale < 1:
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def ours(path: Path, size: int, quality: int = 90) -> bytes:
    return shard.encode_resized(path, "shorter_side", size, quality=quality)[0]


def cpu_seconds_per_image(method, paths, size) -> np.ndarray:
    """CPU seconds of this process spent on each image (robust to other jobs sharing the cores)."""
    spent = np.zeros(len(paths))
    for i, path in enumerate(paths):
        start = time.process_time()
        method(path, size)
        spent[i] = time.process_time() - start
    return spent


def compare(name: str, paths: list[Path], size: int, rounds: int) -> None:
    dims = [Image.open(p).size for p in paths]
    pixels = np.array([w * h for w, h in dims])
    megabytes = sum(p.stat().st_size for p in paths) / 1e6
    print(
        f"\n{name}: {len(paths)} JPEGs, {pixels.mean() / 1e6:.1f} MP mean, "
        f"{8 * megabytes * 1e6 / pixels.sum():.2f} bits/pixel, shorter side -> {size} px"
    )
    methods = {"naive": naive, "shard": ours}
    runs = {m: [] for m in methods}
    wall = dict.fromkeys(methods, 0.0)
    for r in range(rounds):
        for m in list(methods) if r % 2 == 0 else list(methods)[::-1]:
            start = time.perf_counter()
            runs[m].append(cpu_seconds_per_image(methods[m], paths, size))
            wall[m] += time.perf_counter() - start
    per_image = {m: np.median(np.stack(r), axis=0) for m, r in runs.items()}  # median over rounds
    for m, seconds in per_image.items():
        print(
            f"  {m:6s} {len(paths) / seconds.sum():7.2f} images/CPU-s  {pixels.sum() / seconds.sum() / 1e6:7.1f} "
            f"MP/CPU-s   (wall {rounds * len(paths) / wall[m]:7.2f} images/s)"
        )
    print(f"  speed-up per core, all images: {per_image['naive'].sum() / per_image['shard'].sum():.2f}x")
    longer = np.array([max(d) for d in dims])
    for low, high in ((0, 1200), (1200, 2200), (2200, 3400), (3400, 10**6)):
        chosen = (longer > low) & (longer <= high)
        if chosen.any():
            print(
                f"    longer side {low + 1:>5}-{min(high, 9999):>4} px ({chosen.sum():2d} images): "
                f"{per_image['naive'][chosen].sum() / per_image['shard'][chosen].sum():.2f}x "
                f"({1000 * per_image['naive'][chosen].mean():.1f} -> {1000 * per_image['shard'][chosen].mean():.1f}"
                " ms per image)"
            )


def stage_scaling(paths: list[Path], size: int, processes: list[int], repeat: int) -> None:
    """The whole shard stage (decode, resize, encode, tar, index) on 1..N processes, worker start-up
    included; `repeat` passes over the inputs make it a longer job. Wall time only (the workers are
    forkserver children, outside this process's rusage): meaningful on otherwise idle cores."""
    paths = paths * repeat
    selection = pd.DataFrame(
        {
            "id": [f"img{n}" for n in range(len(paths))],
            "landmark_id": 1,
            "split": "train",
            "path": [str(p) for p in paths],
        }
    )
    print(f"\nshard stage on {len(paths)} JPEGs ({len(os.sched_getaffinity(0))} cores usable here):")
    base = None
    for count in processes:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            shard.shard_split(
                selection, Path("/"), "train", 0, 1, Path(tmp), size=size, images_per_shard=1000, threads=count
            )
            wall = time.perf_counter() - start
        base = base or wall
        print(
            f"  {count} process(es): {len(paths) / wall:7.2f} images/s wall ({base / wall:.2f}x of 1 process; "
            f"load average {os.getloadavg()[0]:.1f})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=24, help="generated JPEGs (1000-4000 px)")
    parser.add_argument("--size", type=int, default=256, help="shorter side after resizing")
    parser.add_argument("--rounds", type=int, default=3, help="passes per method (median reported)")
    parser.add_argument("--real", type=Path, default=REAL_DEFAULT, help="folder of real JPEGs (skipped if absent)")
    parser.add_argument("--real-limit", type=int, default=60)
    parser.add_argument("--processes", type=int, nargs="*", default=[1, 2], help="stage runs; none = skip")
    parser.add_argument("--stage-repeat", type=int, default=4, help="the stage runs on the inputs this many times over")
    args = parser.parse_args()
    paths = generated_inputs(args.images)
    compare("generated photo-like", paths, args.size, args.rounds)
    real = sorted(args.real.rglob("*.jpg"))[: args.real_limit] if args.real.is_dir() else []
    if real:
        compare(f"real photos from {args.real}", real, args.size, args.rounds)
    else:
        print(f"\n(no real photos at {args.real}: skipped)")
    if args.processes:
        stage_scaling(paths, args.size, args.processes, args.stage_repeat)


if __name__ == "__main__":
    main()
