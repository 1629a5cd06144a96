"""Stage `score`: GAP as Kaggle computes it, accuracy, and a report with figures.

Ground truth comes from the selection table (test split: a landmark id, or none for non-landmark
queries), or from a Kaggle solution CSV (`id,landmarks,Usage`), which also gives Public and Private
scores. Writes metrics.json, report.md and figures (PNG) into the output folder.

    python -m landmarks.score --predictions results/experiments/X/retrieve/predictions.parquet \
        --selection results/select/selection.parquet --out-dir results/experiments/X/score
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd

from .common import StageError, atomic_path, read_table, run_cli, setup_logging, write_json_atomic, write_text_atomic

log = logging.getLogger("landmarks.score")

FIGURES = ("examples.png", "precision_vs_rank.png", "score_distributions.png", "per_class_accuracy.png")


def truth_from_selection(selection: pd.DataFrame) -> pd.DataFrame:
    """Test queries and their ground truth: [landmark_id], or [] for a non-landmark photo."""
    test = selection[selection["split"] == "test"]
    return pd.DataFrame({"id": test["id"].to_numpy(),
                         "landmarks": [[] if pd.isna(x) else [int(x)] for x in test["landmark_id"]]})


def ranked_predictions(predictions: pd.DataFrame, truth: pd.DataFrame) -> pd.DataFrame:
    """Predictions in GAP order (score desc, id asc, class asc) with correctness and precision at rank."""
    truth_map = dict(zip(truth["id"], truth["landmarks"]))
    ranked = predictions.dropna(subset=["landmark_id"])
    ranked = ranked[ranked["id"].isin(truth_map)].copy()
    ranked["landmark_id"] = ranked["landmark_id"].astype(np.int64)
    ranked = ranked.sort_values(["score", "id", "landmark_id"], ascending=[False, True, True], kind="stable")
    ranked["is_landmark"] = [len(truth_map[i]) > 0 for i in ranked["id"]]
    ranked["correct"] = [lab in truth_map[i] for i, lab in zip(ranked["id"], ranked["landmark_id"])]
    ranked["rank"] = np.arange(1, len(ranked) + 1)
    ranked["precision_at_rank"] = ranked["correct"].cumsum() / ranked["rank"]
    return ranked.reset_index(drop=True)


def _figure_path(out_dir: Path, name: str):
    return atomic_path(out_dir / name, suffix=".png")


def plot_precision_vs_rank(ranked: pd.DataFrame, out_dir: Path, plt) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    if len(ranked):
        ax.plot(ranked["rank"], ranked["precision_at_rank"], label="all predictions")
        landmark_only = ranked[ranked["is_landmark"]].reset_index(drop=True)
        if len(landmark_only):
            ax.plot(np.arange(1, len(landmark_only) + 1),
                    landmark_only["correct"].cumsum() / np.arange(1, len(landmark_only) + 1),
                    label="landmark queries only", linestyle="--")
    ax.set(xlabel="rank (predictions sorted by confidence)", ylabel="precision at rank", ylim=(0, 1.02),
           title="Precision against rank (GAP integrates the correct ones)")
    ax.legend(loc="lower left")
    fig.tight_layout()
    with _figure_path(out_dir, "precision_vs_rank.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def plot_score_distributions(ranked: pd.DataFrame, out_dir: Path, plt) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    groups = [("landmark query, correct", ranked["is_landmark"] & ranked["correct"]),
              ("landmark query, wrong", ranked["is_landmark"] & ~ranked["correct"]),
              ("non-landmark query", ~ranked["is_landmark"])]
    finite = ranked["score"][np.isfinite(ranked["score"])]
    bins = np.linspace(finite.min(), finite.max(), 30) if len(finite) > 1 else 10
    for label, mask in groups:
        values = ranked.loc[mask, "score"]
        values = values[np.isfinite(values)]
        if len(values):
            ax.hist(values, bins=bins, alpha=0.55, label=f"{label} ({len(values)})")
    ax.set(xlabel="confidence score", ylabel="queries", title="Score distributions")
    ax.legend()
    fig.tight_layout()
    with _figure_path(out_dir, "score_distributions.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def plot_per_class_accuracy(predictions: pd.DataFrame, truth: pd.DataFrame, out_dir: Path, plt) -> pd.DataFrame:
    landmark_truth = truth[truth["landmarks"].map(len) > 0]
    predicted = dict(zip(predictions["id"], predictions["landmark_id"]))
    rows = [{"landmark_id": labels[0], "correct": (not pd.isna(predicted.get(i))) and predicted.get(i) in labels}
            for i, labels in zip(landmark_truth["id"], landmark_truth["landmarks"])]
    per_class = (pd.DataFrame(rows, columns=["landmark_id", "correct"]).groupby("landmark_id")["correct"]
                 .agg(["mean", "size"]).rename(columns={"mean": "accuracy", "size": "queries"})
                 .sort_values(["accuracy", "queries"], ascending=[True, False]).reset_index())
    fig, ax = plt.subplots(figsize=(max(6, 0.18 * len(per_class) + 2), 4))
    ax.bar(np.arange(len(per_class)), per_class["accuracy"], color="tab:blue")
    ax.set_xticks(np.arange(len(per_class)), per_class["landmark_id"].astype(str), rotation=90, fontsize=7)
    ax.set(xlabel="landmark id", ylabel="top-1 accuracy", ylim=(0, 1.05), title="Per-class accuracy (test queries)")
    fig.tight_layout()
    with _figure_path(out_dir, "per_class_accuracy.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return per_class


def _thumbnail(index_rows: dict, image_id: str, size: int = 96):
    from PIL import Image
    from .loader import read_sample
    row = index_rows.get(image_id)
    if row is None:
        return Image.new("RGB", (size, size), (200, 200, 200))
    image = read_sample(row[0], row[1])
    image.thumbnail((size, size))
    return image


def plot_examples(ranked: pd.DataFrame, neighbours: pd.DataFrame | None, index_rows: dict, out_dir: Path, plt,
                  k: int = 5) -> None:
    """Queries with their top-k neighbours, green = right landmark, red = wrong: the most confident
    correct, the least confident correct and the most confident wrong predictions."""
    correct = ranked[ranked["correct"]]
    wrong = ranked[~ranked["correct"]]
    picks = [("most confident correct", correct.head(2)), ("least confident correct", correct.tail(2)),
             ("most confident wrong", wrong.head(2))]
    rows = [(title, r) for title, frame in picks for _, r in frame.iterrows()]
    fig, axes = plt.subplots(max(1, len(rows)), k + 1, figsize=(1.7 * (k + 1), 1.9 * max(1, len(rows))),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    by_query = {q: g.sort_values("rank") for q, g in neighbours.groupby("query_id")} if neighbours is not None else {}
    for r, (title, row) in enumerate(rows):
        axes[r, 0].imshow(_thumbnail(index_rows, row["id"]))
        axes[r, 0].set_title(f"{title}\nquery {row['id'][:8]} score {row['score']:.2f}", fontsize=6)
        truth_label = row["landmark_id"] if row["correct"] else None
        for c, (_, n) in enumerate(by_query.get(row["id"], pd.DataFrame()).head(k).iterrows(), start=1):
            axes[r, c].imshow(_thumbnail(index_rows, n["neighbour_id"]))
            right = truth_label is not None and n["neighbour_landmark_id"] == truth_label
            colour = "green" if right else "red"
            axes[r, c].set_title(f"#{int(n['rank'])} lm {n['neighbour_landmark_id']} cos {n['cosine']:.2f}",
                                 fontsize=6, color=colour)
            for spine in axes[r, c].spines.values():
                spine.set_visible(True)
                spine.set_color(colour)
                spine.set_linewidth(3)
            axes[r, c].axis("on")
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
    fig.tight_layout()
    with _figure_path(out_dir, "examples.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def fmt(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def score(predictions_path, out_dir: Path, *, selection_path=None, solution_path=None, neighbours_path=None,
          shard_dirs=(), train_summary_path=None, experiment: str = "") -> dict:
    from . import metrics as gap_metrics
    predictions = read_table(predictions_path)
    if solution_path:
        solution = gap_metrics.read_solution_csv(solution_path)
        truth = solution[solution["usage"] != "Ignored"][["id", "landmarks"]]
    elif selection_path:
        solution = None
        truth = truth_from_selection(read_table(selection_path))
    else:
        raise StageError("give --selection or --solution for the ground truth")
    result = gap_metrics.score_predictions(predictions, truth)
    # The same ranking scored by the raw top-1 cosine shows what the non-landmark reranking bought.
    unreranked = gap_metrics.score_predictions(predictions.assign(score=predictions["top_cosine"]), truth)
    summary = {"experiment": experiment, "gap": result.gap, "gap_landmarks_only": result.gap_landmarks_only,
               "accuracy": result.accuracy, "gap_without_rerank": unreranked.gap,
               "queries": result.n_queries, "landmark_queries": result.n_landmark_queries,
               "predictions": result.n_predictions}
    if solution is not None:
        for usage in ("Public", "Private"):
            part = solution[solution["usage"] == usage][["id", "landmarks"]]
            if len(part):
                summary[f"gap_{usage.lower()}"] = gap_metrics.score_predictions(predictions, part).gap
    if train_summary_path and Path(train_summary_path).exists():
        trained = json.loads(Path(train_summary_path).read_text())
        summary.update({"val_gap": trained.get("best_val_gap"), "best_epoch": trained.get("best_epoch"),
                        "train_seconds": trained.get("seconds")})

    out_dir.mkdir(parents=True, exist_ok=True)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ranked = ranked_predictions(predictions, truth)
    neighbours = read_table(neighbours_path) if neighbours_path else None
    index_rows = {}
    if shard_dirs:
        from .loader import ShardIndex
        table = ShardIndex.from_dirs(shard_dirs).table
        index_rows = {i: (s, k) for i, s, k in zip(table["id"], table["shard"], table["key"])}
    plot_precision_vs_rank(ranked, out_dir, plt)
    plot_score_distributions(ranked, out_dir, plt)
    per_class = plot_per_class_accuracy(predictions, truth, out_dir, plt)
    plot_examples(ranked, neighbours, index_rows, out_dir, plt)
    summary = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in summary.items()}
    write_json_atomic(out_dir / "metrics.json", summary)
    write_text_atomic(out_dir / "report.md", render_report(summary, per_class))
    log.info("%s: GAP %s, GAP without non-landmark queries %s, top-1 accuracy %s", experiment or predictions_path,
             fmt(summary["gap"]), fmt(summary["gap_landmarks_only"]), fmt(summary["accuracy"]))
    return summary


def render_report(summary: dict, per_class: pd.DataFrame) -> str:
    lines = [f"# Recognition report: {summary['experiment']}", "",
             "| metric | value |", "|---|---|",
             f"| GAP (all test queries, Kaggle definition) | {fmt(summary['gap'])} |",
             f"| GAP ignoring non-landmark queries | {fmt(summary['gap_landmarks_only'])} |",
             f"| top-1 accuracy (landmark queries) | {fmt(summary['accuracy'])} |",
             f"| GAP without non-landmark reranking (raw top-1 cosine) | {fmt(summary['gap_without_rerank'])} |"]
    for key, label in (("gap_public", "GAP Public"), ("gap_private", "GAP Private"), ("val_gap", "val GAP (best epoch)")):
        if summary.get(key) is not None:
            lines.append(f"| {label} | {fmt(summary[key])} |")
    lines += [f"| test queries (landmark / all) | {summary['landmark_queries']} / {summary['queries']} |", "",
              "![examples](examples.png)", "", "![precision against rank](precision_vs_rank.png)", "",
              "![score distributions](score_distributions.png)", "", "![per-class accuracy](per_class_accuracy.png)", ""]
    if len(per_class):
        worst = per_class.head(10)
        lines += ["## Hardest classes", "", "| landmark id | accuracy | queries |", "|---|---|---|"]
        lines += [f"| {r.landmark_id} | {r.accuracy:.2f} | {r.queries} |" for r in worst.itertuples()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m landmarks.score", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--predictions", required=True, help="predictions.parquet from the retrieve stage")
    parser.add_argument("--selection", help="selection.parquet: ground truth of the test split")
    parser.add_argument("--solution", help="Kaggle solution CSV (id,landmarks,Usage); overrides --selection")
    parser.add_argument("--neighbours", help="neighbours.parquet (for the example figure)")
    parser.add_argument("--shards", nargs="*", default=[], help="shard folders holding query and database images")
    parser.add_argument("--train-summary", help="train.json (adds the validation GAP to the report)")
    parser.add_argument("--experiment", default="", help="experiment name for the report")
    parser.add_argument("--out-dir", required=True)
    args = parser.parse_args(argv)
    setup_logging()
    score(args.predictions, Path(args.out_dir), selection_path=args.selection, solution_path=args.solution,
          neighbours_path=args.neighbours, shard_dirs=args.shards, train_summary_path=args.train_summary,
          experiment=args.experiment)
    return 0


if __name__ == "__main__":
    run_cli(main)
