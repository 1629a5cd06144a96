"""Stage `retrieve`: faiss kNN of the test queries against the train database, non-landmark reranking.

Search (landmarks.index): exact inner product (cosine, as embeddings are L2-normalised) with faiss `IndexFlatIP` by
default; on the GPU when faiss sees one (several GPUs: the database is sharded over them), on the CPU
otherwise. `index: ivfpq` (IVF + product quantisation) is for databases of tens of millions of
images; it logs its recall@k against exact search on a sample of queries and writes it into
retrieve.json. Database and queries are read from the memory-mapped .npy files in chunks (a flat
index still holds the database in memory as float32; IVF-PQ holds only pq_m bytes per image).

Which neighbours count: a database image with the query's own id is left out (a query that is also
in the database would otherwise find itself at cosine 1; `exclude_self: false` keeps it). Duplicate
images under different ids are not detected. Neighbours with equal cosines are ordered by database
row, so results do not depend on faiss's internal order. Database images without a landmark id stay
in the neighbours table but never give a label.

Prediction (one label per query, from its k neighbours that have a landmark id) and its confidence
follow the registered rules of landmarks.ranking: `prediction` top1 or vote; `rerank` none, seed004
(minus the query's mean cosine to the non-landmark bank) or glr2020 (the GLR2020 winners' A - B - C
rule, which also picks the label). Ties between labels go to the label whose nearest neighbour ranks
higher. With `impostor_weight` (none, seed004) the confidence also subtracts that times the impostor
term of the answer's nearest database image: its mean cosine to its `impostor_k` nearest database
images of other landmarks, computed once per database image by searching the database against itself,
and with `margin_weight` that times the runner-up landmark's cosine (an answer that barely beat another
landmark), except where geometric verification confirmed the answer, and with `bank_excess_weight`
that times how far the query's mean top-`bank_k` cosine to the non-landmark bank exceeds the answer's
cosine (a photo more like the non-landmark photos than its answer; nothing without a bank).
Settings (config.yaml's retrieve section) come as `--settings` JSON.

Geometric verification (`verify.neighbours` > 0, landmarks.verify): SIFT matches between each query
and its first neighbours, read from the shards, counted as RANSAC inliers. A neighbour with at least
`verify.min_inliers` shows the same physical place: with `verify.relabel` the query takes the landmark
of its verified neighbour with the most inliers, and a prediction whose landmark has a verified
neighbour gains `verify.weight` in confidence (and pays no runner-up margin), so verified answers rank
above unverified ones.

Writes neighbours.parquet (query_id, rank, neighbour_id, neighbour_landmark_id, cosine; inliers of the
verified ones), predictions.parquet (id, landmark_id, score, top_cosine, other_cosine, bank_cosine,
impostor_cosine; inliers), the Kaggle submission
(`id,landmarks` with "<landmark_id> <score>"; empty when a query has no prediction) and retrieve.json
(sizes, index, device, timings, recall of an approximate index, the non-landmark threshold). For
`landmarks.predict` it keeps index.faiss and bank.faiss (the faiss indexes, on the CPU),
database.parquet (id, landmark_id, shard relative to this folder, key, B_j, impostor term) and
predictor.json (the `--predictor` embed and shard settings, the retrieve settings, the threshold).
With `--val`, the threshold below which predict calls a photo a non-landmark is chosen on the val
photos and as many bank photos, answered exactly as the test queries (landmarks.threshold: the most
right decisions, weighed for the test queries' share of landmark photos or `landmark_share`); the val
answers are kept in calibration.parquet, for predict to choose again for another share. When model.pt's
whitening was fitted on the val photos too (`--model`; train's `whitening_from: train+val`), it would
rate them surer than new photos, so each val photo is answered with a whitening of the same model that
left it out (its threshold folds: `answer_in_folds`).

    python -m landmarks.retrieve --database train.npy --queries test.npy --bank nonlandmark.npy --out-dir DIR \
        --settings '{"k": 10, "verify": {"neighbours": 5}}' --shards shards/test/part-00 shards/train/part-00 \
        --val val.npy --model model.pt
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import time
from pathlib import Path
from typing import NamedTuple

import faiss
import numpy as np
import pandas as pd

from .common import StageError, run_cli, setup_logging, write_json_atomic, write_table
from .embed import load_embeddings
from .index import (
    bank_similarity_from_index,
    build_index,
    cpu_index,
    gpu_count,
    knn,
    recall_against_exact,
    search,
    write_index,
)
from .model import whitenings_from_checkpoint
from .ranking import Predictions, label_rule_name, predict, reranking
from .tables import EMBEDDING_IDS_COLUMNS
from .threshold import threshold_from_answers, threshold_landmark_share
from .whitening import apply_whitening, unwhiten

log = logging.getLogger("landmarks.retrieve")

# How deep each database image searches the database for its nearest images of other landmarks: its own
# landmark's photos come first, so a landmark with more photos than this leaves the rest as a bound.
IMPOSTOR_SEARCH_DEPTH = 100
IMPOSTOR_CHUNK = 65536  # database images searched at once (bounds the (chunk, depth) arrays)


def _check_unique_ids(ids: pd.DataFrame, path) -> None:
    duplicated = ids["id"].duplicated()
    if duplicated.any():
        raise StageError(
            f"{path}: {int(duplicated.sum())} duplicate ids in its id table, e.g. {ids['id'][duplicated].iloc[0]!r}"
        )


def _positions_of(ids_wanted: pd.Series, ids_table: pd.DataFrame) -> np.ndarray:
    """Row of each wanted id in `ids_table` (unique ids), -1 where absent."""
    return pd.Index(ids_table["id"]).get_indexer(ids_wanted).astype(np.int64)


class Inputs(NamedTuple):
    """The stage's embeddings and their id tables (`load_inputs`)."""

    database: np.ndarray  # memory-mapped, as stored
    db_ids: pd.DataFrame
    queries: np.ndarray  # memory-mapped, as stored
    query_ids: pd.DataFrame
    bank: np.ndarray  # float32, (0, dim) without a bank
    bank_ids: pd.DataFrame


