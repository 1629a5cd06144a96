"""Benchmark: `landmarks.predict` throughput (photos per second), by phase, with and without the HTML
page's saliency maps, on a trained experiment. Not part of the test run; run it after `make demo`:

    .venv/bin/python bench/bench_predict.py                      # the demo's new photos + its test photos
    .venv/bin/python bench/bench_predict.py --experiment results/experiments/X --photos my/folder --device cuda

Phases (predict.json's `seconds`): read = the download stage's checks + the shard stage's resize and
JPEG; embed = the model (with the experiment's TTA); search / bank / verify / predict = the retrieve
stage's code (verify: SIFT + RANSAC against the nearest database images); page = outputs + HTML page
(saliency: one backward pass per photo). Each configuration runs `--rounds` times in this one process,
interleaved; the table gives the median of each. The model is loaded once per run, as a user's
command would (its load time is in `total`). Several experiments (`--experiment A B`, e.g. one embedded
at two scales) run interleaved in the same rounds, so their ratio holds on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--experiment",
        nargs="+",
        default=[str(ROOT / "results" / "experiments" / "effnet_gem_arcface")],
        help="one or more experiment folders, measured interleaved",
    )
    parser.add_argument(
        "--photos",
        nargs="+",
        default=None,
        help="inputs (default: data/demo/new_photos and the demo's downloaded images, up to --limit)",
    )
    parser.add_argument("--limit", type=int, default=200, help="photos at most (default inputs)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args()


def default_photos(limit: int) -> list[str]:
    from landmarks.images import IMAGE_SUFFIXES

    photos = sorted(
        str(p) for p in (ROOT / "data" / "demo" / "new_photos").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
    )
    photos += sorted(str(p) for p in (ROOT / "results" / "download" / "images").rglob("*.jpg"))
    if not photos:
        sys.exit("no photos: run `make demo` first, or give --photos")
    return photos[:limit]


def main() -> int:
    args = parse_args()
    import torch

    from landmarks import predict

    torch.set_num_threads(args.threads)
    photos = args.photos or default_photos(args.limit)
    names = [Path(experiment).name for experiment in args.experiment]
    if len(set(names)) < len(names):  # e.g. two runs' `finetuned`: name each by its whole path instead
        names = list(args.experiment)
    configurations = [
        (f"{name}: {label}", experiment, saliency)
        for name, experiment in zip(names, args.experiment)
        for label, saliency in (("predict (no saliency)", False), ("predict + saliency page", True))
    ]
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in configurations}
    with tempfile.TemporaryDirectory() as tmp:
        for round_number in range(args.rounds):
            for index, (name, experiment, saliency) in enumerate(configurations):
                out = Path(tmp) / f"{round_number}-{index}"
                predict.predict(
                    experiment,
                    photos,
                    out,
                    device=args.device,
                    saliency=saliency,
                    threads=args.threads,
                    progress=False,
                )
                runs[name].append(json.loads((out / "predict.json").read_text()))
    count = next(iter(runs.values()))[0]["answered"]
    order = ["read", "embed", "search", "bank", "verify", "predict", "page"]  # the order predict runs them
    seen = {phase for summaries in runs.values() for s in summaries for phase in s["seconds"]}
    phases = [p for p in order if p in seen] + sorted(seen - set(order))
    print(
        f"\n{count} photos answered, experiments {' '.join(args.experiment)}, device {args.device}, {args.threads} threads, "
        f"median of {args.rounds} rounds\n"
    )
    print("| run | " + " | ".join(f"{p} s" for p in phases) + " | total s | photos/s |")
    print("|---|" + "---:|" * (len(phases) + 2))
    for name, summaries in runs.items():
        cells = [statistics.median(s["seconds"].get(p, 0.0) for s in summaries) for p in phases]
        total = statistics.median(s["total_seconds"] for s in summaries)
        print(f"| {name} | " + " | ".join(f"{c:.2f}" for c in cells) + f" | {total:.2f} | {count / total:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
