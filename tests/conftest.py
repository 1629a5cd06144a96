"""Fixtures and helpers several test modules share."""

import json
import socket

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageDraw

from landmarks import shard, train


def tiny_workflow_config(port: int) -> dict:
    """A small demo config for running the whole DAG in a test: 20 landmarks x 8 views, 2 download
    partitions, short timeouts, 3 epochs at 96 px, and two experiments: the fine-tuned model and its
    untrained backbone (the baseline it must beat)."""
    return {
        "demo": {"landmarks": 20, "views_per_landmark": 8, "nonlandmarks": 20, "broken_fraction": 0.1, "port": port},
        "split": {"partitions": 2},
        "download": {
            "connect_timeout_s": 2,
            "read_timeout_s": 2,
            "total_timeout_s": 3,
            "retries": 1,
            "backoff_s": 0.1,
            "concurrency": 8,
        },
        "select": {"min_images_per_class": 3, "val_fraction": 0.1, "test_fraction": 0.3},
        "shard": {"size": 112, "images_per_shard": 16, "threads": 1},
        "train": {"image_size": 96, "epochs": 3, "batch_size": 16, "lr": 0.0005, "workers": 0},
        "embed": {"batch_size": 32, "workers": 0},
        "retrieve": {"k": 5},
        "predict": {"experiment": "tiny", "inputs": ["data/demo/new_photos"]},
        "experiments": {
            "tiny": {"description": "tiny test experiment"},
            "baseline": {"description": "the untrained backbone", "train": {"epochs": 0}},
        },
    }


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now (for the demo server of a test workflow)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors on a shared 2-core machine: extra threads only add contention (and timing noise)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# A tiny image set, its shards and a model trained on them (shard -> train -> embed -> retrieve -> predict tests)


def _draw_class_image(rng, colour, box, size):
    image = Image.new("RGB", size, colour)
    x, y = box + rng.integers(-3, 4, 2)
    ImageDraw.Draw(image).rectangle([x, y, x + 26, y + 18], fill=tuple(255 - c for c in colour))
    return image


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    """6 landmarks x 7 photos (5 train, 1 val, 1 test) + 8 noise photos (4 test, 4 bank), one corrupt file."""
    root = tmp_path_factory.mktemp("tiny")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for landmark in range(6):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        box = rng.integers(8, 40, 2)
        for view in range(7):
            image_id = f"lm{landmark}v{view}"
            _draw_class_image(rng, colour, box, (90 + 5 * view, 76)).save(images / f"{image_id}.jpg")
            split = "train" if view < 5 else ("val" if view == 5 else "test")
            rows.append({"id": image_id, "landmark_id": 100 + landmark, "split": split, "path": f"{image_id}.jpg"})
    for n in range(8):
        image_id = f"noise{n}"
        Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(images / f"{image_id}.jpg")
        rows.append(
            {
                "id": image_id,
                "landmark_id": None,
                "split": "test" if n < 4 else "nonlandmark",
                "path": f"{image_id}.jpg",
            }
        )
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a whole jpeg")
    rows.append({"id": "broken", "landmark_id": 100, "split": "train", "path": "broken.jpg"})
    selection = pd.DataFrame(rows)
    selection["landmark_id"] = selection["landmark_id"].astype("Int64")
    selection.to_parquet(root / "selection.parquet")
    return root


@pytest.fixture(scope="module")
def shards(tiny_set):
    out = tiny_set / "shards"
    for split in ("train", "val", "test", "nonlandmark"):
        assert (
            shard.main(
                [
                    "--selection",
                    str(tiny_set / "selection.parquet"),
                    "--images",
                    str(tiny_set / "images"),
                    "--split",
                    split,
                    "--out-dir",
                    str(out / split / "part-00"),
                    "--settings",
                    json.dumps({"size": 64, "images_per_shard": 16}),
                ]
            )
            == 0
        )
    return out


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    settings = {"epochs": 2, "image_size": 64, "batch_size": 8, "workers": 0, "neck": "linear", "embedding_dim": 64}
    assert (
        train.main(
            [
                "--train-shards",
                str(shards / "train" / "part-00"),
                "--val-shards",
                str(shards / "val" / "part-00"),
                "--out-dir",
                str(out),
                "--settings",
                json.dumps(settings),
                "--threads",
                "2",
            ]
        )
        == 0
    )
    return out
