"""Download throughput: this pipeline's stage vs a sequential `requests` loop vs img2dataset.

    .venv/bin/python bench/bench_download.py --images 2000 --photos /path/to/real/jpegs \
        --img2dataset /path/to/venv-with-img2dataset/bin/img2dataset

1. Makes N JPEGs of real sizes (long side 300-1000 px, quality 90): crops of the real photos under
   `--photos` (recursively, *.jpg) when given, else synthetic textured pictures. They are written
   to a temporary folder outside the repository (never into it), cached between runs.
2. Serves them from memory with an aiohttp server in its own process on 127.0.0.1 (keep-alive).
3. Runs each contender as a child process on the same URL list, one after the other, `--rounds`
   times (the order rotates from round to round), and reads its CPU time (user + system, children
   included) from wait4():
     ours       python -m landmarks.download (decodes every image with Pillow to check it, keeps the
                bytes as served, sha256, atomic write), --threads decode threads
     requests   one requests.Session, one URL after the other, body written to a file (no checks)
     img2dataset  configured as its README's "How to tweak the options" says: --processes_count =
                --threads (the cores), the same total number of connections as ours split over the
                processes (--thread_count), and as many shards as processes
                (--number_sample_per_shard = ceil(N / processes)): a process works on one shard at a
                time, so fewer shards than processes leaves processes idle. Output_format files,
                --resize_mode no, sha256 like ours, and
                  --skip_reencode True: decodes with OpenCV to check, keeps the bytes (the same work
                    as ours: the fair comparison)
                  --disable_all_reencoding True: no decoding at all (less work than ours; a bound)
   Each contender also runs on 20 URLs in the same round to measure its fixed start-up cost; "steady"
   figures subtract that round's start-up run.
Reported: every round's wall and CPU time, each contender's median round (by wall time) with the CPU
time of that same round: images/s (wall), CPU ms per image, images per CPU-second (throughput per
core); and the ratios ours / other computed within each round (contenders side by side, so a noisy
neighbour hits both), their median and range over the rounds. `--json FILE` keeps the raw rounds.
Install img2dataset in its own virtual environment (it pins other versions of shared libraries):
    python -m venv /tmp/i2d-venv && /tmp/i2d-venv/bin/pip install img2dataset==1.47.0
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
TINY = 20  # URLs of the start-up run


# ----------------------------------------------------------------------------- the image set


def _make_one(args) -> tuple[str, int]:
    index, source, out_dir, seed = args
    import numpy as np
    from PIL import Image

    rng = random.Random(seed * 1_000_003 + index)
    long_side = rng.randrange(300, 1001)
    if source:
        with Image.open(source) as image:
            image = image.convert("RGB")
            w, h = image.size
            scale = rng.uniform(0.6, 1.0)
            cw, ch = int(w * scale), int(h * scale)
            x, y = rng.randrange(w - cw + 1), rng.randrange(h - ch + 1)
            image = image.crop((x, y, x + cw, y + ch))
    else:
        g = np.random.default_rng(index)
        coarse = g.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((800, 600), Image.BICUBIC)
        grain = g.normal(0, 18, (600, 800, 3))
        image = Image.fromarray(np.clip(np.asarray(image, dtype=np.float32) + grain, 0, 255).astype(np.uint8))
    w, h = image.size
    factor = long_side / max(w, h)
    image = image.resize((max(1, round(w * factor)), max(1, round(h * factor))), Image.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    name = f"{index:06d}.jpg"
    (Path(out_dir) / name).write_bytes(buffer.getvalue())
    return name, len(buffer.getvalue())


def make_images(count: int, photos: Path | None, cache_root: Path, seed: int = 0) -> Path:
    sources = sorted(str(p) for p in photos.rglob("*.jpg")) if photos else []
    key = hashlib.sha1(json.dumps([count, sources, seed]).encode()).hexdigest()[:10]
    out_dir = cache_root / f"images-{count}-{key}"
    if (out_dir / "done").exists():
        return out_dir
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    jobs = [(i, sources[i % len(sources)] if sources else None, str(out_dir), seed) for i in range(count)]
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        sizes = [size for _, size in pool.map(_make_one, jobs, chunksize=16)]
    (out_dir / "done").write_text(json.dumps({"count": count, "mean_bytes": sum(sizes) / len(sizes)}))
    return out_dir


# ----------------------------------------------------------------------------- the server


def serve(directory: Path, port_file: Path) -> None:
    """Serve every *.jpg of `directory` from memory at /img/<name> (run in a child process)."""
    from aiohttp import web

    files = {p.name: p.read_bytes() for p in directory.glob("*.jpg")}

    async def image(request):
        data = files.get(request.match_info["name"])
        if data is None:
            raise web.HTTPNotFound()
        return web.Response(body=data, content_type="image/jpeg")

    app = web.Application()
    app.router.add_get("/img/{name}", image)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port_file.write_text(str(sock.getsockname()[1]))
    web.run_app(app, sock=sock, print=None, access_log=None, handle_signals=True)


# ----------------------------------------------------------------------------- contenders


def requests_loop(url_csv: Path, out_dir: Path) -> None:
    """(a) the plain way: one session, one URL after the other, the body written to a file."""
    import requests

    session = requests.Session()
    with open(url_csv) as fh:
        for row in csv.DictReader(fh):
            try:
                response = session.get(row["url"], timeout=30)
            except requests.RequestException:
                continue
            if response.status_code == 200:
                path = out_dir / row["id"][0] / row["id"][1] / row["id"][2] / f"{row['id']}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(response.content)


def run_measured(command: list[str], env=None) -> tuple[float, float]:
    """Run `command`; return (wall seconds, CPU seconds of it and its children)."""
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.monotonic() - started
    stderr = process.stderr.read().decode(errors="replace")
    process.stderr.close()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{command[:3]} failed ({process.returncode}):\n{stderr[-3000:]}")
    return wall, usage.ru_utime + usage.ru_stime


def count_files(folder: Path, suffix: str = ".jpg") -> int:
    return sum(1 for p in folder.rglob(f"*{suffix}") if ".tmp" not in p.parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--photos", type=Path, default=None, help="folder of real JPEGs to crop from")
    parser.add_argument("--img2dataset", default=shutil.which("img2dataset"), help="img2dataset executable")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="decode threads (ours) / processes (img2dataset)"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the raw rounds and the summary here")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "landmarks-bench-download")
    parser.add_argument("--serve", nargs=2, metavar=("DIR", "PORT_FILE"), help=argparse.SUPPRESS)
    parser.add_argument("--requests-loop", nargs=2, metavar=("CSV", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve(Path(args.serve[0]), Path(args.serve[1]))
    if args.requests_loop:
        return requests_loop(Path(args.requests_loop[0]), Path(args.requests_loop[1]))

    args.work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    image_dir = make_images(args.images, args.photos, args.work)
    meta = json.loads((image_dir / "done").read_text())
    print(f"{args.images} JPEGs (mean {meta['mean_bytes'] / 1024:.0f} KiB) ready in {time.monotonic() - started:.0f} s")

    port_file = args.work / "port"
    port_file.unlink(missing_ok=True)
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(image_dir), str(port_file)])
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text():
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("benchmark server did not start")
            time.sleep(0.1)
        time.sleep(0.5)
        port = int(port_file.read_text())
        rounds = benchmark(args, image_dir, port)
    finally:
        server.terminate()
        server.wait(10)
    report(rounds, args)


def benchmark(args, image_dir: Path, port: int) -> list[dict[str, tuple[float, float, int]]]:
    """One dict per round: "<contender>/<full|tiny>" -> (wall s, CPU s, files)."""
    sys.path.insert(0, str(HERE.parent / "src"))
    from landmarks.split import split_csv

    names = sorted(p.name for p in image_dir.glob("*.jpg"))
    lists, counts = {}, {}
    for label, subset in (("full", names), ("tiny", names[:TINY])):
        folder = args.work / f"urls-{label}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        with open(folder / "urls.csv", "w") as fh:
            fh.write("id,url,landmark_id\n")
            for name in subset:
                image_id = hashlib.sha1(name.encode()).hexdigest()[:16]
                fh.write(f"{image_id},http://127.0.0.1:{port}/img/{name},1\n")
        split_csv(folder / "urls.csv", 1, folder / "split")
        lists[label], counts[label] = folder, len(subset)

    def contenders(urls: Path, count: int, out: Path) -> dict[str, list[str] | None]:
        ours = [
            sys.executable,
            "-m",
            "landmarks.download",
            "--part",
            str(urls / "split/part-000.parquet"),
            "--images",
            str(out / "images"),
            "--out",
            str(out / "manifest.parquet"),
            "--no-progress",
            "--concurrency",
            str(args.concurrency),
            "--per-host",
            str(args.concurrency),
            "--threads",
            str(args.threads),
            "--retries",
            "0",
        ]
        i2d = None
        if args.img2dataset:
            i2d = [
                args.img2dataset,
                "--url_list",
                str(urls / "urls.csv"),
                "--input_format",
                "csv",
                "--url_col",
                "url",
                "--output_format",
                "files",
                "--output_folder",
                str(out / "images"),
                "--resize_mode",
                "no",
                "--processes_count",
                str(args.threads),
                "--thread_count",
                str(args.concurrency // args.threads),
                "--timeout",
                "30",
                "--retries",
                "0",
                "--compute_hash",
                "sha256",
                "--enable_wandb",
                "False",
                "--disallowed_header_directives",
                "[]",
                # As many shards as processes: each process downloads one shard at a time.
                "--number_sample_per_shard",
                str(math.ceil(count / args.threads)),
                "--distributor",
                "multiprocessing",
            ]
        return {
            "ours": ours,
            "requests": [sys.executable, __file__, "--requests-loop", str(urls / "urls.csv"), str(out / "images")],
            "img2dataset": i2d and i2d + ["--skip_reencode", "True"],
            "img2dataset-nodecode": i2d and i2d + ["--disable_all_reencoding", "True"],
        }

    # NO_ALBUMENTATIONS_UPDATE: img2dataset imports albumentations, which otherwise asks PyPI for a
    # newer version of itself on every start (a network request that is no part of downloading).
    env = dict(os.environ, PYTHONPATH=str(HERE.parent / "src"), NO_ALBUMENTATIONS_UPDATE="1")
    rounds: list[dict[str, tuple[float, float, int]]] = []
    # Every run writes into a folder of its own, and they are all deleted at the end: deleting
    # thousands of files just before a run makes ext4 search past the recently freed inodes on
    # every file and folder created next, a cost a download to a fresh disk does not pay.
    runs = args.work / "out"
    shutil.rmtree(runs, ignore_errors=True)
    try:
        names = [name for name, command in contenders(lists["full"], args.images, runs).items() if command]
        for round_number in range(args.rounds):
            # Rotate the order so that no contender always runs first (or right after another one).
            shift = round_number % len(names)
            order = names[shift:] + names[:shift]
            measured = {}
            for label in ("tiny", "full"):
                for name in order:
                    out = runs / f"{round_number}-{label}-{name}"
                    command = contenders(lists[label], counts[label], out)[name]
                    out.mkdir(parents=True)
                    wall, cpu = run_measured(command, env)
                    files = count_files(out / "images")
                    measured[f"{name}/{label}"] = (wall, cpu, files)
                    if label == "full":
                        print(
                            f"round {round_number + 1}: {name:22s} {files:5d} files  "
                            f"wall {wall:6.2f} s  CPU {cpu:6.2f} s"
                        )
            rounds.append(measured)
    finally:
        shutil.rmtree(runs, ignore_errors=True)
    return rounds


def figures(measured: dict[str, tuple[float, float, int]], name: str, images: int) -> dict:
    """One contender's figures in one round; the steady ones subtract that round's start-up run."""
    wall, cpu, files = measured[f"{name}/full"]
    tiny_wall, tiny_cpu, _ = measured[f"{name}/tiny"]
    n = images - TINY
    steady_wall, steady_cpu = wall - tiny_wall, cpu - tiny_cpu  # not a number when noise swamps the difference
    return {
        "files": files,
        "wall_s": wall,
        "cpu_s": cpu,
        "img_per_s": files / wall,
        "cpu_ms_per_img": 1000 * cpu / files,
        "img_per_cpu_s": files / cpu,
        "steady_img_per_s": n / steady_wall if steady_wall > 0 else math.nan,
        "steady_cpu_ms_per_img": 1000 * steady_cpu / n if steady_cpu > 0 else math.nan,
        "startup_cpu_s": tiny_cpu,
    }


def report(rounds: list[dict], args) -> dict:
    names = [key.split("/")[0] for key in rounds[0] if key.endswith("/full")]
    names.sort(key=["ours", "requests", "img2dataset", "img2dataset-nodecode"].index)
    per_round = [{name: figures(measured, name, args.images) for name in names} for measured in rounds]

    # Each contender's median round by wall time, with that same round's CPU time (never the best
    # wall of one round next to the best CPU of another).
    median_rows = {}
    for name in names:
        walls = [r[name]["wall_s"] for r in per_round]
        median_rows[name] = per_round[walls.index(statistics.median_low(walls))][name]
    columns = (
        f"{'files':>5s} {'wall s':>7s} {'CPU s':>7s} {'img/s':>8s} {'CPU ms/img':>11s} {'img/CPU-s':>10s}"
        f" {'steady img/s':>13s} {'steady CPU ms/img':>18s} {'start-up CPU s':>15s}"
    )

    def row(r: dict) -> str:
        return (
            f"{r['files']:5d} {r['wall_s']:7.2f} {r['cpu_s']:7.2f} {r['img_per_s']:8.1f} {r['cpu_ms_per_img']:11.2f}"
            f" {r['img_per_cpu_s']:10.1f} {r['steady_img_per_s']:13.1f} {r['steady_cpu_ms_per_img']:18.2f}"
            f" {r['startup_cpu_s']:15.2f}"
        )

    print(f"\n{args.images} images, {args.threads} decode threads / processes, {args.concurrency} connections")
    print(f"every round (wall and CPU of the same run):\n{'round':5s} {'contender':22s} {columns}")
    for number, figures_of in enumerate(per_round, start=1):
        for name in names:
            print(f"{number:<5d} {name:22s} {row(figures_of[name])}")
    print(f"\nmedian round of each contender (by wall time; its own CPU time):\n{'contender':28s} {columns}")
    for name in names:
        print(f"{name:28s} {row(median_rows[name])}")

    # Ratios within each round: ours and the other ran side by side, minutes apart at most.
    ratios = {}
    print(f"\nours / other, computed within each round; median [min-max] over {len(per_round)} rounds:")
    for other in [name for name in names if name != "ours"]:
        pairs = {
            "images/s": [r["ours"]["img_per_s"] / r[other]["img_per_s"] for r in per_round],
            "images per CPU-s": [r["ours"]["img_per_cpu_s"] / r[other]["img_per_cpu_s"] for r in per_round],
            "steady images/s": [r["ours"]["steady_img_per_s"] / r[other]["steady_img_per_s"] for r in per_round],
            "steady images per CPU-s": [
                r[other]["steady_cpu_ms_per_img"] / r["ours"]["steady_cpu_ms_per_img"] for r in per_round
            ],
        }
        pairs = {label: [x for x in values if not math.isnan(x)] for label, values in pairs.items()}
        ratios[other] = pairs
        cells = ", ".join(
            f"{label} {statistics.median(v):.2f}x [{min(v):.2f}-{max(v):.2f}]" if v else f"{label} n/a"
            for label, v in pairs.items()
        )
        print(f"  vs {other:20s}: {cells}")
    summary = {"rounds": per_round, "median_round": median_rows, "ratios_ours_over_other": ratios}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **summary}, indent=1))
    return summary


if __name__ == "__main__":
    main()
