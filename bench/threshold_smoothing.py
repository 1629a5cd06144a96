"""predict's non-landmark threshold, measured offline on finished runs: counted or smoothed on val.

retrieve chooses the threshold on val's answers (calibration.parquet: the val photos and as many bank
photos, answered as the test queries are) and predict applies it. This chooses it again from the same
val answers with each `retrieve.threshold_smoothing` (0: val's right decisions counted as they are; above
0: counted over smoothed confidences, landmarks.threshold) for the share of landmark photos retrieve
chose it for, and scores each threshold on the run's test queries as score's "verdict" does: a landmark
query is decided right when its landmark is right and kept, a non-landmark query when it is rejected.
Prints the share of right decisions per run and, per experiment and regime, the mean ± standard
deviation over runs (ddof 0, as bench/real_photos.py) and the gain over counting, beside keeping every
answer.

    .venv/bin/python bench/threshold_smoothing.py bench/out/real_photos_web/*-seed*/results
    .venv/bin/python bench/threshold_smoothing.py results                          # the demo
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

from neighbour_smoothing import finished_runs  # noqa: E402

from landmarks.common import read_table  # noqa: E402
from landmarks.score import truth_from_selection, verdict_accuracy  # noqa: E402
from landmarks.threshold import threshold_from_answers  # noqa: E402

SMOOTHINGS = [0.0, 0.5, 1.0, 1.5, 2.0]
KEEP_ALL = "keep every answer"


def run_verdicts(results: Path, experiment: str, smoothings=SMOOTHINGS) -> dict:
    """The share of the test decisions right with the threshold chosen at each smoothing, and keeping all."""
    retrieved = results / "experiments" / experiment / "retrieve"
    val = read_table(retrieved / "calibration.parquet")
    share = json.loads((retrieved / "retrieve.json").read_text())["nonlandmark_threshold"].get("landmark_share")
    predictions = read_table(retrieved / "predictions.parquet")
    truth = truth_from_selection(read_table(results / "select" / "selection.parquet"))
    verdicts = {
        f"smoothing {s:g}": verdict_accuracy(predictions, truth, threshold_from_answers(val, share, s)["threshold"])
        for s in smoothings
    }
    row = {name: v["right_decisions"] for name, v in verdicts.items()}
    return {**row, KEEP_ALL: next(iter(verdicts.values()))["right_decisions_without_threshold"]}


def main(argv=None) -> int:
    table = finished_runs(__doc__, run_verdicts, "retrieve/calibration.parquet", argv)
    if table is None:
        return 1
    names = [column for column in table.columns if column not in ("run", "experiment")]
    print(table.set_index(["run", "experiment"]).T.to_string(float_format="%.3f"))
    table["regime"] = table["run"].str.extract(r"^([a-z]+)-seed\d+$", expand=False).fillna("")
    for (experiment, regime), runs in table.groupby(["experiment", "regime"], sort=False):
        print(f"\n{experiment} {regime} ({len(runs)} runs): right decisions mean ± sd; gain over counting mean ± sd")
        for name in names:
            gain = runs[name] - runs["smoothing 0"]
            print(
                f"  {name:18s} {runs[name].mean():.3f} ± {runs[name].std(ddof=0):.3f}   {gain.mean():+.3f} ± {gain.std(ddof=0):.3f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
