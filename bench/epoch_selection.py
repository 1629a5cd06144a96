"""How well val picks training's epoch: every epoch's test GAP beside the val scores that could pick it.

train keeps the epoch (the untrained model as epoch 0) with the best val GAP. On real photos val is small
(full regime: 10% of each landmark, about 33 landmark photos), so one val photo moves val GAP by 0.03 and
ties and noise decide. This trains a finished run's experiment again, with its own settings, and at each
epoch also embeds the run's test queries (their database, the train photos, comes from train's own val
pass), to print per epoch:

- the val scores train computes (`val_gap`, `val_accuracy`, `val_right`, `val_gap_unwhitened`);
- `val_map`: the mean average precision of the val landmark photos' rankings of the train photos (every
  photo of their landmark counts, not only the nearest), with the whitening of the train photos as val GAP
  uses it; a finer-grained selection score;
- `test_gap`, `test_accuracy`: the test queries answered by their top-1 neighbour among the train photos,
  ranked by its cosine, with the whitening model.pt would carry (no geometric verification; `retrieve`
  adds it on top), what the epoch would score if val chose it; with the run's `sources.csv`
  (`bench/real_photos.py`), `test_gap_query` too: over the folder's query photos alone (Paris few-shot: the
  web photos, the issue's regime), and each rule's pick read that way.

Then, per selection rule, the test GAP of the epoch it chooses, and the best epoch's (an oracle). Research
only: the test queries are never used to choose anything in the pipeline.

`--soups` also scores, after the last epoch, the average of the weights of epochs k..last for every k (as
model.pt would hold each: WiSE-FT applied; a uniform model soup of one run's epochs, like stochastic
weight averaging), each with its own learned whitening: an alternative to choosing one epoch on a small val.

    .venv/bin/python bench/epoch_selection.py bench/out/cpu384_web_full/full-seed*/results \
        --out bench/out/epoch_selection/web_full [--soups]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

from neighbour_smoothing import query_photo_ids  # noqa: E402

from landmarks import train as train_module  # noqa: E402
from landmarks import validation  # noqa: E402
from landmarks.config import section_settings  # noqa: E402
from landmarks.index import knn  # noqa: E402
from landmarks.loader import ShardIndex  # noqa: E402
from landmarks.validation import top1_scores  # noqa: E402
from landmarks.whitening import apply_whitening, fit_whitening  # noqa: E402

EVALUATE_VAL_GAP = train_module.evaluate_val_gap
EMBED_FOR_TRAINING = validation.embed_for_training


def split_dirs(results: Path, split: str) -> list[Path]:
    return sorted(path for path in (results / "shards" / split).glob("part-*") if path.is_dir())


def mean_average_precision(db, db_labels, queries, query_labels) -> float:
    """mAP of each labelled query's ranking of the whole database (positives: its landmark's photos)."""
    order = np.argsort(-(queries @ db.T), axis=1, kind="stable")
    precisions = []
    for row, label in zip(order, query_labels):
        hits = db_labels[row] == label
        if hits.any():
            ranks = np.flatnonzero(hits) + 1
            precisions.append(float(np.mean(np.arange(1, len(ranks) + 1) / ranks)))
    return float(np.mean(precisions)) if precisions else float("nan")


def recording_embeddings(recorded: list):
    """validation.embed_for_training, its results also appended to `recorded` (train's own passes over
    the train and val photos, reused here rather than embedded again)."""

    def embed(*args, **kwargs):
        recorded.append(EMBED_FOR_TRAINING(*args, **kwargs))
        return recorded[-1]

    return embed


def score_model(model, train_index, val_index, test_index, settings, device, dist, query_ids=None) -> tuple[dict, dict]:
    """train's val result for the model in hand, and the row of val and test scores this script prints;
    with `query_ids` also `test_gap_query`, over those test queries alone (the folder's query photos)."""
    recorded: list[np.ndarray] = []
    validation.embed_for_training = recording_embeddings(recorded)
    try:
        result = EVALUATE_VAL_GAP(model, train_index, val_index, settings, device, dist)
    finally:
        validation.embed_for_training = EMBED_FOR_TRAINING
    db, val = recorded  # evaluate_val_gap embeds the train photos, then the val queries
    test = EMBED_FOR_TRAINING(model, test_index, settings, device, dist or train_module.Distributed(device=device))
    db_labels = train_index.table["landmark_id"].to_numpy(dtype=np.int64)
    train_whitening = None  # what val GAP is judged with; model.pt carries result["whitening"]
    if settings["whitening"] == "learned":
        train_whitening = fit_whitening(db, db_labels, settings["whitening_shrinkage"], settings["whitening_power"])
    landmark = val_index.table["landmark_id"].notna().to_numpy()
    val_labels = val_index.table["landmark_id"][landmark].to_numpy(dtype=np.int64)
    white_db, white_val = apply_whitening(db, train_whitening), apply_whitening(val[landmark], train_whitening)
    model_whitening = result.get("whitening")
    model_db, model_test = apply_whitening(db, model_whitening), apply_whitening(test, model_whitening)
    test_scores = top1_scores(model_db, db_labels, model_test, test_index.table)
    row = {
        "val_gap": result["val_gap"],
        "val_accuracy": result["val_accuracy"],
        "val_right": result["val_right"],  # val landmark photos answered right
        "val_gap_unwhitened": result.get("val_gap_unwhitened", np.nan),
        "val_map": mean_average_precision(white_db, db_labels, white_val, val_labels),
        "val_top1_cosine": float(np.mean(knn(white_db, white_val, 1)[0])),
        "test_gap": test_scores["val_gap"],
        "test_accuracy": test_scores["val_accuracy"],
    }
    if query_ids is not None:
        chosen = test_index.table["id"].isin(query_ids).to_numpy()
        row["test_gap_query"] = top1_scores(model_db, db_labels, model_test[chosen], test_index.table[chosen])[
            "val_gap"
        ]
    return result, row


def average_weights(snapshots: list[dict]) -> dict:
    """The mean of several state dicts, floating-point tensors only (counters: the last one's)."""
    return {
        key: torch.stack([s[key] for s in snapshots]).mean(0) if value.is_floating_point() else value
        for key, value in snapshots[-1].items()
    }


def epoch_scorer(test_index: ShardIndex, rows: list[dict], soups: list[dict] | None = None, query_ids=None):
    """A stand-in for train's evaluate_val_gap that also scores the epoch's model on the test queries.

    With `soups`, each epoch's weights as model.pt would hold them (WiSE-FT applied) are kept, and after
    the last epoch the averages of epochs k..last (k = 1, 2, ...; a uniform "model soup" of one run's
    epochs, as stochastic weight averaging does) are scored the same way and appended to `soups`."""
    snapshots: list[dict] = []

    def evaluate(model, train_index, val_index, settings, device, dist=None):
        result, row = score_model(model, train_index, val_index, test_index, settings, device, dist, query_ids)
        rows.append({"epoch": len(rows), **row})
        print(json.dumps(rows[-1]), flush=True)
        if soups is not None and len(rows) > 1:
            snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            if len(rows) == settings["epochs"] + 1:
                score_soups(model, snapshots, (train_index, val_index, test_index, settings, device, dist), soups)
        return result

    return evaluate


def score_soups(model, snapshots: list[dict], scoring: tuple, soups: list[dict]) -> None:
    """Score the average of epochs k..last for every k, then put the last epoch's weights back."""
    trained = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        for first in range(1, len(snapshots) + 1):
            model.load_state_dict(average_weights(snapshots[first - 1 :]))
            _, row = score_model(model, *scoring)
            soups.append({"first_epoch": first, "last_epoch": len(snapshots), **row})
            print(json.dumps(soups[-1]), flush=True)
    finally:
        model.load_state_dict(trained)


def epochs_of_run(
    results: Path,
    experiment: str,
    out_dir: Path,
    threads: int,
    overrides: dict | None = None,
    soups: list[dict] | None = None,
) -> pd.DataFrame:
    """Train the run's experiment again (its train.json settings, `overrides` on top); one row per epoch.
    With `soups`, the averages of the last epochs are scored too and appended there (epoch_scorer)."""
    overrides = overrides or {}
    recorded = json.loads((results / "experiments" / experiment / "train" / "train.json").read_text())["settings"]
    settings = section_settings("train", {**recorded, **overrides})  # today's defaults for keys added since
    rows: list[dict] = []
    test_index = ShardIndex.from_dirs(split_dirs(results, "test"))
    train_module.evaluate_val_gap = epoch_scorer(test_index, rows, soups, query_photo_ids(results))
    try:
        train_module.train(
            split_dirs(results, "train"),
            split_dirs(results, "val"),
            out_dir,
            settings,
            device=torch.device("cpu"),
            threads=threads,
            bank_dirs=split_dirs(results, "nonlandmark"),
        )
    finally:
        train_module.evaluate_val_gap = EVALUATE_VAL_GAP
    return pd.DataFrame(rows)


def chosen_epoch(table: pd.DataFrame, column: str) -> int:
    """The best score on `column`, the later epoch on a tie."""
    best = table[column].max()
    return int(table.loc[table[column] >= best - 1e-12, "epoch"].max())


def trained_unless_clearly_behind(table: pd.DataFrame) -> int:
    """train's rule: val GAP, except that the untrained model wins only when it answers at least two more
    val landmark photos right than the best trained epoch (one photo is within val's noise):
    `train.untrained_val_margin: 2`, the default."""
    pick = chosen_epoch(table, "val_gap")
    trained = table[table["epoch"] > 0]
    if pick > 0 or trained.empty:
        return pick
    challenger = chosen_epoch(trained, "val_gap")
    right = table.set_index("epoch")["val_right"]
    return 0 if right[0] - right[challenger] >= 2 else challenger


RULES = {
    "val GAP (train's rule until the margin)": lambda t: chosen_epoch(t, "val_gap"),
    "val GAP, the trained epochs only": lambda t: chosen_epoch(t[t["epoch"] > 0], "val_gap"),
    "val GAP, untrained only when 2+ val photos ahead (train's rule)": trained_unless_clearly_behind,
    "val mAP": lambda t: chosen_epoch(t, "val_map"),
    "val GAP, then val mAP on a tie": lambda t: int(
        t.loc[t["val_gap"] >= t["val_gap"].max() - 1e-12].sort_values(["val_map", "epoch"]).iloc[-1]["epoch"]
    ),
    "val top-1 cosine": lambda t: chosen_epoch(t, "val_top1_cosine"),
    "last epoch": lambda t: int(t["epoch"].max()),
    "untrained (epoch 0)": lambda t: 0,
    "oracle (best test GAP)": lambda t: chosen_epoch(t, "test_gap"),
}


def run_tables(results: Path, args: argparse.Namespace) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """The run's per-epoch table (and with --soups its soups table), read back when already written."""
    name = results.parent.name
    table_path, soups_path = args.out / f"{name}.csv", args.out / f"{name}-soups.csv"
    if table_path.exists() and (soups_path.exists() or not args.soups):
        return pd.read_csv(table_path), pd.read_csv(soups_path) if args.soups else None
    soups: list[dict] | None = [] if args.soups else None
    table = epochs_of_run(
        results, args.experiment, args.out / name / "train", args.threads, json.loads(args.train), soups
    )
    table_path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(table_path, index=False)
    if soups is None:
        return table, None
    soups_table = pd.DataFrame(soups)
    soups_table.to_csv(soups_path, index=False)
    return table, soups_table


def soup_rules(soups: pd.DataFrame) -> dict[str, float]:
    """Test GAP of every soup, and of the one val GAP picks among them (the longer average on a tie)."""
    picks = {f"average of epochs {row.first_epoch}-{row.last_epoch}": float(row.test_gap) for row in soups.itertuples()}
    best = soups.loc[soups["val_gap"] >= soups["val_gap"].max() - 1e-12].sort_values("first_epoch").iloc[0]
    picks["the average val GAP picks"] = float(best["test_gap"])
    return picks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="finished runs' results folders")
    parser.add_argument("--experiment", default="finetuned")
    parser.add_argument("--out", type=Path, required=True, help="folder for the per-epoch tables and training")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train", default="{}", help="JSON train settings over each run's own (a variant to look at)")
    parser.add_argument(
        "--soups", action="store_true", help="also score the averages of the last epochs' weights (epoch_scorer)"
    )
    args = parser.parse_args()
    summary = []
    for results in args.results:
        table, soups = run_tables(results, args)
        print(f"\n{results.parent.name}\n{table.round(3).to_string(index=False)}")
        picks = {rule: float(table.loc[pick(table), "test_gap"]) for rule, pick in RULES.items()}
        if "test_gap_query" in table:  # the same epochs over the folder's query photos alone
            picks |= {
                f"{rule}, query photos": float(table.loc[pick(table), "test_gap_query"]) for rule, pick in RULES.items()
            }
        if soups is not None:
            print(soups.round(3).to_string(index=False))
            picks.update(soup_rules(soups))
        summary.append(picks)
    summary = pd.DataFrame(summary, index=[r.parent.name for r in args.results])
    print("\ntest GAP (top-1 cosine) of the epoch each rule picks\n")
    print(summary.T.assign(mean=summary.mean()).round(3).to_string())


if __name__ == "__main__":
    main()
