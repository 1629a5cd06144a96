"""The shard stage: resize modes, colour and orientation handling, draft decoding, tar layout, limits, parts."""

import io
import json
import tarfile

import numpy as np
import pandas as pd
import pytest
from conftest import write_image_set
from PIL import Image, JpegImagePlugin

from landmarks import shard
from landmarks.common import StageError
from landmarks.images import EXIF_ORIENTATION
from landmarks.tables import SHARD_INDEX_COLUMNS

# ---------------------------------------------------------------------------------------------------
# Resize modes


def _three_bands(size):
    """Red | green | blue vertical bands: tells a centre crop from a squash."""
    width, height = size
    array = np.zeros((height, width, 3), np.uint8)
    array[:, : width // 3, 0] = 255
    array[:, width // 3 : 2 * width // 3, 1] = 255
    array[:, 2 * width // 3 :, 2] = 255
    return Image.fromarray(array)


@pytest.mark.parametrize(
    "mode, upscale, wide, tall, small",
    [
        ("shorter_side", False, (200, 100), (100, 200), (80, 60)),
        ("longer_side", False, (100, 50), (50, 100), (80, 60)),
        ("center_crop", False, (100, 100), (100, 100), (60, 60)),
        ("pad", False, (100, 100), (100, 100), (80, 80)),
        ("none", False, (400, 200), (200, 400), (80, 60)),
        ("shorter_side", True, (200, 100), (100, 200), (133, 100)),
        ("longer_side", True, (100, 50), (50, 100), (100, 75)),
        ("center_crop", True, (100, 100), (100, 100), (100, 100)),
        ("pad", True, (100, 100), (100, 100), (100, 100)),
    ],
)
def test_resize_modes_give_the_expected_sizes_and_never_upscale_unless_asked(
    tmp_path, mode, upscale, wide, tall, small
):
    for name, size, expected in (("wide", (400, 200), wide), ("tall", (200, 400), tall), ("small", (80, 60), small)):
        path = tmp_path / f"{name}.png"
        _three_bands(size).save(path)
        assert shard.load_resized(path, mode, 100, upscale=upscale).size == expected, name


def test_center_crop_keeps_the_middle_and_pad_adds_black_borders(tmp_path):
    path = tmp_path / "bands.png"
    _three_bands((300, 100)).save(path)
    crop = np.asarray(shard.load_resized(path, "center_crop", 50)).astype(int)
    assert crop.shape == (50, 50, 3)
    assert (crop[:, 5:45, 1] > 200).all() and (crop[:, 5:45, [0, 2]] < 50).all()  # only the green band
    padded = np.asarray(shard.load_resized(path, "pad", 60)).astype(int)
    assert padded.shape == (60, 60, 3)
    assert (padded[:15] == 0).all() and (padded[-15:] == 0).all()  # 60x20 image centred: 20 px borders
    assert padded[30, 5, 0] > 200 and padded[30, 30, 1] > 200 and padded[30, 55, 2] > 200


# ---------------------------------------------------------------------------------------------------
# Colour modes


def _roundtrip(tmp_path, image, name, **save):
    path = tmp_path / name
    image.save(path, **save)
    result = shard.load_resized(path, "none", 0)
    assert result.mode == "RGB"
    return np.asarray(result).astype(int)


def test_16_bit_grayscale_png_keeps_its_tones(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (8, 1))
    source = Image.fromarray(ramp)
    path = tmp_path / "ramp16.png"
    source.save(path)
    assert Image.open(path).mode.startswith("I")  # really read back as a 16-bit image
    rgb = shard.load_resized(path, "none", 0)
    array = np.asarray(rgb).astype(int)
    assert rgb.mode == "RGB" and (array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all()
    assert np.abs(array[0, :, 0] - (ramp[0] >> 8)).max() <= 1  # high byte kept, not clipped to white
    assert array[0, 0, 0] == 0 and array[0, 32, 0] in range(120, 136)


def test_palette_with_transparency_goes_onto_white(tmp_path):
    image = Image.new("P", (20, 10), 0)
    image.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    image.paste(1, (10, 0, 20, 10))  # right half: opaque red-ish; left half: index 0, transparent
    array = _roundtrip(tmp_path, image, "palette.png", transparency=0)
    assert (array[:, :10] == 255).all()
    assert np.abs(array[:, 10:] - [200, 30, 30]).max() == 0


def test_palette_without_transparency_keeps_its_colours(tmp_path):
    image = Image.new("P", (8, 8), 1)
    image.putpalette([0, 0, 0, 10, 120, 240] + [0] * 762)
    assert (_roundtrip(tmp_path, image, "palette.gif") == [10, 120, 240]).all()


def test_la_alpha_is_composited_onto_white(tmp_path):
    array = np.zeros((4, 3, 2), np.uint8)
    array[..., 0] = 40  # dark grey
    array[:, 0, 1], array[:, 1, 1], array[:, 2, 1] = 0, 255, 128  # transparent, opaque, half
    rgb = _roundtrip(tmp_path, Image.fromarray(array, "LA"), "la.png")
    assert (rgb[:, 0] == 255).all() and (rgb[:, 1] == 40).all()
    assert (np.abs(rgb[:, 2] - (40 * 128 + 255 * 127) / 255) <= 1).all()


def test_rgba_and_transparent_colour_png_go_onto_white(tmp_path):
    rgba = Image.new("RGBA", (6, 6), (0, 0, 0, 0))
    rgba.paste((0, 90, 0, 255), (0, 0, 3, 6))
    array = _roundtrip(tmp_path, rgba, "rgba.png")
    assert (array[:, :3] == [0, 90, 0]).all() and (array[:, 3:] == 255).all()
    grey = Image.new("L", (6, 6), 7)
    grey.paste(100, (0, 0, 3, 6))
    array = _roundtrip(tmp_path, grey, "trns.png", transparency=7)  # tRNS: grey level 7 is transparent
    assert (array[:, :3] == 100).all() and (array[:, 3:] == 255).all()


def test_cmyk_grayscale_and_bilevel_become_rgb(tmp_path):
    red = _roundtrip(tmp_path, Image.new("CMYK", (32, 16), (0, 255, 255, 0)), "cmyk.jpg")
    assert red[..., 0].min() > 200 and red[..., 1:].max() < 60
    grey = _roundtrip(tmp_path, Image.new("L", (16, 16), 77), "grey.jpg")
    assert (np.abs(grey - 77) <= 2).all()
    bilevel = Image.new("1", (16, 16), 0)
    bilevel.paste(1, (8, 0, 16, 16))
    array = _roundtrip(tmp_path, bilevel, "bilevel.png")
    assert (array[:, :8] == 0).all() and (array[:, 8:] == 255).all()


# ---------------------------------------------------------------------------------------------------
# EXIF orientation

QUADRANTS = [(230, 20, 20), (20, 230, 20), (20, 20, 230), (230, 230, 20)]  # TL, TR, BL, BR


def _upright(width=96, height=64):
    array = np.zeros((height, width, 3), np.uint8)
    h, w = height // 2, width // 2
    array[:h, :w], array[:h, w:], array[h:, :w], array[h:, w:] = QUADRANTS
    return array


# What a camera stores for each orientation: the tag says how to turn the stored pixels to show them
# upright (EXIF 2.3, tag 0x0112), so the stored pixels are the upright photo turned the other way.
STORED = {
    2: lambda a: a[:, ::-1],  # mirrored left-right
    3: lambda a: a[::-1, ::-1],  # rotated 180
    4: lambda a: a[::-1],  # mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),  # mirrored along the main diagonal
    6: lambda a: np.rot90(a, 1),  # shown after turning 90 degrees clockwise
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # mirrored along the anti-diagonal
    8: lambda a: np.rot90(a, -1),  # shown after turning 90 degrees counter-clockwise
}


def _quadrant_means(array):
    h, w = array.shape[0] // 2, array.shape[1] // 2
    blocks = [array[:h, :w], array[:h, w:], array[h:, :w], array[h:, w:]]
    return [tuple(int(v) for v in b.reshape(-1, 3).mean(0)) for b in blocks]


@pytest.mark.parametrize("orientation", range(2, 9))
def test_exif_orientations_are_turned_upright(tmp_path, orientation):
    path = tmp_path / f"o{orientation}.jpg"
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    Image.fromarray(np.ascontiguousarray(STORED[orientation](_upright()))).save(path, quality=95, exif=exif)
    upright = np.asarray(shard.load_resized(path, "none", 0)).astype(int)
    assert upright.shape == (64, 96, 3)
    for got, want in zip(_quadrant_means(upright), QUADRANTS):
        assert np.abs(np.subtract(got, want)).max() < 25, (orientation, got, want)
    small = shard.load_resized(path, "shorter_side", 32)  # resizing works on the upright size
    assert small.size == (48, 32)
    for got, want in zip(_quadrant_means(np.asarray(small).astype(int)), QUADRANTS):
        assert np.abs(np.subtract(got, want)).max() < 40, (orientation, got, want)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_broken_exif_is_ignored_not_fatal(tmp_path):
    path = tmp_path / "badexif.jpg"
    Image.fromarray(_upright()).save(path, exif=b"Exif\x00\x00II*\x00\xff\xff\xff\xff garbage")
    assert shard.load_resized(path, "shorter_side", 32).size == (48, 32)


# ---------------------------------------------------------------------------------------------------
# Draft decoding and pass-through


def _photo_like(width, height, seed=0):
    """Smooth colour fields plus grain: compresses and decodes like a photograph, not like flat colour."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 64 + 2, width // 64 + 2, 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    grain = rng.integers(-12, 13, (height, width, 1), dtype=np.int16)
    return Image.fromarray(np.clip(field + grain, 0, 255).astype(np.uint8))


def test_large_jpegs_are_decoded_at_reduced_scale(tmp_path, monkeypatch):
    path = tmp_path / "big.jpg"
    _photo_like(2400, 1600).save(path, quality=90)
    decoded_sizes = []
    original_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = original_draft(self, mode, size)
        decoded_sizes.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    fast = shard.load_resized(path, "shorter_side", 200)
    assert fast.size == (300, 200)
    assert decoded_sizes == [(300, 200)]  # libjpeg decoded at 1/8 scale: 64x fewer pixels
    full = shard.load_resized(path, "shorter_side", 200, draft=False)
    assert len(decoded_sizes) == 1
    difference = np.abs(np.asarray(fast, dtype=int) - np.asarray(full, dtype=int))
    assert difference.mean() < 3  # the same picture, not a degraded one


def test_upright_rgb_jpeg_is_stored_without_recompression(tmp_path):
    path = tmp_path / "photo.jpg"
    _photo_like(120, 90).save(path, quality=80)
    data, width, height = shard.encode_resized(path, "none", 0, quality=95)
    assert data == path.read_bytes() and (width, height) == (120, 90)
    data, width, height = shard.encode_resized(path, "shorter_side", 200)  # smaller than 200: unchanged too
    assert data == path.read_bytes()
    data, width, height = shard.encode_resized(path, "shorter_side", 45)
    assert (width, height) == (60, 45) and Image.open(io.BytesIO(data)).size == (60, 45)
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    _photo_like(120, 90).save(rotated, exif=exif)
    data, width, height = shard.encode_resized(rotated, "none", 0)
    assert (width, height) == (90, 120) and Image.open(io.BytesIO(data)).getexif().get(EXIF_ORIENTATION) is None


# ---------------------------------------------------------------------------------------------------
# The stage: tars, index, skipped images, limits, parts


@pytest.fixture()
def image_set(tmp_path):
    """25 train images of varied size (one CMYK, one 16-bit PNG, one palette GIF), 4 val images, and 4
    broken train inputs: a truncated JPEG, a text file, a missing file and a row without a path."""
    rng = np.random.default_rng(1)
    photos = []
    for n in range(25):
        image_id = f"img{n:02d}.v{n % 3}"  # a dot in the id: keys replace it
        width, height = int(rng.integers(60, 200)), int(rng.integers(60, 200))
        image = _photo_like(width, height, seed=n)
        name = f"{image_id}.jpg"
        if n == 3:
            image = image.convert("CMYK")
        elif n == 4:
            image, name = Image.fromarray(np.asarray(image.convert("L"), np.uint16) * 257), f"{image_id}.png"
        elif n == 5:
            image, name = image.convert("P"), f"{image_id}.gif"
        photos.append((image_id, image, 10 + n % 4, "train", name))
    for n in range(4):
        photos.append((f"val{n}", _photo_like(80, 70, seed=100 + n), None, "val"))
    whole = io.BytesIO()
    _photo_like(300, 200).save(whole, "JPEG")
    photos += [
        ("truncated", whole.getvalue()[:2000], 10, "train"),
        ("text", b"<html>not found</html>", 10, "train"),
        ("missing", None, 10, "train"),  # no file
        ("nopath", None, 10, "train", None),
    ]
    selection = write_image_set(tmp_path, photos, selection_file=None)
    return selection, tmp_path / "images"


def _run(selection, images, out, **options):
    settings = {"resize_mode": "shorter_side", "size": 64, "images_per_shard": 4, "seed": 0, **options}
    split, part, parts = settings.pop("split", "train"), settings.pop("part", 0), settings.pop("parts", 1)
    return shard.shard_split(selection, images, split, part, parts, out, **settings)


def test_shards_are_webdataset_tars_and_corrupt_images_are_skipped(image_set, tmp_path):
    selection, images = image_set
    out = tmp_path / "out"
    counts = _run(selection, images, out)
    assert counts["rows"] == 29 and counts["written"] == 25 and counts["skipped"] == 4 and counts["shards"] == 7
    skipped = pd.read_parquet(out / "skipped.parquet").set_index("id")["error"]
    assert sorted(skipped.index) == ["missing", "nopath", "text", "truncated"]
    assert "FileNotFoundError" in skipped["missing"] and "UnidentifiedImageError" in skipped["text"]
    assert "truncated" in skipped["truncated"].lower() and "no image path" in skipped["nopath"]
    index = pd.read_parquet(out / "index.parquet")
    assert list(index.columns) == SHARD_INDEX_COLUMNS
    assert sorted(index["id"]) == sorted(selection.loc[selection["split"].eq("train"), "id"].iloc[:25])
    assert not index["key"].str.contains(".", regex=False).any()
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"shard-00-{n:05d}.tar" for n in range(7)] + ["index.parquet", "skipped.parquet", "shard.json"]
    )
    for shard_name, rows in index.groupby("shard"):
        with tarfile.open(out / shard_name) as tar:  # plain tarfile reads them
            members = tar.getmembers()
            assert [m.name for m in members] == [f"{k}.{ext}" for k in rows["key"] for ext in ("jpg", "cls", "json")]
            for row in rows.itertuples():
                jpg = tar.getmember(f"{row.key}.jpg")
                assert (jpg.offset_data, jpg.size) == (row.offset, row.size)
                meta = json.loads(tar.extractfile(f"{row.key}.json").read())
                assert meta["id"] == row.id and meta["landmark_id"] == row.landmark_id
                assert int(tar.extractfile(f"{row.key}.cls").read()) == row.landmark_id
                image = Image.open(io.BytesIO(tar.extractfile(jpg).read()))
                assert image.format == "JPEG" and image.mode == "RGB"
                assert image.size == (row.width, row.height) and min(image.size) <= 64
    summary = json.loads((out / "shard.json").read_text())
    assert summary["written"] == 25 and summary["settings"]["size"] == 64


def test_shard_bytes_limit_is_the_file_size_on_disk(image_set, tmp_path):
    selection, images = image_set
    out = tmp_path / "out"
    limit = 30_720  # three 10 KiB tar records
    counts = _run(selection, images, out, images_per_shard=1000, max_shard_bytes=limit)
    sizes = [p.stat().st_size for p in sorted(out.glob("*.tar"))]
    assert counts["shards"] == len(sizes) > 2
    assert max(sizes) <= limit
    # Shards are full: each was closed because its successor's first sample would not have fitted.
    ends, first_samples = [], []
    for path in sorted(out.glob("*.tar")):
        with tarfile.open(path) as tar:
            members = tar.getmembers()
            padded = [m.offset_data + -(-m.size // 512) * 512 for m in members]
            ends.append(padded[-1])
            first_samples.append(padded[2])  # .jpg, .cls, .json of the first sample, headers included
    for end, successor in zip(ends, first_samples[1:]):
        assert -(-(end + successor + 1024) // 10240) * 10240 > limit


def test_image_count_limit_and_deterministic_bytes_across_processes(image_set, tmp_path):
    selection, images = image_set
    _run(selection, images, tmp_path / "one", images_per_shard=6, threads=1)
    _run(selection, images, tmp_path / "two", images_per_shard=6, threads=2)
    index = pd.read_parquet(tmp_path / "one" / "index.parquet")
    assert index.groupby("shard").size().tolist() == [6, 6, 6, 6, 1]
    for path in sorted((tmp_path / "one").glob("*.tar")):
        assert path.read_bytes() == (tmp_path / "two" / path.name).read_bytes()
    pd.testing.assert_frame_equal(index, pd.read_parquet(tmp_path / "two" / "index.parquet"))


def test_parts_split_a_split_deterministically(image_set, tmp_path):
    selection, images = image_set
    train_ids = set(selection.loc[selection["split"] == "train", "id"])
    parts = [shard.part_rows(selection, "train", k, 3, seed=5)["id"].tolist() for k in range(3)]
    assert set().union(*parts) == train_ids and sum(map(len, parts)) == len(train_ids)
    assert sorted(map(len, parts)) == [9, 10, 10]
    shuffled = selection.sample(frac=1, random_state=3)  # the selection's row order does not matter
    assert [shard.part_rows(shuffled, "train", k, 3, seed=5)["id"].tolist() for k in range(3)] == parts
    assert shard.part_rows(selection, "train", 0, 3, seed=6)["id"].tolist() != parts[0]
    written = []
    for k in range(3):
        _run(selection, images, tmp_path / f"part-{k:02d}", part=k, parts=3)
        index = pd.read_parquet(tmp_path / f"part-{k:02d}" / "index.parquet")
        assert index["shard"].str.startswith(f"shard-{k:02d}-").all()
        written += index["id"].tolist()
    assert sorted(written) == sorted(i for i in train_ids if i not in {"truncated", "text", "missing", "nopath"})


def test_rerun_replaces_earlier_shards_of_the_part(image_set, tmp_path):
    selection, images = image_set
    out = tmp_path / "out"
    _run(selection, images, out, images_per_shard=2)
    assert len(list(out.glob("*.tar"))) == 13
    (out / "shard-01-00000.tar").write_bytes(b"another part's shard")  # not ours: stays
    _run(selection, images, out, images_per_shard=100)
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-00-00000.tar", "shard-01-00000.tar"]
    assert not list(out.glob(".*"))  # no temporary files left behind


def test_bad_selections_and_arguments_are_clear_errors(image_set, tmp_path):
    selection, images = image_set
    doubled = pd.concat([selection, selection.iloc[[0]]])
    with pytest.raises(StageError, match="img00.v0.*more than once"):
        _run(doubled, images, tmp_path / "a")
    clash = pd.concat(
        [selection, pd.DataFrame([{"id": "img00_v0", "landmark_id": 1, "split": "train", "path": "x.jpg"}])]
    )
    with pytest.raises(StageError, match="same WebDataset key"):
        _run(clash, images, tmp_path / "b")
    with pytest.raises(StageError, match="--part 3 is outside 0..2"):
        _run(selection, images, tmp_path / "c", part=3, parts=3)
    with pytest.raises(StageError, match="shard.resize_mode"):
        _run(selection, images, tmp_path / "d", resize_mode="stretch")
    selection.to_parquet(tmp_path / "selection.parquet")
    with pytest.raises(StageError, match="--part 2 is outside 0..1"):
        shard.main(
            [
                "--selection",
                str(tmp_path / "selection.parquet"),
                "--images",
                str(images),
                "--split",
                "train",
                "--part",
                "2",
                "--out-dir",
                str(tmp_path / "e"),
                "--settings",
                json.dumps({"parts": 2}),
            ]
        )
    for settings, error in (
        ({"parts": 1}, "key 'shard.size'"),
        ({"size": 64, "jpeg_quality": 0}, "shard.jpeg_quality"),
    ):
        with pytest.raises(StageError, match=error):  # ConfigError: the key as config.yaml names it
            shard.main(
                ["--selection", str(tmp_path / "selection.parquet"), "--images", str(images), "--split", "train"]
                + ["--out-dir", str(tmp_path / "f"), "--settings", json.dumps(settings)]
            )
