"""Stage `retrieve`: faiss kNN of the test queries against the train database, non-landmark reranking.

Search: exact inner product (cosine, as embeddings are L2-normalised) with faiss `IndexFlatIP` by
default; on the GPU when faiss sees one (several GPUs: the database is sharded over them), on the CPU
otherwise. `--index ivfpq` (IVF + product quantisation) is for databases of tens of millions of
images; it logs its recall@k against exact search on a sample of queries and writes it into
retrieve.json. Database and queries are read from the memory-mapped .npy files in chunks (a flat
index still holds the database in memory as float32; IVF-PQ holds only pq_m bytes per image).

Which neighbours count: a database image with the query's own id is left out (a query that is also
in the database would otherwise find itself at cosine 1; `--no-exclude-self` keeps it). Duplicate
images under different ids are not detected. Neighbours with equal cosines are ordered by database
row, so results do not depend on faiss's internal order. Database images without a landmark id stay
in the neighbours table but never give a label.

Prediction (one label per query, from its k neighbours that have a landmark id):
  - top1: the label of the nearest neighbour;
  - vote: the label with the largest sum of cosines over its neighbours among the k.
Confidence (`--rerank`):
  - none:    the best cosine of the predicted label (its nearest neighbour's);
  - seed004: that cosine minus the mean of the query's top-`bank_k` cosines to the non-landmark bank;
  - glr2020: the GLR2020 winners' rule, which also picks the label (`--prediction` is not used). For
             database image j, B_j = mean of its top-`bank_k` cosines to the bank; for query i,
             A_ij = clamp(cos(i, j), 0, 1) - B_j; sum A over the first `neighbours_per_label`
             neighbours of each label, keep the best label, subtract C_i = mean of the query's
             top-`query_bank_k` cosines to the bank.
Ties between labels (equal vote or A sums) go to the label whose nearest neighbour ranks higher.

Writes neighbours.parquet (query_id, rank, neighbour_id, neighbour_landmark_id, cosine),
predictions.parquet (id, landmark_id, score, top_cosine, bank_cosine), the Kaggle submission
(`id,landmarks` with "<landmark_id> <score>"; empty when a query has no prediction) and retrieve.json
(sizes, index, device, timings, recall of an approximate index).

    python -m landmarks.retrieve --database train.npy --queries test.npy --bank nonlandmark.npy --out-dir DIR
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import faiss
import numpy as np
import pandas as pd

from .common import StageError, run_cli, setup_logging, write_json_atomic, write_table
from .embed import load_embeddings

log = logging.getLogger("landmarks.retrieve")

RERANK_METHODS = ("none", "seed004", "glr2020")
PREDICTION_RULES = ("top1", "vote")
SEARCH_CHUNK = 1 << 16  # query (or database) rows converted to float32 and handed to faiss at once
PREDICT_CELLS = 1 << 22  # queries x k x k label comparisons made at once (bounds predict's memory)
_NO_ROW = np.iinfo(np.int64).max  # sorts after every database row


def gpu_count() -> int:
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def _float32(rows) -> np.ndarray:
    return np.ascontiguousarray(rows, dtype=np.float32)


def build_index(database: np.ndarray, *, index_type: str = "flat", ivf_lists: int = 1024, pq_m: int = 64,
                nprobe: int = 32, use_gpu: bool | None = None, seed: int = 0):
    """(faiss index holding `database`, description dict). `database` may be a float16 memory map.

    flat: exact inner product. ivfpq: an inverted file of `ivf_lists` lists (fewer when the database
    is small: faiss wants ~39 training vectors per list), `pq_m` sub-quantisers of 8 bits (fewer bits
    when there are fewer than 256 vectors to train them), `nprobe` lists visited per query. The
    coarse quantiser and codebooks train on a random sample of the database.
    """
    n, dim = database.shape
    if index_type == "flat":
        index = faiss.IndexFlatIP(dim)
        about = {"type": "flat"}
    elif index_type == "ivfpq":
        if n == 0:
            raise StageError("retrieve.index ivfpq: the database is empty, nothing to train the index on")
        if dim % pq_m:
            raise StageError(f"retrieve.pq_m: {pq_m} sub-quantisers do not divide the embedding dimension {dim}")
        if dim // pq_m < 4:
            # Measured: 64 sub-quantisers of 2 dimensions train ~15x slower than 16 of 8 (faiss k-means).
            log.warning("retrieve.pq_m %d gives %d-dimensional sub-vectors: product quantiser training is "
                        "slow below 4 dimensions each (e.g. pq_m %d)", pq_m, dim // pq_m, max(1, dim // 8))
        lists = max(1, min(ivf_lists, n // 39))
        nbits = 8 if n >= 256 else max(1, int(np.log2(n)))
        index = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, lists, pq_m, nbits, faiss.METRIC_INNER_PRODUCT)
        # k-means uses at most 256 points per centroid anyway: train on a sample, not 50M rows.
        sample_size = min(n, max(256 * lists, 256 * 2 ** nbits))
        sample = np.sort(np.random.default_rng(seed).choice(n, sample_size, replace=False))
        try:
            index.train(_float32(database[sample]))
        except RuntimeError as err:
            raise StageError(f"retrieve: faiss could not train IVF-PQ ({lists} lists, pq_m {pq_m}): {err}") from err
        index.nprobe = min(nprobe, lists)
        about = {"type": "ivfpq", "ivf_lists": lists, "pq_m": pq_m, "pq_bits": nbits, "nprobe": index.nprobe,
                 "trained_on": int(sample_size)}
    else:
        raise StageError(f"unknown index type {index_type!r} (flat or ivfpq)")
    if use_gpu is None:
        use_gpu = gpu_count() > 0
    if use_gpu:
        gpus = gpu_count()
        if gpus == 0:
            raise StageError("retrieve: GPU search requested but faiss sees no GPU (faiss-cpu installed?)")
        options = faiss.GpuMultipleClonerOptions()
        options.shard = True  # several GPUs: each holds a slice of the database (not a copy)
        options.useFloat16 = index_type == "ivfpq"  # IVF-PQ lookup tables in fp16 (needed for large pq_m)
        try:
            index = faiss.index_cpu_to_all_gpus(index, co=options)
        except RuntimeError as err:
            raise StageError(f"retrieve: faiss could not put the {index_type} index on the GPU: {err}") from err
        about["device"] = f"gpu x{gpus}" + (" (sharded)" if gpus > 1 else "")
    else:
        about["device"] = "cpu"
    for start in range(0, n, SEARCH_CHUNK):
        index.add(_float32(database[start:start + SEARCH_CHUNK]))
    return index, about


def search(index, queries: np.ndarray, k: int, *, exclude: np.ndarray | None = None):
    """(cosines, positions), each (len(queries), k), of the k best database rows per query.

    `exclude[i]`, a database row (or -1), is never a neighbour of query i: the query itself when it is
    also in the database. Equal cosines are ordered by database row. Missing neighbours (k larger than
    the database, or an IVF index finding fewer) are position -1 with cosine -inf, at the end.
    """
    n_queries, n_db = len(queries), index.ntotal
    cosines = np.full((n_queries, k), -np.inf, np.float32)
    positions = np.full((n_queries, k), -1, np.int64)
    if n_queries == 0 or n_db == 0:
        return cosines, positions
    excluding = exclude is not None and bool((exclude >= 0).any())
    depth = min(k + (1 if excluding else 0), n_db)
    width = min(k, depth)
    for start in range(0, n_queries, SEARCH_CHUNK):
        stop = min(start + SEARCH_CHUNK, n_queries)
        chunk_cos, chunk_pos = index.search(_float32(queries[start:stop]), depth)
        chunk_pos = chunk_pos.astype(np.int64, copy=False)
        missing = chunk_pos < 0
        if excluding:
            missing |= chunk_pos == exclude[start:stop, None]
        chunk_cos = np.where(missing, -np.inf, chunk_cos).astype(np.float32)
        chunk_pos = np.where(missing, -1, chunk_pos)
        # Sort by cosine (desc), then database row: deterministic ties, dropped entries last.
        order = np.lexsort((np.where(missing, _NO_ROW, chunk_pos), -chunk_cos), axis=1)[:, :width]
        cosines[start:stop, :width] = np.take_along_axis(chunk_cos, order, axis=1)
        positions[start:stop, :width] = np.take_along_axis(chunk_pos, order, axis=1)
    return cosines, positions


def knn(database: np.ndarray, queries: np.ndarray, k: int, *, use_gpu: bool | None = None,
        index_type: str = "flat", ivf_lists: int = 1024, pq_m: int = 64, nprobe: int = 32,
        exclude: np.ndarray | None = None):
    """(cosines, positions) of the k nearest database rows for each query, by inner product.

    Exact search by default; on GPUs when faiss sees any (sharded over several). See `build_index`
    and `search`; missing neighbours come back as position -1 and cosine -inf.
    """
    if database.ndim != 2 or queries.ndim != 2:
        raise StageError(f"knn: expected 2-d arrays, got database {database.shape} and queries {queries.shape}")
    if len(database) and len(queries) and database.shape[1] != queries.shape[1]:
        raise StageError(f"knn: database vectors are {database.shape[1]}-d but queries {queries.shape[1]}-d")
    if len(database) == 0 or len(queries) == 0:
        return np.full((len(queries), k), -np.inf, np.float32), np.full((len(queries), k), -1, np.int64)
    index, _ = build_index(database, index_type=index_type, ivf_lists=ivf_lists, pq_m=pq_m, nprobe=nprobe,
                           use_gpu=use_gpu)
    return search(index, queries, k, exclude=exclude)


def bank_similarity(vectors: np.ndarray, bank: np.ndarray, k: int, *, exclude: np.ndarray | None = None,
                    **knn_options) -> np.ndarray:
    """Mean of each vector's top-k cosines to the non-landmark bank (0 when there is no bank)."""
    if bank is None or len(bank) == 0 or len(vectors) == 0:
        return np.zeros(len(vectors), np.float32)
    cosines, positions = knn(bank, vectors, min(k, len(bank)), exclude=exclude, **knn_options)
    found = positions >= 0
    total = np.where(found, cosines, 0).sum(axis=1, dtype=np.float64)
    return (total / np.maximum(found.sum(axis=1), 1)).astype(np.float32)


