"""Tests of the places365 stage: checkpoint loading, labels, votes, the offline path, the CLI.

The official weights cannot be downloaded here, so the tests write a checkpoint in the official
layout (resnet18, `module.` prefixes, old-style serialisation, no num_batches_tracked) whose
classifier ignores the image: zero fc weights and a bias that ranks chosen categories first.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import torchvision
from PIL import Image

from landmarks import places365, select_rules
from landmarks.common import StageError, write_table

SHARED_LABELS = Path("/work/shared/places365")
# Synthetic labels: category i is outdoor when i is even.
OUTDOOR = np.arange(365) % 2 == 0
# The ranking the test checkpoint forces: indoor, indoor, outdoor x3, indoor x4, outdoor.
# -> 3 outdoor of the top 5 (votes rule: outdoor), 4 outdoor of the top 10 (official rule: indoor).
FORCED_TOP10 = [1, 3, 0, 2, 4, 5, 7, 9, 11, 6]


def write_labels(folder: Path, outdoor=OUTDOOR) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"/c/category_{i}" for i in range(365)]
    (folder / places365.CATEGORIES_FILE).write_text("".join(f"{n} {i}\n" for i, n in enumerate(names)))
    (folder / places365.IO_FILE).write_text("".join(f"{n} {2 if o else 1}\n" for n, o in zip(names, outdoor)))
    return folder


def official_checkpoint(path: Path, arch: str = "resnet18", top=FORCED_TOP10, model=None) -> Path:
    """A checkpoint laid out like the official <arch>_places365.pth.tar, saved the old way."""
    model = model or torchvision.models.resnet18(num_classes=365)
    state = model.state_dict()
    state["fc.weight"] = torch.zeros_like(state["fc.weight"])
    bias = torch.zeros(365)
    for rank, index in enumerate(top):
        bias[index] = 100.0 - 5.0 * rank
    state["fc.bias"] = bias
    # PyTorch 0.x state dicts had no num_batches_tracked and carried DataParallel's prefix.
    state = {"module." + k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    checkpoint = {"epoch": 90, "arch": arch, "state_dict": state, "best_prec1": 54.74}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path, _use_new_zipfile_serialization=False)
    return path


def closed_port_url(name: str = "x") -> str:
    """A URL on a local port nobody listens on: the connection is refused at once, never hangs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/{name}"


def make_manifest(tmp_path: Path) -> tuple[Path, Path]:
    """Five ok rows (3 good images, 1 corrupt file, 1 missing file) and one failed download."""
    images = tmp_path / "images"
    rows = []

    def add(image_id, status="ok", write=None):
        rel = f"{image_id[0]}/{image_id[1]}/{image_id[2]}/{image_id}.jpg"
        if write is not None:
            (images / rel).parent.mkdir(parents=True, exist_ok=True)
            write(images / rel)
        rows.append(
            {
                "id": image_id,
                "url": f"http://example/{image_id}",
                "landmark_id": 1,
                "status": status,
                "path": rel if status == "ok" else None,
                "part": 0,
            }
        )

    def rotated(path):  # EXIF orientation 6 (rotate 90): exercised by exif_transpose
        exif = Image.Exif()
        exif[0x0112] = 6
        Image.new("RGB", (320, 200), (10, 120, 30)).save(path, exif=exif)

    add("abc001", write=lambda p: Image.new("RGB", (300, 400), (200, 30, 30)).save(p))
    add("abc002", write=rotated)
    add("abc003", write=lambda p: Image.new("L", (256, 256), 128).save(p, format="PNG"))  # grey, wrong ext
    add("abc004", write=lambda p: p.write_bytes(b"\xff\xd8 not really a jpeg"))
    add("abc005")  # status ok but the file is gone
    add("abc006", status="http_404")
    frame = pd.DataFrame(rows)
    frame["landmark_id"] = frame["landmark_id"].astype("Int64")
    manifest = tmp_path / "manifest.parquet"
    write_table(frame, manifest)
    return manifest, images


def stage_args(manifest: Path, images: Path, out: Path, settings: dict | None = None, *extra: str) -> list[str]:
    """The stage's command line: the manifest, the images folder and the output, the settings (JSON), `extra`."""
    args = ["--manifest", str(manifest), "--images", str(images), "--out", str(out)]
    return args + (["--settings", json.dumps(settings)] if settings is not None else []) + list(extra)