def load_inputs(database_path, queries_path, bank_path, rerank: str) -> Inputs:
    """(database, its ids, queries, their ids, bank, its ids), checked: same dimensions, unique ids, a bank
    when the reranking needs one, no query in the bank. Database and queries stay memory-mapped."""
    database, db_ids = load_embeddings(database_path, mmap=True)
    queries, query_ids = load_embeddings(queries_path, mmap=True)
    if bank_path:
        bank, bank_ids = load_embeddings(bank_path)
    else:
        bank, bank_ids = np.zeros((0, queries.shape[1]), np.float32), pd.DataFrame({"id": [], "landmark_id": []})
    for array, path in ((database, database_path), (bank, bank_path)):
        if len(array) and len(queries) and array.shape[1] != queries.shape[1]:
            raise StageError(
                f"{path}: {array.shape[1]}-d embeddings, but the queries ({queries_path}) are "
                f"{queries.shape[1]}-d: embedded by different models?"
            )
    for ids, path in ((db_ids, database_path), (query_ids, queries_path), (bank_ids, bank_path)):
        if path:
            _check_unique_ids(ids, path)
    if reranking(rerank).needs_bank and len(bank) == 0:
        raise StageError(f"rerank '{rerank}' needs a non-empty non-landmark bank ({bank_path or 'none given'})")
    leaked = query_ids["id"].isin(bank_ids["id"])
    if leaked.any():
        raise StageError(
            f"{queries_path}: {int(leaked.sum())} queries are also in the non-landmark bank "
            f"{bank_path} (e.g. {query_ids['id'][leaked].iloc[0]!r}): the bank must not contain "
            f"test images, it would give their answer away"
        )
    return Inputs(database, db_ids, queries, query_ids, bank, bank_ids)


def approximate_recall(database, queries, positions, exclude, s: dict, use_gpu) -> dict | None:
    """Recall of an approximate index (ivfpq) against exact search on a sample of the queries; None for
    the exact flat index."""
    if s["index"] == "flat" or not s["recall_sample"] or not len(queries) or not len(database):
        return None
    rng = np.random.default_rng(s["seed"])
    sample = np.sort(rng.choice(len(queries), min(s["recall_sample"], len(queries)), replace=False))
    _, exact_positions = knn(
        database, queries[sample], s["k"], use_gpu=use_gpu, exclude=None if exclude is None else exclude[sample]
    )
    recall = recall_against_exact(positions[sample], exact_positions)
    log.info(
        "%s recall against exact search on %d sampled queries: recall@1 %.4f, true top-1 in top-%d "
        "%.4f, recall@%d %.4f",
        s["index"],
        recall["queries"],
        recall["recall_at_1"] or float("nan"),
        s["k"],
        recall["top1_in_top_k"] or float("nan"),
        s["k"],
        recall["recall_at_k"],
    )
    return recall


def query_bank_k(s: dict) -> int:
    """How many bank photos the query's bank term averages (C_i of glr2020, seed004's term otherwise)."""
    return s[reranking(s["rerank"]).query_bank_k]


def database_bank_terms(database, db_ids, bank_index, bank_ids, s: dict) -> np.ndarray | None:
    """B_j of every database image (glr2020 only, else None): its mean cosine to its nearest bank photos."""
    if not reranking(s["rerank"]).needs_database_bank:
        return None
    db_in_bank = _positions_of(db_ids["id"], bank_ids)
    if (db_in_bank >= 0).any():
        log.warning(
            "%d database images are also in the non-landmark bank: each is left out of its own B_j",
            int((db_in_bank >= 0).sum()),
        )
    return bank_similarity_from_index(bank_index, database, s["bank_k"], exclude=db_in_bank)


