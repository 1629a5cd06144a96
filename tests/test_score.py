"""score and summary stages: metrics as the metric module defines them, Public/Private, the report's
figures and tables."""

import json

import numpy as np
import pandas as pd
import pytest
from conftest import save_tiny_model, write_image_set, write_shards
from PIL import Image, ImageDraw

from landmarks import formatting, report, score, summary
from landmarks.common import StageError
from landmarks.loader import ShardImages
from landmarks.metrics import score_predictions


@pytest.fixture()
def results(tmp_path):
    """Ten test queries (six landmark, four non-landmark) with predictions whose reranked score puts the
    non-landmark queries last while the raw cosine does not; one landmark query is predicted wrong and one
    has no prediction."""
    selection = pd.DataFrame(
        {
            "id": [f"q{i}" for i in range(10)] + ["t0", "t1"],
            "landmark_id": pd.array([1, 2, 3, 4, 5, 6, None, None, None, None, 1, 2], dtype="Int64"),
            "split": ["test"] * 10 + ["train"] * 2,
        }
    )
    selection.to_parquet(tmp_path / "selection.parquet")
    predictions = pd.DataFrame(
        {
            "id": [f"q{i}" for i in range(10)],
            "landmark_id": pd.array([1, 2, 3, 9, 5, None, 1, 2, 3, 4], dtype="Int64"),
            "score": [0.9, 0.8, 0.7, 0.65, 0.6, np.nan, 0.1, 0.05, 0.02, 0.01],
            "top_cosine": np.array([0.7, 0.6, 0.65, 0.9, 0.5, np.nan, 0.95, 0.55, 0.4, 0.3], np.float32),
        }
    )
    predictions.to_parquet(tmp_path / "predictions.parquet")
    neighbours = pd.DataFrame(
        {
            "query_id": np.repeat(predictions["id"], 2).to_numpy(),
            "rank": [1, 2] * 10,
            "neighbour_id": ["t0", "t1"] * 10,
            "neighbour_landmark_id": pd.array([1, 2] * 10, dtype="Int64"),
            "cosine": np.tile([0.7, 0.6], 10).astype(np.float32),
        }
    )
    neighbours.to_parquet(tmp_path / "neighbours.parquet")
    truth = {f"q{i}": ([i + 1] if i < 6 else []) for i in range(10)}
    return tmp_path, predictions, truth


def test_metrics_are_the_kaggle_gap_with_and_without_reranking(results):
    folder, predictions, truth = results
    assert (
        score.main(
            [
                "--predictions",
                str(folder / "predictions.parquet"),
                "--selection",
                str(folder / "selection.parquet"),
                "--neighbours",
                str(folder / "neighbours.parquet"),
                "--experiment",
                "exp",
                "--out-dir",
                str(folder / "score"),
            ]
        )
        == 0
    )
    metrics = json.loads((folder / "score" / "metrics.json").read_text())
    expected = score_predictions(predictions, truth)
    raw = score_predictions(predictions.assign(score=predictions["top_cosine"]), truth)
    assert metrics["gap"] == pytest.approx(expected.gap)
    assert metrics["gap"] == pytest.approx((1 + 1 + 1 + 4 / 5) / 6)  # by hand: q3 wrong at rank 4, q5 unranked
    assert metrics["gap_landmarks_only"] == pytest.approx(expected.gap_landmarks_only)
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["gap_without_rerank"] == pytest.approx(raw.gap) and raw.gap < expected.gap
    assert (metrics["queries"], metrics["landmark_queries"], metrics["predictions"]) == (10, 6, 9)
    for figure in score.FIGURES:
        assert (folder / "score" / figure).read_bytes()[:4] == b"\x89PNG"
    assert not (folder / "score" / "saliency.png").exists()  # no --model: no saliency figure
    text = (folder / "score" / "report.md").read_text()
    assert f"| GAP (all test queries, Kaggle definition) | {expected.gap:.4f} |" in text
    assert "![examples](examples.png)" in text and "| 4 | 0.00 | 1 |" in text  # q3's class among the hardest
    assert "saliency.png" not in text


