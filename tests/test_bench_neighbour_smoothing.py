"""bench/neighbour_smoothing.py: database-side augmentation and query expansion, as the README reports them."""

import numpy as np
import pandas as pd
from test_bench_method import load

from landmarks.common import write_table
from landmarks.embed import write_embeddings

smoothing = load("neighbour_smoothing")


def unit(*vectors) -> np.ndarray:
    return smoothing.normalise(np.array(vectors, dtype=np.float64))


def test_dba_pulls_each_image_towards_its_nearest_neighbour_by_cosine_cubed():
    db = unit([1, 0, 0], [0.8, 0.6, 0], [0, 0, 1])
    labels = np.array([1, 1, 2])
    assert smoothing.augment_database(db, labels, 0, False) is db  # k = 0: the plain database
    augmented = smoothing.augment_database(db, labels, 1, False)
    expected = smoothing.normalise(db[:1] + 0.8**3 * db[1:2])  # image 0's nearest is image 1, cosine 0.8
    np.testing.assert_allclose(augmented[0], expected[0])
    np.testing.assert_allclose(augmented[2], db[2])  # its nearest is orthogonal: weight 0


def test_same_landmark_dba_never_mixes_two_landmarks():
    db = unit([1, 0, 0], [0.9, 0.1, 0], [0.5, 0, 0.5])
    labels = np.array([1, 2, 1])
    augmented = smoothing.augment_database(db, labels, 1, True)
    np.testing.assert_allclose(augmented[:2], db[:2])  # each one's nearest is of the other landmark
    plain = smoothing.augment_database(db, labels, 1, False)
    assert not np.allclose(plain[0], db[0])


def test_query_expansion_moves_the_query_towards_its_nearest_database_images():
    db = unit([1, 0], [0.6, 0.8], [0.55, 0.835])
    labels = np.array([7, 8, 8])
    query = unit([0.8, 0.6])  # cosine 0.8 to the landmark 7 image, 0.96 and 0.94 to the landmark 8 ones
    label, score = smoothing.predict(db, labels, query, qe=0)
    assert label[0] == 8 and np.isclose(score[0], 0.96)
    label, score = smoothing.predict(db, labels, query, qe=2)  # expanded towards landmark 8: closer still
    assert label[0] == 8 and score[0] > 0.96


def test_with_val_a_query_nearest_to_a_val_photo_gets_that_photos_landmark(tmp_path):
    embed = tmp_path / "experiments" / "finetuned" / "embed"
    embed.mkdir(parents=True)
    ids = {split: [f"{split}{i}" for i in range(2)] for split in ("train", "val", "test")}
    vectors = {  # landmark 1's val photo looks like the queries, its train photo does not
        "train": unit([1, 0, 0], [0, 1, 0]),
        "val": unit([0, 0, 1], [0, 1, 0.1]),
        "test": unit([0.1, 0, 1], [0, 0.1, 1]),
    }
    landmarks = {"train": [1, 2], "val": [1, 2], "test": [1, 1]}
    for split in ("train", "val", "test"):
        table = pd.DataFrame({"id": ids[split], "landmark_id": pd.array(landmarks[split], dtype="Int64")})
        write_embeddings(vectors[split].astype(np.float32), table, embed / f"{split}.npy", dtype="float32")
    selection = pd.DataFrame(
        {
            "id": sum(ids.values(), []),
            "landmark_id": pd.array(sum(landmarks.values(), []), dtype="Int64"),
            "split": [split for split in ids for _ in range(2)],
        }
    )
    write_table(selection, tmp_path / "select" / "selection.parquet")
    gaps = smoothing.run_gaps(tmp_path, "finetuned")
    assert gaps["with_val"] == 1.0  # both queries answered 1 through the val photo
    assert gaps["plain"] < 1.0  # from the train photos alone the second query looks like landmark 2
    (embed / "val.npy").unlink()
    assert "with_val" not in smoothing.run_gaps(tmp_path, "finetuned")  # a run that embedded no val photos


def test_each_reading_is_compared_with_the_plain_search_over_the_same_queries(capsys):
    table = pd.DataFrame(
        {"run": ["a", "b"], "experiment": ["x", "x"], "plain": [0.9, 0.8], "plain_query": [0.5, 0.7]}
        | {"up": [0.95, 0.8], "up_query": [0.6, 0.6]}
    )
    smoothing.print_gains(table)
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[-4:]}
    assert "+0.025" in lines["up"]  # (0.05 + 0.0) / 2 over plain
    assert "+0.000" in lines["up_query"]  # (0.1 - 0.1) / 2 over plain_query, not over plain


def test_without_held_out_photos_or_sources_there_is_no_query_reading(tmp_path):
    assert smoothing.query_photo_ids(tmp_path / "results") is None  # no sources.csv
    pd.DataFrame({"id": ["a", "b"], "source": ["query", "nonlandmark"]}).to_csv(tmp_path / "sources.csv", index=False)
    assert smoothing.query_photo_ids(tmp_path / "results") is None  # full regime: every query is a query photo
    pd.DataFrame({"id": ["a", "b", "c", "d"], "source": ["query", "nonlandmark", "heldout", "database"]}).to_csv(
        tmp_path / "sources.csv", index=False
    )
    assert smoothing.query_photo_ids(tmp_path / "results") == {"a", "b"}