def run_stage(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "landmarks.places365", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


# ------------------------------------------------------------------------------------------------
# Label files
# ------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not SHARED_LABELS.is_dir(), reason=f"{SHARED_LABELS} (official Places365 label files) not present")
def test_parse_official_label_files():
    labels = places365.load_labels(SHARED_LABELS)
    assert len(labels.names) == 365
    assert labels.names[0] == "/a/airfield" and labels.names[364] == "/z/zen_garden"
    assert int((~labels.outdoor).sum()) == 160 and int(labels.outdoor.sum()) == 205
    assert labels.outdoor[0] and not labels.outdoor[1]  # airfield outdoor, airplane cabin indoor


def test_parse_synthetic_labels(tmp_path):
    labels = places365.load_labels(write_labels(tmp_path))
    assert list(labels.outdoor) == list(OUTDOOR)
    assert set(labels.sha256) == {places365.CATEGORIES_FILE, places365.IO_FILE}


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda c, io: c.write_text(c.read_text().replace("/c/category_7 7\n", "")), "index"),
        (lambda c, io: c.write_text(c.read_text() + "/c/extra 365\n"), "366 categories"),
        (
            lambda c, io: c.write_text(c.read_text().replace("/c/category_3 3", "/c/category_3 4")),
            "index '4', expected 3",
        ),
        (lambda c, io: c.write_text(c.read_text().replace("/c/category_3 3\n", "/c/category_3 3\n\n")), "blank"),
        (
            lambda c, io: c.write_text(c.read_text().replace("/c/category_3 3", "category_3 3")),
            "expected '<category path> <index>'",
        ),
        (
            lambda c, io: io.write_text(io.read_text().replace("/c/category_5 1", "/c/category_5 3")),
            "1 indoor|2 outdoor",
        ),
        (lambda c, io: io.write_text(io.read_text().replace("/c/category_5 1", "/c/category_9 1")), "category 5 is"),
        (lambda c, io: io.write_text("".join(io.read_text().splitlines(keepends=True)[:-1])), "364 lines"),
        (lambda c, io: io.unlink(), "not found"),
    ],
)
def test_malformed_label_files_are_refused(tmp_path, damage, message):
    folder = write_labels(tmp_path)
    damage(folder / places365.CATEGORIES_FILE, folder / places365.IO_FILE)
    with pytest.raises(StageError, match="places365.txt") as err:
        places365.load_labels(folder)
    assert message in str(err.value)


def test_label_file_without_final_newline_is_fine(tmp_path):
    folder = write_labels(tmp_path)
    path = folder / places365.CATEGORIES_FILE
    path.write_text(path.read_text().rstrip("\n"))  # like the real categories file
    assert len(places365.load_labels(folder).names) == 365


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------


def test_official_layout_checkpoint_loads_and_forces_ranking(tmp_path):
    model = places365.load_checkpoint(official_checkpoint(tmp_path / "ck.pth.tar"), "resnet18")
    with torch.inference_mode():
        top = model(torch.randn(2, 3, 224, 224)).topk(10).indices
    assert top.tolist() == [FORCED_TOP10, FORCED_TOP10]


@pytest.mark.parametrize(
    "content, message",
    [
        (b"this is not a checkpoint", "cannot read as a PyTorch checkpoint"),
        ([1, 2, 3], "holds a list, not a dict"),
        ({"epoch": 1, "model": {}}, "no 'state_dict' entry (top-level keys: epoch, model)"),
        ({"state_dict": {"module.conv1.weight": torch.zeros(64, 3, 7, 7)}}, "does not match resnet18"),
        ({"arch": "resnet50", "state_dict": {}}, "checkpoint is for arch 'resnet50'"),
    ],
)
def test_malformed_checkpoint_names_file_and_problem(tmp_path, content, message):
    path = tmp_path / "broken.pth.tar"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(StageError) as err:
        places365.load_checkpoint(path, "resnet18")
    assert str(path) in str(err.value) and message in str(err.value)


def test_wrong_architecture_weights_list_the_mismatch(tmp_path):
    # resnet18 weights whose `arch` field claims resnet50: the keys and shapes still give it away.
    path = official_checkpoint(tmp_path / "ck.pth.tar", arch="resnet50")
    with pytest.raises(StageError, match=r"does not match resnet50.*missing"):
        places365.load_checkpoint(path, "resnet50")


