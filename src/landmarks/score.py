"""Stage `score`: GAP as Kaggle computes it, accuracy, and a report with figures.

Ground truth comes from the selection table (test split: a landmark id, or none for non-landmark
queries), or from a Kaggle solution CSV (`id,landmarks,Usage`; Ignored rows are not scored), which
also gives Public and Private scores. Metrics (landmarks.metrics): GAP over all test queries, GAP
ignoring non-landmark queries, top-1 accuracy over landmark queries, and GAP of the same labels ranked
by the raw top-1 cosine (what the non-landmark reranking bought). Writes metrics.json, report.md and
the figures (report.py): examples.png, precision_vs_rank.png, score_distributions.png,
per_class_accuracy.png, confusion.png (the most confused landmarks) and, given the model (--model),
saliency.png: for the most and least confident landmark queries, where query and top-1 neighbour
match (Grad-CAM on their cosine, landmarks.saliency; embeddings recomputed by the model from the
shards' images, one view each).

    python -m landmarks.score --predictions results/experiments/X/retrieve/predictions.parquet \
        --selection results/select/selection.parquet --neighbours results/experiments/X/retrieve/neighbours.parquet \
        --shards results/shards/test/part-00 results/shards/train/part-00 \
        --model results/experiments/X/train/model.pt --out-dir results/experiments/X/score
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
from .config import add_settings_argument, parse_settings
from .formatting import fmt
from .loader import ShardImages
from .tables import SCORED_PREDICTIONS_COLUMNS

log = logging.getLogger("landmarks.score")

FIGURES = (
    "examples.png",
    "precision_vs_rank.png",
    "score_distributions.png",
    "per_class_accuracy.png",
    "confusion.png",
)
MODEL_FIGURES = ("saliency.png",)  # written when score is given the model
SALIENCY_PER_GROUP = 4  # most and least confident landmark queries each
CONFUSED_PAIRS_LISTED = 10


def truth_from_selection(selection: pd.DataFrame) -> pd.DataFrame:
    """Test queries and their ground truth: [landmark_id], or [] for a non-landmark photo."""
    test = selection[selection["split"] == "test"]
    return pd.DataFrame(
        {"id": test["id"].to_numpy(), "landmarks": [[] if pd.isna(x) else [int(x)] for x in test["landmark_id"]]}
    )


def ranked_predictions(predictions: pd.DataFrame, truth: pd.DataFrame) -> pd.DataFrame:
    """Scored predictions in GAP order (score desc, then query id asc), one row each, with the query's
    truth (`truth_landmark_id`, NA for a non-landmark query), `is_landmark`, `correct`, `rank` and
    `precision_at_rank`. Queries without a prediction, or not in the truth, are not ranked."""
    made = predictions.dropna(subset=["landmark_id"])
    ranked = made.merge(truth[["id", "landmarks"]], on="id", how="inner", validate="one_to_one")
    ranked["landmark_id"] = ranked["landmark_id"].astype(np.int64)
    labels = ranked.pop("landmarks").map(
        lambda x: [] if x is None or (isinstance(x, float) and math.isnan(x)) else list(x)
    )
    ranked["is_landmark"] = labels.map(len).to_numpy() > 0
    ranked["correct"] = [lab in truth_labels for lab, truth_labels in zip(ranked["landmark_id"], labels)]
    ranked["truth_landmark_id"] = pd.array([x[0] if x else None for x in labels], dtype="Int64")
    ranked = ranked.sort_values(["score", "id"], ascending=[False, True], kind="stable").reset_index(drop=True)
    ranked["rank"] = np.arange(1, len(ranked) + 1)
    ranked["precision_at_rank"] = ranked["correct"].cumsum() / ranked["rank"]
    return ranked


def verdict_accuracy(predictions: pd.DataFrame, truth: pd.DataFrame, threshold: float) -> dict:
    """How the landmark / non-landmark verdict predict gives (confidence >= threshold = a landmark) fares on
    the test queries: a landmark query is decided right when its landmark is right and kept, a
    non-landmark query when it is rejected. Also the same without a threshold (every answer kept)."""
    table = truth[["id", "landmarks"]].merge(predictions[["id", "landmark_id", "score"]], on="id", how="left")
    is_landmark = table["landmarks"].map(len).to_numpy() > 0
    has = table["landmark_id"].notna().to_numpy()
    right_label = np.array(
        [
            has_label and int(label) in labels
            for has_label, label, labels in zip(has, table["landmark_id"].fillna(-1), table["landmarks"])
        ]
    )
    kept = has & (table["score"].fillna(-np.inf).to_numpy() >= threshold)
    right = np.where(is_landmark, right_label & kept, ~kept)
    right_without = np.where(is_landmark, right_label, ~has)
    n = max(len(table), 1)
    return {
        "threshold": threshold,
        "right_decisions": float(right.sum() / n),
        "right_decisions_without_threshold": float(right_without.sum() / n),
        "landmark_answers_kept": float((right_label & kept).sum() / max(right_label.sum(), 1)),
        "nonlandmark_rejected": float((~kept & ~is_landmark).sum() / max((~is_landmark).sum(), 1)),
    }


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


def saliency_panels(
    model,
    image_size: int,
    ranked: pd.DataFrame,
    neighbours: pd.DataFrame | None,
    images: ShardImages,
    per_group: int = SALIENCY_PER_GROUP,
) -> list[dict]:
    """What report.plot_saliency draws, for the most and least confident landmark queries
    (report.pick_saliency_examples): each query and its top-1 neighbour as the model sees them, and
    each one's saliency towards the other's embedding (computed here by the model, not read from the
    embed stage's files). An image missing from the shards leaves its panels empty."""
    from . import report
    from .saliency import embed_image, model_view, overlay, similarity_map

    model.eval()
    top1 = {}
    if neighbours is not None and len(neighbours):
        first = neighbours.sort_values(["query_id", "rank"], kind="stable").drop_duplicates("query_id")
        top1 = {row["query_id"]: row for _, row in first.iterrows()}
    panels = []
    for group, row in report.pick_saliency_examples(ranked, per_group):
        neighbour = top1.get(row["id"])
        panel = {
            "group": group,
            "query_id": row["id"],
            "truth_landmark_id": row["truth_landmark_id"],
            "landmark_id": row["landmark_id"],
            "score": row["score"],
            "correct": bool(row["correct"]),
            "neighbour_id": None if neighbour is None else neighbour["neighbour_id"],
            "neighbour_landmark_id": None if neighbour is None else neighbour.get("neighbour_landmark_id"),
            "cosine": None if neighbour is None else neighbour.get("cosine"),
        }
        query = images.image(row["id"])
        other = None if neighbour is None else images.image(neighbour["neighbour_id"])
        if query is not None:
            panel["query_view"] = model_view(query, image_size)
        if other is not None:
            panel["neighbour_view"] = model_view(other, image_size)
        if query is not None and other is not None:
            query_embedding = embed_image(model, query, image_size)
            other_embedding = embed_image(model, other, image_size)
            panel["query_overlay"] = overlay(
                panel["query_view"], similarity_map(model, query, other_embedding, image_size)
            )
            panel["neighbour_overlay"] = overlay(
                panel["neighbour_view"], similarity_map(model, other, query_embedding, image_size)
            )
        panels.append(panel)
    return panels


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


def read_predictions(predictions_path) -> pd.DataFrame:
    """The predictions table, checked for the columns scoring needs."""
    predictions = read_table(predictions_path)
    missing = set(SCORED_PREDICTIONS_COLUMNS) - set(predictions.columns)
    if missing:
        raise StageError(f"{predictions_path}: missing column(s) {sorted(missing)}")
    if "top_cosine" not in predictions:  # predictions from elsewhere: no separate raw cosine
        predictions["top_cosine"] = predictions["score"]
    return predictions


def score_metrics(predictions: pd.DataFrame, truth: pd.DataFrame, predictions_path):
    """(result, unreranked): the metrics of the predictions as given and ranked by the raw top-1 cosine."""
    from . import metrics as gap_metrics

    try:
        result = gap_metrics.score_predictions(predictions, truth)
        # The same labels ranked by the raw top-1 cosine show what the non-landmark reranking bought.
        unreranked = gap_metrics.score_predictions(predictions.assign(score=predictions["top_cosine"]), truth)
    except (ValueError, TypeError) as err:
        raise StageError(f"{predictions_path}: cannot be scored: {err}") from err
    if result.n_ignored:
        log.warning("%d predictions are for queries not in the ground truth: not scored", result.n_ignored)
    return result, unreranked


def metrics_summary(experiment, predictions, truth, result, unreranked, ground_truth) -> dict:
    """The metrics of metrics.json, in the order they are written."""
    return {
        "experiment": experiment,
        "gap": result.gap,
        "gap_landmarks_only": result.gap_landmarks_only,
        "accuracy": result.accuracy,
        "gap_without_rerank": unreranked.gap,
        "gap_landmarks_only_without_rerank": unreranked.gap_landmarks_only,
        "gap_by_confidence": gap_by_confidence(predictions, truth),
        "queries": result.n_queries,
        "landmark_queries": result.n_landmark_queries,
        "predictions": result.n_predictions,
        "correct": result.n_correct,
        "ground_truth": str(ground_truth),
    }


def usage_scores(predictions: pd.DataFrame, solution: pd.DataFrame) -> dict:
    """GAP on the Public and Private rows of a Kaggle solution (those it has)."""
    from . import metrics as gap_metrics

    scores = {}
    for usage in ("Public", "Private"):
        part = solution[solution["usage"] == usage][["id", "landmarks"]]
        if len(part):
            scores[f"gap_{usage.lower()}"] = gap_metrics.score_predictions(predictions, part).gap
    return scores


def train_fields(train_summary_path) -> dict:
    """What the report shows of the train stage's train.json (nothing when there is none)."""
    if not (train_summary_path and Path(train_summary_path).exists()):
        return {}
    trained = json.loads(Path(train_summary_path).read_text())
    return {
        "val_gap": trained.get("best_val_gap"),
        "best_epoch": trained.get("best_epoch"),
        "train_seconds": trained.get("seconds"),
    }


def retrieve_fields(retrieve_summary_path, predictions: pd.DataFrame, truth: pd.DataFrame) -> dict:
    """What the report shows of the retrieve stage's retrieve.json (nothing when there is none): its
    settings and sizes, the confidences with its verification's min_inliers, and its verdict scored."""
    if not (retrieve_summary_path and Path(retrieve_summary_path).exists()):
        return {}
    retrieved = json.loads(Path(retrieve_summary_path).read_text())
    index = retrieved.get("index") or {}
    recall = retrieved.get("recall") or {}
    settings = retrieved.get("settings") or retrieved  # older retrieve.json: the settings at the top level
    verify = settings.get("verify") or {}
    fields = {
        "prediction": retrieved.get("prediction"),
        "rerank": settings.get("rerank"),
        "k": settings.get("k"),
        "index": index.get("type"),
        "search_device": index.get("device"),
        "verified_neighbours": verify.get("neighbours"),
        "verified": retrieved.get("verified"),
        "ann_recall_at_k": recall.get("recall_at_k"),
        "ann_top1_in_top_k": recall.get("top1_in_top_k"),
        "database_images": (retrieved.get("database") or {}).get("images"),
        "bank_images": (retrieved.get("bank") or {}).get("images"),
    }
    if verify.get("min_inliers"):
        fields["gap_by_confidence"] = gap_by_confidence(predictions, truth, verify["min_inliers"])
    chosen = retrieved.get("nonlandmark_threshold") or {}
    if chosen.get("threshold") is not None:
        fields["verdict"] = {
            **verdict_accuracy(predictions, truth, chosen["threshold"]),
            "source": chosen.get("source"),
            "val_right_decisions": chosen.get("accuracy"),
            "landmark_share": chosen.get("landmark_share"),
        }
    return fields


def score(
    predictions_path,
    out_dir: Path,
    *,
    selection_path=None,
    solution_path=None,
    neighbours_path=None,
    shard_dirs=(),
    train_summary_path=None,
    retrieve_summary_path=None,
    experiment: str = "",
    model_path=None,
    image_size: int | None = None,
) -> dict:
    """Score the predictions against the ground truth; write metrics.json, report.md and the figures into
    out_dir; returns the metrics."""
    from . import report

    if model_path and not Path(model_path).exists():
        raise StageError(f"{model_path}: model checkpoint not found")
    predictions = read_predictions(predictions_path)
    truth, solution = _load_truth(selection_path, solution_path)
    result, unreranked = score_metrics(predictions, truth, predictions_path)
    summary = metrics_summary(experiment, predictions, truth, result, unreranked, solution_path or selection_path)
    if solution is not None:
        summary.update(usage_scores(predictions, solution))
    summary.update(train_fields(train_summary_path))
    # update keeps the key order: a gap_by_confidence with verify's min_inliers stays where it was
    summary.update(retrieve_fields(retrieve_summary_path, predictions, truth))

    out_dir.mkdir(parents=True, exist_ok=True)
    ranked = ranked_predictions(predictions, truth)
    neighbours = read_table(neighbours_path) if neighbours_path else None
    per_class = report.per_class_accuracy(predictions, truth)
    outcomes = report.landmark_outcomes(predictions, truth)
    images = ShardImages(shard_dirs)
    write_figures(out_dir, predictions, truth, ranked, neighbours, images, per_class, outcomes, result, unreranked)
    saliency = _plot_saliency(model_path, image_size, ranked, neighbours, images, out_dir / "saliency.png")
    summary = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in summary.items()}
    write_json_atomic(out_dir / "metrics.json", summary)
    write_text_atomic(out_dir / "report.md", render_report(summary, per_class, ranked, outcomes, saliency=saliency))
    log.info(
        "%s: GAP %s, GAP without non-landmark queries %s, top-1 accuracy %s, GAP without reranking %s",
        experiment or predictions_path,
        fmt(summary["gap"]),
        fmt(summary["gap_landmarks_only"]),
        fmt(summary["accuracy"]),
        fmt(summary["gap_without_rerank"]),
    )
    return summary


