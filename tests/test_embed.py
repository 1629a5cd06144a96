"""embed stage: test-time augmentation, row order, storage, and the checks on reading embeddings back."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import save_tiny_model, write_image_set, write_shards
from PIL import Image, ImageDraw

from landmarks import embed, embedding
from landmarks.common import StageError
from landmarks.loader import ShardDataset, ShardIndex, eval_transform
from landmarks.tables import EMBEDDING_IDS_COLUMNS

SIZE = 48  # the simple CNN pools 5 times: 32 px at least


def _asymmetric_image(seed: int) -> Image.Image:
    """A picture that differs from its mirror image (a bar near the left edge, noise)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 80, (SIZE, SIZE, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    ImageDraw.Draw(image).rectangle([2, 4, 12, 40], fill=tuple(int(c) for c in rng.integers(150, 256, 3)))
    return image


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """One shard folder: 5 pictures and the mirror image of each (ids pN / pN_mirror)."""
    root = tmp_path_factory.mktemp("embed")
    photos = []
    for n in range(5):
        picture = _asymmetric_image(n)
        for suffix, image in (("", picture), ("_mirror", picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT))):
            # PNG, lossless: the mirror is exact
            photos.append((f"p{n}{suffix}", image, 10 + n, "train", f"p{n}{suffix}.png"))
    write_image_set(root, photos)
    out = root / "shards"
    write_shards(
        root / "selection.parquet",
        root / "images",
        out,
        ("train",),
        layout="",
        size=SIZE,
        images_per_shard=4,
        jpeg_quality=100,
    )
    return out


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model") / "model.pt", SIZE)


def _load_model(path):
    from landmarks.model import model_from_checkpoint

    return model_from_checkpoint(path)[0].eval()


def test_flip_and_scale_tta_average_the_normalised_views(shards, model_file, tmp_path):
    out = tmp_path / "train.npy"
    assert (
        embed.main(
            [
                "--model",
                str(model_file),
                "--shards",
                str(shards),
                "--out",
                str(out),
                "--settings",
                json.dumps(
                    {"flip_tta": True, "scales": [1.0, 0.75], "dtype": "float32", "batch_size": 3, "workers": 0}
                ),
            ]
        )
        == 0
    )
    vectors, ids = embed.load_embeddings(out)
    assert vectors.shape == (10, 16)
    # By hand: every view normalised, the views summed, the sum normalised.
    model = _load_model(model_file)
    index = ShardIndex.from_dirs([shards])
    images = {position: image for image, _, position in ShardDataset(index, transform=lambda image: image)}
    for position in (0, 7):
        views = []
        for size in (SIZE, 36):
            tensor = eval_transform(size, model.data_config["mean"], model.data_config["std"])(images[position])
            batch = torch.stack([tensor, torch.flip(tensor, dims=[2])])
            with torch.no_grad():
                views.append(F.normalize(model(batch), dim=1))
        expected = F.normalize(torch.cat(views).sum(dim=0), dim=0).numpy()
        assert vectors[position] == pytest.approx(expected, abs=1e-5)


def test_flip_tta_makes_an_image_and_its_mirror_the_same(shards, model_file, tmp_path):
    for flip, name in ((True, "tta"), (False, "plain")):
        assert (
            embed.main(
                ["--model", str(model_file), "--shards", str(shards), "--out", str(tmp_path / f"{name}.npy")]
                + ["--settings", json.dumps({"flip_tta": flip, "workers": 0})]
            )
            == 0
        )
    for name, expect_same in (("tta", True), ("plain", False)):
        vectors, ids = embed.load_embeddings(tmp_path / f"{name}.npy")
        row = {image_id: i for i, image_id in enumerate(ids["id"])}
        cosines = [float(vectors[row[f"p{n}"]] @ vectors[row[f"p{n}_mirror"]]) for n in range(5)]
        if expect_same:
            assert min(cosines) > 0.999
        else:  # without TTA the model does see the difference
            assert min(cosines) < 0.999


