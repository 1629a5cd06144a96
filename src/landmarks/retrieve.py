"""Stage `retrieve`: faiss kNN of the test queries against the train database, non-landmark reranking.

Predictions: the label of the top-1 neighbour, or a similarity-weighted vote over the top-k labels.
Confidence (config `rerank`):
  - none:    the cosine of the best neighbour of the predicted label;
  - seed004: that cosine minus the mean of the query's top-`bank_k` cosines to the non-landmark bank;
  - glr2020: the GLR2020 winners' rule. For database image j, B_j = mean of its top-5 cosines to the
             bank; for query i, A_ij = clamp(cos(i, j), 0, 1) - B_j; sum A over the top-3 neighbours per
             label, keep the best label; subtract C_i = mean of the query's top-10 cosines to the bank.

Writes neighbours.parquet, predictions.parquet and the Kaggle submission CSV (`id,landmarks`).

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

from .common import StageError, run_cli, setup_logging, write_table
from .embed import load_embeddings

log = logging.getLogger("landmarks.retrieve")

RERANK_METHODS = ("none", "seed004", "glr2020")


def gpu_count() -> int:
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def knn(database: np.ndarray, queries: np.ndarray, k: int, *, use_gpu: bool | None = None,
        index_type: str = "flat", ivf_lists: int = 1024, pq_m: int = 64, nprobe: int = 32):
    """(cosines, positions) of the k nearest database rows for each query, by inner product.

    Exact search by default; on GPUs when faiss sees any (sharded over several). `ivfpq` trades exact
    results for memory on databases of tens of millions of vectors. Missing neighbours (k larger
    than the database) come back as position -1 and cosine -inf.
    """
    database = np.ascontiguousarray(database, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    n, dim = database.shape if database.ndim == 2 else (0, queries.shape[1] if queries.ndim == 2 else 0)
    if n == 0 or len(queries) == 0:
        return (np.full((len(queries), k), -np.inf, np.float32), np.full((len(queries), k), -1, np.int64))
    if index_type == "flat":
        index = faiss.IndexFlatIP(dim)
    elif index_type == "ivfpq":
        lists = max(1, min(ivf_lists, n // 39))  # faiss wants ~39 training points per list
        index = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, lists, pq_m, 8, faiss.METRIC_INNER_PRODUCT)
        index.train(database)
        index.nprobe = min(nprobe, lists)
    else:
        raise StageError(f"unknown index type {index_type!r} (flat or ivfpq)")
    if use_gpu is None:
        use_gpu = gpu_count() > 0
    if use_gpu:
        index = faiss.index_cpu_to_all_gpus(index)  # shards over every visible GPU
    index.add(database)
    cosines, positions = index.search(queries, min(k, n))
    if k > n:  # pad so callers always get k columns
        pad = k - n
        cosines = np.pad(cosines, ((0, 0), (0, pad)), constant_values=-np.inf)
        positions = np.pad(positions, ((0, 0), (0, pad)), constant_values=-1)
    cosines = np.where(positions < 0, -np.inf, cosines)
    return cosines, positions


def bank_similarity(vectors: np.ndarray, bank: np.ndarray, k: int, **knn_options) -> np.ndarray:
    """Mean of each vector's top-k cosines to the non-landmark bank (0 when there is no bank)."""
    if bank is None or len(bank) == 0 or len(vectors) == 0:
        return np.zeros(len(vectors), np.float32)
    cosines, _ = knn(bank, vectors, min(k, len(bank)), **knn_options)
    return cosines.mean(axis=1).astype(np.float32)


def predict(cosines: np.ndarray, positions: np.ndarray, db_labels: np.ndarray, *, prediction: str = "top1",
            rerank: str = "seed004", query_bank: np.ndarray | None = None, db_bank: np.ndarray | None = None,
            neighbours_per_label: int = 3):
    """(label, confidence, base cosine) per query; label -1 when a query has no neighbour."""
    n_queries, k = cosines.shape
    labels = np.full(n_queries, -1, np.int64)
    base = np.full(n_queries, -np.inf, np.float32)
    confidence = np.full(n_queries, -np.inf, np.float32)
    valid = positions >= 0
    neighbour_labels = np.where(valid, db_labels[np.clip(positions, 0, None)], -1)
    for i in range(n_queries):
        if not valid[i].any():
            continue
        row_labels, row_cos = neighbour_labels[i][valid[i]], cosines[i][valid[i]]
        if rerank == "glr2020":
            # A_ij = clamp(cos, 0, 1) - B_j, summed over the top-3 neighbours of each label.
            adjusted = np.clip(row_cos, 0, 1) - db_bank[positions[i][valid[i]]]
            scores = {}
            for label, value in zip(row_labels, adjusted):
                hits = scores.setdefault(label, [])
                if len(hits) < neighbours_per_label:
                    hits.append(value)
            best = max(scores, key=lambda lab: (sum(scores[lab]), -lab))
            labels[i], base[i] = best, row_cos[row_labels == best].max()
            confidence[i] = sum(scores[best]) - query_bank[i]
            continue
        if prediction == "vote":
            votes = {}
            for label, value in zip(row_labels, row_cos):
                votes[label] = votes.get(label, 0.0) + float(value)
            best = max(votes, key=lambda lab: (votes[lab], -lab))
        else:
            best = row_labels[0]
        labels[i], base[i] = best, row_cos[row_labels == best].max()
        confidence[i] = base[i] - (query_bank[i] if rerank == "seed004" else 0.0)
    return labels, confidence, base