def recall_against_exact(approximate: np.ndarray, exact: np.ndarray) -> dict:
    """How well an approximate search's neighbour positions match exact search's, per query sample.

    recall_at_1: the exact nearest neighbour is also the approximate first; top1_in_top_k (faiss's
    "1-recall@k"): it is among the approximate k; recall_at_k: the share of the exact k found in the
    approximate k.
    """
    k = exact.shape[1]
    valid = exact >= 0
    found = (exact[:, :, None] == approximate[:, None, :]).any(axis=2) & valid
    has_any = valid[:, 0]
    return {
        "queries": int(has_any.sum()), "k": int(k),
        "recall_at_1": float((approximate[has_any, 0] == exact[has_any, 0]).mean()) if has_any.any() else None,
        "top1_in_top_k": float(found[has_any, 0].mean()) if has_any.any() else None,
        "recall_at_k": float(found.sum() / max(valid.sum(), 1)),
    }


def _predict_chunk(cosines, positions, db_labels, rule, query_bank, db_bank, cap):
    """`predict` on a block of queries. Labels are compared pairwise among each query's k neighbours
    (a (queries, k, k) mask): cheap for the k of retrieval, and no Python loop per query."""
    n, k = cosines.shape
    rows = np.arange(n)
    found = positions >= 0
    safe = np.where(found, positions, 0)
    neighbour_labels = np.where(found, db_labels[safe], -1)
    valid = found & (neighbour_labels >= 0)  # neighbours that can give a label
    cos64 = cosines.astype(np.float64)
    if rule == "top1":
        column = np.argmax(valid, axis=1)  # the first usable neighbour
    else:
        # same[i, j, l]: neighbours j and l of query i have the same landmark.
        same = (neighbour_labels[:, :, None] == neighbour_labels[:, None, :]) & valid[:, :, None] & valid[:, None, :]
        if rule == "glr2020":
            values = np.clip(cos64, 0.0, 1.0) - db_bank[safe].astype(np.float64)
            earlier = np.tri(k, k, -1, dtype=bool)  # [j, l]: l ranks above j
            counted = valid & ((same & earlier).sum(axis=2) < cap)  # the first `cap` of each label
        else:
            values, counted = cos64, valid
        contributions = np.where(same & counted[:, None, :], values[:, None, :], 0.0)
        # cumsum adds in rank order (as a loop over the neighbours would), so equal totals are equal exactly.
        totals = np.where(valid, np.cumsum(contributions, axis=2)[:, :, -1], -np.inf)
        # Every neighbour of a label carries its label's total; argmax takes the first maximum, i.e. on a
        # tie the label whose nearest neighbour ranks higher.
        column = np.argmax(totals, axis=1)
    has_label = valid[rows, column]
    label = np.where(has_label, neighbour_labels[rows, column], -1)
    base = np.where(valid & (neighbour_labels == label[:, None]), cos64, -np.inf).max(axis=1)
    if rule == "glr2020":
        confidence = totals[rows, column] - query_bank
    elif query_bank is not None:
        confidence = base - query_bank
    else:
        confidence = base.copy()
    confidence[~has_label] = -np.inf
    return label, confidence, base.astype(np.float32)


