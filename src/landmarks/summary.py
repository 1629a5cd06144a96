"""Stage `summary`: one table across every experiment of the run (results/summary.md).

Rows follow the order of --metrics (the config's order of experiments); the best value of each
metric column is in bold; the experiments' descriptions follow the table.

    python -m landmarks.summary --metrics results/experiments/*/score/metrics.json --out results/summary.md
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from .common import StageError, run_cli, setup_logging, write_text_atomic
from .config import add_settings_argument, parse_settings
from .formatting import fmt

log = logging.getLogger("landmarks.summary")

# (metrics.json key, column title); a column only appears when some experiment has a value for it.
COLUMNS = [
    ("experiment", "experiment"),
    ("gap", "GAP"),
    ("gap_landmarks_only", "GAP (landmark queries only)"),
    ("accuracy", "top-1 accuracy"),
    ("gap_without_rerank", "GAP without reranking"),
    ("val_gap", "val GAP"),
    ("gap_public", "GAP Public"),
    ("gap_private", "GAP Private"),
    ("rerank", "reranking"),
    ("prediction", "prediction"),
    ("index", "index"),
    ("ann_recall_at_k", "ANN recall@k"),
    ("queries", "test queries"),
    ("landmark_queries", "landmark queries"),
]
# Metrics where higher is better: the best experiment's value is set in bold.
BEST_IS_HIGHEST = {
    "gap",
    "gap_landmarks_only",
    "accuracy",
    "gap_without_rerank",
    "val_gap",
    "gap_public",
    "gap_private",
}


def _cell(value) -> str:
    if isinstance(value, float):
        return fmt(value)
    return "" if value is None else str(value).replace("|", "\\|")


def render_summary(rows: list[dict], descriptions: dict | None = None) -> str:
    """Markdown: one row per experiment (in the order given), one column per metric that any has."""
    columns = [(key, title) for key, title in COLUMNS if any(row.get(key) is not None for row in rows)]
    best = {}
    for key, _ in columns:
        values = [row.get(key) for row in rows if isinstance(row.get(key), (int, float))]
        if key in BEST_IS_HIGHEST and len(rows) > 1 and values:
            best[key] = max(values)
    lines = [
        "# Results",
        "",
        "| " + " | ".join(t for _, t in columns) + " |",
        "|"
        + "|".join("---" if key in ("experiment", "rerank", "prediction", "index") else "---:" for key, _ in columns)
        + "|",
    ]
    for row in rows:
        cells = []
        for key, _ in columns:
            text = _cell(row.get(key))
            if key in best and row.get(key) is not None and fmt(row[key]) == fmt(best[key]):
                text = f"**{text}**"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "GAP: Global Average Precision as Kaggle scores Google Landmark Recognition (one prediction per "
        "test query, ranked by confidence; predictions on non-landmark queries count as wrong). "
        "Best value per column in bold.",
    ]
    if descriptions:
        lines += ["", *[f"- **{name}**: {text}" for name, text in descriptions.items() if text]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m landmarks.summary", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--metrics", nargs="+", required=True, help="metrics.json of each experiment")
    add_settings_argument(parser, "experiments")  # only their descriptions are read
    parser.set_defaults(settings=None)  # none given: no descriptions
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    setup_logging()
    rows = []
    for path in args.metrics:
        try:
            row = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise StageError(f"{path}: cannot read metrics ({err})") from err
        if not isinstance(row, dict):
            raise StageError(f"{path}: expected a JSON object of metrics")
        # results/experiments/<name>/score/metrics.json names its experiment when the file does not.
        row["experiment"] = row.get("experiment") or Path(path).resolve().parent.parent.name
        rows.append(row)
    experiments = parse_settings(args.settings, "experiments") if args.settings else {}
    descriptions = {name: spec.get("description", "") for name, spec in experiments.items()}
    text = render_summary(rows, descriptions)
    write_text_atomic(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    run_cli(main)