def test_solution_csv_gives_public_and_private_scores(results):
    folder, predictions, truth = results
    usage = ["Public", "Private", "Public", "Private", "Public", "Private", "Public", "Private", "Ignored", "Public"]
    rows = ["id,landmarks,Usage"] + [f"q{i},{' '.join(map(str, truth[f'q{i}']))},{usage[i]}" for i in range(10)]
    (folder / "solution.csv").write_text("\n".join(rows) + "\n")
    result = score.score(
        folder / "predictions.parquet",
        folder / "out",
        solution_path=folder / "solution.csv",
        selection_path=folder / "selection.parquet",
    )
    scored = {q: labels for q, labels in truth.items() if q != "q8"}
    public = {q: truth[q] for q, u in zip(truth, usage) if u == "Public"}
    private = {q: truth[q] for q, u in zip(truth, usage) if u == "Private"}
    assert result["gap"] == pytest.approx(score_predictions(predictions, scored).gap)
    assert result["gap_public"] == pytest.approx(score_predictions(predictions, public).gap)
    assert result["gap_private"] == pytest.approx(score_predictions(predictions, private).gap)
    assert result["queries"] == 9  # the Ignored row is not scored


def test_precision_curve_is_the_ranking_gap_walks(results):
    _, predictions, truth = results
    truth_table = pd.DataFrame({"id": list(truth), "landmarks": list(truth.values())})
    ranked = score.ranked_predictions(predictions, truth_table)
    assert ranked["id"].tolist()[:4] == ["q0", "q1", "q2", "q3"] and len(ranked) == 9
    gap = ranked.loc[ranked["correct"], "precision_at_rank"].sum() / 6
    assert gap == pytest.approx(score_predictions(predictions, truth).gap)


def test_examples_show_wrong_landmarks_and_non_landmark_queries(results):
    _, predictions, truth = results
    ranked = score.ranked_predictions(predictions, pd.DataFrame({"id": list(truth), "landmarks": list(truth.values())}))
    picked = [(group, row["id"]) for group, row in report.pick_examples(ranked, per_group=2)]
    assert picked == [
        ("most confident correct", "q0"),
        ("most confident correct", "q1"),
        ("least confident correct", "q4"),
        ("least confident correct", "q2"),
        ("most confident wrong landmark", "q3"),
        ("most confident non-landmark query", "q6"),
        ("most confident non-landmark query", "q7"),
    ]


def test_bad_predictions_are_named(results):
    folder, predictions, _ = results
    predictions.drop(columns=["score"]).to_parquet(folder / "bad.parquet")
    with pytest.raises(StageError, match=r"bad\.parquet: missing column\(s\) \['score'\]"):
        score.score(folder / "bad.parquet", folder / "out", selection_path=folder / "selection.parquet")
    pd.concat([predictions, predictions.head(1)]).to_parquet(folder / "twice.parquet")
    with pytest.raises(StageError, match="twice.parquet: cannot be scored: .*duplicate query id 'q0'"):
        score.score(folder / "twice.parquet", folder / "out", selection_path=folder / "selection.parquet")


def test_summary_is_one_table_with_the_best_values_in_bold(tmp_path):
    rows = {
        "a": {"experiment": "a", "gap": 0.5, "accuracy": 0.7, "rerank": "seed004", "queries": 10},
        "b": {"gap": 0.625, "accuracy": 0.6, "rerank": "glr2020", "queries": 10},
    }
    paths = []
    for name, row in rows.items():
        path = tmp_path / "experiments" / name / "score" / "metrics.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(row))
        paths.append(str(path))
    out = tmp_path / "summary.md"
    assert (
        summary.main(
            ["--metrics", *paths, "--out", str(out), "--settings"]
            + [json.dumps({"a": {"description": "first"}, "b": {"description": "second"}})]
        )
        == 0
    )
    lines = out.read_text().splitlines()
    assert lines[2] == "| experiment | GAP | top-1 accuracy | reranking | test queries |"
    assert lines[4] == "| a | 0.5000 | **0.7000** | seed004 | 10 |"
    assert lines[5] == "| b | **0.6250** | 0.6000 | glr2020 | 10 |"  # named after its folder
    assert "- **b**: second" in lines
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(StageError, match="broken.json: cannot read metrics"):
        summary.main(["--metrics", str(tmp_path / "broken.json"), "--out", str(out)])


