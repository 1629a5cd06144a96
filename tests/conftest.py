"""Fixtures and helpers several test modules share."""

import importlib.util
import json
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageDraw

from landmarks import shard, train
from landmarks.common import read_table


def pytest_collection_modifyitems(items):
    """The modules that mostly wait come first: under `make test`'s two workers (pytest-xdist, one module per
    worker at a time) the SLURM run (status polls, a Snakemake start per job) and the workflow run start
    together, one on each worker, instead of one of them ending the suite alone."""

    def waits_longest(item) -> int:
        return 0 if item.get_closest_marker("slurm") else 1 if item.get_closest_marker("slow") else 2

    items.sort(key=waits_longest)  # stable: tests of one rank keep their order


def load_bench_script(name: str):
    """bench/<name>.py as a module (bench/ is no package; each script puts on sys.path what it imports)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


# Image sets, selections and shards: one way to build them (each test module draws its own pictures)

SPLITS = ("train", "val", "test", "nonlandmark")


def write_image_set(root: Path, photos, *, selection_file: str | None = "selection.parquet", **save) -> pd.DataFrame:
    """Writes `photos` under root/images and returns their selection table (id, landmark_id as Int64, split,
    path), in the order given; also written to root/<selection_file> unless that is None.

    Each photo is (id, picture, landmark_id, split) or (id, picture, landmark_id, split, file name). The
    picture is a PIL image (saved with `save`, e.g. quality=95), bytes (written as they are: a broken file)
    or None (no file: a missing one). The file name defaults to `<id>.jpg`; None leaves the row without a path.
    """
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for image_id, picture, landmark_id, split, *name in photos:
        name = name[0] if name else f"{image_id}.jpg"
        if isinstance(picture, bytes):
            (images / name).write_bytes(picture)
        elif picture is not None:
            picture.save(images / name, **save)
        rows.append({"id": image_id, "landmark_id": landmark_id, "split": split, "path": name})
    selection = pd.DataFrame(rows)
    selection["landmark_id"] = selection["landmark_id"].astype("Int64")
    if selection_file:
        selection.to_parquet(root / selection_file)
    return selection


def write_shards(selection, images: Path, out: Path, splits=SPLITS, *, layout="{split}", parts=1, **options):
    """Shards each split of `selection` (a table or its Parquet file) as the shard stage does, part by part,
    into out/<layout> (formatted with split and part); `options` are shard_split's (size, images_per_shard,
    jpeg_quality, ...). Returns the folders written, split by split."""
    if not isinstance(selection, pd.DataFrame):
        selection = read_table(selection)  # as `python -m landmarks.shard --selection` reads it
    dirs = []
    for split in splits:
        for part in range(parts):
            folder = out / layout.format(split=split, part=part)
            shard.shard_split(selection, images, split, part, parts, folder, **options)
            dirs.append(folder)
    return dirs


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
    rng = np.random.default_rng(0)
    photos = []
    for landmark in range(6):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        box = rng.integers(8, 40, 2)
        for view in range(7):
            split = "train" if view < 5 else ("val" if view == 5 else "test")
            image = _draw_class_image(rng, colour, box, (90 + 5 * view, 76))
            photos.append((f"lm{landmark}v{view}", image, 100 + landmark, split))
    for n in range(8):
        noise = Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8))
        photos.append((f"noise{n}", noise, None, "test" if n < 4 else "nonlandmark"))
    photos.append(("broken", b"\xff\xd8\xff\xe0 definitely not a whole jpeg", 100, "train"))
    write_image_set(root, photos)
    return root


@pytest.fixture(scope="module")
def shards(tiny_set):
    """The tiny set sharded at 64 px, 16 images per tar, into shards/<split>/part-00 (the workflow's layout)."""
    out = tiny_set / "shards"
    write_shards(
        tiny_set / "selection.parquet", tiny_set / "images", out, layout="{split}/part-00", size=64, images_per_shard=16
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


def save_tiny_model(path: Path, image_size: int) -> Path:
    """A model.pt as the train stage writes it, of an untrained simple_cnn (16-d, seeded): what embed,
    score and predict load."""
    from landmarks.model import LandmarkModel

    torch.manual_seed(0)
    model = LandmarkModel("simple_cnn", "none", embedding_dim=16).eval()
    settings = {"backbone": "simple_cnn", "embedding_dim": 16, "gem_p": 3.0, "pooling": "gem", "image_size": image_size}
    torch.save({"model": model.state_dict(), "data_config": model.data_config, "settings": settings}, path)
    return path
