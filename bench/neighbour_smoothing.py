"""Database-side augmentation (DBA) and alpha query expansion (alpha-QE), measured offline on finished runs.

Both are the standard retrieval tricks of the Google Landmarks winners (Radenovic et al., "Fine-tuning CNN
image retrieval with no human annotation", PAMI 2018): DBA replaces each database embedding by the
similarity-weighted mean of itself and its nearest database neighbours, alpha-QE does the same for each
query with its nearest database images before searching again. The weights are cosine ** alpha.
Label-aware DBA averages only neighbours of the image's own landmark (the database is labelled).
`with_val` searches the val photos too: once val has chosen the model, its photos are labelled
database photos like the train ones (one-shot: two photos per landmark instead of one).

This reads the embeddings that `bench/real_photos.py` (or `make demo`) left under each run's results
folder, predicts the nearest neighbour's landmark ranked by its cosine (no reranking, no geometric
verification: the rule that every variant changes the same way) and prints GAP per setting as mean ±
standard deviation over the runs, with the gain over the plain search per run.

    .venv/bin/python bench/neighbour_smoothing.py bench/out/real_photos_web/fewshot-seed*/results \\
        --experiments pretrained finetuned
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from landmarks.common import read_table  # noqa: E402
from landmarks.config import experiment_settings, load_config  # noqa: E402
from landmarks.embed import load_embeddings  # noqa: E402
from landmarks.metrics import score_predictions  # noqa: E402
from landmarks.model import model_from_checkpoint  # noqa: E402
from landmarks.score import truth_from_selection  # noqa: E402

# name -> (DBA neighbours, DBA label-aware, QE neighbours, val photos in the database); alpha is shared (ALPHA).
# Expanding a query with its one nearest image cannot change its answer or the order of the confidences, so
# QE starts at 2.
SETTINGS = {
    "plain": (0, False, 0, False),
    "dba1": (1, False, 0, False),
    "dba2": (2, False, 0, False),
    "dba3": (3, False, 0, False),
    "dba2_same_landmark": (2, True, 0, False),
    "dba4_same_landmark": (4, True, 0, False),
    "qe2": (0, False, 2, False),
    "qe3": (0, False, 3, False),
    "dba2_qe2": (2, False, 2, False),
    "with_val": (0, False, 0, True),
}
ALPHA = 3.0


def normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def weighted_mean_of_neighbours(vectors, base, cosines, rows, keep) -> np.ndarray:
    """normalise(v + sum over kept neighbours of max(cos, 0) ** ALPHA x base[row])."""
    weights = np.where(keep, np.clip(cosines, 0, None) ** ALPHA, 0.0)
    return normalise(vectors + np.einsum("qk,qkd->qd", weights, base[rows]))


def augment_database(db: np.ndarray, labels: np.ndarray, k: int, same_landmark: bool) -> np.ndarray:
    if k == 0:
        return db
    cosines = db @ db.T
    np.fill_diagonal(cosines, -np.inf)  # the image itself is the "v" term
    rows = np.argsort(-cosines, axis=1, kind="stable")[:, :k]
    near = np.take_along_axis(cosines, rows, axis=1)
    keep = labels[rows] == labels[:, None] if same_landmark else np.ones_like(near, dtype=bool)
    return weighted_mean_of_neighbours(db, db, near, rows, keep)


def query_photo_ids(results: Path) -> set | None:
    """The landmark queries from the folder's own query photos, with every non-landmark query; None when the
    run has no sources.csv (written by bench/real_photos.py) or no held-out database photos among its queries."""
    path = results.parent / "sources.csv"
    if not path.exists():
        return None
    sources = pd.read_csv(path)
    if not (sources["source"] == "heldout").any():
        return None
    return set(sources.loc[sources["source"].isin(["query", "nonlandmark"]), "id"])


def nearest_neighbour(cosines: np.ndarray, query_ids, db_labels: np.ndarray) -> pd.DataFrame:
    """Each query's prediction: the nearest database photo's landmark, its cosine as the score."""
    best = cosines.argmax(axis=1)
    return pd.DataFrame(
        {"id": np.asarray(query_ids), "landmark_id": db_labels[best], "score": cosines[np.arange(len(best)), best]}
    )


def gaps_of(name: str, predictions: pd.DataFrame, truth: pd.DataFrame, query_ids: set | None) -> dict[str, float]:
    """{name: GAP over every query}, and with `query_ids` {name_query: GAP over those queries alone}."""
    gaps = {name: score_predictions(predictions, truth).gap}
    if query_ids is not None:
        chosen = predictions["id"].isin(query_ids)
        gaps[f"{name}_query"] = score_predictions(predictions[chosen], truth[truth["id"].isin(query_ids)]).gap
    return gaps


def predict(db: np.ndarray, labels: np.ndarray, queries: np.ndarray, qe: int) -> tuple[np.ndarray, np.ndarray]:
    cosines = queries @ db.T
    if qe:
        rows = np.argsort(-cosines, axis=1, kind="stable")[:, :qe]
        near = np.take_along_axis(cosines, rows, axis=1)
        queries = weighted_mean_of_neighbours(queries, db, near, rows, np.ones_like(near, dtype=bool))
        cosines = queries @ db.T
    best = np.argmax(cosines, axis=1)
    return labels[best], cosines[np.arange(len(best)), best]


def database(embed: Path, splits: list[str], landmark_of: dict) -> tuple[np.ndarray, np.ndarray]:
    """The embeddings of those splits' photos, one after the other, and their landmarks."""
    parts = [load_embeddings(embed / f"{split}.npy") for split in splits]
    vectors = np.concatenate([part[0] for part in parts]).astype(np.float32)
    labels = np.array([int(landmark_of[i]) for part in parts for i in part[1]["id"]])
    return vectors, labels


