"""The confidence that ranks the answers, measured offline on finished runs: the impostor term's settings.

GAP rewards a ranking of the answers in which the right ones come first. This reads what `retrieve` left
in each run's results folder (its answers, their neighbours and inlier counts, the database embeddings)
and ranks the same answers by each confidence:
  - the raw top-1 cosine of the answer's landmark;
  - that plus the geometric verification bonus (`verify.weight` x min(1, inliers / `verify.full_inliers`)
    for an answer with a verified neighbour);
  - either of them minus `impostor_weight` x the impostor term of the answer's nearest database image:
    its mean cosine to its `impostor_k` nearest database images of other landmarks
    (`landmarks.retrieve.database_impostor_terms`, the code retrieve runs);
  - the verification bonus and the schema's impostor term, minus `margin_weight` x the runner-up: the
    best cosine of any other landmark among the k neighbours (retrieve's `other_cosine`), for every
    answer or only for those no neighbour verified (a verified relabel's runner-up is the cosine it
    overruled: what retrieve does). The row marked "(schema default)" is what retrieve computes with the
    schema's settings;
  - the schema default with each weight of the bank excess (`bank_excess_weight`, 0 = none): minus that
    times how far the query's bank term (retrieve's `bank_cosine`) exceeds the answer's top-1 cosine.
Other signals compared the same way (none beat the impostor term): the share of the answer's landmark
in the k neighbours (weights cosine^3), the top-1 cosine minus the mean of the query's k cosines (a
query close to everything), the matched image's mean cosine to its 3 nearest non-landmark bank photos
in place of the impostor term, and the whole runner-up margin (weight 1).
The answers are the runs' own, so every row ranks the same labels; verification settings are
config.yaml's defaults. Prints GAP per run and, per experiment, the mean and the gain over the raw
cosine (mean ± standard deviation over runs, ddof 0 as in bench/real_photos.py, and the smallest gain).

    .venv/bin/python bench/confidence.py bench/out/real_photos_web/*-seed*/results --experiments pretrained finetuned
    .venv/bin/python bench/confidence.py results                                    # the demo
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

from neighbour_smoothing import finished_runs  # noqa: E402

from landmarks.common import read_table  # noqa: E402
from landmarks.config import section_settings  # noqa: E402
from landmarks.embed import load_embeddings  # noqa: E402
from landmarks.index import bank_similarity, build_index  # noqa: E402
from landmarks.metrics import score_predictions  # noqa: E402
from landmarks.retrieve import database_impostor_terms  # noqa: E402
from landmarks.score import truth_from_selection  # noqa: E402

IMPOSTOR_K = (1, 3, 5)
IMPOSTOR_WEIGHTS = (0.25, 0.5, 1.0)
MARGIN_WEIGHTS = (0.1, 0.2, 0.3, 0.4, 0.5)
BANK_EXCESS_WEIGHTS = (0.0, 0.25, 0.5, 1.0)


def answer_rows(neighbours: pd.DataFrame, predictions: pd.DataFrame, db_row: dict) -> np.ndarray:
    """The database row of each answer's nearest image of its landmark (-1 without an answer)."""
    answers = neighbours.merge(predictions[["id", "landmark_id"]], left_on="query_id", right_on="id")
    nearest = (
        answers[answers["neighbour_landmark_id"] == answers["landmark_id"]]
        .sort_values(["query_id", "rank"])
        .drop_duplicates("query_id")
    )
    row_of = dict(zip(nearest["query_id"], nearest["neighbour_id"].map(db_row)))
    return np.array([row_of.get(query, -1) for query in predictions["id"]], dtype=np.int64)


def verification_bonus(predictions: pd.DataFrame, verify: dict) -> np.ndarray:
    if "inliers" not in predictions:
        return np.zeros(len(predictions))
    inliers = predictions["inliers"].fillna(0).to_numpy(dtype=float)
    full = verify.get("full_inliers") or verify["min_inliers"]
    return np.where(inliers >= verify["min_inliers"], verify["weight"] * np.minimum(inliers / full, 1.0), 0.0)