def database_impostor_terms(index, database: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Each database image's mean cosine to its k nearest database images of other landmarks (an unlabelled
    image is another landmark to every image). When fewer than k of them are within IMPOSTOR_SEARCH_DEPTH
    (a landmark with many photos), the deepest cosine searched stands in for the rest: no unseen image is
    closer. An image with no other at all gets 0."""
    n = len(labels)
    terms = np.zeros(n, np.float32)
    depth = min(k + IMPOSTOR_SEARCH_DEPTH, n)
    for start in range(0, n, IMPOSTOR_CHUNK):
        rows = np.arange(start, min(start + IMPOSTOR_CHUNK, n))
        cosines, positions = search(index, database[rows], depth, exclude=rows)
        found = positions >= 0
        other = found & ((labels[np.where(found, positions, 0)] != labels[rows, None]) | (labels[rows, None] < 0))
        # the first k other-landmark cosines of each row, in rank order (their columns sorted first)
        order = np.argsort(~other, axis=1, kind="stable")[:, :k]
        first = np.take_along_axis(np.where(other, cosines, np.nan), order, axis=1)
        deepest = np.where(found, cosines, np.inf).min(axis=1)
        first = np.where(np.isnan(first), deepest[:, None], first)
        terms[rows] = np.where(found.any(axis=1), first.mean(axis=1), 0.0)
    return terms


def verified_labels(positions: np.ndarray, db_labels: np.ndarray, inliers: np.ndarray, v: dict):
    """(label per query from geometric verification, -1 where none; each neighbour's label; verified mask).

    `inliers`: (queries, m) counts for the first m neighbours. A neighbour with at least `min_inliers`
    shows the same physical place; with `relabel`, a query takes the label of its verified neighbour
    with the most inliers (ties: the higher rank)."""
    m = inliers.shape[1]
    found = positions[:, :m] >= 0
    labels = np.where(found, db_labels[np.where(found, positions[:, :m], 0)], -1)
    is_verified = (inliers >= v["min_inliers"]) & (labels >= 0)
    forced = np.full(len(labels), -1, np.int64)
    if v["relabel"]:
        best = np.argmax(np.where(is_verified, inliers, -1), axis=1)
        has = is_verified.any(axis=1)
        forced[has] = labels[has, best[has]]
    return forced, labels, is_verified


def verified(
    result: Predictions, labels: np.ndarray, is_verified: np.ndarray, inliers: np.ndarray, v: dict
) -> tuple[Predictions, np.ndarray]:
    """A prediction whose label has a verified neighbour gains confidence: `weight` x its best inlier
    count over `full_inliers` (at most 1; full_inliers null = min_inliers: every verified answer gains the
    whole weight). Returns them and each query's best inlier count for its label (`labels`,
    `is_verified`, `inliers`: of the first m neighbours, see verified_labels)."""
    of_label = labels == result.label[:, None]
    label_inliers = np.where(of_label, inliers, 0).max(axis=1)
    evidence = np.where(of_label & is_verified, inliers, 0).max(axis=1)
    full = v.get("full_inliers") or v["min_inliers"]
    confidence = result.confidence + v["weight"] * np.minimum(evidence / full, 1.0)
    return result._replace(confidence=confidence), label_inliers


class ImageSource:
    """Images by id for geometric verification: the shards' images, plus images held in memory (new
    photos that predict has decoded, which are in no shard)."""

    def __init__(self, shard_dirs=(), extra: dict | None = None):
        from .loader import ShardImages

        self.shards = ShardImages(shard_dirs)
        self.extra = extra or {}
        self.shard_dirs = list(shard_dirs)

    def __contains__(self, image_id) -> bool:
        return image_id in self.extra or image_id in self.shards

    def image(self, image_id):
        return self.extra[image_id] if image_id in self.extra else self.shards.image(image_id)

    def with_extra(self, extra: dict) -> ImageSource:
        """The same shards (their index read once) plus these images held in memory."""
        source = copy.copy(self)
        source.extra = extra
        return source


def verify_neighbours_of(query_ids, db_ids, positions, images: ImageSource, v: dict, threads: int) -> np.ndarray:
    """SIFT + RANSAC inlier counts between each query and its first `v['neighbours']` neighbours."""
    from .verify import VerifySettings, verify_neighbours

    if not images.shard_dirs and not images.extra:
        raise StageError(
            f"retrieve.verify.neighbours is {v['neighbours']}: verification reads the images from "
            "their shards; give them (--shards), or set retrieve.verify.neighbours: 0"
        )
    m = min(v["neighbours"], positions.shape[1])
    db = db_ids["id"].to_numpy(dtype=object)
    neighbour_ids = np.where(positions[:, :m] >= 0, db[np.where(positions[:, :m] >= 0, positions[:, :m], 0)], None)
    missing = [i for i in list(query_ids) + [x for x in neighbour_ids.ravel() if x is not None] if i not in images]
    if missing:
        shards = ", ".join(map(str, images.shard_dirs)) or "none given"
        raise StageError(
            f"retrieve.verify: {len(missing)} images are in none of the shards ({shards}), e.g. "
            f"{missing[0]!r}; give their shards (--shards), or set retrieve.verify.neighbours: 0"
        )
    keys = ("max_side", "max_features", "ratio", "model", "min_inliers", "ignore_static")
    settings = VerifySettings(**{key: v[key] for key in keys})
    return verify_neighbours(list(query_ids), neighbour_ids, images.image, settings, threads=threads)


class Answers(NamedTuple):
    """Everything retrieval decides for a set of queries (see `answer_queries`)."""

    predictions: Predictions
    cosines: np.ndarray  # (queries, k), best first
    positions: np.ndarray  # (queries, k) database rows, -1 = none
    query_bank: np.ndarray  # the query's bank term
    inliers: np.ndarray | None  # (queries, m) RANSAC inliers of the first m neighbours (verify on)
    label_inliers: np.ndarray | None  # best inlier count of the predicted landmark's neighbours


class Database(NamedTuple):
    """What a query is answered against: the database index and its rows, the bank index, the settings."""

    index: object  # faiss index of the database embeddings
    ids: pd.DataFrame  # id, landmark_id (+ shard, key) per database row
    labels: np.ndarray  # landmark id per row, -1 for none
    bank_terms: np.ndarray | None  # B_j per row (glr2020)
    bank_index: object | None  # faiss index of the non-landmark bank
    settings: dict  # the retrieve section, validated
    impostor_terms: np.ndarray | None = None  # per row: mean cosine to its nearest other landmarks' images


def prediction_options(db: Database, query_bank: np.ndarray) -> dict:
    """`predict`'s keyword arguments for these queries (their bank terms) under the retrieve settings."""
    s = db.settings
    has_bank = db.bank_index is not None and db.bank_index.ntotal > 0
    return dict(
        prediction=s["prediction"],
        rerank=s["rerank"],
        query_bank=query_bank if has_bank else None,  # without a bank there is no bank term to weigh
        db_bank=db.bank_terms,
        neighbours_per_label=s["glr2020_neighbours_per_label"],
        margin_weight=s["margin_weight"],
        bank_weight=s["bank_weight"],
        db_impostor=db.impostor_terms,
        impostor_weight=s["impostor_weight"],
        bank_excess_weight=s["bank_excess_weight"],
    )


