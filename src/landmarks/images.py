"""Image files: which formats the pipeline accepts, and the one way their pixels become upright RGB.

Every stage that looks at pixels decodes with these rules, so the scene classifier, the shards the
model trains on and the photos `predict` is asked about all show the same picture:

* EXIF orientation (or XMP's tiff:Orientation) is applied, so the image is the way up a viewer shows
  it; a malformed EXIF block counts as upright, not as an error.
* Every mode becomes RGB: 16/32-bit grey keeps its high byte, palette and grey are expanded, CMYK
  and YCbCr converted, and transparency (an alpha channel, or a palette/PNG tRNS colour) is laid on
  white.

`decode_rgb` does all of it for a whole image (places365, the loader, predict). The shard stage uses
the same steps with a DCT-scaled JPEG decode and a resize between them (`shard._decode`). The
download stage's check opens bodies with `open_image` (the accepted formats) and validates them at
1/8 scale rather than decoding them to RGB: it needs to know a file is whole, not its pixels.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

IMAGE_FORMATS = {  # Pillow format -> file extension; anything else is "not_image"
    "JPEG": ".jpg",
    "MPO": ".jpg",  # multi-picture JPEG from cameras: a JPEG file
    "PNG": ".png",
    "WEBP": ".webp",
    "GIF": ".gif",
    "BMP": ".bmp",
    "TIFF": ".tif",
    "AVIF": ".avif",
    "JPEG2000": ".jp2",
}
# File name endings a folder search takes for photos (predict's folders, the benchmark's photo folders).
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".mpo"}
Image.init()
# Formats Pillow can open by name here (MPO has no opener of its own: the JPEG one returns it).
OPENABLE_FORMATS = [name for name in IMAGE_FORMATS if name in Image.OPEN]
JPEG_SOI = b"\xff\xd8\xff"  # a JPEG's start-of-image marker

EXIF_ORIENTATION = 0x0112
# EXIF orientation -> the transpose that makes the stored pixels upright (orientations 5-8 swap w and h).
UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def open_image(data: bytes) -> Image.Image:
    """Pillow's lazy view of `data`, trying only the accepted formats (raises as Image.open does)."""
    return Image.open(io.BytesIO(data), formats=OPENABLE_FORMATS)


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1 = upright); a malformed EXIF block counts as upright, not as an error."""
    try:
        value = image.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:
        return 1
    return value if value in UPRIGHT else 1


def turn_upright(image: Image.Image, orientation: int) -> Image.Image:
    """Undo the stored `orientation` (from `exif_orientation`, read before any resize or conversion)."""
    return image if orientation == 1 else image.transpose(UPRIGHT[orientation])


def _to_8bit_gray(image: Image.Image) -> Image.Image:
    """16/32-bit grayscale to 8 bits by keeping the high byte (a plain convert would clip to white)."""
    array = np.asarray(image).astype(np.int64)
    if image.mode.startswith("I;16") or array.max(initial=0) > 255:
        array = array >> 8
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), "L")


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB for every input mode: 16-bit and 32-bit grayscale, palette, grayscale, CMYK, YCbCr;
    transparency (alpha channel, or a palette/PNG tRNS transparent colour) composited onto white.
    An RGB image without transparency is returned as it is."""
    if image.mode.startswith("I"):
        image = _to_8bit_gray(image)
    if "transparency" in image.info and image.mode in ("P", "L", "RGB"):
        image = image.convert("RGBA")  # tRNS: the transparent index or colour becomes alpha 0
    elif image.mode == "P":
        image = image.convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode != "RGB":
        return image.convert("RGB")  # L, 1, CMYK (Adobe-inverted JPEGs are handled by Pillow), YCbCr
    return image


def decode_rgb(source: bytes | str | os.PathLike) -> Image.Image:
    """The image in `source` (its bytes, or a file path) fully decoded to upright RGB.

    Raises what Pillow raises for data it cannot decode. An upright RGB JPEG (what the shards hold)
    costs one decode and no copy."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        orientation = exif_orientation(image)  # before load: TIFF reads its EXIF from the open file
        image.load()
        return turn_upright(to_rgb(image), orientation)