def neighbour_cosines(neighbours: pd.DataFrame, predictions: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(cosines, is the answer's landmark), (queries, k) in the predictions' order; NaN / False past the
    neighbours a query has."""
    table = neighbours.merge(predictions[["id", "landmark_id"]], left_on="query_id", right_on="id")
    table = table.assign(same=(table["neighbour_landmark_id"] == table["landmark_id"]).fillna(False))
    cosines = table.pivot(index="query_id", columns="rank", values="cosine").reindex(predictions["id"])
    same = table.pivot(index="query_id", columns="rank", values="same").reindex(predictions["id"])
    return cosines.to_numpy(dtype=float), same.fillna(False).to_numpy(dtype=bool)


def other_signals(top, neighbours, predictions, bank_terms) -> dict[str, np.ndarray]:
    """The confidences that lost to the impostor term (see the module docstring)."""
    cosines, same = neighbour_cosines(neighbours, predictions)
    weights = np.nan_to_num(np.clip(cosines, 0, None)) ** 3
    other = predictions["other_cosine"].to_numpy(dtype=float)
    return {
        "share of the answer's landmark in the k": (weights * same).sum(1) / np.maximum(weights.sum(1), 1e-12),
        "top-1 - mean of the query's k cosines": top - np.nanmean(cosines, axis=1),
        "- 0.5 x matched image's bank cosine": top - 0.5 * bank_terms,
        "- runner-up landmark's cosine (margin)": top - np.nan_to_num(other),
    }


def bank_excess(predictions: pd.DataFrame) -> np.ndarray:
    """How far each query's bank term exceeds its answer's top-1 cosine (0 where not, or not recorded)."""
    if "bank_cosine" not in predictions:
        return np.zeros(len(predictions))
    excess = predictions["bank_cosine"].to_numpy(dtype=float) - predictions["top_cosine"].to_numpy(dtype=float)
    return np.nan_to_num(np.maximum(excess, 0.0))


def margin_confidences(verified_top, predictions, gap, impostor_terms: dict) -> dict[str, float]:
    """GAP with the schema's impostor term (`impostor_terms`: the answers' terms per impostor_k) and bank
    excess, and each runner-up weight, paid by every answer or, as retrieve does, only by those no neighbour
    verified; then the schema's margin with each bank excess weight."""
    retrieve = section_settings("retrieve", {}, "defaults")
    excess = bank_excess(predictions)
    base = verified_top - retrieve["impostor_weight"] * impostor_terms[retrieve["impostor_k"]]
    other = predictions["other_cosine"].to_numpy(dtype=float)
    other = np.where(np.isfinite(other), other, 0.0)  # as retrieve scores an answer without a runner-up
    inliers = predictions["inliers"].fillna(0).to_numpy(dtype=float) if "inliers" in predictions else 0.0
    unverified = inliers < retrieve["verify"]["min_inliers"]
    gaps = {}
    without_excess = base - retrieve["margin_weight"] * other * unverified
    for weight in BANK_EXCESS_WEIGHTS:
        gaps[f"default with {weight} x bank excess"] = gap(without_excess - weight * excess)
    base = base - retrieve["bank_excess_weight"] * excess
    for weight in sorted({0.0, *MARGIN_WEIGHTS, retrieve["margin_weight"]}):
        default = " (schema default)" if weight == retrieve["margin_weight"] else ""
        if not weight:
            gaps[f"default - 0.0 x runner-up{default}"] = gap(base)
            continue
        gaps[f"default - {weight} x runner-up"] = gap(base - weight * other)
        gaps[f"default - {weight} x runner-up if unverified{default}"] = gap(base - weight * other * unverified)
    return gaps


def run_confidences(results: Path, experiment: str) -> dict[str, float]:
    """GAP of the run's answers ranked by each confidence."""
    selection = read_table(results / "select" / "selection.parquet")
    landmark_of = dict(zip(selection["id"], selection["landmark_id"]))
    folder = results / "experiments" / experiment
    database, db_ids = load_embeddings(folder / "embed" / "train.npy")
    labels = np.array([int(landmark_of.get(i, -1)) for i in db_ids["id"]])
    predictions = read_table(folder / "retrieve" / "predictions.parquet")
    neighbours = read_table(folder / "retrieve" / "neighbours.parquet")
    rows = answer_rows(neighbours, predictions, {image: row for row, image in enumerate(db_ids["id"])})
    top = predictions["top_cosine"].to_numpy(dtype=float)
    bonus = verification_bonus(predictions, section_settings("retrieve", {}, "defaults")["verify"])
    truth = truth_from_selection(selection)

    def gap(confidence: np.ndarray) -> float:
        scored = predictions[["id", "landmark_id"]].assign(score=np.where(rows >= 0, confidence, np.nan))
        return score_predictions(scored, truth).gap

    gaps = {"top-1 cosine": gap(top), "+ verification": gap(top + bonus)}
    index, _ = build_index(database)
    schema_k = section_settings("retrieve", {}, "defaults")["impostor_k"]
    impostor_terms = {  # the answers' impostor terms per k, each searched once
        k: database_impostor_terms(index, database, labels, k)[np.maximum(rows, 0)] for k in {*IMPOSTOR_K, schema_k}
    }
    for k in IMPOSTOR_K:
        terms = impostor_terms[k]
        for weight in IMPOSTOR_WEIGHTS:
            gaps[f"- {weight} x impostor k={k}"] = gap(top - weight * terms)
            gaps[f"+ verification - {weight} x impostor k={k}"] = gap(top + bonus - weight * terms)
    gaps.update(margin_confidences(top + bonus, predictions, gap, impostor_terms))
    bank, _ = load_embeddings(folder / "embed" / "nonlandmark.npy")
    bank_terms = bank_similarity(database, bank, 3)[np.maximum(rows, 0)]
    for name, confidence in other_signals(top, neighbours, predictions, bank_terms).items():
        gaps[name] = gap(confidence)
    return gaps


def main() -> int:
    table = finished_runs(__doc__, run_confidences, "retrieve/predictions.parquet")
    if table is None:
        return 1
    names = [column for column in table.columns if column not in ("run", "experiment")]
    print(table.set_index(["run", "experiment"]).T.to_string(float_format="%.3f"))
    for experiment, runs in table.groupby("experiment", sort=False):
        print(f"\n{experiment} ({len(runs)} runs): GAP mean; gain over the top-1 cosine mean ± sd, smallest")
        for name in names:
            gain = runs[name] - runs["top-1 cosine"]
            print(
                f"  {name:42s} {runs[name].mean():.3f}   {gain.mean():+.4f} ± {gain.std(ddof=0):.4f}   {gain.min():+.4f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
