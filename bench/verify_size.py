"""Geometric verification's image size and inlier threshold, measured offline on finished runs.

SIFT reads the shards' images, shrunk to `verify.max_side` (longer side, never enlarged). The larger the
image it sees, the more keypoints and tentative matches, and the more chance inliers between photos of
different places: on 384-px shards, SIFT at 384 px verified wrong answers that 224 px does not
(bench/real_photos.md, "Geometric verification at 224 px").

This answers each run's test queries again through `landmarks.retrieve.answer_queries` (the code retrieve
runs: search, verification, relabelling, confidence) under each (max_side, min_inliers, full_inliers)
and prints per setting: GAP, GAP by the raw top-1 cosine, top-1 accuracy on the landmark queries, how
many answers verification relabelled, how many it verified, how many of those are wrong, and predict's
verdict (share of test decisions right; the threshold chosen again on val's answers under the setting,
as retrieve chooses it). The inlier counts are computed once per max_side and run (min_inliers and full_inliers only decide what they
count for). Needs each run's embeddings and shards (`bench/real_photos.py` and `make demo` keep them).

    .venv/bin/python bench/verify_size.py bench/out/real_photos_web_lite0_384/fewshot-seed*/results \
        --max-side 224 288 384 --min-inliers 10 12 15 20
    .venv/bin/python bench/verify_size.py results --experiments imagenet_no_finetune effnet_gem_arcface
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from landmarks import retrieve  # noqa: E402
from landmarks.common import read_table  # noqa: E402
from landmarks.config import section_settings  # noqa: E402
from landmarks.metrics import score_predictions  # noqa: E402
from landmarks.score import truth_from_selection, verdict_accuracy  # noqa: E402


def shard_dirs(results: Path) -> list[Path]:
    return sorted(path for path in (results / "shards").glob("*/part-*") if path.is_dir())


def counting_inliers(original, cache: dict):
    """retrieve.verify_neighbours_of, its counts kept per max_side, queries and neighbours: min_inliers
    does not change them (one cache per run)."""

    def counts(query_ids, db_ids, positions, images, v, threads):
        key = (v["max_side"], tuple(query_ids), positions[:, : v["neighbours"]].tobytes())
        if key not in cache:
            cache[key] = original(query_ids, db_ids, positions, images, v, threads)
        return cache[key]

    return counts


def run_settings(results: Path, experiment: str, sizes, thresholds, fulls, threads: int) -> list[dict]:
    """One row per (max_side, min_inliers, full_inliers): the run's test answers scored under it."""
    folder = results / "experiments" / experiment / "embed"
    defaults = section_settings("retrieve", {}, "retrieve defaults")
    inputs = retrieve.load_inputs(folder / "train.npy", folder / "test.npy", folder / "nonlandmark.npy", "none")
    db, _, _ = retrieve.build_database(inputs, defaults, None, {})
    images = retrieve.ImageSource(shard_dirs(results))
    truth = truth_from_selection(read_table(results / "select" / "selection.parquet"))
    run = (results / "experiments" / experiment, inputs, images, truth)
    original = retrieve.verify_neighbours_of
    retrieve.verify_neighbours_of = counting_inliers(original, {})  # this run's counts only
    try:
        return [
            scored_setting(db, defaults, run, dict(max_side=side, min_inliers=least, full_inliers=full), threads)
            for side in sizes
            for least in thresholds
            for full in fulls
        ]
    finally:
        retrieve.verify_neighbours_of = original


def scored_setting(db, defaults, run, setting: dict, threads: int) -> dict:
    """The test answers under one setting of `verify`, scored against the same answers unverified, and
    predict's verdict with the threshold chosen again on val's answers under that setting."""
    folder, inputs, images, truth = run
    verify = {**defaults["verify"], **setting}
    db = db._replace(settings={**defaults, "verify": verify})
    answers = retrieve.answer_queries(db, inputs.queries, inputs.query_ids["id"], images=images, threads=threads)
    unverified = retrieve.answer_queries(
        db._replace(settings={**defaults, "verify": {**verify, "neighbours": 0}}),
        inputs.queries,
        inputs.query_ids["id"],
    )
    table = retrieve.predictions_table(inputs.query_ids, answers.predictions, answers.query_bank, answers.label_inliers)
    verdict = predict_verdict(db, folder, inputs, images, truth, table, threads)
    right_of = {row.id: set(row.landmarks) for row in truth.itertuples()}
    right = np.array([label in right_of.get(i, ()) for i, label in zip(table["id"], table["landmark_id"])])
    verified = table["inliers"].fillna(0).to_numpy() >= verify["min_inliers"]
    return {
        **setting,
        "gap": score_predictions(table[["id", "landmark_id", "score"]], truth).gap,
        "gap_raw_cosine": score_predictions(table[["id", "landmark_id"]].assign(score=table["top_cosine"]), truth).gap,
        "accuracy": float(right[[bool(right_of.get(i)) for i in table["id"]]].mean()),  # landmark queries
        "relabelled": int((answers.predictions.label != unverified.predictions.label).sum()),
        "verified": int(verified.sum()),
        "verified_wrong": int((verified & ~right).sum()),
        "verdict_right": verdict.get("right_decisions"),
        "verdict_keeping_all": verdict.get("right_decisions_without_threshold"),
    }


def predict_verdict(db, folder: Path, inputs, images, truth, table: pd.DataFrame, threads: int) -> dict:
    """verdict_accuracy with the threshold retrieve would choose on the run's val answers under db's
    settings ({} without val embeddings, or when val chooses none)."""
    if not (folder / "embed" / "val.npy").exists():
        return {}
    model = folder / "train" / "model.pt"
    chosen, _ = retrieve.calibrate_threshold(
        db, folder / "embed" / "val.npy", inputs, images, threads, model if model.exists() else None
    )
    return {} if chosen["threshold"] is None else verdict_accuracy(table, truth, chosen["threshold"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="results folders of finished runs (with their shards)")
    parser.add_argument("--experiments", nargs="+", default=["pretrained", "finetuned"])
    parser.add_argument("--max-side", nargs="+", type=int, default=[224, 288, 384])
    parser.add_argument("--min-inliers", nargs="+", type=int, default=[10, 12, 15])
    parser.add_argument("--full-inliers", nargs="+", type=int, default=[40])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    rows = []
    for results in args.results:
        for experiment in args.experiments:
            if not (results / "experiments" / experiment / "embed" / "test.npy").exists() or not shard_dirs(results):
                print(f"skipped {results} {experiment}: no embeddings or shards", file=sys.stderr)
                continue
            for row in run_settings(
                results, experiment, args.max_side, args.min_inliers, args.full_inliers, args.threads
            ):
                rows.append({"run": str(results), "experiment": experiment, **row})
                print(rows[-1], flush=True)
    if not rows:
        print("no finished runs with shards under the given folders", file=sys.stderr)
        return 1
    table = pd.DataFrame(rows)
    keys = ["experiment", "max_side", "min_inliers", "full_inliers"]
    summary = table.groupby(keys, sort=False)[
        [
            "gap",
            "gap_raw_cosine",
            "accuracy",
            "verdict_right",
            "verdict_keeping_all",
            "relabelled",
            "verified",
            "verified_wrong",
        ]
    ].mean()
    print(summary.to_string(float_format="%.3f"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