def predict(cosines: np.ndarray, positions: np.ndarray, db_labels: np.ndarray, *, prediction: str = "top1",
            rerank: str = "seed004", query_bank: np.ndarray | None = None, db_bank: np.ndarray | None = None,
            neighbours_per_label: int = 3):
    """(label, confidence, base cosine) per query, vectorised; label -1 when no neighbour has a label.

    cosines, positions: (queries, k) from `search`, best first (position -1 = no neighbour);
    db_labels: landmark id of each database row, -1 for none. query_bank: the query's mean cosine to
    the bank (seed004: top-`bank_k`; glr2020: C_i); db_bank: B_j per database row (glr2020).
    The rules and tie-breaking are in the module docstring.
    """
    if prediction not in PREDICTION_RULES:
        raise StageError(f"unknown prediction rule {prediction!r} (choose from {', '.join(PREDICTION_RULES)})")
    if rerank not in RERANK_METHODS:
        raise StageError(f"unknown rerank method {rerank!r} (choose from {', '.join(RERANK_METHODS)})")
    if rerank in ("seed004", "glr2020") and query_bank is None:
        raise StageError(f"rerank {rerank!r} needs the queries' bank similarities (query_bank)")
    if rerank == "glr2020" and db_bank is None:
        raise StageError("rerank 'glr2020' needs the database images' bank similarities (db_bank)")
    if neighbours_per_label < 1:
        raise StageError(f"neighbours_per_label must be at least 1, got {neighbours_per_label}")
    cosines, positions = np.asarray(cosines), np.asarray(positions)
    if cosines.shape != positions.shape or cosines.ndim != 2:
        raise StageError(f"cosines {cosines.shape} and positions {positions.shape} must be the same 2-d shape")
    db_labels = np.asarray(db_labels, dtype=np.int64)
    rule = "glr2020" if rerank == "glr2020" else prediction
    bank = np.asarray(query_bank, dtype=np.float64) if rerank != "none" else None
    db_bank = np.asarray(db_bank, dtype=np.float64) if db_bank is not None else None
    n = len(cosines)
    labels = np.full(n, -1, np.int64)
    confidence = np.full(n, -np.inf, np.float64)
    base = np.full(n, -np.inf, np.float32)
    if cosines.shape[1] == 0:
        return labels, confidence, base
    chunk = max(1, PREDICT_CELLS // cosines.shape[1] ** 2)
    for start in range(0, n, chunk):
        part = slice(start, min(start + chunk, n))
        labels[part], confidence[part], base[part] = _predict_chunk(
            cosines[part], positions[part], db_labels, rule, None if bank is None else bank[part], db_bank,
            neighbours_per_label)
    return labels, confidence, base


def _check_unique_ids(ids: pd.DataFrame, path) -> None:
    duplicated = ids["id"].duplicated()
    if duplicated.any():
        raise StageError(f"{path}: {int(duplicated.sum())} duplicate ids in its id table, "
                         f"e.g. {ids['id'][duplicated].iloc[0]!r}")


def _positions_of(ids_wanted: pd.Series, ids_table: pd.DataFrame) -> np.ndarray:
    """Row of each wanted id in `ids_table` (unique ids), -1 where absent."""
    return pd.Index(ids_table["id"]).get_indexer(ids_wanted).astype(np.int64)


def retrieve(database_path, queries_path, bank_path, out_dir: Path, *, k: int = 10, prediction: str = "top1",
             rerank: str = "seed004", bank_k: int = 5, neighbours_per_label: int = 3, query_bank_k: int = 10,
             index_type: str = "flat", ivf_lists: int = 1024, pq_m: int = 64, nprobe: int = 32,
             use_gpu: bool | None = None, exclude_self: bool = True, recall_sample: int = 1000,
             seed: int = 0) -> pd.DataFrame:
    """Search, predict and write the stage's four files into `out_dir`; returns the predictions table.

    Refuses (StageError) queries that are also in the bank, duplicate ids, embeddings of different
    dimensions, and a reranking without a bank.
    """
    if rerank not in RERANK_METHODS:
        raise StageError(f"unknown rerank method {rerank!r} (choose from {', '.join(RERANK_METHODS)})")
    if prediction not in PREDICTION_RULES:
        raise StageError(f"unknown prediction rule {prediction!r} (choose from {', '.join(PREDICTION_RULES)})")
    for name, value in (("k", k), ("bank_k", bank_k), ("neighbours_per_label", neighbours_per_label),
                        ("query_bank_k", query_bank_k)):
        if value < 1:
            raise StageError(f"retrieve.{name} must be at least 1, got {value}")
    database, db_ids = load_embeddings(database_path, mmap=True)
    queries, query_ids = load_embeddings(queries_path, mmap=True)
    if bank_path:
        bank, bank_ids = load_embeddings(bank_path)
    else:
        bank, bank_ids = np.zeros((0, queries.shape[1]), np.float32), pd.DataFrame({"id": [], "landmark_id": []})
    for array, path in ((database, database_path), (bank, bank_path)):
        if len(array) and len(queries) and array.shape[1] != queries.shape[1]:
            raise StageError(f"{path}: {array.shape[1]}-d embeddings, but the queries ({queries_path}) are "
                             f"{queries.shape[1]}-d: embedded by different models?")
    for ids, path in ((db_ids, database_path), (query_ids, queries_path), (bank_ids, bank_path)):
        if path:
            _check_unique_ids(ids, path)
    if rerank != "none" and len(bank) == 0:
        raise StageError(f"rerank '{rerank}' needs a non-empty non-landmark bank ({bank_path or 'none given'})")
    leaked = query_ids["id"].isin(bank_ids["id"])
    if leaked.any():
        raise StageError(f"{queries_path}: {int(leaked.sum())} queries are also in the non-landmark bank "
                         f"{bank_path} (e.g. {query_ids['id'][leaked].iloc[0]!r}): the bank must not contain "
                         f"test images, it would give their answer away")

    self_rows = _positions_of(query_ids["id"], db_ids)
    in_database = int((self_rows >= 0).sum())
    if in_database:
        log.warning("%d of %d queries are also in the database (same id): %s", in_database, len(queries),
                    "each is left out of its own neighbours" if exclude_self
                    else "kept (--no-exclude-self): they will find themselves first")
    options = dict(use_gpu=use_gpu, index_type=index_type, ivf_lists=ivf_lists, pq_m=pq_m, nprobe=nprobe)
    seconds = {}
    started = time.perf_counter()
    index, about = build_index(database, seed=seed, **options)
    seconds["index"] = time.perf_counter() - started
    started = time.perf_counter()
    exclude = self_rows if exclude_self else None
    cosines, positions = search(index, queries, k, exclude=exclude)
    seconds["search"] = time.perf_counter() - started
    log.info("searched %d queries against %d database images (%s index on %s) in %.2f s (+%.2f s to build it)",
             len(queries), len(database), about["type"], about["device"], seconds["search"], seconds["index"])

    recall = None
    if index_type != "flat" and recall_sample and len(queries) and len(database):
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(len(queries), min(recall_sample, len(queries)), replace=False))
        exact_cosines, exact_positions = knn(database, queries[sample], k, use_gpu=use_gpu,
                                             exclude=None if exclude is None else exclude[sample])
        recall = recall_against_exact(positions[sample], exact_positions)
        log.info("%s recall against exact search on %d sampled queries: recall@1 %.4f, true top-1 in top-%d "
                 "%.4f, recall@%d %.4f", index_type, recall["queries"], recall["recall_at_1"] or float("nan"), k,
                 recall["top1_in_top_k"] or float("nan"), k, recall["recall_at_k"])
    del index

    started = time.perf_counter()
    bank_options = dict(use_gpu=use_gpu, index_type="flat")  # the bank is small: exact search
    query_bank_k_used = query_bank_k if rerank == "glr2020" else bank_k
    query_bank = bank_similarity(queries, bank, query_bank_k_used, **bank_options)
    db_bank = None
    if rerank == "glr2020":
        db_in_bank = _positions_of(db_ids["id"], bank_ids)
        if (db_in_bank >= 0).any():
            log.warning("%d database images are also in the non-landmark bank: each is left out of its own B_j",
                        int((db_in_bank >= 0).sum()))
        db_bank = bank_similarity(database, bank, bank_k, exclude=db_in_bank, **bank_options)
    seconds["bank"] = time.perf_counter() - started

    started = time.perf_counter()
    db_labels = db_ids["landmark_id"].astype("Int64").fillna(-1).to_numpy(dtype=np.int64)
    unlabelled = int((db_labels < 0).sum())
    if unlabelled:
        log.warning("%d database images have no landmark id: they are listed as neighbours but give no label",
                    unlabelled)
    labels, confidence, base = predict(cosines, positions, db_labels, prediction=prediction, rerank=rerank,
                                       query_bank=query_bank, db_bank=db_bank,
                                       neighbours_per_label=neighbours_per_label)
    seconds["predict"] = time.perf_counter() - started

    flat_positions = positions.reshape(-1)
    keep = flat_positions >= 0
    neighbour_rows = flat_positions[keep]
    neighbour_labels = db_labels[neighbour_rows]
    neighbours = pd.DataFrame({
        "query_id": np.repeat(query_ids["id"].to_numpy(dtype=object), k)[keep],
        "rank": np.tile(np.arange(1, k + 1, dtype=np.int32), len(queries))[keep],
        "neighbour_id": db_ids["id"].to_numpy(dtype=object)[neighbour_rows],
        "neighbour_landmark_id": pd.array(np.where(neighbour_labels >= 0, neighbour_labels, 0), dtype="Int64"),
        "cosine": cosines.reshape(-1)[keep],
    })
    neighbours.loc[neighbour_labels < 0, "neighbour_landmark_id"] = pd.NA
    has_label = labels >= 0
    predictions = pd.DataFrame({
        "id": query_ids["id"].to_numpy(dtype=object),
        "landmark_id": pd.array(np.where(has_label, labels, 0), dtype="Int64"),
        "score": np.where(has_label, confidence, np.nan),
        "top_cosine": np.where(has_label, base, np.nan).astype(np.float32),
        "bank_cosine": query_bank,
    })
    predictions.loc[~has_label, "landmark_id"] = pd.NA
    out_dir.mkdir(parents=True, exist_ok=True)
    write_table(neighbours, out_dir / "neighbours.parquet")
    write_table(predictions, out_dir / "predictions.parquet")
    from .metrics import write_submission_csv
    write_submission_csv(predictions, out_dir / "submission.csv")  # every query; empty = no prediction
    summary = {
        "database": {"path": str(database_path), "images": len(database), "unlabelled": unlabelled},
        "queries": {"path": str(queries_path), "images": len(queries), "in_database": in_database,
                    "without_prediction": int((~has_label).sum())},
        "bank": {"path": str(bank_path) if bank_path else None, "images": len(bank)},
        "dim": int(queries.shape[1]), "k": k, "prediction": "glr2020" if rerank == "glr2020" else prediction,
        "rerank": rerank, "bank_k": bank_k, "glr2020_neighbours_per_label": neighbours_per_label,
        "glr2020_query_bank_k": query_bank_k, "exclude_self": exclude_self, "index": about,
        "recall": recall, "seconds": {name: round(value, 3) for name, value in seconds.items()},
    }
    write_json_atomic(out_dir / "retrieve.json", summary)
    log.info("%d of %d queries got a prediction (rerank %s); timings %s", int(has_label.sum()), len(queries),
             rerank, summary["seconds"])
    return predictions


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m landmarks.retrieve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database", required=True, help="embeddings of the database (train split) .npy")
    parser.add_argument("--queries", required=True, help="embeddings of the queries (test split) .npy")
    parser.add_argument("--bank", default=None, help="embeddings of the non-landmark bank .npy")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--k", type=int, default=10, help="neighbours per query")
    parser.add_argument("--prediction", choices=PREDICTION_RULES, default="top1")
    parser.add_argument("--rerank", choices=RERANK_METHODS, default="seed004")
    parser.add_argument("--bank-k", type=int, default=5, help="bank neighbours averaged (seed004, and B_j of glr2020)")
    parser.add_argument("--neighbours-per-label", type=int, default=3, help="glr2020: neighbours summed per label")
    parser.add_argument("--query-bank-k", type=int, default=10, help="glr2020: bank neighbours in C_i")
    parser.add_argument("--index", choices=["flat", "ivfpq"], default="flat")
    parser.add_argument("--ivf-lists", type=int, default=1024)
    parser.add_argument("--pq-m", type=int, default=64)
    parser.add_argument("--nprobe", type=int, default=32)
    parser.add_argument("--recall-sample", type=int, default=1000,
                        help="ivfpq: queries searched exactly too, to measure recall (0: skip)")
    parser.add_argument("--exclude-self", action=argparse.BooleanOptionalAction, default=True,
                        help="leave a database image with the query's own id out of its neighbours")
    parser.add_argument("--seed", type=int, default=0, help="seed of the IVF training and recall samples")
    parser.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    parser.add_argument("--threads", type=int, default=None, help="faiss CPU threads (OpenMP)")
    args = parser.parse_args(argv)
    setup_logging()
    use_gpu = {"auto": None, "cpu": False, "gpu": True}[args.device]
    if use_gpu and gpu_count() == 0:
        raise StageError("--device gpu: faiss sees no GPU (faiss-cpu installed, or no CUDA device)")
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    retrieve(args.database, args.queries, args.bank, Path(args.out_dir), k=args.k, prediction=args.prediction,
             rerank=args.rerank, bank_k=args.bank_k, neighbours_per_label=args.neighbours_per_label,
             query_bank_k=args.query_bank_k, index_type=args.index, ivf_lists=args.ivf_lists, pq_m=args.pq_m,
             nprobe=args.nprobe, use_gpu=use_gpu, exclude_self=args.exclude_self,
             recall_sample=args.recall_sample, seed=args.seed)
    return 0


if __name__ == "__main__":
    run_cli(main)
