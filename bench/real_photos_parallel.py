"""bench/real_photos.py on a machine with many cores (a GPU machine): one process per photo set x regime x
seed, side by side, then one merged table per set.

Each process is `real_photos.py` for one set, regime and seed, with its own port, `--cores` and output
folder (`OUT/<set>-<regime>-seed<N>/`, its log beside it); the pipeline trains and embeds on the GPU when
there is one (`--device auto`). A run stops at `--time-limit` seconds: the processes still going are
stopped (their Snakemake jobs with them) and named, and the tables hold the runs that finished. The
merged rows and tables go to `OUT/<set>.csv` and `OUT/<set>.md` (`real_photos.py`'s format).

    .venv/bin/python bench/real_photos_parallel.py --landmarks ../web_landmarks13 ../web_landmarks_asia11 \\
        --regimes full fewshot --seeds 0 1 2 --cores 2 --out bench/out/parallel
    .venv/bin/python bench/real_photos_parallel.py --landmarks ../web_landmarks13 --regimes oneshot --seeds 0 \\
        --train '{"backbone": "tf_efficientnet_lite2", "pretrained": "efficientnet_lite2_pypi"}' --out bench/out/lite2

On one H100 with 16 cores, 12 processes of 2 cores each (Lite2; web and held-out sets, full and few-shot,
seeds 0-2) kept the cores busy (load average 14-20: decoding, SIFT) and finished in 5.3 to 6 minutes
(bench/real_photos.md, "EfficientNet-Lite2 at today's defaults, on a GPU").
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import real_photos  # noqa: E402

STOP_GRACE_S = 20  # after SIGTERM, before SIGKILL


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--landmarks", type=Path, nargs="+", required=True, help="photo sets (real_photos.py's)")
    parser.add_argument("--data", type=Path, default=real_photos.SHARED_DATA, help="folder with distractors/")
    parser.add_argument("--regimes", nargs="+", choices=list(real_photos.REGIMES), default=["full", "fewshot"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--experiments", nargs="+", default=["pretrained", "finetuned"])
    parser.add_argument("--train", default="{}", help="JSON train settings for every experiment (e.g. a backbone)")
    parser.add_argument("--embed", default="{}", help="JSON embed settings for every experiment (e.g. scales)")
    parser.add_argument("--cores", type=int, default=2, help="Snakemake cores of each process")
    parser.add_argument("--port", type=int, default=8800, help="the first process's port; the others count up")
    parser.add_argument("--time-limit", type=float, default=None, help="seconds; then stop what is still running")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    json.loads(args.train), json.loads(args.embed)  # a typo fails here, not in every process
    names = [folder.resolve().name for folder in args.landmarks]
    if len(set(names)) < len(names):
        parser.error(f"--landmarks: two folders of the same name ({names}): runs and tables are named after them")
    known = {**real_photos.EXPERIMENTS, **real_photos.VARIANTS}
    unknown = set(args.experiments) - set(known)
    if unknown:
        parser.error(f"unknown experiment(s) {sorted(unknown)}; known: {sorted(known)}")
    # name -> spec for the tables, `pretrained` first (the baseline of every gain), as real_photos.py has it
    args.catalogue = {"pretrained": known["pretrained"], **{name: known[name] for name in args.experiments}}
    return args


def run_name(landmarks: Path, regime: str, seed: int) -> str:
    return f"{landmarks.resolve().name}-{regime}-seed{seed}"


def start(args: argparse.Namespace, landmarks: Path, regime: str, seed: int, port: int) -> subprocess.Popen:
    name = run_name(landmarks, regime, seed)
    command = [
        sys.executable,
        str(BENCH / "real_photos.py"),
        *("--landmarks", str(landmarks), "--data", str(args.data), "--regimes", regime, "--seeds", str(seed)),
        *("--experiments", *args.experiments, "--train", args.train, "--embed", args.embed, "--cores", str(args.cores)),
        *("--port", str(port), "--out", str(args.out / name)),
    ]
    log = (args.out / f"{name}.log").open("w")
    # A session of its own: stopping it stops its Snakemake and Snakemake's jobs too.
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop(processes: dict[str, subprocess.Popen]) -> None:
    for process in processes.values():
        os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for process in processes.values():
        try:
            process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def run_all(args: argparse.Namespace) -> dict[str, int | None]:
    """Start every run, wait for them (or the time limit); name -> exit code (None: stopped)."""
    runs = list(itertools.product(args.landmarks, args.regimes, args.seeds))
    processes = {run_name(*run): start(args, *run, port=args.port + number) for number, run in enumerate(runs)}
    print(f"{len(processes)} runs side by side, {args.cores} cores each: {', '.join(processes)}", flush=True)
    started = time.monotonic()
    codes: dict[str, int | None] = {}
    while len(codes) < len(processes):
        for name, process in processes.items():
            if name not in codes and process.poll() is not None:
                codes[name] = process.returncode
                print(f"{time.monotonic() - started:6.0f} s  {name}: exit code {process.returncode}", flush=True)
        if args.time_limit is not None and time.monotonic() - started > args.time_limit:
            running = {name: p for name, p in processes.items() if name not in codes}
            print(f"time limit {args.time_limit:.0f} s: stopping {', '.join(running)}", flush=True)
            stop(running)
            codes.update(dict.fromkeys(running))
        time.sleep(1)
    return codes


def merge(args: argparse.Namespace, codes: dict[str, int | None]) -> str:
    """Each set's finished runs as one table (real_photos.py's), written to OUT/<set>.csv and .md."""
    texts = []
    for landmarks in args.landmarks:
        frames = [
            pd.read_csv(table)
            for regime, seed in itertools.product(args.regimes, args.seeds)
            if codes[run_name(landmarks, regime, seed)] == 0
            for table in (args.out / run_name(landmarks, regime, seed)).glob(f"results-{regime}.csv")
        ]
        if not frames:
            texts.append(f"## {landmarks.resolve().name}\n\nno run finished\n")
            continue
        frame = pd.concat(frames, ignore_index=True)
        frame = frame.sort_values(
            ["regime", "seed"], key=lambda c: c.map(args.regimes.index) if c.name == "regime" else c
        )
        text = real_photos.write_tables(frame, args.catalogue, args.out / landmarks.resolve().name)
        texts.append(f"## {landmarks.resolve().name}\n\n{text}")
    unfinished = [
        f"{name} ({'stopped' if code is None else f'exit code {code}'})" for name, code in codes.items() if code != 0
    ]
    if unfinished:
        texts.append("Not in the tables (see their logs): " + ", ".join(unfinished) + "\n")
    return "\n".join(texts)


def main() -> int:
    args = parse_args()
    photos = real_photos.photo_folders(argparse.Namespace(data=args.data, landmarks=args.landmarks[0]))
    if photos is None:
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    codes = run_all(args)
    print(merge(args, codes))
    return 0 if all(code == 0 for code in codes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