def answer_queries(
    db: Database,
    queries: np.ndarray,
    query_ids,
    *,
    exclude=None,
    exclude_bank=None,
    images: ImageSource | None = None,
    threads: int = 1,
    seconds: dict | None = None,
) -> Answers:
    """Search, bank terms, geometric verification and prediction for `queries` (L2-normalised rows):
    the one path by which the retrieve stage answers its test queries, its val queries (for the
    non-landmark threshold) and predict answers new photos, so each gets the same answer.

    exclude: a database row per query that may not be its neighbour (itself), or None; exclude_bank:
    likewise a bank row (a bank photo used as a query); images: where verification reads the images."""
    s, seconds = db.settings, {} if seconds is None else seconds
    started = time.perf_counter()
    cosines, positions = search(db.index, queries, s["k"], exclude=exclude)
    seconds["search"] = seconds.get("search", 0.0) + time.perf_counter() - started
    started = time.perf_counter()
    query_bank = bank_similarity_from_index(db.bank_index, queries, query_bank_k(s), exclude=exclude_bank)
    seconds["bank"] = seconds.get("bank", 0.0) + time.perf_counter() - started
    inliers = label_inliers = forced = None
    if s["verify"]["neighbours"]:
        started = time.perf_counter()
        inliers = verify_neighbours_of(
            list(query_ids), db.ids, positions, images or ImageSource(), s["verify"], threads
        )
        forced, neighbour_labels, is_verified = verified_labels(positions, db.labels, inliers, s["verify"])
        seconds["verify"] = seconds.get("verify", 0.0) + time.perf_counter() - started
    started = time.perf_counter()
    options = prediction_options(db, query_bank)
    if inliers is not None:
        options["verified"] = is_verified  # a verified answer pays no runner-up margin
    result = predict(cosines, positions, db.labels, **options)
    if inliers is not None:
        relabelled = (forced >= 0) & (forced != result.label)
        log.info(
            "geometric verification: %d of %d queries have a verified neighbour; %d change their label",
            int(is_verified.any(axis=1).sum()),
            len(queries),
            int(relabelled.sum()),
        )
        if relabelled.any():
            result = predict(cosines, positions, db.labels, labels=forced, **options)
        result, label_inliers = verified(result, neighbour_labels, is_verified, inliers, s["verify"])
    seconds["predict"] = seconds.get("predict", 0.0) + time.perf_counter() - started
    return Answers(result, cosines, positions, query_bank, inliers, label_inliers)


def alternatives(db: Database, answers: Answers, row: int, limit: int = 3) -> list[tuple[int, float]]:
    """The query's candidate landmarks (the prediction first, then the other landmarks among its
    neighbours by confidence), each with the confidence it would have as the answer; at most `limit`."""
    positions, cosines = answers.positions[row : row + 1], answers.cosines[row : row + 1]
    found = positions[0] >= 0
    labels = list(dict.fromkeys(int(x) for x in db.labels[positions[0][found]] if x >= 0))
    predicted = int(answers.predictions.label[row])
    candidates = [predicted] + [x for x in labels if x != predicted] if predicted >= 0 else labels
    options = prediction_options(db, answers.query_bank[row : row + 1])
    if answers.inliers is not None:
        inliers = answers.inliers[row : row + 1]
        _, neighbour_labels, is_verified = verified_labels(positions, db.labels, inliers, db.settings["verify"])
        options["verified"] = is_verified
    scored = []
    for label in candidates:
        result = predict(cosines, positions, db.labels, labels=np.array([label]), **options)
        if answers.inliers is not None:
            result, _ = verified(result, neighbour_labels, is_verified, inliers, db.settings["verify"])
        scored.append((label, float(result.confidence[0])))
    if predicted >= 0:  # the rule's answer stays first, whatever the others score
        scored[0] = (predicted, float(answers.predictions.confidence[row]))
        return [scored[0]] + sorted(scored[1:], key=lambda item: -item[1])[: limit - 1]
    return sorted(scored, key=lambda item: -item[1])[:limit]