class NotATensor:  # defined at module level so pickle can save it
    pass


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth.tar"
    torch.save({"state_dict": {}, "payload": NotATensor()}, path)
    with pytest.raises(StageError, match="weights_only=True"):
        places365.load_checkpoint(path, "resnet18")


def test_densenet_keys_from_old_torchvision_are_renamed():
    old = {
        "module.features.denseblock1.denselayer1.norm.1.weight": 1,
        "module.features.denseblock1.denselayer1.conv.2.weight": 2,
        "module.features.transition1.norm.weight": 3,
        "module.features.norm5.running_mean": 4,
    }
    new = places365.normalise_state_dict_keys(old, "densenet161")
    assert list(new) == [
        "features.denseblock1.denselayer1.norm1.weight",
        "features.denseblock1.denselayer1.conv2.weight",
        "features.transition1.norm.weight",
        "features.norm5.running_mean",
    ]


def test_wideresnet18_is_resnet18_without_maxpool():
    model = places365.build_model("wideresnet18").eval()
    assert set(model.state_dict()) == set(torchvision.models.resnet18(num_classes=365).state_dict())
    shapes = []
    model.layer4.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    with torch.inference_mode():
        assert model(torch.zeros(1, 3, 224, 224)).shape == (1, 365)
    assert shapes == [(1, 512, 14, 14)]  # the official model's 14x14 last feature map


def test_unsupported_arch_lists_supported():
    with pytest.raises(StageError, match="supported: resnet18, resnet50, densenet161, wideresnet18"):
        places365.build_model("alexnet")


# ------------------------------------------------------------------------------------------------
# The stage end to end
# ------------------------------------------------------------------------------------------------


def test_stage_scores_images_and_votes_decide(tmp_path):
    manifest, images = make_manifest(tmp_path)
    weights = official_checkpoint(tmp_path / "resnet18_places365.pth.tar")
    out = tmp_path / "scenes.parquet"
    settings = {
        "arch": "resnet18",
        "weights": str(weights),
        "labels_dir": str(write_labels(tmp_path / "labels")),
        "cache_dir": str(tmp_path / "empty-cache"),
        "top_k": 12,
        "batch_size": 2,
        "workers": 1,
    }
    places365.main(stage_args(manifest, images, out, settings, "--device", "cpu"))
    table = pq.read_table(out)
    assert table.schema.field("topk_index").type.value_type.bit_width == 16
    assert str(table.schema.field("topk_prob").type.value_type) == "float"
    frame = table.to_pandas().set_index("id")
    assert list(frame.index) == ["abc001", "abc002", "abc003", "abc004", "abc005"]  # no failed download
    assert list(frame["scene_status"]) == ["scored"] * 3 + ["unreadable"] * 2
    assert frame.loc["abc005", "scene_error"].startswith("FileNotFoundError")
    for image_id in ["abc001", "abc002", "abc003"]:
        row = frame.loc[image_id]
        assert list(row["topk_index"][:10]) == FORCED_TOP10 and len(row["topk_index"]) == 12
        assert np.all(np.diff(row["topk_prob"]) <= 0)
        outdoor = list(row["topk_outdoor"])
        assert outdoor == [bool(OUTDOOR[i]) for i in row["topk_index"]]
        assert select_rules.outdoor_by_votes(outdoor, min_votes=3, top_k=5)  # 3 of the top 5
        assert not select_rules.outdoor_by_official(outdoor)  # 4 of the top 10
    assert frame.loc["abc004", "topk_index"] is None
    meta = places365.read_metadata(out)
    assert meta["status"] == "scored" and meta["arch"] == "resnet18" and meta["top_k"] == 12
    assert meta["weights_sha256"] == places365.sha256_file(weights)
    assert meta["labels_source"] == str(tmp_path / "labels")


def test_weights_and_labels_found_in_cache_without_network(tmp_path, monkeypatch):
    manifest, images = make_manifest(tmp_path)
    cache = tmp_path / "cache"
    official_checkpoint(cache / "resnet18_places365.pth.tar")
    write_labels(cache)

    def no_network(*args, **kwargs):
        raise AssertionError("the cache should have been enough")

    monkeypatch.setattr(places365, "download", no_network)
    out = tmp_path / "scenes.parquet"
    places365.main(
        stage_args(
            manifest, images, out, {"arch": "resnet18", "cache_dir": str(cache), "workers": 0}, "--device", "cpu"
        )
    )
    assert places365.read_metadata(out)["weights_path"] == str(cache / "resnet18_places365.pth.tar")
    assert (pq.read_table(out).column("scene_status").to_pylist()).count("scored") == 3


