"""The retrieval index: faiss build, search and files, shared by retrieve, train's validation and predict.

Search is by inner product (cosine, as embeddings are L2-normalised): exact with `IndexFlatIP` by
default, or IVF + product quantisation (`ivfpq`) for databases of tens of millions of images. On the
GPU when faiss sees one (several GPUs: the database is sharded over them), on the CPU otherwise.
Database and queries are handed to faiss in chunks, so float16 memory maps of any size can be read.
Neighbours with equal cosines are ordered by database row, so results do not depend on faiss's
internal order; missing neighbours are position -1 with cosine -inf.
"""

from __future__ import annotations

import logging
from pathlib import Path

import faiss
import numpy as np

from .common import StageError, atomic_path

log = logging.getLogger("landmarks.index")

SEARCH_CHUNK = 1 << 16  # query (or database) rows converted to float32 and handed to faiss at once
_NO_ROW = np.iinfo(np.int64).max  # sorts after every database row


def gpu_count() -> int:
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def _float32(rows) -> np.ndarray:
    return np.ascontiguousarray(rows, dtype=np.float32)


def build_index(
    database: np.ndarray,
    *,
    index_type: str = "flat",
    ivf_lists: int = 1024,
    pq_m: int = 64,
    nprobe: int = 32,
    use_gpu: bool | None = None,
    seed: int = 0,
):
    """(faiss index holding `database`, description dict). `database` may be a float16 memory map.

    flat: exact inner product. ivfpq: an inverted file of `ivf_lists` lists (fewer when the database
    is small: faiss wants ~39 training vectors per list), `pq_m` sub-quantisers of 8 bits (fewer bits
    when there are fewer than 256 vectors to train them), `nprobe` lists visited per query. The
    coarse quantiser and codebooks train on a random sample of the database.
    """
    n, dim = database.shape
    if index_type == "flat":
        index, about = faiss.IndexFlatIP(dim), {"type": "flat"}
    elif index_type == "ivfpq":
        index, about = _trained_ivfpq(database, ivf_lists, pq_m, nprobe, seed)
    else:
        raise StageError(f"unknown index type {index_type!r} (flat or ivfpq)")
    if use_gpu is None:
        use_gpu = gpu_count() > 0
    if use_gpu:
        index, about["device"] = _on_all_gpus(index, index_type)
    else:
        about["device"] = "cpu"
    for start in range(0, n, SEARCH_CHUNK):
        index.add(_float32(database[start : start + SEARCH_CHUNK]))
    return index, about


def _trained_ivfpq(database: np.ndarray, ivf_lists: int, pq_m: int, nprobe: int, seed: int):
    """An empty IVF-PQ index trained on a sample of `database`, and its description (see `build_index`)."""
    n, dim = database.shape
    if n == 0:
        raise StageError("retrieve.index ivfpq: the database is empty, nothing to train the index on")
    if dim % pq_m:
        raise StageError(f"retrieve.pq_m: {pq_m} sub-quantisers do not divide the embedding dimension {dim}")
    if dim // pq_m < 4:
        # Measured: 64 sub-quantisers of 2 dimensions train ~15x slower than 16 of 8 (faiss k-means).
        log.warning(
            "retrieve.pq_m %d gives %d-dimensional sub-vectors: product quantiser training is "
            "slow below 4 dimensions each (e.g. pq_m %d)",
            pq_m,
            dim // pq_m,
            max(1, dim // 8),
        )
    lists = max(1, min(ivf_lists, n // 39))
    nbits = 8 if n >= 256 else max(1, int(np.log2(n)))
    index = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, lists, pq_m, nbits, faiss.METRIC_INNER_PRODUCT)
    # k-means uses at most 256 points per centroid anyway: train on a sample, not 50M rows.
    sample_size = min(n, max(256 * lists, 256 * 2**nbits))
    sample = np.sort(np.random.default_rng(seed).choice(n, sample_size, replace=False))
    try:
        index.train(_float32(database[sample]))
    except RuntimeError as err:
        raise StageError(f"retrieve: faiss could not train IVF-PQ ({lists} lists, pq_m {pq_m}): {err}") from err
    index.nprobe = min(nprobe, lists)
    about = {
        "type": "ivfpq",
        "ivf_lists": lists,
        "pq_m": pq_m,
        "pq_bits": nbits,
        "nprobe": index.nprobe,
        "trained_on": int(sample_size),
    }
    return index, about


def _on_all_gpus(index, index_type: str):
    """(the index on every GPU faiss sees, sharded over several, the device description)."""
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
    return index, f"gpu x{gpus}" + (" (sharded)" if gpus > 1 else "")


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


def knn(
    database: np.ndarray,
    queries: np.ndarray,
    k: int,
    *,
    use_gpu: bool | None = None,
    index_type: str = "flat",
    ivf_lists: int = 1024,
    pq_m: int = 64,
    nprobe: int = 32,
    exclude: np.ndarray | None = None,
):
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
    index, _ = build_index(
        database, index_type=index_type, ivf_lists=ivf_lists, pq_m=pq_m, nprobe=nprobe, use_gpu=use_gpu
    )
    return search(index, queries, k, exclude=exclude)


def bank_similarity(
    vectors: np.ndarray, bank: np.ndarray, k: int, *, exclude: np.ndarray | None = None, **knn_options
) -> np.ndarray:
    """Mean of each vector's top-k cosines to the non-landmark bank (0 when there is no bank)."""
    if bank is None or len(bank) == 0 or len(vectors) == 0:
        return np.zeros(len(vectors), np.float32)
    index, _ = build_index(bank, **knn_options)
    return bank_similarity_from_index(index, vectors, k, exclude=exclude)


def bank_similarity_from_index(
    bank_index, vectors: np.ndarray, k: int, *, exclude: np.ndarray | None = None
) -> np.ndarray:
    """`bank_similarity` against a bank already in a faiss index (retrieve builds it once; predict loads it)."""
    if bank_index is None or bank_index.ntotal == 0 or len(vectors) == 0:
        return np.zeros(len(vectors), np.float32)
    cosines, positions = search(bank_index, vectors, min(k, bank_index.ntotal), exclude=exclude)
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
        "queries": int(has_any.sum()),
        "k": int(k),
        "recall_at_1": float((approximate[has_any, 0] == exact[has_any, 0]).mean()) if has_any.any() else None,
        "top1_in_top_k": float(found[has_any, 0].mean()) if has_any.any() else None,
        "recall_at_k": float(found.sum() / max(valid.sum(), 1)),
    }


def cpu_index(index, about: dict):
    """The index as faiss writes it to disk (a GPU index is copied back to the CPU first)."""
    return faiss.index_gpu_to_cpu(index) if about["device"].startswith("gpu") else index


def write_index(index, path: Path) -> None:
    with atomic_path(path, suffix=".faiss") as tmp:
        faiss.write_index(index, str(tmp))


def read_index(path: Path):
    """A faiss index file written by `write_index`; StageError (rerun retrieve) when faiss cannot read it."""
    try:
        return faiss.read_index(str(path))
    except RuntimeError as err:
        raise StageError(
            f"{path}: faiss cannot read it ({str(err).splitlines()[0]}); rerun the retrieve stage"
        ) from err


def to_all_gpus(index):
    """A CPU index copied onto every GPU faiss sees."""
    return faiss.index_cpu_to_all_gpus(index)