def neighbours_table(query_ids, db_ids, db_labels, cosines, positions, inliers=None) -> pd.DataFrame:
    n, k = positions.shape
    flat_positions = positions.reshape(-1)
    keep = flat_positions >= 0
    neighbour_rows = flat_positions[keep]
    neighbour_labels = db_labels[neighbour_rows]
    table = pd.DataFrame(
        {
            "query_id": np.repeat(query_ids["id"].to_numpy(dtype=object), k)[keep],
            "rank": np.tile(np.arange(1, k + 1, dtype=np.int32), n)[keep],
            "neighbour_id": db_ids["id"].to_numpy(dtype=object)[neighbour_rows],
            "neighbour_landmark_id": pd.array(np.where(neighbour_labels >= 0, neighbour_labels, 0), dtype="Int64"),
            "cosine": cosines.reshape(-1)[keep],
        }
    )
    table.loc[neighbour_labels < 0, "neighbour_landmark_id"] = pd.NA
    if inliers is not None:  # verified neighbours only; NA for the others
        padded = np.full((n, k), -1, np.int64)
        padded[:, : inliers.shape[1]] = inliers
        table["inliers"] = pd.array(padded.reshape(-1)[keep], dtype="Int64")
        table.loc[table["inliers"] < 0, "inliers"] = pd.NA
    return table


def predictions_table(query_ids, result: Predictions, query_bank, label_inliers=None) -> pd.DataFrame:
    has_label = result.label >= 0
    table = pd.DataFrame(
        {
            "id": query_ids["id"].to_numpy(dtype=object),
            "landmark_id": pd.array(np.where(has_label, result.label, 0), dtype="Int64"),
            "score": np.where(has_label, result.confidence, np.nan),
            "top_cosine": np.where(has_label, result.top_cosine, np.nan).astype(np.float32),
            "other_cosine": np.where(has_label, result.other_cosine, np.nan).astype(np.float32),
            "bank_cosine": query_bank,
            "impostor_cosine": np.where(has_label, result.impostor, np.nan).astype(np.float32),
        }
    )
    if label_inliers is not None:
        table["inliers"] = np.where(has_label, label_inliers, 0).astype(np.int32)
    table.loc[~has_label, "landmark_id"] = pd.NA
    return table


def calibration_queries(val_path, bank, bank_ids, dim: int, seed: int):
    """The val queries that choose the non-landmark threshold: the val images (landmark queries) and as
    many photos of the bank as non-landmark queries (a fixed sample; each is left out of its own bank
    term). Returns (vectors, ids table with landmark_id, bank row per query or -1)."""
    val, val_ids = load_embeddings(val_path)
    if len(val) and val.shape[1] != dim:
        raise StageError(f"{val_path}: {val.shape[1]}-d embeddings, but the database is {dim}-d")
    landmark = val_ids["landmark_id"].notna().to_numpy()
    val, val_ids = val[landmark], val_ids[landmark].reset_index(drop=True)
    size = min(len(bank), len(val_ids))
    rows = (
        np.sort(np.random.default_rng([seed, 29]).choice(len(bank), size, replace=False))
        if size
        else np.zeros(0, np.int64)
    )
    vectors = np.concatenate([val, bank[rows]]) if size else val
    ids = pd.concat(
        [val_ids[["id", "landmark_id"]], bank_ids.iloc[rows][["id"]].assign(landmark_id=pd.NA)], ignore_index=True
    )
    exclude_bank = np.concatenate([np.full(len(val_ids), -1, np.int64), rows.astype(np.int64)])
    return vectors, ids, exclude_bank


def calibrate_threshold(
    db: Database, val_path, inputs: Inputs, images: ImageSource, threads: int, model_path=None, use_gpu=None
) -> tuple[dict, pd.DataFrame]:
    """Choose the non-landmark threshold on val (landmarks.threshold), for the test queries' mix of
    landmark and non-landmark photos (`threshold_landmark_share`); answers the val queries exactly as the
    test queries are answered, or, when model.pt's whitening was fitted on the val photos too
    (`model_path` has threshold folds), each with a whitening that left it out (`answer_in_folds`).
    Returns the choice and the val answers it was made on (calibration.parquet; predict chooses again
    from them for another share)."""
    vectors, ids, exclude_bank = calibration_queries(
        val_path, inputs.bank, inputs.bank_ids, db.index.d, db.settings["seed"]
    )
    if not ids["landmark_id"].notna().any():
        log.warning(
            "%s has no landmark images: no non-landmark threshold chosen (predict keeps every "
            "answer unless predict.nonlandmark_threshold is set)",
            val_path,
        )
        return {"threshold": None, "source": "none: val has no landmark images", "queries": len(ids)}, no_calibration()
    final, folds = whitenings_from_checkpoint(model_path) if model_path else (None, [])
    if final is not None and folds:
        queries = (vectors, ids, exclude_bank)
        confidence, label = answer_in_folds(inputs, db.settings, use_gpu, queries, final, folds, images, threads)
        answered = f"{len(folds)} threshold folds: each val photo with a whitening fitted without it"
    else:
        answers = answer_queries(db, vectors, ids["id"], exclude_bank=exclude_bank, images=images, threads=threads)
        confidence, label, answered = answers.predictions.confidence, answers.predictions.label, "as the test queries"
    val_answers = calibration_table(ids, label, confidence)
    share, share_from = threshold_landmark_share(inputs.query_ids, db.settings["landmark_share"])
    chosen = threshold_from_answers(val_answers, share, db.settings["threshold_smoothing"])
    chosen.update(source="val", answered=answered, landmark_share_from=share_from)
    log.info(
        "non-landmark threshold %.4f chosen on val (%s; smoothing %g) for a landmark share of %s (%s): %d "
        "landmark + %d non-landmark queries, %.1f%% right decisions at that share (%.1f%% without a threshold)",
        chosen["threshold"],
        answered,
        chosen["smoothing"],
        "0.5" if share is None else f"{share:.3f}",
        share_from,
        chosen["landmark_queries"],
        chosen["nonlandmark_queries"],
        100 * chosen["accuracy"],
        100 * chosen["accuracy_without_threshold"],
    )
    return chosen, val_answers


