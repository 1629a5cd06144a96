"""landmarks.index: faiss search (exact order, ties, padding) and the index files predict reads."""

import numpy as np
import pytest

from landmarks import index
from landmarks.common import StageError


def _unit(rows):
    rows = np.asarray(rows, np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_exact_knn_matches_numpy_and_pads_short_databases():
    rng = np.random.default_rng(2)
    database, queries = _unit(rng.normal(size=(300, 16))), _unit(rng.normal(size=(25, 16)))
    cosines, positions = index.knn(database, queries, 7)
    similarity = queries @ database.T
    expected = np.argsort(-similarity, axis=1)[:, :7]
    assert positions.tolist() == expected.tolist()
    assert cosines == pytest.approx(np.take_along_axis(similarity, expected, axis=1), abs=1e-5)
    cosines, positions = index.knn(database[:3], queries, 5)
    assert (positions[:, 3:] == -1).all() and np.isneginf(cosines[:, 3:]).all()
    assert sorted(positions[0, :3].tolist()) == [0, 1, 2]


def test_equal_cosines_are_ordered_by_database_row():
    database = _unit(np.tile([[1.0, 0.0]], (6, 1)))  # six identical database images
    _, positions = index.knn(database, _unit([[1.0, 0.2]]), 4)
    assert positions.tolist() == [[0, 1, 2, 3]]


def test_an_index_written_to_disk_reads_back_with_the_same_neighbours(tmp_path):
    rng = np.random.default_rng(5)
    database, queries = _unit(rng.normal(size=(50, 8))), _unit(rng.normal(size=(4, 8)))
    built, about = index.build_index(database, use_gpu=False)
    index.write_index(index.cpu_index(built, about), tmp_path / "index.faiss")
    loaded = index.read_index(tmp_path / "index.faiss")
    assert loaded.ntotal == 50
    for got, expected in zip(index.search(loaded, queries, 5), index.search(built, queries, 5)):
        assert got.tolist() == expected.tolist()
    (tmp_path / "broken.faiss").write_bytes(b"not an index")
    with pytest.raises(StageError, match="faiss cannot read it .*rerun the retrieve stage"):
        index.read_index(tmp_path / "broken.faiss")
