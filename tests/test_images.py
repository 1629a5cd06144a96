"""One decoder to upright RGB: the scene classifier, the shards and the loader see the same pixels."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from landmarks import places365, shard
from landmarks.images import EXIF_ORIENTATION, decode_rgb


def _gradient(width: int = 40, height: int = 24) -> np.ndarray:
    x = np.linspace(0, 255, width, dtype=np.uint8)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.uint8)[:, None, None]
    return np.concatenate(
        [
            np.broadcast_to(x, (height, width, 1)),
            np.broadcast_to(y, (height, width, 1)),
            255 - np.broadcast_to(x, (height, width, 1)),
        ],
        axis=2,
    )


def _save(image: Image.Image, path, **options):
    image.save(path, **options)
    return path


def _files(tmp_path) -> dict:
    rgb = Image.fromarray(_gradient())
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, 40, dtype=np.uint8), (24, 1))))
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    grey16 = Image.fromarray(_gradient()[:, :, 0].astype(np.uint16) * 257)  # mode I;16
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    return {
        "rgb": _save(rgb, tmp_path / "rgb.png"),
        "rgba": _save(rgba, tmp_path / "rgba.png"),
        "palette_trns": _save(palette, tmp_path / "palette.png", transparency=0),
        "grey16": _save(grey16, tmp_path / "grey16.png"),
        "cmyk": _save(rgb.convert("CMYK"), tmp_path / "cmyk.jpg", quality=95),
        "exif_6": _save(rgb, tmp_path / "rotated.jpg", quality=95, exif=exif),
    }


def test_decode_rgb_gives_the_shard_stages_pixels_for_every_mode(tmp_path):
    for name, path in _files(tmp_path).items():
        decoded = decode_rgb(path)
        assert decoded.mode == "RGB", name
        assert np.array_equal(np.asarray(decoded), np.asarray(shard.load_resized(path, "none", 0))), name
        assert np.array_equal(np.asarray(decoded), np.asarray(decode_rgb(path.read_bytes()))), name
    assert decode_rgb(tmp_path / "rotated.jpg").size == (24, 40)  # orientation 6: turned upright
    assert decode_rgb(tmp_path / "rgba.png").getpixel((0, 0)) == (255, 255, 255)  # alpha 0 lies on white
    grey = np.asarray(decode_rgb(tmp_path / "grey16.png"))
    assert grey.max() == 255 and grey.min() == 0  # the high byte, not clipped to white


def test_places365_sees_the_decoded_pixels(tmp_path):
    files = _files(tmp_path)
    dataset = places365.ImageFiles([files["rgba"], files["exif_6"], tmp_path / "missing.png"])
    for i, name in enumerate(("rgba", "exif_6")):
        tensor, readable, error = dataset[i]
        assert readable and error == ""
        assert torch.equal(tensor, dataset.transform(decode_rgb(files[name])))
    _, readable, error = dataset[2]
    assert not readable and error.startswith("FileNotFoundError")


def test_an_upright_rgb_jpeg_is_decoded_as_it_is():
    buffer = io.BytesIO()
    Image.fromarray(_gradient()).save(buffer, "JPEG", quality=90)
    plain = Image.open(io.BytesIO(buffer.getvalue()))
    plain.load()
    assert np.array_equal(np.asarray(decode_rgb(buffer.getvalue())), np.asarray(plain))


@pytest.mark.parametrize("data", [b"", b"<html>not an image</html>"])
def test_data_that_is_no_image_raises(data):
    with pytest.raises(Exception):  # noqa: B017 - Pillow's own error, as every caller expects
        decode_rgb(data)
