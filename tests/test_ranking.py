"""landmarks.ranking: the prediction rules and rerankings, their registries, and predict()."""

import numpy as np
import pytest

from landmarks import ranking
from landmarks.common import StageError

# ---- predict(): the vectorised rules against a plain loop over each query -------------------------------------


def _reference(cosines, positions, db_labels, rule, query_bank, db_bank, cap):
    """The documented rules, one query at a time: candidates are found neighbours with a label; ties go to
    the label whose first candidate ranks higher."""
    labels, confidence, base = [], [], []
    for cos_row, pos_row, bank in zip(cosines, positions, query_bank):
        candidates = [
            (rank, db_labels[p], float(c), p)
            for rank, (c, p) in enumerate(zip(cos_row, pos_row))
            if p >= 0 and db_labels[p] >= 0
        ]
        if not candidates:
            labels.append(-1), confidence.append(-np.inf), base.append(-np.inf)
            continue
        per_label = {}
        for rank, label, cos, p in candidates:
            per_label.setdefault(label, []).append((rank, cos, p))
        if rule == "top1":
            best = candidates[0][1]
            total = None
        else:

            def total_of(label):
                hits = per_label[label]  # noqa: B023 (called inside the loop that binds it)
                if rule == "glr2020":
                    return sum(min(max(c, 0.0), 1.0) - db_bank[p] for _, c, p in hits[:cap])
                return sum(c for _, c, _ in hits)

            best = min(per_label, key=lambda label: (-total_of(label), per_label[label][0][0]))
            total = total_of(best)
        top = max(c for _, c, _ in per_label[best])
        labels.append(best)
        base.append(top)
        if rule == "glr2020":
            confidence.append(total - bank)
        else:
            confidence.append(top - bank)
    return np.array(labels), np.array(confidence), np.array(base)


@pytest.mark.parametrize(
    "prediction, rerank",
    [("top1", "none"), ("top1", "seed004"), ("vote", "none"), ("vote", "seed004"), ("top1", "glr2020")],
)
def test_vectorised_predict_matches_a_loop_per_query(prediction, rerank):
    rng = np.random.default_rng(1)
    n_queries, k, n_db = 400, 8, 60
    # Cosines on a coarse grid so that votes tie; missing neighbours at the end of some rows.
    cosines = -np.sort(-np.round(rng.uniform(-0.2, 1.0, (n_queries, k)), 1), axis=1).astype(np.float32)
    positions = rng.integers(0, n_db, (n_queries, k))
    found = rng.integers(0, k + 1, n_queries)
    found[:5] = 0  # some queries find nothing
    missing = np.arange(k) >= found[:, None]
    positions[missing], cosines[missing] = -1, -np.inf
    db_labels = rng.integers(0, 6, n_db)
    db_labels[::7] = -1  # database images without a landmark id
    query_bank = rng.uniform(0, 0.5, n_queries).astype(np.float32)
    db_bank = rng.uniform(0, 0.3, n_db).astype(np.float32)
    labels, confidence, base, _, _ = ranking.predict(
        cosines,
        positions,
        db_labels,
        prediction=prediction,
        rerank=rerank,
        query_bank=query_bank,
        db_bank=db_bank,
        neighbours_per_label=2,
    )
    rule = "glr2020" if rerank == "glr2020" else prediction
    bank = query_bank if rerank != "none" else np.zeros(n_queries)
    expected_labels, expected_confidence, expected_base = _reference(
        cosines, positions, db_labels, rule, bank, db_bank, 2
    )
    assert labels.tolist() == expected_labels.tolist()
    assert confidence == pytest.approx(expected_confidence, abs=1e-6)
    assert base == pytest.approx(expected_base, abs=1e-6)
    assert (labels == -1).sum() >= 5


def test_ties_go_to_the_label_of_the_nearer_neighbour():
    # Label 9 at rank 1 and label 7 at ranks 2-3: votes tie at 0.8 each (0.8 vs 0.5 + 0.3).
    cosines = np.array([[0.8, 0.5, 0.3]], np.float32)
    positions = np.array([[0, 1, 2]])
    db_labels = np.array([9, 7, 7])
    labels, confidence, _, _, _ = ranking.predict(cosines, positions, db_labels, prediction="vote", rerank="none")
    assert labels.tolist() == [9] and confidence == pytest.approx([0.8])
    labels, _, _, _, _ = ranking.predict(cosines, np.array([[1, 2, 0]]), db_labels, prediction="vote", rerank="none")
    assert labels.tolist() == [7]  # now label 7 ranks first


def test_reranking_needs_its_bank_similarities():
    cosines, positions = np.array([[0.9]], np.float32), np.array([[0]])
    with pytest.raises(StageError, match="query_bank"):
        ranking.predict(cosines, positions, np.array([1]), rerank="seed004")
    with pytest.raises(StageError, match="db_bank"):
        ranking.predict(cosines, positions, np.array([1]), rerank="glr2020", query_bank=np.zeros(1))


def test_margin_and_bank_weights_shape_the_confidence():
    cosines = np.array([[0.9, 0.8, 0.5], [0.7, 0.6, 0.4]], np.float32)
    positions = np.array([[0, 1, 2], [3, 4, 5]])
    db_labels = np.array([1, 2, 2, 3, 3, 3])  # query 2: every neighbour has the same landmark
    bank = np.array([0.2, 0.4])
    result = ranking.predict(
        cosines, positions, db_labels, rerank="seed004", query_bank=bank, margin_weight=1.0, bank_weight=0.5
    )
    assert result.label.tolist() == [1, 3]
    assert result.other_cosine == pytest.approx([0.8, 0.4])  # runner-up landmark; else the k-th cosine
    assert result.confidence == pytest.approx([0.9 - 0.8 - 0.1, 0.7 - 0.4 - 0.2], abs=1e-6)
    plain = ranking.predict(cosines, positions, db_labels, rerank="none")
    assert plain.confidence == pytest.approx(plain.top_cosine) and plain.top_cosine == pytest.approx([0.9, 0.7])