def write_figures(
    out_dir: Path, predictions, truth, ranked, neighbours, images, per_class, outcomes, result, unreranked
):
    """The figures of FIGURES (report.py), into out_dir."""
    from . import report

    ranked_raw = ranked_predictions(predictions.assign(score=predictions["top_cosine"]), truth)
    report.plot_examples(ranked, neighbours, images, out_dir / "examples.png")
    report.plot_precision_vs_rank(
        ranked, ranked_raw, out_dir / "precision_vs_rank.png", gap=result.gap, gap_raw=unreranked.gap
    )
    report.plot_score_distributions(ranked, out_dir / "score_distributions.png")
    report.plot_per_class_accuracy(per_class, out_dir / "per_class_accuracy.png")
    report.plot_confusion(outcomes, out_dir / "confusion.png")


def _plot_saliency(model_path, image_size, ranked, neighbours, images, path: Path) -> bool:
    """Whether saliency.png was written: it needs the model to compute the saliency maps."""
    from . import report
    from .model import model_from_checkpoint

    if not model_path:
        log.info("no --model given: saliency.png not written (it needs the model to compute the saliency maps)")
        return False
    model, checkpoint = model_from_checkpoint(model_path)
    image_size = image_size or checkpoint["settings"]["image_size"]
    note = "" if neighbours is not None else " (no neighbours table given)"
    panels = saliency_panels(model, image_size, ranked, neighbours, images)
    report.plot_saliency(panels, path, note=note)
    log.info("saliency.png: %d landmark queries and their top-1 neighbours at %d px", len(panels), image_size)
    return True