def test_metrics_are_written_with_four_decimals_and_undefined_ones_as_n_a():
    assert [formatting.fmt(v) for v in (0.123456, 1, None, float("nan"))] == ["0.1235", "1.0000", "n/a", "n/a"]


def test_gap_by_confidence_ranks_the_same_labels_by_each_available_confidence():
    truth = pd.DataFrame({"id": ["a", "b", "c"], "landmarks": [[1], [2], []]})
    predictions = pd.DataFrame(
        {
            "id": ["a", "b", "c"],
            "landmark_id": pd.array([1, 3, 1], dtype="Int64"),
            "score": [0.5, 0.4, 0.3],
            # b is wrong with a high cosine but a close runner-up; c is a non-landmark near the bank
            "top_cosine": np.array([0.7, 0.9, 0.8], np.float32),
            "other_cosine": np.array([0.2, 0.85, 0.5], np.float32),
            "bank_cosine": np.array([0.1, 0.1, 0.7], np.float32),
        }
    )
    by = score.gap_by_confidence(predictions, truth)
    assert by["the retrieve stage's confidence (score)"] == pytest.approx(0.5)  # a first: 1/1, then nothing right
    assert by["top-1 cosine"] == pytest.approx(1 / 3 / 2)  # b, c above a: a at rank 3
    assert by["top-1 cosine − runner-up landmark's cosine"] == pytest.approx(0.5)
    assert "geometrically verified first, then top-1 cosine" not in by  # no inliers column
    verified = score.gap_by_confidence(predictions.assign(inliers=[12, 0, 3]), truth, min_inliers=10)
    assert verified["geometrically verified first, then top-1 cosine"] == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------------
# Confusions and saliency


SHARD_SIZE = 96