def test_the_bank_excess_is_paid_only_by_queries_closer_to_the_bank_than_to_their_answer():
    cosines = np.array([[0.9, 0.5], [0.4, 0.3], [0.3, 0.2]], np.float32)
    positions = np.array([[0, 1], [0, 1], [1, 0]])
    db_labels = np.array([1, 2])
    bank = np.array([0.95, 0.2, 0.5])  # query 1 is less like the bank than its answer: it pays nothing
    result = ranking.predict(cosines, positions, db_labels, rerank="none", query_bank=bank, bank_excess_weight=0.5)
    assert result.label.tolist() == [1, 1, 2] and result.top_cosine == pytest.approx([0.9, 0.4, 0.3])
    assert result.confidence == pytest.approx([0.9 - 0.025, 0.4, 0.3 - 0.1])
    seed004 = ranking.predict(
        cosines, positions, db_labels, rerank="seed004", query_bank=bank, bank_weight=1.0, bank_excess_weight=0.5
    )
    assert seed004.confidence == pytest.approx(result.confidence - bank)
    without_bank = ranking.predict(cosines, positions, db_labels, rerank="none", bank_excess_weight=0.5)
    assert without_bank.confidence == pytest.approx([0.9, 0.4, 0.3])


def test_the_impostor_term_of_the_answers_nearest_database_image_lowers_its_confidence():
    """Two queries equally close to their answers: the one whose answer resembles other landmarks' photos
    (impostor term 0.6 against 0.1) ranks lower; labels and cosines do not change."""
    cosines = np.array([[0.8, 0.5], [0.8, 0.5]], np.float32)
    positions = np.array([[0, 2], [1, 2]])
    db_labels = np.array([1, 2, 3])
    impostor = np.array([0.6, 0.1, 0.3])
    result = ranking.predict(cosines, positions, db_labels, rerank="none", db_impostor=impostor, impostor_weight=0.5)
    assert result.label.tolist() == [1, 2] and result.top_cosine == pytest.approx([0.8, 0.8])
    assert result.confidence == pytest.approx([0.8 - 0.3, 0.8 - 0.05]) and result.impostor == pytest.approx([0.6, 0.1])
    # verification may force a label further down: the term is that label's nearest image's
    forced = ranking.predict(
        cosines,
        positions,
        db_labels,
        rerank="none",
        db_impostor=impostor,
        impostor_weight=0.5,
        labels=np.array([3, -1]),
    )
    assert forced.label.tolist() == [3, 2] and forced.confidence[0] == pytest.approx(0.5 - 0.15)
    off = ranking.predict(cosines, positions, db_labels, rerank="none", db_impostor=impostor)
    assert off.confidence == pytest.approx([0.8, 0.8]) and off.impostor == pytest.approx([0.6, 0.1])
    with pytest.raises(StageError, match="db_impostor"):
        ranking.predict(cosines, positions, db_labels, rerank="none", impostor_weight=0.5)


# ---- the registries ----------------------------------------------------------------------------------------------


def test_unknown_rules_are_refused_naming_the_registered_ones():
    cosines, positions = np.array([[0.9]], np.float32), np.array([[0]])
    with pytest.raises(StageError, match=r"unknown prediction rule 'best' \(choose from top1, vote\)"):
        ranking.predict(cosines, positions, np.array([1]), prediction="best", rerank="none")
    with pytest.raises(StageError, match=r"unknown rerank method 'x' \(choose from none, seed004, glr2020\)"):
        ranking.predict(cosines, positions, np.array([1]), rerank="x")
    with pytest.raises(ValueError, match="already registered"):
        ranking.register_prediction_rule("top1")(ranking.top1)
    assert ranking.label_rule_name("vote", "glr2020") == "glr2020"
    assert ranking.label_rule_name("vote", "seed004") == "vote"


def test_a_registered_rule_and_reranking_are_used_by_predict(monkeypatch):
    monkeypatch.setattr(ranking, "PREDICTION_RULES", dict(ranking.PREDICTION_RULES))
    monkeypatch.setattr(ranking, "RERANKINGS", dict(ranking.RERANKINGS))

    @ranking.register_prediction_rule("last")
    def last(neighbours):  # the label of the farthest usable neighbour
        k = neighbours.valid.shape[1]
        return ranking.Choice(k - 1 - np.argmax(neighbours.valid[:, ::-1], axis=1), None)

    @ranking.register_reranking("margin_only")
    def margin_only(scored):
        return scored.top_cosine - scored.other_cosine

    cosines = np.array([[0.9, 0.8, 0.5]], np.float32)
    result = ranking.predict(
        cosines, np.array([[0, 1, 2]]), np.array([1, 2, 3]), prediction="last", rerank="margin_only"
    )
    assert result.label.tolist() == [3] and result.confidence == pytest.approx([0.5 - 0.9])


def test_the_config_schema_offers_exactly_the_registered_rules():
    """A new rule is registered here and named in config.schema.yaml's enum: this catches a missing half."""
    from landmarks.config import load_schema

    schema = load_schema()
    retrieve = (schema["$defs"].get("retrieve") or schema["properties"]["retrieve"])["properties"]
    assert retrieve["prediction"]["enum"] == list(ranking.PREDICTION_RULES)
    assert retrieve["rerank"]["enum"] == list(ranking.RERANKINGS)
