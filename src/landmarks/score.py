"""Stage `score`: GAP as Kaggle computes it, accuracy, and a report with figures.

Ground truth comes from the selection table (test split: a landmark id, or none for non-landmark
queries), or from a Kaggle solution CSV (`id,landmarks,Usage`; Ignored rows are not scored), which
also gives Public and Private scores. Metrics (landmarks.metrics): GAP over all test queries, GAP
ignoring non-landmark queries, top-1 accuracy over landmark queries, and GAP of the same labels ranked
by the raw top-1 cosine (what the non-landmark reranking bought). Writes metrics.json, report.md and
the figures (report.py): examples.png, precision_vs_rank.png, score_distributions.png,
per_class_accuracy.png.

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

from .common import StageError, read_table, run_cli, setup_logging, write_json_atomic, write_text_atomic
from .loader import ShardImages

log = logging.getLogger("landmarks.score")

FIGURES = ("examples.png", "precision_vs_rank.png", "score_distributions.png", "per_class_accuracy.png")


def truth_from_selection(selection: pd.DataFrame) -> pd.DataFrame:
    """Test queries and their ground truth: [landmark_id], or [] for a non-landmark photo."""
    test = selection[selection["split"] == "test"]
    return pd.DataFrame({"id": test["id"].to_numpy(),
                         "landmarks": [[] if pd.isna(x) else [int(x)] for x in test["landmark_id"]]})


def ranked_predictions(predictions: pd.DataFrame, truth: pd.DataFrame) -> pd.DataFrame:
    """Scored predictions in GAP order (score desc, then query id asc), one row each, with the query's
    truth (`truth_landmark_id`, NA for a non-landmark query), `is_landmark`, `correct`, `rank` and
    `precision_at_rank`. Queries without a prediction, or not in the truth, are not ranked."""
    made = predictions.dropna(subset=["landmark_id"])
    ranked = made.merge(truth[["id", "landmarks"]], on="id", how="inner", validate="one_to_one")
    ranked["landmark_id"] = ranked["landmark_id"].astype(np.int64)
    labels = ranked.pop("landmarks").map(lambda x: [] if x is None or (isinstance(x, float) and math.isnan(x))
                                         else list(x))
    ranked["is_landmark"] = labels.map(len).to_numpy() > 0
    ranked["correct"] = [lab in truth_labels for lab, truth_labels in zip(ranked["landmark_id"], labels)]
    ranked["truth_landmark_id"] = pd.array([x[0] if x else None for x in labels], dtype="Int64")
    ranked = ranked.sort_values(["score", "id"], ascending=[False, True], kind="stable").reset_index(drop=True)
    ranked["rank"] = np.arange(1, len(ranked) + 1)
    ranked["precision_at_rank"] = ranked["correct"].cumsum() / ranked["rank"]
    return ranked


# Other confidences for the same predicted labels (columns of predictions.parquet), to show what the
# retrieve stage's confidence buys: name -> function of (predictions table, verified(table) -> mask).
CONFIDENCES = {
    "top-1 cosine": lambda p, _: p["top_cosine"],
    "top-1 cosine − runner-up landmark's cosine": lambda p, _: p["top_cosine"] - p["other_cosine"],
    "top-1 cosine − mean top cosine to the non-landmark bank": lambda p, _: p["top_cosine"] - p["bank_cosine"],
    "geometrically verified first, then top-1 cosine": lambda p, verified: p["top_cosine"] + 2 * verified(p),
}


def gap_by_confidence(predictions: pd.DataFrame, truth: pd.DataFrame, min_inliers: int = 10) -> dict[str, float]:
    """GAP of the same labels ranked by each confidence whose columns the predictions have."""
    from . import metrics as gap_metrics
    result = {"the retrieve stage's confidence (score)": gap_metrics.score_predictions(predictions, truth).gap}
    for name, confidence in CONFIDENCES.items():
        try:
            score = confidence(predictions, lambda p: p["inliers"] >= min_inliers)
        except KeyError:
            continue
        result[name] = gap_metrics.score_predictions(predictions.assign(score=score.fillna(-np.inf)), truth).gap
    return result


def fmt(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def _load_truth(selection_path, solution_path):
    """(truth of the scored queries, solution table or None). A solution CSV wins over the selection."""
    from . import metrics as gap_metrics
    if solution_path:
        solution = gap_metrics.read_solution_csv(solution_path)
        return solution[solution["usage"] != "Ignored"][["id", "landmarks"]].reset_index(drop=True), solution
    if selection_path:
        selection = read_table(selection_path)
        missing = {"id", "landmark_id", "split"} - set(selection.columns)
        if missing:
            raise StageError(f"{selection_path}: missing column(s) {sorted(missing)} for the test ground truth")
        return truth_from_selection(selection), None
    raise StageError("give --selection or --solution for the ground truth")


def score(predictions_path, out_dir: Path, *, selection_path=None, solution_path=None, neighbours_path=None,
          shard_dirs=(), train_summary_path=None, retrieve_summary_path=None, experiment: str = "") -> dict:
    from . import metrics as gap_metrics
    from . import report
    predictions = read_table(predictions_path)
    missing = {"id", "landmark_id", "score"} - set(predictions.columns)
    if missing:
        raise StageError(f"{predictions_path}: missing column(s) {sorted(missing)}")
    if "top_cosine" not in predictions:  # predictions from elsewhere: no separate raw cosine
        predictions["top_cosine"] = predictions["score"]
    truth, solution = _load_truth(selection_path, solution_path)
    try:
        result = gap_metrics.score_predictions(predictions, truth)
        # The same labels ranked by the raw top-1 cosine show what the non-landmark reranking bought.
        unreranked = gap_metrics.score_predictions(predictions.assign(score=predictions["top_cosine"]), truth)
    except (ValueError, TypeError) as err:
        raise StageError(f"{predictions_path}: cannot be scored: {err}") from err
    if result.n_ignored:
        log.warning("%d predictions are for queries not in the ground truth: not scored", result.n_ignored)
    summary = {"experiment": experiment, "gap": result.gap, "gap_landmarks_only": result.gap_landmarks_only,
               "accuracy": result.accuracy, "gap_without_rerank": unreranked.gap,
               "gap_landmarks_only_without_rerank": unreranked.gap_landmarks_only,
               "gap_by_confidence": gap_by_confidence(predictions, truth),
               "queries": result.n_queries, "landmark_queries": result.n_landmark_queries,
               "predictions": result.n_predictions, "correct": result.n_correct,
               "ground_truth": str(solution_path or selection_path)}
    if solution is not None:
        for usage in ("Public", "Private"):
            part = solution[solution["usage"] == usage][["id", "landmarks"]]
            if len(part):
                summary[f"gap_{usage.lower()}"] = gap_metrics.score_predictions(predictions, part).gap
    if train_summary_path and Path(train_summary_path).exists():
        trained = json.loads(Path(train_summary_path).read_text())
        summary.update({"val_gap": trained.get("best_val_gap"), "best_epoch": trained.get("best_epoch"),
                        "train_seconds": trained.get("seconds")})
    if retrieve_summary_path and Path(retrieve_summary_path).exists():
        retrieved = json.loads(Path(retrieve_summary_path).read_text())
        index = retrieved.get("index") or {}
        recall = retrieved.get("recall") or {}
        settings = retrieved.get("settings") or retrieved  # older retrieve.json: the settings at the top level
        verify = settings.get("verify") or {}
        summary.update({"prediction": retrieved.get("prediction"), "rerank": settings.get("rerank"),
                        "k": settings.get("k"), "index": index.get("type"), "search_device": index.get("device"),
                        "verified_neighbours": verify.get("neighbours"), "verified": retrieved.get("verified"),
                        "ann_recall_at_k": recall.get("recall_at_k"),
                        "ann_top1_in_top_k": recall.get("top1_in_top_k"),
                        "database_images": (retrieved.get("database") or {}).get("images"),
                        "bank_images": (retrieved.get("bank") or {}).get("images")})
        if verify.get("min_inliers"):
            summary["gap_by_confidence"] = gap_by_confidence(predictions, truth, verify["min_inliers"])

    out_dir.mkdir(parents=True, exist_ok=True)
    ranked = ranked_predictions(predictions, truth)
    ranked_raw = ranked_predictions(predictions.assign(score=predictions["top_cosine"]), truth)
    neighbours = read_table(neighbours_path) if neighbours_path else None
    per_class = report.per_class_accuracy(predictions, truth)
    report.plot_examples(ranked, neighbours, ShardImages(shard_dirs), out_dir / "examples.png")
    report.plot_precision_vs_rank(ranked, ranked_raw, out_dir / "precision_vs_rank.png", gap=result.gap,
                                  gap_raw=unreranked.gap)
    report.plot_score_distributions(ranked, out_dir / "score_distributions.png")
    report.plot_per_class_accuracy(per_class, out_dir / "per_class_accuracy.png")
    summary = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in summary.items()}
    write_json_atomic(out_dir / "metrics.json", summary)
    write_text_atomic(out_dir / "report.md", render_report(summary, per_class, ranked))
    log.info("%s: GAP %s, GAP without non-landmark queries %s, top-1 accuracy %s, GAP without reranking %s",
             experiment or predictions_path, fmt(summary["gap"]), fmt(summary["gap_landmarks_only"]),
             fmt(summary["accuracy"]), fmt(summary["gap_without_rerank"]))
    return summary


def render_report(summary: dict, per_class: pd.DataFrame, ranked: pd.DataFrame | None = None) -> str:
    lines = [f"# Recognition report: {summary['experiment'] or 'test queries'}", "",
             f"Ground truth: `{summary.get('ground_truth', '')}`.", "",
             "| metric | value |", "|---|---|",
             f"| GAP (all test queries, Kaggle definition) | {fmt(summary['gap'])} |",
             f"| GAP ignoring non-landmark queries | {fmt(summary['gap_landmarks_only'])} |",
             f"| top-1 accuracy (landmark queries) | {fmt(summary['accuracy'])} |",
             f"| GAP without non-landmark reranking (raw top-1 cosine) | {fmt(summary['gap_without_rerank'])} |"]
    for key, label in (("gap_public", "GAP Public"), ("gap_private", "GAP Private"),
                       ("val_gap", "val GAP (train stage, best epoch)")):
        if summary.get(key) is not None:
            lines.append(f"| {label} | {fmt(summary[key])} |")
    lines += [f"| test queries (landmark / all) | {summary['landmark_queries']} / {summary['queries']} |",
              f"| predictions ranked (correct) | {summary['predictions']} ({summary['correct']}) |"]
    if summary.get("gap_by_confidence"):
        lines += ["", "The same predicted landmarks ranked by other confidences (GAP):", "",
                  "| confidence | GAP |", "|---|---|"]
        lines += [f"| {name} | {fmt(value)} |" for name, value in summary["gap_by_confidence"].items()]
    if summary.get("rerank"):
        lines += ["", f"Retrieval: {summary.get('index')} index on {summary.get('search_device')}, "
                      f"k = {summary.get('k')}, prediction `{summary.get('prediction')}`, "
                      f"reranking `{summary.get('rerank')}`; {summary.get('database_images')} database images, "
                      f"{summary.get('bank_images')} in the non-landmark bank."]
        if summary.get("verified_neighbours"):
            lines.append(f"Geometric verification of the first {summary['verified_neighbours']} neighbours: "
                         f"{summary.get('verified')} predictions verified (SIFT + RANSAC).")
        if summary.get("ann_recall_at_k") is not None:
            lines.append(f"Approximate search against exact search on a sample of queries: recall@k "
                         f"{fmt(summary['ann_recall_at_k'])}, true nearest neighbour in the top k "
                         f"{fmt(summary['ann_top1_in_top_k'])}.")
    if ranked is not None and len(ranked):
        wrong_landmark = int((ranked["is_landmark"] & ~ranked["correct"]).sum())
        non_landmark = int((~ranked["is_landmark"]).sum())
        first_wrong = ranked.loc[~ranked["correct"], "rank"]
        lines += ["", f"Of {len(ranked)} ranked predictions, {wrong_landmark} name the wrong landmark and "
                      f"{non_landmark} are on non-landmark queries; the first mistake is at rank "
                      f"{int(first_wrong.iloc[0]) if len(first_wrong) else 'none'}."]
    lines += ["", "## Examples", "", "![examples](examples.png)", "", "## Precision against rank", "",
              "![precision against rank](precision_vs_rank.png)", "", "## Score distributions", "",
              "![score distributions](score_distributions.png)", "", "## Per-class accuracy", "",
              "![per-class accuracy](per_class_accuracy.png)", ""]
    if len(per_class):
        worst = per_class.head(10)
        lines += ["### Hardest classes", "", "| landmark id | accuracy | queries |", "|---|---|---|"]
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
    parser.add_argument("--retrieve-summary", help="retrieve.json (adds the retrieval settings and ANN recall)")
    parser.add_argument("--experiment", default="", help="experiment name for the report")
    parser.add_argument("--out-dir", required=True)
    args = parser.parse_args(argv)
    setup_logging()
    score(args.predictions, Path(args.out_dir), selection_path=args.selection, solution_path=args.solution,
          neighbours_path=args.neighbours, shard_dirs=args.shards, train_summary_path=args.train_summary,
          retrieve_summary_path=args.retrieve_summary, experiment=args.experiment)
    return 0


if __name__ == "__main__":
    run_cli(main)