def _landmark_photo(landmark: int | None, seed: int) -> Image.Image:
    """A 'landmark' (a tower whose colour and shape follow the landmark id) on a sky, shifted per photo;
    a non-landmark photo is a noisy field."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (120, 100), (150, 190, 230))
    draw = ImageDraw.Draw(image)
    if landmark is None:
        image.paste(Image.fromarray(rng.integers(60, 140, (40, 120, 3), dtype=np.uint8)), (0, 60))
        return image
    colour = tuple(int(c) for c in np.random.default_rng(landmark).integers(0, 200, 3))
    x = 30 + int(rng.integers(-10, 10))
    width = 14 + 6 * (landmark % 4)
    draw.rectangle([x, 25, x + width, 95], fill=colour)
    draw.polygon([(x - 4, 25), (x + width + 4, 25), (x + width // 2, 8)], fill=colour)
    for row in range(35, 90, 12):  # windows: texture the model can see
        draw.rectangle([x + 3, row, x + width - 3, row + 4], fill=(250, 240, 200))
    draw.rectangle([0, 95, 120, 100], fill=(70, 120, 60))
    return image


@pytest.fixture()
def with_model(results):
    """Shards holding every query and database image of `results`, and a small random model."""
    folder, _, _ = results
    photos = []
    for n, row in enumerate(pd.read_parquet(folder / "selection.parquet").itertuples()):
        landmark = None if pd.isna(row.landmark_id) else int(row.landmark_id)
        photos.append((row.id, _landmark_photo(landmark, n), landmark, row.split, f"{row.id}.png"))
    selection = write_image_set(folder, photos, selection_file=None)  # selection.parquet stays as `results` wrote it
    shard_dirs = write_shards(
        selection, folder / "images", folder / "shards", ("test", "train"), size=SHARD_SIZE, images_per_shard=8
    )
    dirs = [str(out) for out in shard_dirs]
    save_tiny_model(folder / "model.pt", 64)
    return folder, dirs, folder / "model.pt"


def test_report_explains_results_with_saliency_and_confusions(with_model):
    folder, dirs, model = with_model
    assert (
        score.main(
            [
                "--predictions",
                str(folder / "predictions.parquet"),
                "--selection",
                str(folder / "selection.parquet"),
                "--neighbours",
                str(folder / "neighbours.parquet"),
                "--shards",
                *dirs,
                "--model",
                str(model),
                "--embed-settings",
                json.dumps({"image_size": 96}),
                "--experiment",
                "exp",
                "--out-dir",
                str(folder / "score"),
            ]
        )
        == 0
    )
    for figure in score.FIGURES + score.MODEL_FIGURES:
        assert (folder / "score" / figure).read_bytes()[:4] == b"\x89PNG"
    text = (folder / "score" / "report.md").read_text()
    assert "![confusion matrix](confusion.png)" in text and "![saliency](saliency.png)" in text
    pairs = text.split("### Most confused pairs")[1]
    assert "| true landmark | predicted landmark | queries |" in pairs and "| 4 | 9 | 1 |" in pairs  # q3
    assert "1 of 6 landmark queries have no prediction." in text  # q5
    with pytest.raises(StageError, match="missing.pt: model checkpoint not found"):
        score.score(
            folder / "predictions.parquet",
            folder / "out",
            selection_path=folder / "selection.parquet",
            model_path=folder / "missing.pt",
        )


def test_saliency_panels_compare_each_query_with_its_top_neighbour(with_model, results):
    folder, dirs, model_path = with_model
    _, predictions, truth = results
    from landmarks.model import model_from_checkpoint

    model, _ = model_from_checkpoint(model_path)
    ranked = score.ranked_predictions(predictions, pd.DataFrame({"id": list(truth), "landmarks": list(truth.values())}))
    neighbours = pd.read_parquet(folder / "neighbours.parquet")
    neighbours = neighbours[neighbours["query_id"] != "q4"].sort_values("rank", ascending=False)  # order: not by rank
    images = ShardImages(dirs)
    images.rows.pop("q2")  # an image missing from the shards
    panels = score.saliency_panels(model, 72, ranked, neighbours, images)
    assert [(p["group"], p["query_id"]) for p in panels] == [
        ("most confident", "q0"),
        ("most confident", "q1"),
        ("most confident", "q2"),
        ("most confident", "q3"),
        ("least confident", "q4"),
    ]  # landmark queries with a prediction; q5 has none, q6+ are non-landmarks
    first = panels[0]
    assert (first["neighbour_id"], first["neighbour_landmark_id"], first["cosine"]) == ("t0", 1, pytest.approx(0.7))
    assert first["correct"] and not panels[3]["correct"]
    for key in ("query_view", "query_overlay", "neighbour_view", "neighbour_overlay"):
        assert first[key].size == (72, 72) and first[key].mode == "RGB"
    assert panels[2].get("query_view") is None and panels[2].get("query_overlay") is None  # q2 not in the shards
    assert panels[2]["neighbour_view"] is not None
    assert panels[4]["neighbour_id"] is None and panels[4].get("neighbour_overlay") is None  # q4: no neighbours
    report.plot_saliency(panels, folder / "saliency.png")  # gaps drawn as "not available"
    assert (folder / "saliency.png").read_bytes()[:4] == b"\x89PNG"


def test_saliency_examples_are_the_most_and_least_confident_landmark_queries(results):
    _, predictions, truth = results
    ranked = score.ranked_predictions(predictions, pd.DataFrame({"id": list(truth), "landmarks": list(truth.values())}))
    picked = [(group, row["id"]) for group, row in report.pick_saliency_examples(ranked, per_group=2)]
    assert picked == [
        ("most confident", "q0"),
        ("most confident", "q1"),
        ("least confident", "q4"),
        ("least confident", "q3"),
    ]


def _outcomes(pairs):
    """Landmark-query outcomes from (true landmark, predicted landmark or None) pairs."""
    return pd.DataFrame(
        {
            "id": [f"q{i}" for i in range(len(pairs))],
            "truth_landmark_id": np.array([t for t, _ in pairs], dtype=np.int64),
            "predicted_landmark_id": pd.array([p for _, p in pairs], dtype="Int64"),
            "correct": np.array([t == p for t, p in pairs], dtype=bool),
        }
    )


def test_most_confused_landmarks_count_both_sides_of_each_mistake():
    outcomes = _outcomes([(1, 1), (1, 2), (1, 2), (2, 1), (3, 3), (3, 3), (4, None), (5, 6), (7, 7)])
    # mistakes: 1->2 twice, 2->1, 4 unpredicted, 5->6; 1 and 2 are in three each, the rest in one
    assert report.most_confused_landmarks(outcomes) == [1, 2, 4, 5, 6]  # all of them when few; 3, 7: no mistakes
    assert report.most_confused_landmarks(outcomes, max_landmarks=3) == [1, 2, 4]  # ties by id
    assert report.most_confused_landmarks(_outcomes([(1, 1), (2, 2)])) == []
    many = _outcomes([(t, t + 100) for t in range(30)] + [(5, 105)])
    picked = report.most_confused_landmarks(many)
    assert len(picked) == 20 and picked[:2] == [5, 105]
    matrix = report.confusion_matrix(outcomes, report.most_confused_landmarks(outcomes, max_landmarks=3))
    assert matrix.index.tolist() == [1, 2, 4]
    assert matrix.columns.tolist() == [1, 2, 4, "no prediction"]  # no prediction outside {1, 2, 4}: no "other"
    assert matrix.loc[1].tolist() == [1, 2, 0, 0] and matrix.loc[2].tolist() == [1, 0, 0, 0]
    assert matrix.loc[4].tolist() == [0, 0, 0, 1]
    wider = report.confusion_matrix(outcomes, [5, 1])
    assert wider.columns.tolist() == [5, 1, "other landmark"] and wider.loc[5].tolist() == [0, 0, 1]
    assert report.confused_pairs(outcomes).values.tolist() == [[1, 2, 2], [2, 1, 1], [5, 6, 1]]


def test_confusion_figure_is_written_with_and_without_mistakes(tmp_path):
    report.plot_confusion(_outcomes([(1, 1), (2, 2)]), tmp_path / "none.png")
    report.plot_confusion(_outcomes([]), tmp_path / "empty.png")
    report.plot_confusion(
        _outcomes([(t % 25, (t * 7) % 25 if t % 3 else None) for t in range(200)]), tmp_path / "many.png"
    )
    for name in ("none", "empty", "many"):
        assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"


def test_the_nonlandmark_verdict_is_scored_on_the_test_queries():
    truth = pd.DataFrame({"id": ["a", "b", "c", "d", "e"], "landmarks": [[1], [2], [3], [], []]})
    predictions = pd.DataFrame(
        {
            "id": ["a", "b", "c", "d", "e"],
            "landmark_id": pd.array([1, 9, 3, 1, None], dtype="Int64"),
            "score": [0.9, 0.8, 0.3, 0.5, np.nan],
        }
    )
    verdict = score.verdict_accuracy(predictions, truth, threshold=0.6)
    # a kept and right; b kept but wrong; c right but rejected; d rejected; e has no answer: rejected
    assert verdict["right_decisions"] == pytest.approx(3 / 5)
    assert verdict["right_decisions_without_threshold"] == pytest.approx(3 / 5)  # a, c right; e no answer
    assert verdict["landmark_answers_kept"] == pytest.approx(1 / 2)
    assert verdict["nonlandmark_rejected"] == 1.0