def run_gaps(results: Path, experiment: str) -> dict[str, float]:
    selection = read_table(results / "select" / "selection.parquet")
    landmark_of = dict(zip(selection["id"], selection["landmark_id"]))
    embed = results / "experiments" / experiment / "embed"
    queries, query_ids = load_embeddings(embed / "test.npy")
    truth = truth_from_selection(selection)
    databases = {False: database(embed, ["train"], landmark_of)}
    if (embed / "val.npy").exists():  # an older run embedded no val photos
        databases[True] = database(embed, ["train", "val"], landmark_of)
    query_photos = query_photo_ids(results)
    gaps = {}
    for name, (k, same_landmark, qe, with_val) in SETTINGS.items():
        if with_val not in databases:
            continue
        db, labels = databases[with_val]
        label, score = predict(augment_database(db, labels, k, same_landmark), labels, queries, qe)
        pred = pd.DataFrame({"id": query_ids["id"].to_numpy(), "landmark_id": label, "score": score})
        gaps |= gaps_of(name, pred, truth, query_photos)
    return gaps


def run_name(results: Path) -> str:
    """The benchmark's <regime>-seed<N> folder name for its results folder, else the path."""
    return results.parent.name if results.name == "results" and results.parent.name != REPO.name else str(results)


def model_and_embed_size(results: Path, experiment: str):
    """A finished run's model.pt (for the benches that embed again) and the size its embed stage used."""
    model, checkpoint = model_from_checkpoint(results / "experiments" / experiment / "train" / "model.pt")
    # The benchmark writes each run's config.yaml beside its results folder (make demo: the repository's)
    embed = experiment_settings(load_config(results.parent / "config.yaml"), experiment)["embed"]
    return model, embed["image_size"] or checkpoint["settings"]["image_size"]


def runs_table(folders, experiments, measure, needed: str) -> pd.DataFrame:
    """One row per (results folder, experiment) whose `needed` file (under the experiment's folder) exists:
    run, experiment and the GAPs `measure(results, experiment)` returns. Shared by the offline benches."""
    rows = [
        {"run": run_name(results), "experiment": experiment, **measure(results, experiment)}
        for results in folders
        for experiment in experiments
        if (results / "experiments" / experiment / needed).exists()
    ]
    return pd.DataFrame(rows)


def finished_runs(description: str, measure, needed: str, argv=None) -> pd.DataFrame | None:
    """The offline benches' command line (results folders, --experiments) and `runs_table` over it;
    None, having said so, when no finished run of those experiments is there."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="results folders of finished runs")
    parser.add_argument("--experiments", nargs="+", default=["pretrained", "finetuned"])
    args = parser.parse_args(argv)
    table = runs_table(args.results, args.experiments, measure, needed)
    if table.empty:
        print("no finished runs of those experiments under the given folders", file=sys.stderr)
        return None
    return table


def print_gains(table: pd.DataFrame) -> None:
    """Every run's GAPs, then per experiment each setting's mean GAP and its gain over `plain` (the shared
    summary of the offline benches that compare settings against the plain search)."""
    print(table.to_string(float_format="%.3f"))
    names = [column for column in table.columns if column not in ("run", "experiment")]
    for experiment, runs in table.groupby("experiment", sort=False):
        print(f"\n{experiment} ({len(runs)} runs): GAP mean ± sd, gain over plain mean ± sd")
        for name in names:
            if runs[name].isna().all():  # a setting these runs could not measure (with_val: no val photos)
                continue
            # A reading over a subset of the queries (`<setting>_query`) is compared with plain's same reading
            gain = runs[name] - runs["plain_query" if name.endswith("_query") else "plain"]
            print(
                f"  {name:26s} {runs[name].mean():.3f} ± {runs[name].std():.3f}   {gain.mean():+.3f} ± {gain.std():.3f}"
            )


def compare_settings(description: str, measure, needed: str, argv=None) -> int:
    """An offline bench's whole command: `finished_runs`, then `print_gains`; the exit status."""
    table = finished_runs(description, measure, needed, argv)
    if table is None:
        return 1
    print_gains(table)
    return 0


def main() -> int:
    return compare_settings(__doc__, run_gaps, "embed/test.npy")


if __name__ == "__main__":
    sys.exit(main())
