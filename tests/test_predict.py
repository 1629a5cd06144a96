"""landmarks.predict: new photos get the answer a test photo gets, bad inputs fail alone, and the HTML page
renders (headless Chromium)."""

import http.server
import json
import re
import shutil
import subprocess
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from landmarks import embed, predict, retrieve, threshold
from landmarks.config import section_settings

SPLITS = ("train", "val", "test", "nonlandmark")
# Views other than the defaults (mirrored too, whole photos): predict must embed a new photo as the embed stage did.
VIEWS = {"flip_tta": True, "whole_image": True}


@pytest.fixture(scope="module")
def experiment(tiny_set, shards, trained, tmp_path_factory):
    """A finished experiment as the workflow lays it out: train/model.pt, embed/, retrieve/."""
    exp = tmp_path_factory.mktemp("experiment")
    (exp / "train").mkdir()
    shutil.copy(trained / "model.pt", exp / "train" / "model.pt")
    for split in SPLITS:
        assert (
            embed.main(
                [
                    "--model",
                    str(exp / "train" / "model.pt"),
                    "--shards",
                    str(shards / split / "part-00"),
                    "--out",
                    str(exp / "embed" / f"{split}.npy"),
                    "--settings",
                    json.dumps({**VIEWS, "workers": 0}),
                    "--no-progress",
                ]
            )
            == 0
        )
    predictor = {"embed": VIEWS, "shard": {"size": 64}}
    assert (
        retrieve.main(
            [
                "--database",
                str(exp / "embed" / "train.npy"),
                "--queries",
                str(exp / "embed" / "test.npy"),
                "--bank",
                str(exp / "embed" / "nonlandmark.npy"),
                "--val",
                str(exp / "embed" / "val.npy"),
                "--out-dir",
                str(exp / "retrieve"),
                "--settings",
                json.dumps({"k": 5, "bank_k": 3, "rerank": "seed004"}),
                "--predictor",
                json.dumps(predictor),
                "--shards",
                *(str(shards / split / "part-00") for split in SPLITS),
            ]
        )
        == 0
    )
    return exp


def run_predict(experiment, inputs, out_dir, *extra):
    return predict.main(
        ["--experiment", str(experiment), *map(str, inputs), "--out-dir", str(out_dir), "--no-progress", *extra]
    )


def read_rows(out_dir: Path) -> dict:
    return {row["id"]: row for row in map(json.loads, (out_dir / "predictions.jsonl").read_text().splitlines())}


def test_retrieve_keeps_what_predict_needs(experiment):
    saved = json.loads((experiment / "retrieve" / "predictor.json").read_text())
    assert saved["embed"]["flip_tta"] is True and saved["embed"]["whole_image"] is True
    assert saved["shard"]["size"] == 64
    threshold = saved["nonlandmark_threshold"]
    assert threshold["source"] == "val" and threshold["landmark_queries"] == 6
    assert threshold["nonlandmark_queries"] == 4  # as many bank photos as val landmark photos (4 in the bank)
    # weighed for the test queries' mix of landmark and non-landmark photos
    test_ids = pd.read_parquet(experiment / "embed" / "test.ids.parquet")
    assert threshold["landmark_share_from"] == "the test queries"
    assert threshold["landmark_share"] == pytest.approx(test_ids["landmark_id"].notna().mean())
    assert 0 < threshold["landmark_share"] < 1
    database = pd.read_parquet(experiment / "retrieve" / "database.parquet")
    assert len(database) == 30 and database[["landmark_id", "impostor_term"]].notna().all().all()