def calibration_table(ids: pd.DataFrame, label: np.ndarray, confidence: np.ndarray) -> pd.DataFrame:
    """calibration.parquet: each val query (id, its landmark or NA for a bank photo), the landmark it was
    answered with (NA: none) and the confidence (NaN: none)."""
    has_label = np.asarray(label) >= 0
    predicted = pd.array(np.where(has_label, label, 0), dtype="Int64")
    predicted[~has_label] = pd.NA
    return pd.DataFrame(
        {
            "id": ids["id"].to_numpy(dtype=object),
            "landmark_id": ids["landmark_id"].astype("Int64").to_numpy(),
            "predicted_landmark_id": predicted,
            "confidence": np.where(has_label, confidence, np.nan),
        }
    )


def no_calibration() -> pd.DataFrame:
    """calibration.parquet without val: its columns, no rows."""
    return calibration_table(pd.DataFrame({"id": [], "landmark_id": []}), np.zeros(0, np.int64), np.zeros(0))


def answer_in_folds(inputs: Inputs, s: dict, use_gpu, queries, final: dict, folds: list[dict], images, threads):
    """(confidence, label) of the calibration queries, each answered in its fold's space: database, bank
    and query re-whitened with the whitening that left the fold's val landmarks out (validation.threshold_folds;
    the embeddings before the whitening come back with `unwhiten`). Non-landmark queries, in no fit, are
    dealt to the folds in turn. Each fold builds its own database index (and impostor terms), and holds
    the database twice in memory as float32."""
    vectors, ids, exclude_bank = queries
    truth = ids["landmark_id"].astype("Int64").fillna(-1).to_numpy(dtype=np.int64)
    fold_of = np.arange(len(ids)) % len(folds)  # val landmarks in no fold were in no fit: any fold will do
    for number, fold in enumerate(folds):
        fold_of[np.isin(truth, fold["val_landmarks"]) & (truth >= 0)] = number
    database = unwhiten(np.asarray(inputs.database), final)
    bank = unwhiten(inputs.bank, final) if len(inputs.bank) else inputs.bank
    vectors = unwhiten(vectors, final)
    confidence, label = np.full(len(ids), np.nan), np.full(len(ids), -1, np.int64)
    for number, fold in enumerate(folds):
        rows = np.flatnonzero(fold_of == number)
        whitening = fold["whitening"]  # None: answered unwhitened
        fold_inputs = inputs._replace(
            database=apply_whitening(database, whitening), bank=apply_whitening(bank, whitening) if len(bank) else bank
        )
        fold_db, _, _ = build_database(fold_inputs, s, use_gpu, {})
        answers = answer_queries(
            fold_db,
            apply_whitening(vectors[rows], whitening),
            ids["id"].iloc[rows],
            exclude_bank=exclude_bank[rows],
            images=images,
            threads=threads,
        )
        confidence[rows], label[rows] = answers.predictions.confidence, answers.predictions.label
    return confidence, label


def save_database(out_dir: Path, db: Database, about: dict, bank_about: dict) -> None:
    """What predict needs to answer new photos without rebuilding anything: the database index, its rows
    (id, landmark, where the image is, B_j, impostor term) and the bank index."""
    write_index(cpu_index(db.index, about), out_dir / "index.faiss")
    write_index(cpu_index(db.bank_index, bank_about), out_dir / "bank.faiss")
    table = db.ids[[c for c in EMBEDDING_IDS_COLUMNS if c in db.ids.columns]].copy()
    table["landmark_id"] = table["landmark_id"].astype("Int64")
    if "shard" in table:  # relative to this folder: predict finds them from anywhere, and after a move
        table["shard"] = [os.path.relpath(Path(shard).resolve(), out_dir.resolve()) for shard in table["shard"]]
    table["bank_term"] = db.bank_terms.astype(np.float32) if db.bank_terms is not None else np.nan
    table["impostor_term"] = db.impostor_terms.astype(np.float32) if db.impostor_terms is not None else np.nan
    write_table(table.reset_index(drop=True), out_dir / "database.parquet")


