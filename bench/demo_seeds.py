"""The demo over several training seeds: is a difference between two recipes on the demo the recipe or the draw?

The demo's test set has 95 landmark queries, so one answer moves GAP by about 0.01, and the training seed
(batch order, augmentations, which epoch val picks) moves a fine-tuned model's GAP by more than that. This
runs the demo exactly as `make demo` does (the repository's config.yaml), under its own folder, with each
contender trained once per seed as its own experiment beside the untrained baseline; the download, the
Places365 cleaning, the split and the shards are computed once and shared. It prints GAP, GAP on landmark
queries only, top-1 accuracy, GAP by the raw top-1 cosine and val GAP as mean ± standard deviation over the
seeds, each seed's GAP, and each contender's GAP minus the first contender's on the same seed.

    .venv/bin/python bench/demo_seeds.py          # the defaults against whitening: none, seeds 0 1 2 (~15 min, 2 cores)
    .venv/bin/python bench/demo_seeds.py --seeds 0 1 --contender no_wise '{"train": {"wise_alpha": 1.0}}'

Writes bench/out/demo_seeds/results.csv (one row per contender and seed) and results.md; reruns reuse
what Snakemake already computed.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import pandas as pd
import yaml
from real_photos import METRIC_COLUMNS, mean_sd, snakemake, write_if_changed

from landmarks.config import deep_merge

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out" / "demo_seeds"
BASELINE = "not_finetuned"
# The contenders every run compares (config overrides on top of config.yaml's defaults).
CONTENDERS = {
    "finetuned": {"description": "the defaults: fine-tuned, whitened"},
    "no_whitening": {"description": "the same without the learned whitening", "train": {"whitening": "none"}},
}
COLUMNS = METRIC_COLUMNS  # score's metrics, as bench/real_photos.py prints them


def demo_config(contenders: dict, seeds: list[int], port: int) -> dict:
    """config.yaml with its experiments replaced: each contender once per training seed, plus the untrained
    baseline (training seed has no effect on it)."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    experiments = {
        BASELINE: {"description": "the same backbone, not fine-tuned", "train": {"epochs": 0, "whitening": "none"}}
    }
    for name, spec in contenders.items():
        for seed in seeds:
            experiments[f"{name}_seed{seed}"] = deep_merge(copy.deepcopy(spec), {"train": {"seed": seed}})
    config["experiments"] = experiments
    config["demo"]["port"] = port
    return config


def collect(workdir: Path, config: dict) -> pd.DataFrame:
    rows = []
    for experiment in config["experiments"]:
        metrics = json.loads((workdir / "results" / "experiments" / experiment / "score" / "metrics.json").read_text())
        name, _, seed = experiment.rpartition("_seed")
        row = {"contender": name or experiment, "seed": int(seed) if name else None}
        rows.append({**row, **{key: metrics.get(key) for key in COLUMNS}})
    return pd.DataFrame(rows)


def render(results: pd.DataFrame, contenders: dict) -> str:
    first = next(iter(contenders))
    reference = results[results["contender"] == first].set_index("seed")["gap"]
    lines = [
        "| contender | " + " | ".join(COLUMNS.values()) + " | GAP per seed | GAP − " + first + " |",
        "|---|" + "---:|" * (len(COLUMNS) + 2),
    ]
    for name in [BASELINE, *contenders]:
        rows = results[results["contender"] == name]
        per_seed = " / ".join(f"{gap:.3f}" for gap in rows["gap"])
        gain = rows.set_index("seed")["gap"] - reference.reindex(rows["seed"]).to_numpy()
        gain_cell = mean_sd(gain) if name not in (BASELINE, first) else ""
        lines.append(
            f"| {name} | " + " | ".join(mean_sd(rows[key]) for key in COLUMNS) + f" | {per_seed} | {gain_cell} |"
        )
    seeds = ", ".join(str(seed) for seed in sorted(results["seed"].dropna().astype(int).unique()))
    lines += ["", f"mean ± standard deviation over training seeds {seeds}; {BASELINE} is trained once (epochs: 0)."]
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--contender",
        nargs=2,
        action="append",
        metavar=("NAME", "JSON"),
        help="compare this recipe (config overrides as JSON) with the defaults instead of whitening: none; repeatable",
    )
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--cores", type=int, default=os.cpu_count())
    parser.add_argument("--port", type=int, default=8767, help="port of the demo's photo server (not make demo's)")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    contenders = dict(CONTENDERS)
    if args.contender:
        contenders = {"finetuned": CONTENDERS["finetuned"], **{n: json.loads(spec) for n, spec in args.contender}}
    config = demo_config(contenders, args.seeds, args.port)
    args.out.mkdir(parents=True, exist_ok=True)
    write_if_changed(args.out / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    snakemake(args.out, args.cores)
    results = collect(args.out, config)
    results.to_csv(args.out / "results.csv", index=False)
    text = render(results, contenders)
    (args.out / "results.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
