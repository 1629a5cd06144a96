"""Stage `summary`: one table across every experiment of the run (results/summary.md).

    python -m landmarks.summary --metrics results/experiments/*/score/metrics.json --out results/summary.md
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from .common import StageError, run_cli, setup_logging, write_text_atomic
from .score import fmt

log = logging.getLogger("landmarks.summary")

COLUMNS = [("experiment", "experiment"), ("gap", "GAP"), ("gap_landmarks_only", "GAP (landmark queries only)"),
           ("accuracy", "top-1 accuracy"), ("gap_without_rerank", "GAP without reranking"), ("val_gap", "val GAP"), ("gap_public", "GAP Public"),
           ("gap_private", "GAP Private"), ("queries", "test queries"), ("landmark_queries", "landmark queries")]


def render_summary(rows: list[dict], descriptions: dict | None = None) -> str:
    columns = [(key, title) for key, title in COLUMNS if any(row.get(key) is not None for row in rows)]
    lines = ["# Results", "", "| " + " | ".join(t for _, t in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for key, _ in columns:
            value = row.get(key)
            cells.append(fmt(value) if isinstance(value, float) else ("" if value is None else str(value)))
        lines.append("| " + " | ".join(cells) + " |")
    if descriptions:
        lines += ["", *[f"- **{name}**: {text}" for name, text in descriptions.items() if text]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m landmarks.summary", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--metrics", nargs="+", required=True, help="metrics.json of each experiment")
    parser.add_argument("--descriptions", default="{}", help="JSON {experiment: description}")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    setup_logging()
    rows = []
    for path in args.metrics:
        try:
            rows.append(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as err:
            raise StageError(f"{path}: cannot read metrics ({err})") from err
    text = render_summary(rows, json.loads(args.descriptions))
    write_text_atomic(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    run_cli(main)