def retrieve(
    database_path,
    queries_path,
    bank_path,
    out_dir: Path,
    *,
    use_gpu: bool | None = None,
    shard_dirs=(),
    threads: int = 1,
    val_path=None,
    model_path=None,
    predictor: dict | None = None,
    **settings,
) -> pd.DataFrame:
    """Search, predict (and verify) and write the stage's files into `out_dir`; returns the predictions
    table. `settings`: keys of config.yaml's retrieve section (validated, defaults filled); `shard_dirs`:
    shards holding the query, database (and val and bank) images, for `verify`; `val_path`: val
    embeddings, to choose the non-landmark threshold predict uses; `model_path`: the model.pt that
    embedded them, whose threshold folds (when val was in its whitening's fit) answer the val photos;
    `predictor`: the experiment's embed and shard settings, recorded in predictor.json for predict.

    Refuses (StageError) queries that are also in the bank, duplicate ids, embeddings of different
    dimensions, and a reranking without a bank.
    """
    from .config import section_settings

    s = section_settings("retrieve", settings, "retrieve settings")
    inputs = load_inputs(database_path, queries_path, bank_path, s["rerank"])
    self_rows = queries_in_database(inputs, s["exclude_self"])
    seconds = {}
    db, about, bank_about = build_database(inputs, s, use_gpu, seconds)
    images = ImageSource(shard_dirs) if s["verify"]["neighbours"] else None
    exclude = self_rows if s["exclude_self"] else None
    answers = search_queries(db, inputs, about, exclude, images, threads, seconds)
    recall = approximate_recall(inputs.database, inputs.queries, answers.positions, exclude, s, use_gpu)
    threshold, calibration = nonlandmark_threshold(db, val_path, inputs, images, threads, seconds, model_path, use_gpu)
    out_dir = Path(out_dir)
    predictions = write_answers(out_dir, inputs, db, answers, about, bank_about)
    write_table(calibration, out_dir / "calibration.parquet")
    summary = run_summary(
        (database_path, queries_path, bank_path), inputs, self_rows, db, answers, predictions, about, recall
    )
    summary.update(nonlandmark_threshold=threshold, seconds={name: round(value, 3) for name, value in seconds.items()})
    write_json_atomic(out_dir / "predictor.json", predictor_record(inputs, s, threshold, predictor))
    write_json_atomic(out_dir / "retrieve.json", summary)
    log.info(
        "%d of %d queries got a prediction (rerank %s%s); timings %s",
        int((answers.predictions.label >= 0).sum()),
        len(inputs.queries),
        s["rerank"],
        "" if answers.inliers is None else f", {summary['verified']} verified",
        summary["seconds"],
    )
    return predictions


def queries_in_database(inputs: Inputs, exclude_self: bool) -> np.ndarray:
    """The database row of each query that is also in the database (same id), else -1; says so in the log."""
    self_rows = _positions_of(inputs.query_ids["id"], inputs.db_ids)
    in_database = int((self_rows >= 0).sum())
    if in_database:
        log.warning(
            "%d of %d queries are also in the database (same id): %s",
            in_database,
            len(inputs.queries),
            "each is left out of its own neighbours"
            if exclude_self
            else "kept (exclude_self false): they will find themselves first",
        )
    return self_rows


def build_database(inputs: Inputs, s: dict, use_gpu, seconds: dict) -> tuple[Database, dict, dict]:
    """The database and bank indexes (timed in seconds["index"]) and the database's labels, bank terms and
    impostor terms (timed in seconds["impostor"]); returns the Database and the description of each index."""
    started = time.perf_counter()
    index, about = build_index(
        inputs.database,
        seed=s["seed"],
        use_gpu=use_gpu,
        index_type=s["index"],
        ivf_lists=s["ivf_lists"],
        pq_m=s["pq_m"],
        nprobe=s["nprobe"],
    )
    bank = inputs.bank if len(inputs.bank) else np.zeros((0, inputs.queries.shape[1]), np.float32)
    bank_index, bank_about = build_index(bank, use_gpu=use_gpu)  # small: exact search
    seconds["index"] = time.perf_counter() - started
    db_labels = inputs.db_ids["landmark_id"].astype("Int64").fillna(-1).to_numpy(dtype=np.int64)
    unlabelled = int((db_labels < 0).sum())
    if unlabelled:
        log.warning(
            "%d database images have no landmark id: they are listed as neighbours but give no label", unlabelled
        )
    bank_terms = database_bank_terms(inputs.database, inputs.db_ids, bank_index, inputs.bank_ids, s)
    impostor_terms = None
    if s["impostor_weight"] and reranking(s["rerank"]).uses_impostor:  # a search of the database against itself
        started = time.perf_counter()
        impostor_terms = database_impostor_terms(index, inputs.database, db_labels, s["impostor_k"])
        seconds["impostor"] = time.perf_counter() - started
    database = Database(index, inputs.db_ids, db_labels, bank_terms, bank_index, s, impostor_terms)
    return database, about, bank_about


def search_queries(db: Database, inputs: Inputs, about: dict, exclude, images, threads: int, seconds: dict) -> Answers:
    """The test queries' answers (`answer_queries`), with the search logged."""
    answers = answer_queries(
        db, inputs.queries, inputs.query_ids["id"], exclude=exclude, images=images, threads=threads, seconds=seconds
    )
    log.info(
        "searched %d queries against %d database images (%s index on %s) in %.2f s (+%.2f s to build it)",
        len(inputs.queries),
        len(inputs.database),
        about["type"],
        about["device"],
        seconds["search"],
        seconds["index"],
    )
    return answers