def test_offline_without_weights_keeps_every_image(tmp_path):
    manifest, images = make_manifest(tmp_path)
    cache, out, url = tmp_path / "empty-cache", tmp_path / "scenes.parquet", closed_port_url("resnet18.pth.tar")
    settings = {"arch": "resnet18", "cache_dir": str(cache), "download_timeout_s": 5}
    argv = stage_args(manifest, images, out, settings, "--weights-url", url, "--labels-url", closed_port_url() + "/")
    result = run_stage(*argv, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "NO PLACES365 WEIGHTS" in result.stderr and "kept all 5 images" in result.stderr
    assert url in result.stderr and str(cache / "resnet18_places365.pth.tar") in result.stderr
    assert "places365.weights" in result.stderr
    frame = pq.read_table(out).to_pandas()
    assert list(frame["scene_status"]) == ["no_weights"] * 5
    assert frame["topk_outdoor"].isna().all()
    meta = places365.read_metadata(out)
    assert meta["status"] == "no_weights" and url in meta["note"] and meta["weights_path"] is None
    assert not any(cache.glob("*"))  # no half-downloaded file left behind


def test_weights_without_labels_is_an_error(tmp_path):
    manifest, images = make_manifest(tmp_path)
    weights = official_checkpoint(tmp_path / "ck.pth.tar")
    settings = {
        "arch": "resnet18",
        "weights": str(weights),
        "cache_dir": str(tmp_path / "cache"),
        "download_timeout_s": 5,
    }
    no_labels = closed_port_url() + "/"
    with pytest.raises(StageError, match="places365.labels_dir"):
        places365.main(stage_args(manifest, images, tmp_path / "o.parquet", settings, "--labels-url", no_labels))


def test_missing_explicit_weights_path_is_an_error(tmp_path):
    manifest, images = make_manifest(tmp_path)
    settings = {"arch": "resnet18", "weights": str(tmp_path / "nowhere.pth.tar")}
    with pytest.raises(StageError, match="weights file not found"):
        places365.main(stage_args(manifest, images, tmp_path / "o.parquet", settings))


def test_cli_broken_weights_exit_code_and_message(tmp_path):
    manifest, images = make_manifest(tmp_path)
    broken = tmp_path / "resnet18_places365.pth.tar"
    broken.write_bytes(b"\x00" * 100)
    out = tmp_path / "scenes.parquet"
    settings = {"arch": "resnet18", "weights": str(broken), "labels_dir": str(write_labels(tmp_path / "l"))}
    result = run_stage(*stage_args(manifest, images, out, settings))
    assert result.returncode == 2
    assert f"error: {broken}: cannot read as a PyTorch checkpoint" in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


def test_manifest_of_wrong_shape_names_file(tmp_path):
    bad = tmp_path / "bad.parquet"
    write_table(pd.DataFrame({"id": ["a"], "url": ["u"]}), bad)
    with pytest.raises(StageError, match=f"{bad}: not a download manifest .*path, status"):
        places365.main(["--manifest", str(bad), "--images", str(tmp_path), "--out", str(tmp_path / "o.parquet")])


def test_settings_are_checked_against_the_config_schema(tmp_path):
    manifest, images = make_manifest(tmp_path)
    out = tmp_path / "o.parquet"
    with pytest.raises(StageError, match="key 'places365.top_k'"):  # the official rule votes over 10
        places365.main(stage_args(manifest, images, out, {"top_k": 5}))
    with pytest.raises(StageError, match="unknown key 'topk'"):
        places365.main(stage_args(manifest, images, out, {"topk": 12}))


def test_cli_help():
    result = run_stage("--help", timeout=120)
    assert result.returncode == 0
    for option in ["--manifest", "--images", "--out", "--settings", "--weights-url", "--labels-url", "--device"]:
        assert option in result.stdout


def test_default_cache_is_torch_hub_checkpoints(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    assert places365.default_cache_dir() == tmp_path / "torch-home" / "hub" / "checkpoints"
