"""retrieve stage: exact and approximate kNN, the prediction and reranking rules, the files it writes."""

import json
import logging

import numpy as np
import pandas as pd
import pytest
from conftest import write_image_set, write_shards
from PIL import Image

from landmarks import ranking, retrieve, threshold
from landmarks.common import StageError
from landmarks.config import section_settings
from landmarks.embed import write_embeddings
from landmarks.metrics import read_submission_csv, score_predictions
from landmarks.tables import NEIGHBOURS_COLUMNS, PREDICTIONS_COLUMNS


def _unit(rows):
    rows = np.asarray(rows, np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def _write(path, vectors, ids, labels=None):
    labels = labels if labels is not None else [None] * len(ids)
    write_embeddings(
        _unit(vectors), pd.DataFrame({"id": ids, "landmark_id": pd.array(labels, dtype="Int64")}), path, dtype="float32"
    )
    return path


# ---- the stage ------------------------------------------------------------------------------------------------------


@pytest.fixture()
def clustered(tmp_path):
    """12 landmarks x 20 train images around a centre each, queries near some centres, and a bank."""
    rng = np.random.default_rng(3)
    dim = 32
    centres = rng.normal(size=(12, dim))
    train_labels = np.repeat(np.arange(12), 20)
    train = centres[train_labels] + 0.35 * rng.normal(size=(len(train_labels), dim))
    query_labels = np.array([0, 1, 2, 3, 4, 5, 6, 7])
    queries = np.vstack([centres[query_labels] + 0.35 * rng.normal(size=(8, dim)), rng.normal(size=(6, dim))])
    bank = rng.normal(size=(30, dim))
    paths = {
        "database": _write(tmp_path / "train.npy", train, [f"t{i}" for i in range(len(train))], train_labels + 100),
        "queries": _write(tmp_path / "test.npy", queries, [f"q{i}" for i in range(len(queries))]),
        "bank": _write(tmp_path / "bank.npy", bank, [f"b{i}" for i in range(len(bank))]),
    }
    return paths, query_labels + 100


def test_stage_writes_neighbours_predictions_and_a_submission_that_rescores_the_same(clustered, tmp_path):
    paths, truth_labels = clustered
    out = tmp_path / "out"
    assert (
        retrieve.main(
            [
                "--database",
                str(paths["database"]),
                "--queries",
                str(paths["queries"]),
                "--bank",
                str(paths["bank"]),
                "--out-dir",
                str(out),
                "--settings",
                '{"k": 5, "verify": {"neighbours": 0}}',
                "--threads",
                "1",
            ]
        )
        == 0
    )
    predictions = pd.read_parquet(out / "predictions.parquet")
    assert predictions["landmark_id"].iloc[:8].tolist() == truth_labels.tolist()  # well separated clusters
    neighbours = pd.read_parquet(out / "neighbours.parquet")
    # The tables score and predict read, as landmarks.tables declares them (no verification: no inliers).
    assert list(predictions.columns) == PREDICTIONS_COLUMNS and list(neighbours.columns) == NEIGHBOURS_COLUMNS
    assert (
        len(neighbours) == 14 * 5
        and neighbours.groupby("query_id")["rank"].apply(list).map(lambda r: r == [1, 2, 3, 4, 5]).all()
    )
    truth = {f"q{i}": ([int(truth_labels[i])] if i < 8 else []) for i in range(14)}
    submission = read_submission_csv(out / "submission.csv")
    assert score_predictions(submission, truth) == score_predictions(predictions, truth)
    summary = json.loads((out / "retrieve.json").read_text())
    assert summary["index"] == {"type": "flat", "device": "cpu"} and summary["recall"] is None
    assert summary["database"]["images"] == 240 and summary["bank"]["images"] == 30


def _impostor_terms_by_loop(vectors, labels, k):
    """The documented impostor term, one database image at a time."""
    cosines = vectors @ vectors.T
    terms = []
    for j in range(len(vectors)):
        others = [cosines[j, i] for i in range(len(vectors)) if i != j and (labels[i] != labels[j] or labels[j] < 0)]
        terms.append(np.mean(sorted(others, reverse=True)[:k]))
    return np.array(terms)


def test_impostor_terms_are_each_images_mean_cosine_to_its_nearest_other_landmarks(monkeypatch):
    rng = np.random.default_rng(5)
    labels = np.array([0] * 30 + [1] * 6 + [2] * 3 + [-1] * 2)  # one landmark deeper than the search below
    vectors = _unit(rng.normal(size=(3, 16))[np.where(labels >= 0, labels, 0)] + 0.8 * rng.normal(size=(41, 16)))
    index, _ = retrieve.build_index(vectors)
    terms = retrieve.database_impostor_terms(index, vectors, labels, 3)
    assert terms == pytest.approx(_impostor_terms_by_loop(vectors, labels, 3), abs=1e-6)
    # A search too shallow to reach another landmark takes its deepest cosine as the bound (never below the truth).
    monkeypatch.setattr(retrieve, "IMPOSTOR_SEARCH_DEPTH", 2)
    monkeypatch.setattr(retrieve, "IMPOSTOR_CHUNK", 7)  # and chunks give the same terms
    shallow = retrieve.database_impostor_terms(index, vectors, labels, 3)
    assert (shallow >= terms - 1e-6).all() and (shallow[:30] > terms[:30]).any()
    assert shallow[-2:] == pytest.approx(terms[-2:], abs=1e-6)  # unlabelled: every image is another landmark


def test_the_confidence_discounts_answers_whose_database_image_resembles_other_landmarks(clustered, tmp_path):
    paths, _ = clustered
    runs = {}
    for weight in (0.0, 0.5):
        out = tmp_path / f"w{weight}"
        settings = {"k": 5, "verify": {"neighbours": 0}, "impostor_weight": weight, "margin_weight": 0.0}
        settings["bank_excess_weight"] = 0.0
        runs[weight] = retrieve.retrieve(paths["database"], paths["queries"], paths["bank"], out, **settings)
    plain, discounted = runs[0.0], runs[0.5]
    assert plain["landmark_id"].equals(discounted["landmark_id"]) and plain["impostor_cosine"].isna().all()
    expected = discounted["top_cosine"].astype(float) - 0.5 * discounted["impostor_cosine"].astype(float)
    assert discounted["score"].to_numpy() == pytest.approx(expected.to_numpy(), abs=1e-6)
    database = pd.read_parquet(tmp_path / "w0.5" / "database.parquet")
    assert (
        database["impostor_term"].notna().all()
        and pd.read_parquet(tmp_path / "w0.0/database.parquet")["impostor_term"].isna().all()
    )


def test_the_default_confidence_also_discounts_a_close_runner_up(clustered, tmp_path):
    """The schema's confidence: top-1 cosine - 0.25 x impostor term - 0.3 x the runner-up landmark's cosine,
    so of two answers with the same cosine the one that barely beat another landmark ranks lower."""
    paths, _ = clustered
    predictions = retrieve.retrieve(
        paths["database"], paths["queries"], paths["bank"], tmp_path, k=5, verify={"neighbours": 0}
    )
    top, other = predictions["top_cosine"].astype(float), predictions["other_cosine"].astype(float)
    excess = (predictions["bank_cosine"].astype(float) - top).clip(lower=0)
    expected = top - 0.25 * predictions["impostor_cosine"].astype(float) - 0.3 * other - 0.5 * excess
    assert predictions["score"].to_numpy() == pytest.approx(expected.to_numpy(), abs=1e-6)
    assert json.loads((tmp_path / "predictor.json").read_text())["retrieve"]["margin_weight"] == 0.3


def test_a_photo_more_like_the_nonlandmark_bank_than_its_answer_ranks_below_the_landmark_photos(tmp_path):
    """Room photos (the bank and two queries from one cluster) find some landmark at a low cosine; with
    bank_excess_weight they pay for how far their bank term exceeds it and fall below a landmark photo
    that matches its landmark at an even lower cosine. Landmark photos pay nothing; without a bank nothing
    is paid at all."""
    rng = np.random.default_rng(7)
    dim = 32
    centres, room = rng.normal(size=(3, dim)), rng.normal(size=dim)
    train = centres[np.repeat(np.arange(3), 10)] + 0.5 * rng.normal(size=(30, dim))
    far_view = 0.3 * centres[0] + rng.normal(size=dim)  # a landmark photo its database barely resembles
    queries = np.vstack([centres + 0.5 * rng.normal(size=(3, dim)), far_view, room + 0.5 * rng.normal(size=(2, dim))])
    paths = {
        "database": _write(tmp_path / "train.npy", train, [f"t{i}" for i in range(30)], np.repeat([10, 11, 12], 10)),
        "queries": _write(tmp_path / "test.npy", queries, [f"q{i}" for i in range(6)]),
        "bank": _write(tmp_path / "bank.npy", room + 0.5 * rng.normal(size=(20, dim)), [f"b{i}" for i in range(20)]),
    }
    plain = {"k": 5, "verify": {"neighbours": 0}, "impostor_weight": 0.0, "margin_weight": 0.0}

    def answers(name, bank="bank", **weights):
        run = retrieve.retrieve(
            paths["database"], paths["queries"], paths.get(bank), tmp_path / name, **plain, **weights
        )
        return run.set_index("id")

    without, paid = answers("w0", bank_excess_weight=0.0), answers("w05", bank_excess_weight=0.5)
    top, bank_term = paid["top_cosine"].astype(float), paid["bank_cosine"].astype(float)
    excess = (bank_term - top).clip(lower=0)
    assert paid["landmark_id"].equals(without["landmark_id"]) and paid["landmark_id"]["q3"] == 10
    assert paid["score"].to_numpy() == pytest.approx((top - 0.5 * excess).to_numpy(), abs=1e-6)
    assert (excess[["q0", "q1", "q2", "q3"]] == 0).all() and (excess[["q4", "q5"]] > 0.1).all()
    rooms_first = without["score"][["q4", "q5"]].min() > without["score"]["q3"]
    assert rooms_first and paid["score"][["q4", "q5"]].max() < paid["score"]["q3"]
    no_bank = answers("nobank", bank="none", bank_excess_weight=0.5)
    assert no_bank["score"].to_numpy() == pytest.approx(no_bank["top_cosine"].astype(float).to_numpy(), abs=1e-6)


def test_glr2020_scores_use_the_bank_as_described(clustered, tmp_path):
    paths, _ = clustered
    retrieve.retrieve(
        paths["database"],
        paths["queries"],
        paths["bank"],
        tmp_path,
        k=6,
        rerank="glr2020",
        verify={"neighbours": 0},
        bank_k=5,
        glr2020_query_bank_k=10,
        glr2020_neighbours_per_label=3,
    )
    database = np.load(paths["database"])
    queries, bank = np.load(paths["queries"]), np.load(paths["bank"])
    db_labels = pd.read_parquet(str(paths["database"]).replace(".npy", ".ids.parquet"))["landmark_id"].to_numpy()
    b = np.sort(database @ bank.T, axis=1)[:, -5:].mean(axis=1)  # B_j
    c = np.sort(queries @ bank.T, axis=1)[:, -10:].mean(axis=1)  # C_i
    similarity = queries @ database.T
    predictions = pd.read_parquet(tmp_path / "predictions.parquet")
    for i, row in predictions.iterrows():
        top = np.argsort(-similarity[i])[:6]
        sums = {}
        for j in top:
            hits = sums.setdefault(db_labels[j], [])
            if len(hits) < 3:
                hits.append(min(max(similarity[i, j], 0), 1) - b[j])
        best = max(sums, key=lambda label: sum(sums[label]))
        assert row["landmark_id"] == best
        assert row["score"] == pytest.approx(sum(sums[best]) - c[i], abs=1e-4)
        assert row["bank_cosine"] == pytest.approx(c[i], abs=1e-4)


def test_a_query_that_is_also_in_the_database_is_not_its_own_neighbour(clustered, tmp_path, caplog):
    paths, _ = clustered
    database = paths["database"]  # the train images queried against themselves
    with caplog.at_level(logging.WARNING, logger="landmarks.retrieve"):
        retrieve.retrieve(database, database, paths["bank"], tmp_path / "loo", k=4, verify={"neighbours": 0})
    assert "240 of 240 queries are also in the database" in caplog.text
    neighbours = pd.read_parquet(tmp_path / "loo" / "neighbours.parquet")
    assert (neighbours["query_id"] != neighbours["neighbour_id"]).all()
    assert (neighbours.groupby("query_id").size() == 4).all()
    retrieve.retrieve(
        database, database, paths["bank"], tmp_path / "self", k=4, exclude_self=False, verify={"neighbours": 0}
    )
    first = pd.read_parquet(tmp_path / "self" / "neighbours.parquet").query("rank == 1")
    assert (first["query_id"] == first["neighbour_id"]).all()


def test_ivfpq_reports_its_recall_against_exact_search(tmp_path, capsys):
    rng = np.random.default_rng(4)
    centres = rng.normal(size=(40, 32))
    labels = rng.integers(0, 40, 3000)
    database = centres[labels] + 0.3 * rng.normal(size=(3000, 32))
    queries = centres[labels[:300]] + 0.3 * rng.normal(size=(300, 32))
    _write(tmp_path / "db.npy", database, [f"d{i}" for i in range(3000)], labels)
    _write(tmp_path / "q.npy", queries, [f"q{i}" for i in range(300)])
    assert (
        retrieve.main(
            [
                "--database",
                str(tmp_path / "db.npy"),
                "--queries",
                str(tmp_path / "q.npy"),
                "--out-dir",
                str(tmp_path / "out"),
                "--threads",
                "1",
                "--settings",
                json.dumps(
                    {
                        "rerank": "none",
                        "index": "ivfpq",
                        "ivf_lists": 16,
                        "pq_m": 8,
                        "nprobe": 4,
                        "recall_sample": 300,
                        "verify": {"neighbours": 0},
                    }
                ),
            ]
        )
        == 0
    )
    summary = json.loads((tmp_path / "out" / "retrieve.json").read_text())
    assert summary["index"]["type"] == "ivfpq" and summary["index"]["ivf_lists"] == 16
    recall = summary["recall"]
    assert recall["queries"] == 300 and recall["k"] == 10
    assert "recall against exact search on 300 sampled queries" in capsys.readouterr().err  # the log
    # The sample is every query here: the reported recall is what the neighbours table shows.
    neighbours = pd.read_parquet(tmp_path / "out" / "neighbours.parquet")
    found = neighbours.groupby("query_id")["neighbour_id"].apply(lambda ids: {int(i[1:]) for i in ids})
    exact = np.argsort(-(_unit(queries) @ _unit(database).T), axis=1)[:, :10]
    approx = [found[f"q{i}"] for i in range(300)]
    assert recall["top1_in_top_k"] == pytest.approx(np.mean([exact[i, 0] in approx[i] for i in range(300)]))
    assert recall["recall_at_k"] == pytest.approx(np.mean([len(set(exact[i]) & approx[i]) / 10 for i in range(300)]))
    assert recall["recall_at_k"] < 1  # 8 sub-quantisers of 4 dimensions: approximate, and it says so
    predictions = pd.read_parquet(tmp_path / "out" / "predictions.parquet")
    assert (predictions["landmark_id"].to_numpy() == labels[:300]).mean() > 0.9  # labels survive the approximation


def test_bad_inputs_are_refused_with_the_file_or_key_named(clustered, tmp_path):
    paths, _ = clustered
    with pytest.raises(StageError, match="also in the non-landmark bank"):
        retrieve.retrieve(paths["database"], paths["bank"], paths["bank"], tmp_path, rerank="seed004")
    with pytest.raises(StageError, match="retrieve.pq_m: 5 sub-quantisers do not divide the embedding dimension 32"):
        retrieve.retrieve(paths["database"], paths["queries"], paths["bank"], tmp_path, index="ivfpq", pq_m=5)
    other = _write(tmp_path / "other.npy", np.ones((3, 8)), ["x", "y", "z"])
    with pytest.raises(StageError, match="other.npy: 8-d embeddings, but the queries .* are 32-d"):
        retrieve.retrieve(other, paths["queries"], paths["bank"], tmp_path)
    twice = _write(tmp_path / "twice.npy", np.ones((2, 32)), ["same", "same"], [1, 1])
    with pytest.raises(StageError, match="twice.npy: 1 duplicate ids"):
        retrieve.retrieve(twice, paths["queries"], paths["bank"], tmp_path)
    with pytest.raises(StageError, match="needs a non-empty non-landmark bank"):
        retrieve.retrieve(paths["database"], paths["queries"], None, tmp_path, rerank="glr2020")
    with pytest.raises(StageError, match=r"retrieve.verify.neighbours is 5: .* give them \(--shards\)"):
        retrieve.retrieve(paths["database"], paths["queries"], paths["bank"], tmp_path)


# ---- geometric verification ------------------------------------------------------------


def test_a_verified_neighbour_corrects_the_label_and_raises_the_confidence():
    cosines = np.array([[0.9, 0.8, 0.7], [0.6, 0.5, 0.4]], np.float32)
    positions, db_labels = np.array([[0, 1, 2], [3, 4, -1]]), np.array([1, 2, 1, 4, 4])
    inliers = np.array([[3, 40, 0], [12, 0, 0]])  # query 1: the second neighbour (landmark 2) is the same place
    settings = {"min_inliers": 10, "relabel": True, "weight": 1.0, "full_inliers": None}
    forced, labels, is_verified = retrieve.verified_labels(positions, db_labels, inliers, settings)
    assert forced.tolist() == [2, 4] and is_verified.tolist() == [[False, True, False], [True, False, False]]
    base = ranking.predict(cosines, positions, db_labels, rerank="none", labels=forced)
    assert base.label.tolist() == [2, 4] and base.confidence == pytest.approx([0.8, 0.6])  # the new label's cosine
    result, label_inliers = retrieve.verified(base, labels, is_verified, inliers, settings)
    assert result.confidence == pytest.approx([0.8 + 1.0, 0.6 + 1.0]) and label_inliers.tolist() == [40, 12]
    # graded: 40 inliers earn the whole weight, 12 only 12/40 of it, so the better-verified answer ranks first
    graded, _ = retrieve.verified(base, labels, is_verified, inliers, {**settings, "weight": 0.5, "full_inliers": 40})
    assert graded.confidence == pytest.approx([0.8 + 0.5, 0.6 + 0.5 * 12 / 40])
    # A verified answer does not pay the runner-up margin: relabelled to landmark 2, query 0's runner-up is
    # the 0.9 it overruled, and it keeps 0.8 + 1.0 however much the margin weighs.
    margin = dict(rerank="none", margin_weight=0.5)
    unexempt = ranking.predict(cosines, positions, db_labels, labels=forced, **margin)
    assert unexempt.confidence[0] == pytest.approx(0.8 - 0.5 * 0.9)
    weighed = ranking.predict(cosines, positions, db_labels, labels=forced, verified=is_verified, **margin)
    weighed, _ = retrieve.verified(weighed, labels, is_verified, inliers, settings)
    assert weighed.confidence == pytest.approx([0.8 + 1.0, 0.6 + 1.0])
    forced, labels, is_verified = retrieve.verified_labels(
        positions, db_labels, inliers, {**settings, "relabel": False}
    )
    kept = ranking.predict(cosines, positions, db_labels, rerank="none", labels=forced)
    kept, _ = retrieve.verified(kept, labels, is_verified, inliers, settings)
    assert kept.label.tolist() == [1, 4] and kept.confidence == pytest.approx([0.9, 1.6])  # landmark 1 unverified
    kept = ranking.predict(cosines, positions, db_labels, labels=forced, verified=is_verified, **margin)
    kept, _ = retrieve.verified(kept, labels, is_verified, inliers, settings)
    assert kept.confidence[0] == pytest.approx(0.9 - 0.5 * 0.8)  # unverified: it pays the margin to landmark 2


def test_retrieve_verifies_neighbours_read_from_the_shards(tmp_path):
    """A query whose nearest embedding is the wrong landmark, but whose second neighbour is another view
    of the same (textured) scene: verification finds it, relabels the query and marks it verified."""
    from test_verify import scene, second_view

    photos = [
        ("db_a", scene(1), 1, "train"),
        ("db_b", scene(2), 2, "train"),
        ("db_c", scene(3), 3, "train"),
        ("q", Image.fromarray(second_view(scene(2))), None, "test"),
        ("q2", scene(4), None, "test"),
    ]
    write_image_set(tmp_path, photos, quality=95)
    write_shards(tmp_path / "selection.parquet", tmp_path / "images", tmp_path, ("train", "test"), size=300)
    unit = np.eye(4, dtype=np.float32)
    database = _write(tmp_path / "db.npy", unit[:3], ["db_a", "db_b", "db_c"], [1, 2, 3])
    # Both queries look most like db_a; q is really db_b's scene, q2 is none of them.
    queries = _write(tmp_path / "q.npy", np.array([[0.8, 0.6, 0, 0], [0.7, 0.1, 0.1, 0.7]], np.float32), ["q", "q2"])
    out = tmp_path / "out"
    predictions = retrieve.retrieve(
        database,
        queries,
        None,
        out,
        rerank="none",
        k=3,
        verify={"neighbours": 2},
        shard_dirs=[tmp_path / "train", tmp_path / "test"],
    )
    by_id = predictions.set_index("id")
    assert by_id.loc["q", "landmark_id"] == 2 and by_id.loc["q", "inliers"] >= 10
    bonus = 0.25 * min(by_id.loc["q", "inliers"] / 40, 1)  # the schema's weight x inliers / full_inliers
    assert by_id.loc["q", "score"] == pytest.approx(0.6 + bonus, abs=1e-6)  # its cosine to db_b + the bonus
    assert by_id.loc["q2", "landmark_id"] == 1 and by_id.loc["q2", "inliers"] < 10  # unverified: cosine only
    neighbours = pd.read_parquet(out / "neighbours.parquet")
    assert neighbours["inliers"].notna().sum() == 4  # 2 queries x 2 verified neighbours; rank 3 not checked
    assert json.loads((out / "retrieve.json").read_text())["verified"] == 1
    with pytest.raises(StageError, match="retrieve.verify: .* images are in none of the shards"):
        retrieve.retrieve(
            database,
            queries,
            None,
            tmp_path / "x",
            rerank="none",
            verify={"neighbours": 2},
            shard_dirs=[tmp_path / "train"],
        )


def test_val_photos_in_the_whitenings_fit_are_answered_with_a_whitening_that_left_them_out(tmp_path):
    """With `whitening_from: train+val` the val photos helped fit model.pt's whitening, which pulls each
    towards its train photos: the threshold is chosen with the threshold folds' whitenings instead, each
    val photo (and its share of the bank sample) answered in the space of the fold that left it out."""
    import torch

    from landmarks.model import threshold_folds_state, whitening_buffers
    from landmarks.validation import threshold_folds
    from landmarks.whitening import apply_whitening, fit_whitening

    rng = np.random.default_rng(11)
    dim, landmarks = 24, 8
    centres = rng.normal(size=(landmarks, dim))
    photo = lambda labels: _unit(centres[labels] + 1.2 * rng.normal(size=(len(labels), dim)))  # noqa: E731
    train_labels, val_labels = np.repeat(np.arange(landmarks), 2), np.arange(landmarks)
    train, val, bank, test = (
        photo(train_labels),
        photo(val_labels),
        _unit(rng.normal(size=(20, dim))),
        photo(val_labels),
    )
    final = fit_whitening(np.concatenate([train, val]), np.concatenate([train_labels, val_labels]))
    folds = threshold_folds(train, train_labels, val, val_labels, 0, fit_whitening)
    assert len(folds) == 2 and sorted(np.concatenate([f["val_landmarks"] for f in folds])) == list(range(landmarks))
    torch.save(
        {"model": whitening_buffers(final["mean"], final["matrix"]), "threshold_folds": threshold_folds_state(folds)},
        tmp_path / "model.pt",
    )
    torch.save({"model": whitening_buffers(final["mean"], final["matrix"])}, tmp_path / "no_folds.pt")
    ids = lambda prefix, n: [f"{prefix}{i}" for i in range(n)]  # noqa: E731
    paths = {
        "database": _write(tmp_path / "train.npy", apply_whitening(train, final), ids("t", 16), train_labels),
        "queries": _write(tmp_path / "test.npy", apply_whitening(test, final), ids("q", landmarks)),
        "bank": _write(tmp_path / "bank.npy", apply_whitening(bank, final), ids("b", 20)),
        "val": _write(tmp_path / "val.npy", apply_whitening(val, final), ids("v", landmarks), val_labels),
    }
    settings = {
        "verify": {"neighbours": 0},
        "impostor_weight": 0,
        "margin_weight": 0,
        "bank_excess_weight": 0,
        "seed": 0,
    }  # plain cosine
    chosen = {}
    for name, model in (("folds", "model.pt"), ("in_fit", "no_folds.pt")):
        out = tmp_path / name
        retrieve.retrieve(
            paths["database"],
            paths["queries"],
            paths["bank"],
            out,
            val_path=paths["val"],
            model_path=tmp_path / model,
            **settings,
        )
        chosen[name] = json.loads((out / "retrieve.json").read_text())["nonlandmark_threshold"]
    assert chosen["folds"]["answered"].startswith("2 threshold folds") and chosen["folds"]["source"] == "val"
    assert chosen["in_fit"]["answered"] == "as the test queries"
    # By hand: each calibration query's top-1 cosine in its fold's space (bank rows dealt in turn).
    _, query_ids, _ = retrieve.calibration_queries(paths["val"], bank, pd.DataFrame({"id": ids("b", 20)}), dim, 0)
    bank_rows = [int(i[1:]) for i in query_ids["id"][landmarks:]]
    raw = np.concatenate([val, bank[bank_rows]])
    truth = np.concatenate([val_labels, -np.ones(len(bank_rows), np.int64)])
    confidence, correct = np.zeros(len(raw)), np.zeros(len(raw), bool)
    for row in range(len(raw)):
        fold = next((f for f in folds if truth[row] in f["val_landmarks"]), folds[row % 2])
        cosines = apply_whitening(train, fold["whitening"]) @ apply_whitening(raw[row : row + 1], fold["whitening"])[0]
        confidence[row], correct[row] = cosines.max(), train_labels[cosines.argmax()] == truth[row]
    smoothing = section_settings("retrieve", {})["threshold_smoothing"]  # the default, as the stage ran
    expected = threshold.choose_threshold(confidence, correct, truth >= 0, smoothing=smoothing)
    assert chosen["folds"]["threshold"] == pytest.approx(expected["threshold"], abs=1e-4)
    assert chosen["folds"]["accuracy"] == pytest.approx(expected["accuracy"])
    assert chosen["in_fit"]["threshold"] != pytest.approx(chosen["folds"]["threshold"], abs=1e-3)