def test_test_photos_get_the_answer_retrieve_gave_them(experiment, tiny_set, tmp_path):
    """The same label and confidence as predictions.parquet, from the original image files."""
    expected = pd.read_parquet(experiment / "retrieve" / "predictions.parquet").set_index("id")
    files = [tiny_set / "images" / f"{image_id}.jpg" for image_id in expected.index]
    assert run_predict(experiment, files, tmp_path) == 0
    rows = read_rows(tmp_path)
    assert len(rows) == len(expected)
    for image_id, want in expected.iterrows():
        got = rows[str(tiny_set / "images" / f"{image_id}.jpg")]
        assert got["error"] is None
        assert got["predicted_landmark_id"] == want["landmark_id"], image_id
        assert got["confidence"] == pytest.approx(want["score"], abs=1e-4), image_id
        assert got["top_landmarks"][0] == {
            "landmark_id": want["landmark_id"],
            "confidence": pytest.approx(want["score"], abs=1e-4),
        }
        neighbours = got["neighbours"]
        assert [n["cosine"] for n in neighbours] == sorted((n["cosine"] for n in neighbours), reverse=True)
    # the verdict uses the threshold chosen on val, and says so
    threshold = json.loads((experiment / "retrieve" / "predictor.json").read_text())["nonlandmark_threshold"]
    for row in rows.values():
        assert row["threshold_source"] == "val"
        assert (row["verdict"] == "landmark") == (row["confidence"] >= threshold["threshold"])
    table = pd.read_csv(tmp_path / "predictions.csv")
    assert len(table) == len(expected) and table["error"].isna().all()
    submission = pd.read_csv(tmp_path / "submission.csv", dtype=str, keep_default_na=False)
    assert submission["landmarks"].str.fullmatch(r"\d+ -?[\d.]+").all()


def test_a_threshold_from_the_config_overrides_val(experiment, tiny_set, tmp_path):
    assert run_predict(experiment, [tiny_set / "images" / "lm0v6.jpg"], tmp_path, "--nonlandmark-threshold", "99") == 0
    (row,) = read_rows(tmp_path).values()
    assert row["verdict"] == "non-landmark" and row["threshold_source"] == "config"
    assert row["predicted_landmark_id"] is not None and row["landmark_id"] is None


def test_an_expected_landmark_share_chooses_the_threshold_again_on_the_val_answers(experiment, tiny_set, tmp_path):
    """A user who expects mostly landmark photos (or mostly not) gets the threshold that makes the most
    right decisions at that share, chosen on the val answers retrieve saved: more landmarks, a lower bar."""
    val = pd.read_parquet(experiment / "retrieve" / "calibration.parquet")
    assert len(val) == 10 and val["landmark_id"].notna().sum() == 6  # 6 val photos, 4 bank photos
    truth = val["landmark_id"].fillna(-1).to_numpy(dtype=np.int64)
    correct = (val["predicted_landmark_id"].fillna(-1).to_numpy(dtype=np.int64) == truth) & (truth >= 0)
    thresholds = {}
    smoothing = section_settings("retrieve", {})["threshold_smoothing"]  # the experiment's, as retrieve's
    for share in (0.05, 0.95):
        out = tmp_path / str(share)
        assert run_predict(experiment, [tiny_set / "images" / "lm0v6.jpg"], out, "--landmark-share", str(share)) == 0
        (row,) = read_rows(out).values()
        expected = threshold.choose_threshold(val["confidence"].to_numpy(), correct, truth >= 0, share, smoothing)
        assert row["threshold"] == pytest.approx(expected["threshold"])
        assert row["threshold_source"] == f"val, for a landmark share of {share:g} (predict.landmark_share)"
        thresholds[share] = row["threshold"]
    assert thresholds[0.95] <= thresholds[0.05]
    with pytest.raises(predict.StageError, match="key 'predict.landmark_share'"):
        predict.parse_args(["--experiment", "x", "a.jpg", "--landmark-share", "1"])


def test_a_folder_is_searched_recursively(experiment, tiny_set, tmp_path):
    folder = tmp_path / "holiday"
    (folder / "day2").mkdir(parents=True)
    shutil.copy(tiny_set / "images" / "lm1v6.jpg", folder / "a.jpg")
    Image.open(tiny_set / "images" / "lm2v6.jpg").save(folder / "day2" / "b.png")
    (folder / "notes.txt").write_text("not a photo: skipped, not an error")
    assert run_predict(experiment, [folder], tmp_path / "out") == 0
    assert sorted(read_rows(tmp_path / "out")) == [str(folder / "a.jpg"), str(folder / "day2" / "b.png")]