def retrieve(database_path, queries_path, bank_path, out_dir: Path, *, k: int = 10, prediction: str = "top1",
             rerank: str = "seed004", bank_k: int = 5, neighbours_per_label: int = 3, query_bank_k: int = 10,
             index_type: str = "flat", ivf_lists: int = 1024, pq_m: int = 64, nprobe: int = 32,
             use_gpu: bool | None = None) -> pd.DataFrame:
    if rerank not in RERANK_METHODS:
        raise StageError(f"unknown rerank method {rerank!r} (choose from {', '.join(RERANK_METHODS)})")
    database, db_ids = load_embeddings(database_path)
    queries, query_ids = load_embeddings(queries_path)
    bank, bank_ids = load_embeddings(bank_path) if bank_path else (np.zeros((0, queries.shape[1]), np.float32), None)
    if rerank != "none" and len(bank) == 0:
        raise StageError(f"rerank '{rerank}' needs a non-empty non-landmark bank ({bank_path or 'none given'})")
    options = dict(use_gpu=use_gpu, index_type=index_type, ivf_lists=ivf_lists, pq_m=pq_m, nprobe=nprobe)
    started = time.perf_counter()
    cosines, positions = knn(database, queries, k, **options)
    bank_options = dict(options, index_type="flat")  # the bank is small: exact search
    query_bank_k_used = query_bank_k if rerank == "glr2020" else bank_k
    query_bank = bank_similarity(queries, bank, query_bank_k_used, **bank_options)
    db_bank = bank_similarity(database, bank, bank_k, **bank_options) if rerank == "glr2020" else None
    db_labels = db_ids["landmark_id"].fillna(-1).astype(np.int64).to_numpy()
    labels, confidence, base = predict(cosines, positions, db_labels, prediction=prediction, rerank=rerank,
                                       query_bank=query_bank, db_bank=db_bank,
                                       neighbours_per_label=neighbours_per_label)
    elapsed = time.perf_counter() - started
    log.info("searched %d queries against %d database images (+%d in the bank) in %.2f s",
             len(queries), len(database), len(bank), elapsed)

    ranks = np.tile(np.arange(1, k + 1), len(queries))
    flat_positions = positions.reshape(-1)
    keep = flat_positions >= 0
    neighbours = pd.DataFrame({
        "query_id": np.repeat(query_ids["id"].to_numpy(), k)[keep],
        "rank": ranks[keep],
        "neighbour_id": db_ids["id"].to_numpy()[flat_positions[keep]],
        "neighbour_landmark_id": db_labels[flat_positions[keep]],
        "cosine": cosines.reshape(-1)[keep],
    })
    predictions = pd.DataFrame({
        "id": query_ids["id"].to_numpy(),
        "landmark_id": pd.array(np.where(labels >= 0, labels, 0), dtype="Int64"),
        "score": confidence,
        "top_cosine": base,
        "bank_cosine": query_bank,
    })
    predictions.loc[labels < 0, "landmark_id"] = pd.NA
    out_dir.mkdir(parents=True, exist_ok=True)
    write_table(neighbours, out_dir / "neighbours.parquet")
    write_table(predictions, out_dir / "predictions.parquet")
    from .metrics import write_submission_csv
    write_submission_csv(predictions, out_dir / "submission.csv")  # every query; empty = no prediction
    return predictions


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m landmarks.retrieve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database", required=True, help="embeddings of the database (train split) .npy")
    parser.add_argument("--queries", required=True, help="embeddings of the queries (test split) .npy")
    parser.add_argument("--bank", default=None, help="embeddings of the non-landmark bank .npy")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--k", type=int, default=10, help="neighbours per query")
    parser.add_argument("--prediction", choices=["top1", "vote"], default="top1")
    parser.add_argument("--rerank", choices=RERANK_METHODS, default="seed004")
    parser.add_argument("--bank-k", type=int, default=5, help="bank neighbours averaged (seed004, and B_j of glr2020)")
    parser.add_argument("--neighbours-per-label", type=int, default=3, help="glr2020: neighbours summed per label")
    parser.add_argument("--query-bank-k", type=int, default=10, help="glr2020: bank neighbours in C_i")
    parser.add_argument("--index", choices=["flat", "ivfpq"], default="flat")
    parser.add_argument("--ivf-lists", type=int, default=1024)
    parser.add_argument("--pq-m", type=int, default=64)
    parser.add_argument("--nprobe", type=int, default=32)
    parser.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    args = parser.parse_args(argv)
    setup_logging()
    use_gpu = {"auto": None, "cpu": False, "gpu": True}[args.device]
    if use_gpu and gpu_count() == 0:
        raise StageError("--device gpu: faiss sees no GPU (faiss-cpu installed, or no CUDA device)")
    retrieve(args.database, args.queries, args.bank, Path(args.out_dir), k=args.k, prediction=args.prediction,
             rerank=args.rerank, bank_k=args.bank_k, neighbours_per_label=args.neighbours_per_label,
             query_bank_k=args.query_bank_k, index_type=args.index, ivf_lists=args.ivf_lists, pq_m=args.pq_m,
             nprobe=args.nprobe, use_gpu=use_gpu)
    return 0


if __name__ == "__main__":
    run_cli(main)
