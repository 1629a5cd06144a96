"""Benchmark: exact k-nearest-neighbour search, faiss against a brute force, on the same data, one run.

CPU (default): faiss `IndexFlatIP` (what the retrieve stage uses) against numpy (query chunks x database
matmul, `argpartition` for the top k, then a sort of those k). GPU (`--gpu`): faiss on the GPU (the
retrieve stage's `index_cpu_to_all_gpus`) against torch (chunked `mm` + `topk` on the same GPU).
Data: random unit vectors (float32), like L2-normalised embeddings. Prints both times, the ratio and how
often the two agree on the top-k (ties aside, they should agree exactly). Not part of the test run:

    .venv/bin/python bench/bench_knn.py                          # 200k x 512 database, 20k queries, CPU
    .venv/bin/python bench/bench_knn.py --database 100000 --queries 10000 --threads 2
    python bench/bench_knn.py --gpu --database 1000000 --queries 100000   # needs faiss-gpu and CUDA torch
    .venv/bin/python bench/bench_knn.py --predict-only --predict-queries 1000000

`--predict-queries N` (default 1M) also times the retrieve stage's vectorised `predict()` (labels and
confidences from the k neighbours) for each rule on N synthetic queries, against a per-query Python
loop (the shape of its first version) on a slice of them; `--predict-only` skips the kNN part.
"""

from __future__ import annotations

import argparse
import os
import time


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database", type=int, default=200_000, help="database vectors")
    parser.add_argument("--queries", type=int, default=20_000, help="query vectors")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--chunk", type=int, default=512, help="queries per brute-force matmul")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for both (default: all)")
    parser.add_argument("--gpu", action="store_true", help="faiss-gpu against torch on the GPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--predict-queries", type=int, default=1_000_000, help="queries for the predict() timing")
    parser.add_argument("--predict-only", action="store_true", help="time predict() only, no kNN")
    return parser.parse_args()


ARGS = parse_args()
if ARGS.threads:  # before numpy / faiss load their BLAS and OpenMP runtimes
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(ARGS.threads)

import faiss  # noqa: E402
import numpy as np  # noqa: E402