def nonlandmark_threshold(
    db: Database, val_path, inputs: Inputs, images, threads: int, seconds: dict, model_path=None, use_gpu=None
) -> tuple[dict, pd.DataFrame]:
    """The threshold predict calls a photo a non-landmark below, chosen on val when given (timed), and the
    val answers it was chosen on (no rows without val)."""
    if not val_path:
        return {"threshold": None, "source": "none: no val embeddings given"}, no_calibration()
    started = time.perf_counter()
    threshold, calibration = calibrate_threshold(db, val_path, inputs, images, threads, model_path, use_gpu)
    seconds["calibrate"] = time.perf_counter() - started
    return threshold, calibration


def write_answers(out_dir: Path, inputs: Inputs, db: Database, answers: Answers, about, bank_about) -> pd.DataFrame:
    """neighbours.parquet, predictions.parquet, submission.csv and what predict reads; returns the predictions."""
    from .metrics import write_submission_csv

    predictions = predictions_table(inputs.query_ids, answers.predictions, answers.query_bank, answers.label_inliers)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_table(
        neighbours_table(inputs.query_ids, db.ids, db.labels, answers.cosines, answers.positions, answers.inliers),
        out_dir / "neighbours.parquet",
    )
    write_table(predictions, out_dir / "predictions.parquet")
    write_submission_csv(predictions, out_dir / "submission.csv")  # every query; empty = no prediction
    save_database(out_dir, db, about, bank_about)
    return predictions


def run_summary(paths, inputs: Inputs, self_rows, db: Database, answers: Answers, predictions, about, recall) -> dict:
    """retrieve.json's sizes, settings, index and recall (the threshold and timings are added after)."""
    database_path, queries_path, bank_path = paths
    s = db.settings
    return {
        "database": {
            "path": str(database_path),
            "images": len(inputs.database),
            "unlabelled": int((db.labels < 0).sum()),
        },
        "queries": {
            "path": str(queries_path),
            "images": len(inputs.queries),
            "in_database": int((self_rows >= 0).sum()),
            "without_prediction": int((answers.predictions.label < 0).sum()),
        },
        "bank": {"path": str(bank_path) if bank_path else None, "images": len(inputs.bank)},
        "dim": int(inputs.queries.shape[1]),
        "prediction": label_rule_name(s["prediction"], s["rerank"]),
        "settings": s,
        "index": about,
        "recall": recall,
        "verified": None
        if answers.inliers is None
        else int(predictions["inliers"].ge(s["verify"]["min_inliers"]).sum()),
    }


def predictor_record(inputs: Inputs, s: dict, threshold: dict, predictor: dict | None) -> dict:
    """predictor.json: what predict needs besides the indexes (sizes, settings, threshold, embed and shard)."""
    return {
        "dim": int(inputs.queries.shape[1]),
        "database_images": len(inputs.database),
        "bank_images": len(inputs.bank),
        "retrieve": s,
        "nonlandmark_threshold": threshold,
        **(predictor or {}),
    }


def _json_object(text: str, flag: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise StageError(f"{flag} is not valid JSON: {err}") from err
    if not isinstance(value, dict):
        raise StageError(f"{flag} must be a JSON object")
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m landmarks.retrieve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--database", required=True, help="embeddings of the database (train split) .npy")
    parser.add_argument("--queries", required=True, help="embeddings of the queries (test split) .npy")
    parser.add_argument("--bank", default=None, help="embeddings of the non-landmark bank .npy")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument(
        "--settings",
        default="{}",
        help="JSON object of retrieve settings (config.yaml's retrieve section); defaults fill the rest",
    )
    parser.add_argument(
        "--shards", nargs="*", default=[], help="shard folders of the query and database images (for verify)"
    )
    parser.add_argument(
        "--val",
        default=None,
        help="embeddings of the val split .npy: the non-landmark threshold predict uses is chosen on them",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="the model.pt that made the embeddings: when its whitening was fitted on the val photos too, "
        "the threshold is chosen with its threshold folds' whitenings, which left them out",
    )
    parser.add_argument(
        "--predictor",
        default="{}",
        help="JSON object recorded in predictor.json for predict: the experiment's embed and shard "
        'settings ({"embed": {...}, "shard": {...}})',
    )
    parser.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    parser.add_argument("--threads", type=int, default=None, help="faiss CPU threads (OpenMP) and verify threads")
    args = parser.parse_args(argv)
    setup_logging()
    settings = _json_object(args.settings, "--settings")
    use_gpu = {"auto": None, "cpu": False, "gpu": True}[args.device]
    if use_gpu and gpu_count() == 0:
        raise StageError("--device gpu: faiss sees no GPU (faiss-cpu installed, or no CUDA device)")
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    retrieve(
        args.database,
        args.queries,
        args.bank,
        Path(args.out_dir),
        use_gpu=use_gpu,
        shard_dirs=args.shards,
        threads=args.threads or 1,
        val_path=args.val,
        model_path=args.model,
        predictor=_json_object(args.predictor, "--predictor"),
        **settings,
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
