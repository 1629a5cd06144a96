"""Checks of one row before and after its request: a URL worth fetching, a body that is a whole image.

Every body is decoded with Pillow (JPEG at 1/8 scale: the whole entropy-coded stream is still read,
so truncation and broken data are caught at a fraction of the cost) after a pixel-count check
against its byte count, so HTML pages, truncated or corrupt files and decompression bombs are
failures with their own status. The formats accepted are `images.IMAGE_FORMATS`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import yarl
from PIL import Image, UnidentifiedImageError

try:
    import simplejpeg
except ImportError as err:
    # Imported here, not where a JPEG is checked: there, a missing package would read as every JPEG
    # being corrupt (each check's failure is the image's status), and the manifest would keep that.
    raise ImportError(
        f"the download check decodes JPEGs with simplejpeg, which cannot be imported ({err}); "
        "install the project's requirements (make env, or pip install -r requirements.lock)"
    ) from err

from ..images import IMAGE_FORMATS, JPEG_SOI, open_image
from ..tables import OK

# Our own pixel checks run before Pillow's; its bomb warning would only repeat them in the log.
warnings.simplefilter("ignore", Image.DecompressionBombWarning)

BOMB_MIN_PIXELS = 10_000_000  # the pixels-per-byte test applies above this (smaller images are harmless)


@dataclass
class ImageCheck:
    """Result of `inspect_image`: status OK with the image's facts, or a failure status and reason."""

    status: str
    reason: str = ""
    width: int | None = None
    height: int | None = None
    format: str | None = None

    @property
    def extension(self) -> str:
        return IMAGE_FORMATS[self.format]


def _describe_non_image(data: bytes, content_type: str | None) -> str:
    head = data[:1024].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in head:
        what = "an HTML page"
    elif head.startswith(b"<?xml") or head.startswith(b"<svg"):
        what = "XML/SVG"
    elif head.startswith((b"{", b"[")):
        what = "JSON"
    else:
        what = f"unrecognised data starting {data[:8]!r}"
    served_as = f", served as {content_type}" if content_type else ""
    return f"{what} instead of an image{served_as}"


def inspect_image(
    data: bytes, max_pixels: int, max_pixels_per_byte: float, content_type: str | None = None
) -> ImageCheck:
    """Decode `data` fully (JPEG at 1/8 scale) and say whether it is a usable image.

    Statuses: ok, not_image, decompression_bomb, truncated, corrupt_image. Thread-safe: the
    download stage runs it in worker threads (Pillow releases the GIL while decoding).
    """
    if not data:
        return ImageCheck("not_image", "empty body (0 bytes)")
    try:
        image = open_image(data)
    except Image.DecompressionBombError as err:
        return ImageCheck("decompression_bomb", f"Pillow refused it: {err}")
    except UnidentifiedImageError:
        if data.startswith(JPEG_SOI):  # a JPEG's start marker, then a header no decoder can read
            return ImageCheck("corrupt_image", "JPEG header cannot be decoded (the file starts as a JPEG)")
        return ImageCheck("not_image", _describe_non_image(data, content_type))
    except Exception as err:  # a broken header: Pillow raises several kinds of errors here
        return _decode_failure(err, "header")
    with image:
        width, height = image.size
        fmt = image.format
        pixels = width * height
        if pixels > max_pixels:
            return ImageCheck(
                "decompression_bomb",
                f"{width}x{height} = {pixels:,} pixels, above max_pixels {max_pixels:,}",
                width,
                height,
                fmt,
            )
        if pixels >= BOMB_MIN_PIXELS and pixels > max_pixels_per_byte * len(data):
            return ImageCheck(
                "decompression_bomb",
                f"{width}x{height} = {pixels:,} pixels from only {len(data):,} bytes "
                f"({pixels / len(data):,.0f} pixels per byte, limit {max_pixels_per_byte:g})",
                width,
                height,
                fmt,
            )
        try:
            if fmt in ("JPEG", "MPO"):
                return check_jpeg_data(data, image.mode, width, height, fmt)
            image.load()  # GIF and other animations: the first frame
        except Image.DecompressionBombError as err:
            return ImageCheck("decompression_bomb", f"Pillow refused it: {err}", width, height, fmt)
        except Exception as err:
            return _decode_failure(err, "data", width, height, fmt)
    return ImageCheck(OK, "", width, height, fmt)


def check_jpeg_data(data: bytes, mode: str, width: int, height: int, fmt: str) -> ImageCheck:
    """Decode a JPEG's data at 1/8 scale with libjpeg-turbo (simplejpeg) in strict mode: libjpeg's
    warnings (premature end of data, corrupt data, extraneous bytes) are failures. Pillow ignores them
    and decodes noise from a scan of random bytes or a file cut before its end marker."""
    try:
        # 1/8 scale, one channel: libjpeg still entropy-decodes every block (where broken data shows)
        # but skips most of the pixel work. CMYK cannot be converted to grey by libjpeg.
        simplejpeg.decode_jpeg(data, colorspace="CMYK" if mode == "CMYK" else "GRAY", min_factor=8, strict=True)
    except ValueError as err:
        message = str(err)
        if "premature end" in message.lower():
            return ImageCheck("truncated", f"{fmt} image data ends early (libjpeg: {message})", width, height, fmt)
        return ImageCheck(
            "corrupt_image", f"{fmt} image data cannot be decoded cleanly (libjpeg: {message})", width, height, fmt
        )
    return ImageCheck(OK, "", width, height, fmt)


def _decode_failure(err: Exception, where: str, width=None, height=None, fmt=None) -> ImageCheck:
    message = str(err) or type(err).__name__
    kind = f"{fmt} " if fmt else ""
    if "truncated" in message.lower():
        return ImageCheck("truncated", f"{kind}image data ends early ({message})", width, height, fmt)
    return ImageCheck("corrupt_image", f"{kind}image {where} cannot be decoded ({message})", width, height, fmt)


def check_url(url: str) -> tuple[str, str] | None:
    """(status, reason) when `url` cannot be fetched at all, else None."""
    if not url or not url.strip():
        return "bad_url", "empty URL"
    try:  # yarl parses lazily: reading .host can fail too (e.g. an invalid IDNA name)
        parsed = yarl.URL(url.strip())
        scheme, host = parsed.scheme.lower(), parsed.host
    except (ValueError, TypeError) as err:
        return "bad_url", f"not a URL ({err})"
    if not scheme:
        return "bad_url", "not an absolute URL (no http:// or https://)"
    if scheme not in ("http", "https"):
        return "bad_scheme", f"scheme {scheme!r} is not allowed (only http and https)"
    if not host:
        return "bad_url", "URL has no host"
    return None