def unit_vectors(rng, n: int, dim: int) -> np.ndarray:
    vectors = rng.standard_normal((n, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def numpy_knn(database: np.ndarray, queries: np.ndarray, k: int, chunk: int):
    """Exact top-k by inner product: one matmul per query chunk, argpartition, then sort the k."""
    cosines = np.empty((len(queries), k), np.float32)
    positions = np.empty((len(queries), k), np.int64)
    for start in range(0, len(queries), chunk):
        similarity = queries[start : start + chunk] @ database.T
        top = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
        top_values = np.take_along_axis(similarity, top, axis=1)
        order = np.argsort(-top_values, axis=1, kind="stable")
        positions[start : start + chunk] = np.take_along_axis(top, order, axis=1)
        cosines[start : start + chunk] = np.take_along_axis(top_values, order, axis=1)
    return cosines, positions


def faiss_knn(database: np.ndarray, queries: np.ndarray, k: int, gpu: bool):
    index = faiss.IndexFlatIP(database.shape[1])
    if gpu:
        options = faiss.GpuMultipleClonerOptions()
        options.shard = True
        index = faiss.index_cpu_to_all_gpus(index, co=options)
    index.add(database)
    return index.search(queries, k)


def torch_knn(database: np.ndarray, queries: np.ndarray, k: int, chunk: int):
    import torch

    db = torch.from_numpy(database).cuda()
    cosines, positions = [], []
    for start in range(0, len(queries), chunk):
        similarity = torch.from_numpy(queries[start : start + chunk]).cuda() @ db.T
        values, indices = similarity.topk(k, dim=1)
        cosines.append(values.cpu())
        positions.append(indices.cpu())
    torch.cuda.synchronize()
    return torch.cat(cosines).numpy(), torch.cat(positions).numpy()


def timed(function, *args):
    started = time.perf_counter()
    result = function(*args)
    return time.perf_counter() - started, result


def agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(share of queries with the same top-1, share of the top-k sets that match) between two searches."""
    same_top1 = float((a[:, 0] == b[:, 0]).mean())
    same_sets = float(np.mean([len(set(x) & set(y)) / len(x) for x, y in zip(a.tolist(), b.tolist())]))
    return same_top1, same_sets


def loop_predict(cosines, positions, db_labels, rule, query_bank, db_bank, cap=3):
    """One query at a time with dicts, as the first version of retrieve.predict did."""
    labels, confidence = np.full(len(cosines), -1), np.full(len(cosines), -np.inf)
    for i in range(len(cosines)):
        scores = {}
        for cos, pos in zip(cosines[i], positions[i]):
            label = db_labels[pos]
            if rule == "glr2020":
                hits = scores.setdefault(label, [])
                if len(hits) < cap:
                    hits.append(min(max(cos, 0.0), 1.0) - db_bank[pos])
            else:
                scores.setdefault(label, []).append(cos)
        if rule == "top1":
            best = db_labels[positions[i][0]]
        else:
            best = max(scores, key=lambda lab: (sum(scores[lab]), -lab))
        labels[i] = best
        confidence[i] = (sum(scores[best]) if rule == "glr2020" else max(scores[best])) - query_bank[i]
    return labels, confidence


def bench_predict(n_queries: int, k: int, seed: int) -> None:
    from landmarks.ranking import predict

    rng = np.random.default_rng(seed)
    n_db = 1_000_000
    cosines = -np.sort(-rng.uniform(0, 1, (n_queries, k)).astype(np.float32), axis=1)
    positions = rng.integers(0, n_db, (n_queries, k))
    db_labels = rng.integers(0, 200_000, n_db)
    db_labels[positions[:, 1::2]] = db_labels[positions[:, ::2]]  # repeated labels among the neighbours
    query_bank = rng.uniform(0, 0.5, n_queries).astype(np.float32)
    db_bank = rng.uniform(0, 0.3, n_db).astype(np.float32)
    loop_n = min(n_queries, 50_000)
    print(f"predict(): {n_queries:,} queries x k={k}; the per-query loop on the first {loop_n:,}")
    for prediction, rerank in (("top1", "seed004"), ("vote", "seed004"), ("top1", "glr2020")):
        seconds, _ = timed(
            lambda prediction=prediction, rerank=rerank: predict(
                cosines,
                positions,
                db_labels,
                prediction=prediction,
                rerank=rerank,
                query_bank=query_bank,
                db_bank=db_bank,
            )
        )
        loop_seconds, _ = timed(
            loop_predict,
            cosines[:loop_n],
            positions[:loop_n],
            db_labels,
            "glr2020" if rerank == "glr2020" else prediction,
            query_bank,
            db_bank,
        )
        rate, loop_rate = n_queries / seconds, loop_n / loop_seconds
        print(
            f"  {prediction}/{rerank}: vectorised {seconds:6.2f} s ({rate:,.0f} queries/s), "
            f"loop {loop_rate:,.0f} queries/s -> {rate / loop_rate:.1f}x"
        )


def main() -> None:
    args = ARGS
    if args.predict_queries:
        bench_predict(args.predict_queries, args.k, args.seed)
    if args.predict_only:
        return
    rng = np.random.default_rng(args.seed)
    database = unit_vectors(rng, args.database, args.dim)
    queries = unit_vectors(rng, args.queries, args.dim)
    device = "GPU" if args.gpu else f"CPU ({args.threads or os.cpu_count()} threads)"
    print(f"exact kNN, k={args.k}: {args.database:,} x {args.dim} database, {args.queries:,} queries, on {device}")
    if args.gpu:
        print(f"faiss sees {faiss.get_num_gpus()} GPU(s)")
        brute_name, brute = "torch mm + topk", lambda: torch_knn(database, queries, args.k, args.chunk)
        torch_knn(database[:1000], queries[:10], args.k, args.chunk)  # CUDA start-up outside the timing
        faiss_knn(database[:1000], queries[:10], args.k, True)
    else:
        brute_name, brute = "numpy matmul + argpartition", lambda: numpy_knn(database, queries, args.k, args.chunk)
    faiss_seconds, (_, faiss_positions) = timed(faiss_knn, database, queries, args.k, args.gpu)
    brute_seconds, (_, brute_positions) = timed(brute)
    top1, sets = agreement(faiss_positions, brute_positions)
    print(
        f"faiss IndexFlatIP{' (GPU)' if args.gpu else ''}: {faiss_seconds:8.2f} s  "
        f"({args.queries / faiss_seconds:,.0f} queries/s)"
    )
    print(f"{brute_name}: {brute_seconds:8.2f} s  ({args.queries / brute_seconds:,.0f} queries/s)")
    print(f"ratio (brute force / faiss): {brute_seconds / faiss_seconds:.2f}x")
    print(f"agreement: same top-1 {top1:.4%}, same top-{args.k} sets {sets:.4%}")


if __name__ == "__main__":
    main()
