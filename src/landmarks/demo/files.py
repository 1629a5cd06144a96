"""What the demo writes on disk: photos encoded as the web serves them (JPEG, progressive JPEG, PNG,
RGBA PNG, grayscale and CMYK JPEG, EXIF-rotated JPEG), written atomically, and its CSV tables."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw

from ..common import write_bytes_atomic, write_text_atomic

if TYPE_CHECKING:
    import numpy as np

    from .generate import Photo

URLS_COLUMNS = ("id", "url", "landmark_id")
NEW_PHOTOS_COLUMNS = ("file", "landmark_id")

# ---------------------------------------------------------------------------------------------
# Encoding: JPEG, PNG, RGBA, grayscale, CMYK, EXIF-rotated
# ---------------------------------------------------------------------------------------------

EXIF_ORIENTATION_TAG = 0x0112
# Stored pixels for each EXIF orientation: `ImageOps.exif_transpose` undoes exactly this.
STORE_TRANSPOSE = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


def encode(image: Image.Image, variant: str, g: np.random.Generator) -> tuple[bytes, str]:
    """Encode an upright RGB photo as `variant`; returns the bytes and the file extension."""
    buffer = io.BytesIO()
    quality = int(g.integers(72, 96))
    if variant in ("jpeg", "progressive_jpeg"):
        image.save(buffer, "JPEG", quality=quality, progressive=variant == "progressive_jpeg")
    elif variant == "png":
        image.save(buffer, "PNG", compress_level=6)
    elif variant == "rgba_png":
        # A cut-out with rounded transparent corners, as exported by phones and editors.
        w, h = image.size
        alpha = Image.new("L", image.size, 0)
        ImageDraw.Draw(alpha).rounded_rectangle((0, 0, w - 1, h - 1), radius=min(w, h) * 0.12, fill=255)
        rgba = image.convert("RGBA")
        rgba.putalpha(alpha)
        rgba.save(buffer, "PNG", compress_level=6)
    elif variant == "gray_jpeg":
        image.convert("L").save(buffer, "JPEG", quality=quality)
    elif variant == "cmyk_jpeg":
        image.convert("CMYK").save(buffer, "JPEG", quality=quality)
    elif variant.startswith("exif_"):
        orientation = int(variant.split("_")[1])
        exif = Image.Exif()
        exif[EXIF_ORIENTATION_TAG] = orientation
        image.transpose(STORE_TRANSPOSE[orientation]).save(buffer, "JPEG", quality=quality, exif=exif.tobytes())
    else:
        raise ValueError(f"unknown variant {variant!r}")
    return buffer.getvalue(), (".png" if variant.endswith("png") else ".jpg")


def write_photo(images_dir: Path, photo: Photo, image: Image.Image, g: np.random.Generator) -> dict:
    """Encode `image` as the photo's variant into images_dir/<id>.<ext>; returns what was written."""
    data, ext = encode(image, photo.variant, g)
    name = photo.image_id + ext
    write_bytes_atomic(images_dir / name, data)
    return {"id": photo.image_id, "file": name, "variant": photo.variant, "bytes": len(data)}


def csv_text(header, rows) -> str:
    """A CSV table with "\\n" line ends, the same bytes on every platform."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def write_csv(path: Path, header, rows) -> None:
    """Write a CSV table atomically: a reader never sees half of it."""
    write_text_atomic(path, csv_text(header, rows))