def test_rows_follow_the_shard_index_in_float16_with_ids(shards, model_file, tmp_path):
    assert (
        embed.main(
            ["--model", str(model_file), "--shards", str(shards), "--out", str(tmp_path / "a.npy")]
            + ["--settings", json.dumps({"batch_size": 4, "workers": 0})]
        )
        == 0
    )
    stored = np.load(tmp_path / "a.npy")
    assert stored.dtype == np.float16
    assert np.allclose(np.linalg.norm(stored.astype(np.float32), axis=1), 1, atol=2e-3)
    ids = pd.read_parquet(tmp_path / "a.ids.parquet")
    index = ShardIndex.from_dirs([shards]).table
    assert ids["id"].tolist() == index["id"].tolist()
    assert ids["landmark_id"].tolist() == index["landmark_id"].tolist()
    assert list(ids.columns) == EMBEDDING_IDS_COLUMNS  # landmarks.tables: what retrieve and predict read
    # Two DataLoader workers read interleaved slices; rows still land in index order.
    model = _load_model(model_file)
    parallel = embed.compute_embeddings(
        model, ShardIndex.from_dirs([shards]), SIZE, batch_size=3, workers=2, progress=False
    )
    assert parallel == pytest.approx(stored.astype(np.float32), abs=2e-3)


def test_whole_image_embeds_each_photo_at_its_own_aspect_ratio_in_index_order(model_file, tmp_path):
    """embed.whole_image: photos of three shapes in one batch, each embedded whole (not its centred
    square), rows in index order as with crops."""
    rng = np.random.default_rng(3)
    shapes = [(48, 48), (96, 48), (48, 80), (96, 48), (64, 48), (48, 48), (96, 48)]  # (width, height)
    photos = [
        (f"w{n}", Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)), 1, "train", f"w{n}.png")
        for n, (w, h) in enumerate(shapes)
    ]
    write_image_set(tmp_path, photos)
    shards = write_shards(
        tmp_path / "selection.parquet", tmp_path / "images", tmp_path / "shards", ("train",), layout="", size=SIZE
    )
    index = ShardIndex.from_dirs(shards)
    model = _load_model(model_file)
    whole = embed.compute_embeddings(model, index, SIZE, batch_size=4, whole_image=True, progress=False)
    cropped = embed.compute_embeddings(model, index, SIZE, batch_size=4, progress=False)
    images = {position: image for image, _, position in ShardDataset(index, transform=lambda image: image)}
    mean, std = model.data_config["mean"], model.data_config["std"]
    for position, image in images.items():
        tensor = eval_transform(SIZE, mean, std, whole_image=True)(image)
        assert tensor.shape[1:] == (image.height, image.width)  # stored at the shorter side SIZE already
        with torch.no_grad():
            expected = F.normalize(model(tensor.unsqueeze(0)), dim=1)[0].numpy()
        assert whole[position] == pytest.approx(expected, abs=1e-5)
    square = np.array([image.width == image.height for _, image in sorted(images.items())])
    assert np.allclose(whole[square], cropped[square], atol=1e-5)
    assert not np.allclose(whole[~square], cropped[~square], atol=1e-3)


def test_reading_embeddings_checks_the_id_table(shards, model_file, tmp_path):
    vectors = np.eye(3, 4, dtype=np.float32)
    embed.write_embeddings(
        vectors, pd.DataFrame({"id": ["a", "b", "c"], "landmark_id": [1, 2, None]}), tmp_path / "x.npy"
    )
    loaded, ids = embed.load_embeddings(tmp_path / "x.npy")
    assert loaded.dtype == np.float32 and ids["id"].tolist() == ["a", "b", "c"]
    mapped, _ = embed.load_embeddings(tmp_path / "x.npy", mmap=True)
    assert mapped.dtype == np.float16 and isinstance(mapped, np.memmap)
    pd.DataFrame({"id": ["a", "b"], "landmark_id": [1, 2]}).to_parquet(tmp_path / "x.ids.parquet")
    with pytest.raises(StageError, match=r"x\.npy: 3 embeddings but 2 ids"):
        embed.load_embeddings(tmp_path / "x.npy")
    (tmp_path / "x.ids.parquet").unlink()
    with pytest.raises(StageError, match="id table .* is missing"):
        embed.load_embeddings(tmp_path / "x.npy")
    with pytest.raises(StageError, match="embeddings not found"):
        embed.load_embeddings(tmp_path / "nothing.npy")


def test_bad_tta_scales_and_missing_model_are_named(shards, model_file, tmp_path):
    with pytest.raises(StageError, match="embed.scales"):
        embedding.tta_sizes(SIZE, [1.0, -0.5])
    with pytest.raises(StageError, match="nothing.pt: model checkpoint not found"):
        embed.main(["--model", str(tmp_path / "nothing.pt"), "--shards", str(shards), "--out", str(tmp_path / "o.npy")])
    with pytest.raises(StageError, match="key 'embed.batch_size'"):  # a ConfigError, named as config.yaml names it
        embed.main(
            ["--model", str(model_file), "--shards", str(shards), "--out", str(tmp_path / "o.npy")]
            + ["--settings", json.dumps({"batch_size": 0})]
        )
    assert not (tmp_path / "o.npy").exists()