def render_report(
    summary: dict,
    per_class: pd.DataFrame,
    ranked: pd.DataFrame | None = None,
    outcomes: pd.DataFrame | None = None,
    *,
    saliency: bool = False,
) -> str:
    """report.md: the metrics table, what the retrieval and the verdict did, the figures and the hardest
    classes and confusions."""
    lines = metric_lines(summary)
    lines += confidence_lines(summary)
    lines += retrieval_lines(summary)
    lines += verdict_lines(summary)
    lines += mistake_lines(ranked)
    lines += figure_lines()
    lines += hardest_class_lines(per_class)
    if outcomes is not None:
        lines += confusion_lines(outcomes)
    if saliency:
        lines += ["## Where queries and their neighbours match", "", "![saliency](saliency.png)", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def metric_lines(summary: dict) -> list[str]:
    """The report's title and its table of metrics."""
    lines = [
        f"# Recognition report: {summary['experiment'] or 'test queries'}",
        "",
        f"Ground truth: `{summary.get('ground_truth', '')}`.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| GAP (all test queries, Kaggle definition) | {fmt(summary['gap'])} |",
        f"| GAP ignoring non-landmark queries | {fmt(summary['gap_landmarks_only'])} |",
        f"| top-1 accuracy (landmark queries) | {fmt(summary['accuracy'])} |",
        f"| GAP without non-landmark reranking (raw top-1 cosine) | {fmt(summary['gap_without_rerank'])} |",
    ]
    for key, label in (
        ("gap_public", "GAP Public"),
        ("gap_private", "GAP Private"),
        ("val_gap", "val GAP (train stage, best epoch)"),
    ):
        if summary.get(key) is not None:
            lines.append(f"| {label} | {fmt(summary[key])} |")
    lines += [
        f"| test queries (landmark / all) | {summary['landmark_queries']} / {summary['queries']} |",
        f"| predictions ranked (correct) | {summary['predictions']} ({summary['correct']}) |",
    ]
    return lines


def confidence_lines(summary: dict) -> list[str]:
    """GAP of the same predicted landmarks ranked by other confidences (nothing when not computed)."""
    if not summary.get("gap_by_confidence"):
        return []
    lines = [
        "",
        "The same predicted landmarks ranked by other confidences (GAP):",
        "",
        "| confidence | GAP |",
        "|---|---|",
    ]
    return lines + [f"| {name} | {fmt(value)} |" for name, value in summary["gap_by_confidence"].items()]


def retrieval_lines(summary: dict) -> list[str]:
    """How the retrieve stage searched, verified and reranked (nothing without its retrieve.json)."""
    if not summary.get("rerank"):
        return []
    lines = [
        "",
        f"Retrieval: {summary.get('index')} index on {summary.get('search_device')}, "
        f"k = {summary.get('k')}, prediction `{summary.get('prediction')}`, "
        f"reranking `{summary.get('rerank')}`; {summary.get('database_images')} database images, "
        f"{summary.get('bank_images')} in the non-landmark bank.",
    ]
    if summary.get("verified_neighbours"):
        lines.append(
            f"Geometric verification of the first {summary['verified_neighbours']} neighbours: "
            f"{summary.get('verified')} predictions verified (SIFT + RANSAC)."
        )
    if summary.get("ann_recall_at_k") is not None:
        lines.append(
            f"Approximate search against exact search on a sample of queries: recall@k "
            f"{fmt(summary['ann_recall_at_k'])}, true nearest neighbour in the top k "
            f"{fmt(summary['ann_top1_in_top_k'])}."
        )
    return lines


def verdict_lines(summary: dict) -> list[str]:
    """How predict's landmark / non-landmark verdict fares on the test queries (nothing without one)."""
    if not summary.get("verdict"):
        return []
    v = summary["verdict"]
    share = v.get("landmark_share")
    weighed = "" if share is None else f", weighed for a landmark share of {share:.2f}"
    return [
        "",
        f"Landmark / non-landmark verdict (predict's; threshold {v['threshold']:.4f} chosen on "
        f"{v['source']}{weighed}, where it made {fmt(v['val_right_decisions'])} of the decisions right): on the "
        f"test queries {fmt(v['right_decisions'])} right decisions, against "
        f"{fmt(v['right_decisions_without_threshold'])} when every answer is kept; it keeps "
        f"{fmt(v['landmark_answers_kept'])} of the right landmark answers and rejects "
        f"{fmt(v['nonlandmark_rejected'])} of the non-landmark queries.",
    ]


def mistake_lines(ranked: pd.DataFrame | None) -> list[str]:
    """What kinds of mistakes the ranked predictions make and where the first one is."""
    if ranked is None or not len(ranked):
        return []
    wrong_landmark = int((ranked["is_landmark"] & ~ranked["correct"]).sum())
    non_landmark = int((~ranked["is_landmark"]).sum())
    first_wrong = ranked.loc[~ranked["correct"], "rank"]
    return [
        "",
        f"Of {len(ranked)} ranked predictions, {wrong_landmark} name the wrong landmark and "
        f"{non_landmark} are on non-landmark queries; the first mistake is at rank "
        f"{int(first_wrong.iloc[0]) if len(first_wrong) else 'none'}.",
    ]


def figure_lines() -> list[str]:
    """The sections showing the figures every score writes."""
    return [
        "",
        "## Examples",
        "",
        "![examples](examples.png)",
        "",
        "## Precision against rank",
        "",
        "![precision against rank](precision_vs_rank.png)",
        "",
        "## Score distributions",
        "",
        "![score distributions](score_distributions.png)",
        "",
        "## Per-class accuracy",
        "",
        "![per-class accuracy](per_class_accuracy.png)",
        "",
    ]


def hardest_class_lines(per_class: pd.DataFrame) -> list[str]:
    """The ten classes with the lowest accuracy (per_class comes sorted hardest first)."""
    if not len(per_class):
        return []
    lines = ["### Hardest classes", "", "| landmark id | accuracy | queries |", "|---|---|---|"]
    return lines + [f"| {r.landmark_id} | {r.accuracy:.2f} | {r.queries} |" for r in per_class.head(10).itertuples()]


def confusion_lines(outcomes: pd.DataFrame) -> list[str]:
    """The confusion figure, the most confused pairs and how many landmark queries have no prediction."""
    from . import report

    lines = ["", "## Confusions", "", "![confusion matrix](confusion.png)", ""]
    pairs = report.confused_pairs(outcomes)
    unpredicted = int(outcomes["predicted_landmark_id"].isna().sum())
    if len(pairs):
        lines += [
            "### Most confused pairs",
            "",
            "| true landmark | predicted landmark | queries |",
            "|---|---|---|",
        ]
        lines += [
            f"| {r.truth_landmark_id} | {r.predicted_landmark_id} | {r.queries} |"
            for r in pairs.head(CONFUSED_PAIRS_LISTED).itertuples()
        ]
        lines.append("")
        if len(pairs) > CONFUSED_PAIRS_LISTED:
            lines += [f"({len(pairs)} confused pairs in all.)", ""]
    else:
        lines += ["No landmark query was given another landmark's id.", ""]
    if unpredicted:
        lines += [f"{unpredicted} of {len(outcomes)} landmark queries have no prediction.", ""]
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m landmarks.score", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--predictions", required=True, help="predictions.parquet from the retrieve stage")
    parser.add_argument("--selection", help="selection.parquet: ground truth of the test split")
    parser.add_argument("--solution", help="Kaggle solution CSV (id,landmarks,Usage); overrides --selection")
    parser.add_argument("--neighbours", help="neighbours.parquet (for the example figure)")
    parser.add_argument("--shards", nargs="*", default=[], help="shard folders holding query and database images")
    parser.add_argument("--train-summary", help="train.json (adds the validation GAP to the report)")
    parser.add_argument("--retrieve-summary", help="retrieve.json (adds the retrieval settings and ANN recall)")
    parser.add_argument(
        "--model",
        help="model.pt from the train stage (for the saliency figure; without it, saliency.png is not written)",
    )
    # image_size: what the model sees (null: the checkpoint's training image size)
    add_settings_argument(parser, "embed", "--embed-settings")
    parser.add_argument("--experiment", default="", help="experiment name for the report")
    parser.add_argument("--out-dir", required=True)
    args = parser.parse_args(argv)
    setup_logging()
    embed_settings = parse_settings(args.embed_settings, "embed", "--embed-settings")
    score(
        args.predictions,
        Path(args.out_dir),
        selection_path=args.selection,
        solution_path=args.solution,
        neighbours_path=args.neighbours,
        shard_dirs=args.shards,
        train_summary_path=args.train_summary,
        retrieve_summary_path=args.retrieve_summary,
        experiment=args.experiment,
        model_path=args.model,
        image_size=embed_settings["image_size"],
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
