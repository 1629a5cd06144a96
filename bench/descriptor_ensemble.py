"""The untrained backbone's descriptor kept beside the fine-tuned one, measured offline on finished runs.

The issue behind the real-photo benchmark suggests "an embedding that does not throw away what the
pretrained backbone knows", for example the pretrained GeM descriptor kept beside the learned one.
WiSE-FT (`train.wise_alpha`) does it in weight space; this measures the output-space version: each photo's
fine-tuned embedding (with its learned whitening, as `embed` wrote it) concatenated with `weight` x the
untrained backbone's GeM descriptor, both L2-normalised first, then searched by cosine. The untrained
descriptor is taken raw (as the `pretrained` experiment embeds it) or with a learned whitening of its
own, fitted the way training fits the default one (`landmarks.whitening`, on the train and val landmark
photos: `whitening_from: train+val`).

Reads the embeddings `bench/real_photos.py` left under each run's results folder (the fine-tuned
experiment and the untrained one, `pretrained`, embed the same photos), predicts the nearest database
photo's landmark ranked by its cosine (no reranking, no geometric verification: the rule every setting
changes the same way, as in bench/neighbour_smoothing.py) and prints GAP per setting, mean ± standard
deviation over the seeds of each set and regime, with the gain over the fine-tuned embedding alone.

    .venv/bin/python bench/descriptor_ensemble.py bench/out/cpu384_{web,asia11}_{full,small}/*-seed*/results
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

from neighbour_smoothing import database, normalise, predict, run_name  # noqa: E402

from landmarks.common import read_table  # noqa: E402
from landmarks.embed import load_embeddings  # noqa: E402
from landmarks.metrics import score_predictions  # noqa: E402
from landmarks.score import truth_from_selection  # noqa: E402
from landmarks.whitening import apply_whitening, fit_whitening  # noqa: E402

UNTRAINED = "pretrained"  # the benchmark's experiment with the untrained backbone's own GeM descriptor
WEIGHTS = (0.5, 0.75, 1.0)


def concatenate(fine_tuned: np.ndarray, untrained: np.ndarray, weight: float) -> np.ndarray:
    """normalise([fine_tuned, weight x untrained]) of two L2-normalised embeddings; weight 0 is fine_tuned alone."""
    return normalise(np.hstack([fine_tuned, weight * untrained]))


def whitened(train: np.ndarray, train_labels: np.ndarray, val: np.ndarray, val_labels: np.ndarray):
    """A function that whitens L2-normalised embeddings with a whitening learned on train + val and normalises
    them again (the identity where no landmark has two photos: nothing is learned)."""
    whitening = fit_whitening(np.vstack([train, val]).astype(np.float64), np.concatenate([train_labels, val_labels]))
    return lambda x: normalise(apply_whitening(x, whitening)) if whitening else x


def experiment_embeddings(results: Path, experiment: str, landmark_of: dict) -> dict:
    """The experiment's train, val (None if not embedded) and test embeddings, L2-normalised, with labels and ids."""
    embed = results / "experiments" / experiment / "embed"
    val, val_labels = database(embed, ["val"], landmark_of) if (embed / "val.npy").exists() else (None, None)
    train, train_labels = database(embed, ["train"], landmark_of)
    queries, query_ids = load_embeddings(embed / "test.npy")
    return {
        "train": normalise(train),
        "labels": train_labels,
        "val": None if val is None else normalise(val),
        "val_labels": val_labels,
        "test": normalise(queries.astype(np.float32)),
        "ids": query_ids,
    }


def run_gaps(results: Path, experiment: str) -> dict[str, float]:
    selection = read_table(results / "select" / "selection.parquet")
    landmark_of = dict(zip(selection["id"], selection["landmark_id"]))
    truth = truth_from_selection(selection)
    tuned = experiment_embeddings(results, experiment, landmark_of)
    raw = experiment_embeddings(results, UNTRAINED, landmark_of)
    if not np.array_equal(tuned["ids"]["id"], raw["ids"]["id"]):
        raise SystemExit(f"{results}: {experiment} and {UNTRAINED} embedded different test photos")
    labels = tuned["labels"]

    def gap(db: np.ndarray, queries: np.ndarray) -> float:
        label, score = predict(db, labels, queries, qe=0)
        return score_predictions(
            pd.DataFrame({"id": tuned["ids"]["id"], "landmark_id": label, "score": score}), truth
        ).gap

    untrained = {"raw": (raw["train"], raw["test"])}
    if raw["val"] is not None:
        whiten = whitened(raw["train"], labels, raw["val"], raw["val_labels"])
        untrained["whitened"] = (whiten(raw["train"]), whiten(raw["test"]))
    gaps = {"fine-tuned": gap(tuned["train"], tuned["test"])}
    for kind, (db, queries) in untrained.items():
        gaps[f"untrained, {kind}"] = gap(db, queries)
        for weight in WEIGHTS:
            gaps[f"fine-tuned + {weight} x untrained, {kind}"] = gap(
                concatenate(tuned["train"], db, weight), concatenate(tuned["test"], queries, weight)
            )
    return gaps


def runs_table(folders: list[Path], experiment: str) -> pd.DataFrame:
    """One row per results folder where both experiments embedded the test photos: its set (the benchmark's
    --out folder), its run (<regime>-seed<N>) and the GAP of each setting."""
    rows = [
        {"set": results.parent.parent.name, "run": run_name(results), **run_gaps(results, experiment)}
        for results in folders
        if all((results / "experiments" / name / "embed" / "test.npy").exists() for name in (experiment, UNTRAINED))
    ]
    return pd.DataFrame(rows)


def summary(table: pd.DataFrame) -> str:
    """Per set and regime: GAP mean ± sd over the seeds and the gain over the fine-tuned embedding alone."""
    settings = [column for column in table if column not in ("set", "run")]
    regime = table["run"].str.replace(r"-seed\d+$", "", regex=True)
    lines = []
    for (folder, name), runs in table.groupby([table["set"], regime], sort=False):
        lines.append(
            f"\n{folder}, {name} ({len(runs)} runs): GAP mean ± sd; gain over fine-tuned alone: mean ± sd (smallest)"
        )
        for setting in settings:
            gain = runs[setting] - runs["fine-tuned"]
            lines.append(
                f"  {setting:40s} {runs[setting].mean():.3f} ± {runs[setting].std(ddof=0):.3f}   "
                f"{gain.mean():+.4f} ± {gain.std(ddof=0):.4f} ({gain.min():+.4f})"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="results folders of finished benchmark runs")
    parser.add_argument("--experiment", default="finetuned", help="the fine-tuned experiment (default: finetuned)")
    args = parser.parse_args(argv)
    table = runs_table(args.results, args.experiment)
    if table.empty:
        print(f"no finished runs with both {args.experiment} and {UNTRAINED} under the given folders", file=sys.stderr)
        return 1
    print(table.set_index(["set", "run"]).T.to_string(float_format="%.3f"))
    print(summary(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