@pytest.fixture
def served(tiny_set, tmp_path):
    """The tiny set's images on 127.0.0.1 (stops with the test)."""
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(tiny_set / "images"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.RequestHandlerClass.log_message = lambda *args: None
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_bad_photos_fail_alone_with_a_clear_message(experiment, tiny_set, served, tmp_path):
    good = tiny_set / "images" / "lm3v6.jpg"
    data = good.read_bytes()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "text.jpg").write_text("<html>not a photo</html>")
    (bad / "cut.jpg").write_bytes(data[: len(data) // 2])
    (bad / "random.jpg").write_bytes(
        b"\xff\xd8\xff\xe0" + bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8))
    )
    Image.new("RGB", (3000, 3000)).save(bad / "huge.png")
    (bad / "heavy.jpg").write_bytes(data + bytes(300_000))  # a whole JPEG, then padding past max_bytes
    (tmp_path / "crawl.csv").write_text(
        f"id,url\nfetched,{served}/lm4v6.jpg\ndead,{served}/missing.jpg\nnotaurl,ftp://example.org/x.jpg\n"
    )
    inputs = [
        good,
        bad / "text.jpg",
        bad / "cut.jpg",
        bad / "random.jpg",
        bad / "huge.png",
        bad / "heavy.jpg",
        tmp_path / "nowhere.jpg",
        tmp_path / "crawl.csv",
    ]
    limits = json.dumps({"max_pixels": 4_000_000, "max_bytes": 200_000, "retries": 0, "total_timeout_s": 5})
    assert run_predict(experiment, inputs, tmp_path / "out", "--download-settings", limits) == 1
    rows = read_rows(tmp_path / "out")
    assert len(rows) == 10
    errors = {key: row["error"] for key, row in rows.items()}
    assert errors[str(good)] is None and errors["fetched"] is None
    assert rows["fetched"]["predicted_landmark_id"] == 104 and rows[str(good)]["predicted_landmark_id"] == 103
    assert re.search(r"not_image: .*HTML", errors[str(bad / "text.jpg")])
    assert "truncated" in errors[str(bad / "cut.jpg")]
    assert re.search(r"corrupt_image|truncated", errors[str(bad / "random.jpg")])
    assert (
        "decompression_bomb: 3000x3000 = 9,000,000 pixels, above max_pixels 4,000,000" in errors[str(bad / "huge.png")]
    )
    assert re.search(r"[\d,]+ bytes, above download.max_bytes 200,000", errors[str(bad / "heavy.jpg")])
    assert "no such file or folder" in errors[str(tmp_path / "nowhere.jpg")]
    assert "http_404" in errors["dead"] or "404" in errors["dead"]
    assert "bad_scheme" in errors["notaurl"]
    assert "landmark" not in json.dumps([rows[k]["verdict"] for k in rows if errors[k]])  # failed: no verdict
    page = (tmp_path / "out" / "index.html").read_text()
    assert page.count('class="verdict error"') == 8


def test_a_missing_or_half_written_experiment_is_named(experiment, tiny_set, tmp_path, capsys):
    photo = tiny_set / "images" / "lm0v6.jpg"
    broken = tmp_path / "exp"
    shutil.copytree(experiment, broken)
    (broken / "train" / "model.pt").unlink()
    with pytest.raises(predict.StageError, match=r"not a finished experiment, missing train/model.pt"):
        run_predict(broken, [photo], tmp_path / "out")
    shutil.copy(experiment / "train" / "model.pt", broken / "train" / "model.pt")
    index = broken / "retrieve" / "index.faiss"
    index.write_bytes(index.read_bytes()[:100])
    with pytest.raises(predict.StageError, match=r"index.faiss: faiss cannot read it"):
        run_predict(broken, [photo], tmp_path / "out")
    model = broken / "train" / "model.pt"
    model.write_bytes(model.read_bytes()[:1000])
    with pytest.raises(predict.StageError, match=r"model.pt: cannot load the model"):
        run_predict(broken, [photo], tmp_path / "out")
    with pytest.raises(predict.StageError, match="no such experiment folder"):
        run_predict(tmp_path / "nothing", [photo], tmp_path / "out")


def test_a_database_from_before_the_impostor_terms_asks_for_a_rerun_of_retrieve(experiment, tiny_set, tmp_path):
    old = tmp_path / "exp"
    shutil.copytree(experiment, old)
    table = old / "retrieve" / "database.parquet"
    pd.read_parquet(table).drop(columns="impostor_term").to_parquet(table)
    with pytest.raises(predict.StageError, match=r"database.parquet: no impostor terms.*rerun the retrieve stage"):
        run_predict(old, [tiny_set / "images" / "lm0v6.jpg"], tmp_path / "out")


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium is not installed (Debian package `chromium`; .ci/run installs it)"
)
def test_the_page_renders_in_headless_chromium(experiment, tiny_set, tmp_path):
    photos = [tiny_set / "images" / name for name in ("lm0v6.jpg", "lm5v6.jpg", "noise0.jpg")]
    assert run_predict(experiment, [*photos, tmp_path / "missing.jpg"], tmp_path) == 1
    page = (tmp_path / "index.html").read_text()
    assert "http" not in page.replace("http-equiv", "")  # self-contained: no link to fetch
    # Count, in the browser, the images that decoded (a broken data URI has naturalWidth 0).
    probe = tmp_path / "probe.html"
    probe.write_text(
        page.replace(
            "</body>",
            "<script>addEventListener('load', () => document.title = 'images:' + "
            "[...document.images].filter(i => i.complete && i.naturalWidth > 0).length + '/' + "
            "document.images.length)</script></body>",
        )
    )
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000"]
    dom = subprocess.run([*command, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    rendered = re.search(r"<title>images:(\d+)/(\d+)</title>", dom.stdout)
    assert rendered, dom.stderr[-2000:]
    shown, total = map(int, rendered.groups())
    assert total >= 3 * 3 and shown == total  # each photo, its saliency map, its neighbours
    screenshot = tmp_path / "page.png"
    subprocess.run(
        [*command, f"--screenshot={screenshot}", "--window-size=1200,900", (tmp_path / "index.html").as_uri()],
        capture_output=True,
        timeout=120,
    )
    pixels = np.asarray(Image.open(screenshot).convert("RGB"))
    assert pixels.std() > 20  # photos drawn, not an empty page


def test_predict_finds_the_database_images_after_the_results_folder_moves(
    experiment, shards, tiny_set, tmp_path, monkeypatch
):
    """A workflow records shard paths relative to where it ran; predict runs from anywhere, also after the
    results folder was moved or copied elsewhere."""
    workdir = tmp_path / "run"
    shutil.copytree(shards, workdir / "results" / "shards")
    exp = workdir / "results" / "experiments" / "x"
    shutil.copytree(experiment / "train", exp / "train")
    monkeypatch.chdir(workdir)
    relative = {split: f"results/shards/{split}/part-00" for split in SPLITS}
    for split in SPLITS:
        assert (
            embed.main(
                [
                    "--model",
                    "results/experiments/x/train/model.pt",
                    "--shards",
                    relative[split],
                    "--out",
                    f"results/experiments/x/embed/{split}.npy",
                    "--settings",
                    json.dumps({**VIEWS, "workers": 0}),
                    "--no-progress",
                ]
            )
            == 0
        )
    assert (
        retrieve.main(
            [
                "--database",
                "results/experiments/x/embed/train.npy",
                "--queries",
                "results/experiments/x/embed/test.npy",
                "--bank",
                "results/experiments/x/embed/nonlandmark.npy",
                "--out-dir",
                "results/experiments/x/retrieve",
                "--settings",
                json.dumps({"k": 5, "bank_k": 3, "rerank": "seed004"}),
                "--predictor",
                json.dumps({"embed": VIEWS, "shard": {"size": 64}}),
                "--shards",
                *relative.values(),
            ]
        )
        == 0
    )
    moved = tmp_path / "elsewhere"
    shutil.move(workdir, moved)
    monkeypatch.chdir(tmp_path)
    photo = tiny_set / "images" / "lm2v6.jpg"
    assert run_predict(moved / "results" / "experiments" / "x", [photo], tmp_path / "out") == 0
    (row,) = read_rows(tmp_path / "out").values()
    expected = pd.read_parquet(experiment / "retrieve" / "predictions.parquet").set_index("id").loc["lm2v6"]
    assert row["predicted_landmark_id"] == expected["landmark_id"]
    assert row["confidence"] == pytest.approx(expected["score"], abs=1e-4)
    assert Path(row["neighbours"][0]["path"].rsplit(":", 1)[0]).is_file()


def test_flags_override_the_settings_json():
    settings = json.dumps({"top_landmarks": 4, "neighbours": 7, "saliency": True})
    _, chosen = predict.parse_args(
        ["--experiment", "x", "a.jpg", "--settings", settings, "--neighbours", "2", "--no-saliency"]
    )
    assert chosen["top_landmarks"] == 4 and chosen["neighbours"] == 2 and chosen["saliency"] is False
    assert chosen["batch_size"] == 32 and chosen["nonlandmark_threshold"] is None  # config.yaml's defaults
    with pytest.raises(predict.StageError, match="key 'predict.top_landmarks'"):
        predict.parse_args(["--experiment", "x", "a.jpg", "--top-landmarks", "0"])
