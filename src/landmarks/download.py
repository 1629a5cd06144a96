"""Download stage: fetch one partition's URLs into the shared image tree, one manifest row per URL.

    python -m landmarks.download --part results/split/part-000.parquet \
        --images results/download/images --out results/download/part-000/manifest.parquet

How it behaves, and why:

* One asyncio event loop with aiohttp: `concurrency` requests in flight, at most `per_host` per
  host. Jobs whose host is full wait in that host's queue while other hosts proceed, so one slow
  or rate-limiting host never stalls the rest. Timeouts: connect, read (per socket read) and total
  (per attempt); redirects and body bytes are capped.
* Transient failures (5xx except 501/505, 408, 429, connection resets/refusals, timeouts, a body
  cut short) are retried with exponential backoff and jitter; a `Retry-After` on 429/503 pauses
  the whole host that long (up to `max_retry_after_s`). Permanent failures (other 4xx, bad
  content, DNS "no such host", TLS errors) are not retried. A job waiting for a retry holds no slot.
* Every body is decoded with Pillow (JPEG at 1/8 scale: the whole entropy-coded stream is still
  read, so truncation and broken data are caught at a fraction of the cost) after a pixel-count
  check against its byte count, so HTML pages, truncated or corrupt files and decompression bombs
  are failures with their own status. The bytes are kept exactly as served (checksum = sha256 of
  the file).
* Files land at `<images>/a/b/c/<id>.<ext>` (Google Landmarks layout; `.jpg` for JPEG, the
  format's own extension otherwise; the manifest's `path` column says which), written to a
  per-job temporary folder and renamed into place, so a killed run leaves no half file.
* Resume: each finished row is appended to a journal beside `--out` (one JSON line, written after
  the image is in place). A rerun reuses the journal's rows (an "ok" row only while its file is
  still there with the same size), fetches the rest, and writes the same manifest as an
  uninterrupted run. If the settings that decide outcomes changed since the journal was written,
  its failures are retried (successes kept); `--retry-failed` retries them anyway, `--fresh`
  ignores the journal.
* Bad rows fail alone: an id that is not a safe file name (`bad_id`), a URL that is not http(s)
  (`bad_scheme`) or not a URL (`bad_url`). Problems of the stage itself (unreadable part file,
  disk full, another process on the same part) stop it with a message; the journal keeps what was
  done.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import heapq
import io
import itertools
import json
import logging
import os
import random
import re
import shutil
import socket
import sys
import time
import warnings
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path

import aiohttp
import pyarrow as pa
import pyarrow.parquet as pq
import yarl
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from . import __version__
from .common import (
    StageError,
    check_image_id,
    exclusive_lock,
    image_relpath,
    run_cli,
    setup_logging,
    write_bytes_atomic,
    write_json_atomic,
    write_table,
)

log = logging.getLogger("landmarks.download")

# Our own pixel checks run before Pillow's; its bomb warning would only repeat them in the log.
warnings.simplefilter("ignore", Image.DecompressionBombWarning)

OK = "ok"
DEFAULT_USER_AGENT = (
    f"landmarks-pipeline/{__version__} (landmark recognition research; image dataset download; "
    f"aiohttp/{aiohttp.__version__})"
)
# Prefer the original JPEG: CDNs that negotiate on Accept would otherwise send WebP or AVIF.
ACCEPT = "image/jpeg,image/png;q=0.9,image/*;q=0.8,*/*;q=0.5"
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
Image.init()
# Formats Pillow can open by name here (MPO has no opener of its own: the JPEG one returns it).
OPENABLE_FORMATS = [name for name in IMAGE_FORMATS if name in Image.OPEN]
BOMB_MIN_PIXELS = 10_000_000  # the pixels-per-byte test applies above this (smaller images are harmless)
MAX_BACKOFF_S = 60.0
PROGRESS_LOG_EVERY_S = 30.0
MANIFEST_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("url", pa.string()),
        ("landmark_id", pa.int64()),
        ("split", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("http_status", pa.int64()),
        ("attempts", pa.int64()),
        ("bytes", pa.int64()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("format", pa.string()),
        ("sha256", pa.string()),
        ("elapsed_s", pa.float64()),
        ("path", pa.string()),
        ("part", pa.int64()),
        ("row", pa.int64()),
    ]
)


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    """The `download:` section of config.yaml (same names); CLI flags override it."""

    concurrency: int = 64
    per_host: int = 16
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 30.0
    total_timeout_s: float = 60.0
    retries: int = 3
    backoff_s: float = 1.0
    max_retry_after_s: float = 300.0
    max_bytes: int = 50_000_000
    max_redirects: int = 5
    max_pixels: int = 100_000_000
    max_pixels_per_byte: float = 1000.0
    user_agent: str = DEFAULT_USER_AGENT
    threads: int = 2

    # Settings that only change speed; all others can change a row's outcome (see Journal).
    SPEED_ONLY = ("concurrency", "per_host", "threads")

    def outcome_settings(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.SPEED_ONLY}

    def check(self) -> None:
        for name in ("concurrency", "per_host", "threads", "max_bytes", "max_pixels"):
            if getattr(self, name) < 1:
                raise StageError(f"download setting {name} must be at least 1 (got {getattr(self, name)})")
        for name in ("connect_timeout_s", "read_timeout_s", "total_timeout_s", "max_pixels_per_byte"):
            if getattr(self, name) <= 0:
                raise StageError(f"download setting {name} must be positive (got {getattr(self, name)})")
        for name in ("retries", "backoff_s", "max_retry_after_s", "max_redirects"):
            if getattr(self, name) < 0:
                raise StageError(f"download setting {name} must not be negative (got {getattr(self, name)})")


# ----------------------------------------------------------------------------- outcomes


@dataclass
class Outcome:
    """What happened to one row: a manifest row without the columns copied from the part file."""

    status: str
    reason: str = ""
    http_status: int | None = None
    attempts: int = 0
    bytes: int | None = None
    width: int | None = None
    height: int | None = None
    format: str | None = None
    sha256: str | None = None
    elapsed_s: float = 0.0
    path: str | None = None


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
        image = Image.open(io.BytesIO(data), formats=OPENABLE_FORMATS)
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


JPEG_SOI = b"\xff\xd8\xff"


def check_jpeg_data(data: bytes, mode: str, width: int, height: int, fmt: str) -> ImageCheck:
    """Decode a JPEG's data at 1/8 scale with libjpeg-turbo (simplejpeg) in strict mode: libjpeg's
    warnings (premature end of data, corrupt data, extraneous bytes) are failures. Pillow ignores them
    and decodes noise from a scan of random bytes or a file cut before its end marker."""
    import simplejpeg

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


# ----------------------------------------------------------------------------- one HTTP attempt


@dataclass
class Attempt:
    """One HTTP request: a body, or a failure that may be worth retrying."""

    body: bytes | None = None
    content_type: str | None = None
    status: str = OK
    reason: str = ""
    http_status: int | None = None
    transient: bool = False
    retry_after_s: float | None = None


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _transient_http(code: int) -> bool:
    return code in (408, 429) or (500 <= code <= 599 and code not in (501, 505))


class Fetcher:
    """Makes single attempts; retries and scheduling are the caller's."""

    def __init__(self, session: aiohttp.ClientSession, settings: Settings):
        self.session = session
        self.settings = settings

    async def fetch(self, url: str) -> Attempt:
        s = self.settings
        try:
            async with self.session.get(url.strip(), max_redirects=s.max_redirects) as response:
                code = response.status
                if not 200 <= code <= 299:
                    return Attempt(
                        status=f"http_{code}",
                        reason=f"HTTP {code} {response.reason or ''}".rstrip(),
                        http_status=code,
                        transient=_transient_http(code),
                        retry_after_s=parse_retry_after(response.headers.get("Retry-After"))
                        if code in (429, 503)
                        else None,
                    )
                return await self._read_body(response)
        except aiohttp.TooManyRedirects:
            return Attempt(status="redirect_loop", reason=f"more than {s.max_redirects} redirects")
        except aiohttp.RedirectClientError as err:
            return Attempt(status="bad_redirect", reason=f"redirect to an unusable URL ({err})")
        except aiohttp.InvalidURL as err:
            return Attempt(status="bad_url", reason=f"invalid URL ({err})")
        except aiohttp.ClientConnectorDNSError as err:
            # "Try again" is a resolver hiccup; "no such host" will not change in a minute.
            again = getattr(err.os_error, "errno", None) == socket.EAI_AGAIN
            return Attempt(status="dns_error", reason=f"host name lookup failed ({err.os_error})", transient=again)
        except aiohttp.ClientSSLError as err:
            return Attempt(status="ssl_error", reason=f"TLS error ({err})")
        except aiohttp.ConnectionTimeoutError:
            return Attempt(status="timeout", reason=f"no connection within {s.connect_timeout_s:g} s", transient=True)
        except aiohttp.SocketTimeoutError:
            return Attempt(status="timeout", reason=f"server silent for {s.read_timeout_s:g} s", transient=True)
        except TimeoutError:  # the total timeout (aiohttp raises asyncio's, i.e. the builtin)
            return Attempt(status="timeout", reason=f"not complete within {s.total_timeout_s:g} s", transient=True)
        except aiohttp.ClientPayloadError as err:
            got = re.search(r"received \d+ of \d+ bytes", str(err))
            detail = f" ({got.group(0)})" if got else f" ({err})"
            return Attempt(
                status="truncated", reason=f"connection closed before the end of the body{detail}", transient=True
            )
        except aiohttp.ClientResponseError as err:
            return Attempt(
                status="bad_response", reason=f"malformed HTTP response ({err.message})", http_status=err.status or None
            )
        except (aiohttp.ClientError, ConnectionError) as err:
            return Attempt(status="connection_error", reason=f"{type(err).__name__}: {err}", transient=True)
        except ValueError as err:  # URLs aiohttp cannot encode (bad IDNA, bad port, ...)
            return Attempt(status="bad_url", reason=f"invalid URL ({type(err).__name__}: {err})")
        except Exception as err:
            # One odd URL must not end a crawl of millions: record it, with the traceback in the log.
            log.warning("unexpected error fetching %s", url, exc_info=True)
            return Attempt(status="client_error", reason=f"unexpected {type(err).__name__}: {err}")

    async def _read_body(self, response: aiohttp.ClientResponse) -> Attempt:
        limit = self.settings.max_bytes
        encoding = response.headers.get("Content-Encoding", "").strip().lower()
        encoded = encoding not in ("", "identity")
        declared = response.content_length
        if declared is not None and declared > limit and not encoded:
            return Attempt(
                status="too_large",
                reason=f"Content-Length {declared:,} bytes is above max_bytes {limit:,}",
                http_status=response.status,
            )
        chunks, size = [], 0
        async for chunk in response.content.iter_any():
            size += len(chunk)
            if size > limit:
                if encoded:
                    return Attempt(
                        status="decompression_bomb",
                        reason=f"Content-Encoding {encoding} body inflates past max_bytes {limit:,}"
                        + (f" from {declared:,} bytes sent" if declared is not None else ""),
                        http_status=response.status,
                    )
                return Attempt(
                    status="too_large", reason=f"body is larger than max_bytes {limit:,}", http_status=response.status
                )
            chunks.append(chunk)
        return Attempt(
            body=b"".join(chunks), content_type=response.headers.get("Content-Type"), http_status=response.status
        )


# ----------------------------------------------------------------------------- scheduling


@dataclass
class Job:
    index: int  # position in the part file
    image_id: str
    url: str
    host: str
    attempts: int = 0
    started: float = 0.0


class HostScheduler:
    """Hands jobs to the workers: at most `per_host` running per host, retries after their delay.

    A job whose host is full (or paused by Retry-After) waits in that host's queue, and the
    scheduler looks further down the input (up to `lookahead` waiting jobs) for other hosts, so a
    slow host does not hold up the rest. `concurrency` itself is the number of workers.
    """

    def __init__(self, jobs: Iterable[Job], per_host: int, lookahead: int):
        self._fresh: Iterator[Job] | None = iter(jobs)
        self._per_host = per_host
        self._lookahead = lookahead
        self._waiting: dict[str, deque[Job]] = {}
        self._n_waiting = 0
        self._active: Counter[str] = Counter()
        self._paused_until: dict[str, float] = {}
        self._delayed: list[tuple[float, int, Job]] = []
        self._sequence = itertools.count()
        self._running = 0
        self._changed = asyncio.Event()

    def _free(self, host: str, now: float) -> bool:
        return self._active[host] < self._per_host and self._paused_until.get(host, 0.0) <= now

    def _pick(self) -> Job | None:
        now = time.monotonic()
        while self._delayed and self._delayed[0][0] <= now:
            job = heapq.heappop(self._delayed)[2]
            self._waiting.setdefault(job.host, deque()).appendleft(job)
            self._n_waiting += 1
        for host, queue in self._waiting.items():
            if self._free(host, now):
                job = queue.popleft()
                self._n_waiting -= 1
                if not queue:
                    del self._waiting[host]
                return job
        while self._fresh is not None and self._n_waiting < self._lookahead:
            job = next(self._fresh, None)
            if job is None:
                self._fresh = None
                break
            if self._free(job.host, now):
                return job
            self._waiting.setdefault(job.host, deque()).append(job)
            self._n_waiting += 1
        return None

    def _next_timer(self) -> float | None:
        now = time.monotonic()
        times = [self._delayed[0][0]] if self._delayed else []
        times += [t for host, t in self._paused_until.items() if t > now and host in self._waiting]
        return max(0.0, min(times) - now) if times else None

    async def next_job(self) -> Job | None:
        """The next job to run, or None when everything is done."""
        while True:
            job = self._pick()
            if job is not None:
                self._active[job.host] += 1
                self._running += 1
                return job
            if self._fresh is None and not self._n_waiting and not self._delayed and not self._running:
                self._changed.set()  # wake the other idle workers so they finish too
                return None
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), self._next_timer())

    def finished(self, job: Job, retry_at: float | None = None, pause_host_until: float | None = None) -> None:
        """The job's network part is over; `retry_at` puts it back for another attempt then."""
        self._active[job.host] -= 1
        if not self._active[job.host]:
            del self._active[job.host]
        self._running -= 1
        if pause_host_until is not None:
            self._paused_until[job.host] = max(pause_host_until, self._paused_until.get(job.host, 0.0))
        if retry_at is not None:
            heapq.heappush(self._delayed, (retry_at, next(self._sequence), job))
        self._changed.set()


def backoff_delay(attempt: int, backoff_s: float, retry_after_s: float | None) -> float:
    """Exponential backoff with jitter (x0.5 to x1.5), at least what Retry-After asked for."""
    delay = min(MAX_BACKOFF_S, backoff_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.5)
    return max(delay, retry_after_s or 0.0)


# ----------------------------------------------------------------------------- journal (resume)


class Journal:
    """Append-only JSON-lines record of finished rows beside the manifest, for resuming.

    The first line holds the outcome-deciding settings. A row's line is appended (one write call)
    only after its image is in place, so after a crash every journaled "ok" has its file; a last
    line cut short by the crash is ignored. A lock file keeps two runs off the same part.
    """

    VERSION = 1

    def __init__(self, out: Path):
        self.path = out.with_name(out.stem + ".journal.jsonl")
        self.lock_path = out.with_name(out.stem + ".lock")
        self._lock: contextlib.AbstractContextManager | None = None
        self._fd: int | None = None

    def lock(self) -> None:
        self._lock = exclusive_lock(self.lock_path, "another download process")
        self._lock.__enter__()  # held until close()

    def load(self) -> tuple[dict | None, dict[str, dict]]:
        """(settings of the journal or None, records by id); unreadable lines are skipped."""
        if not self.path.exists():
            return None, {}
        settings, records = None, {}
        with open(self.path, "rb") as fh:
            for number, line in enumerate(fh):
                if not line.endswith(b"\n"):
                    break  # the write the crash interrupted
                try:
                    entry = json.loads(line)
                except ValueError:
                    log.warning("%s: skipping unreadable line %d", self.path, number + 1)
                    continue
                if number == 0:
                    if entry.get("journal") != self.VERSION:
                        log.warning("%s: unknown journal format, starting afresh", self.path)
                        return None, {}
                    settings = entry.get("settings")
                else:
                    records[entry["id"]] = entry
        return settings, records

    def start(self, settings: dict, kept: Iterable[dict]) -> None:
        """Rewrite the journal with the new settings and the records kept, then open it for appending."""
        lines = [json.dumps({"journal": self.VERSION, "settings": settings}, sort_keys=True)]
        lines += [json.dumps(record, sort_keys=True) for record in kept]
        write_bytes_atomic(self.path, ("\n".join(lines) + "\n").encode())
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)

    def append(self, record: dict) -> None:
        os.write(self._fd, (json.dumps(record, sort_keys=True) + "\n").encode())

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        if self._lock is not None:
            self._lock.__exit__(None, None, None)
        self._fd = self._lock = None


def _record(image_id: str, url: str, outcome: Outcome) -> dict:
    return {"id": image_id, "url": url, **vars(outcome)}  # vars: asdict's deep copy is slow per row


# ----------------------------------------------------------------------------- the stage


class PartDownloader:
    """Downloads the rows of one part file; see the module docstring."""

    def __init__(
        self, part_path: Path, images: Path, out: Path, settings: Settings, part_index: int, progress: bool = True
    ):
        self.part_path = part_path
        self.images = images
        self.out = out
        self.settings = settings
        self.part_index = part_index
        self.progress = progress
        self.rows = _read_part(part_path)
        self.outcomes: list[Outcome | None] = [None] * len(self.rows["id"])
        self.journal = Journal(out)
        # One temporary folder per job, inside the image tree so the final rename stays on one file
        # system; the other parts' jobs use their own, so each job may empty its own at start.
        token = hashlib.sha1(str(out.resolve()).encode()).hexdigest()[:12]
        self.tmp_dir = images / ".tmp" / f"part-{part_index:03d}-{token}"
        self._images_str, self._tmp_str = str(images), str(self.tmp_dir)  # plain strings: pathlib is slow per image
        self._made_dirs: set[str] = set()
        self._ok = self._failed = 0  # for the progress bar
        self._bar = None
        self._postfix_at = 0.0

    # -- before the network

    def _prefill(self, retry_failed: bool, fresh: bool) -> list[int]:
        """Fill in the rows that need no request (bad rows, journaled rows); return the rest."""
        settings = self.settings.outcome_settings()
        old_settings, records = (None, {}) if fresh else self.journal.load()
        same_settings = old_settings == settings
        if records and not same_settings:
            log.info(
                "download settings changed since %s was written: its failed rows will be retried", self.journal.path
            )
        kept, pending, reused_ok, reused_failed = [], [], 0, 0
        for i, (image_id, url) in enumerate(zip(self.rows["id"], self.rows["url"])):
            id_problem = check_image_id(image_id)
            problem = ("bad_id", f"id {image_id!r}: {id_problem}") if id_problem else check_url(url)
            if problem:
                self.outcomes[i] = Outcome(status=problem[0], reason=problem[1])
                continue
            record = records.get(image_id)
            if record is not None and record.get("url") == url and self._reusable(record, same_settings, retry_failed):
                kept.append(record)
                self.outcomes[i] = Outcome(**{f.name: record.get(f.name) for f in dataclasses.fields(Outcome)})
                if record["status"] == OK:
                    reused_ok += 1
                else:
                    reused_failed += 1
                continue
            pending.append(i)
        self.journal.start(settings, kept)
        if kept:
            log.info(
                "resuming from %s: %d done before (%d ok, %d failed), %d to fetch",
                self.journal.path,
                len(kept),
                reused_ok,
                reused_failed,
                len(pending),
            )
        return pending

    def _reusable(self, record: dict, same_settings: bool, retry_failed: bool) -> bool:
        s = self.settings
        if record.get("status") != OK:
            return same_settings and not retry_failed
        if record["bytes"] > s.max_bytes or record["width"] * record["height"] > s.max_pixels:
            return False  # limits were tightened since: fetch again to get the right failure
        try:
            return (self.images / record["path"]).stat().st_size == record["bytes"]
        except (OSError, TypeError):
            return False  # the file was deleted or replaced: fetch it again

    # -- the network

    async def _run(self, pending: list[int]) -> None:
        s = self.settings
        timeout = aiohttp.ClientTimeout(
            total=s.total_timeout_s, sock_connect=s.connect_timeout_s, sock_read=s.read_timeout_s
        )
        connector = aiohttp.TCPConnector(limit=s.concurrency, limit_per_host=s.per_host, ttl_dns_cache=300)
        headers = {"User-Agent": s.user_agent, "Accept": ACCEPT, "Accept-Encoding": "identity"}
        jobs = (Job(i, self.rows["id"][i], self.rows["url"][i], _host_of(self.rows["url"][i])) for i in pending)
        scheduler = HostScheduler(jobs, s.per_host, lookahead=max(1000, 20 * s.concurrency))
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(max_workers=s.threads, thread_name_prefix="decode") as pool:
            async with aiohttp.ClientSession(
                connector=connector,
                timeout=timeout,
                headers=headers,
                auto_decompress=True,
                trust_env=_proxy_configured(),
            ) as session:
                fetcher = Fetcher(session, s)
                async with asyncio.TaskGroup() as group:
                    for _ in range(min(s.concurrency, max(1, len(pending)))):
                        group.create_task(self._worker(scheduler, fetcher, pool, loop))

    async def _worker(self, scheduler: HostScheduler, fetcher: Fetcher, pool, loop) -> None:
        s = self.settings
        while (job := await scheduler.next_job()) is not None:
            if not job.attempts:
                job.started = time.monotonic()
            attempt = await fetcher.fetch(job.url)
            job.attempts += 1
            if attempt.body is None:
                retry_after = attempt.retry_after_s
                if retry_after is not None and retry_after > s.max_retry_after_s:
                    attempt.reason += (
                        f"; Retry-After {retry_after:g} s is longer than max_retry_after_s {s.max_retry_after_s:g}"
                    )
                elif attempt.transient and job.attempts <= s.retries:
                    now = time.monotonic()
                    scheduler.finished(
                        job,
                        retry_at=now + backoff_delay(job.attempts, s.backoff_s, retry_after),
                        pause_host_until=now + retry_after if retry_after is not None else None,
                    )
                    continue
                scheduler.finished(job)
                if job.attempts > 1:
                    attempt.reason += f" (after {job.attempts} attempts)"
                outcome = Outcome(attempt.status, attempt.reason, attempt.http_status)
            else:
                scheduler.finished(job)
                outcome = await loop.run_in_executor(pool, self._store, job, attempt)
            outcome.attempts = job.attempts
            outcome.elapsed_s = round(time.monotonic() - job.started, 4)
            self._finish(job, outcome)

    def _store(self, job: Job, attempt: Attempt) -> Outcome:
        """Check the body and, if it is a good image, put it in place (runs in a worker thread)."""
        s = self.settings
        body = attempt.body
        check = inspect_image(body, s.max_pixels, s.max_pixels_per_byte, attempt.content_type)
        outcome = Outcome(
            check.status,
            check.reason,
            attempt.http_status,
            bytes=len(body),
            width=check.width,
            height=check.height,
            format=check.format,
        )
        if check.status != OK:
            return outcome
        relpath = image_relpath(job.image_id, check.extension).as_posix()
        final = os.path.join(self._images_str, relpath)
        folder = os.path.dirname(final)
        try:
            if folder not in self._made_dirs:
                os.makedirs(folder, exist_ok=True)
                self._made_dirs.add(folder)
            place_file(body, os.path.join(self._tmp_str, os.path.basename(final)), final)
        except OSError as err:
            # A full disk or a read-only folder is the stage's problem, not the row's.
            raise StageError(f"cannot write {final}: {err}") from err
        outcome.sha256 = hashlib.sha256(body).hexdigest()
        outcome.path = relpath
        return outcome

    def _finish(self, job: Job, outcome: Outcome) -> None:
        self.outcomes[job.index] = outcome
        self.journal.append(_record(job.image_id, job.url, outcome))
        if outcome.status == OK:
            self._ok += 1
        else:
            self._failed += 1
        if self._bar is not None:
            self._bar.update(1)
            now = time.monotonic()
            if now - self._postfix_at > 1.0:
                self._postfix_at = now
                self._bar.set_postfix(self._postfix(), refresh=False)

    def _postfix(self) -> dict:
        return {"ok": self._ok, "failed": self._failed}

    # -- the whole part

    def run(self, retry_failed: bool = False, fresh: bool = False) -> dict:
        self.settings.check()
        self.journal.lock()
        try:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)  # leftovers of a killed run of this job
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
            pending = self._prefill(retry_failed, fresh)
            n = len(self.outcomes)
            done = [o for o in self.outcomes if o is not None]
            self._ok = sum(o.status == OK for o in done)
            self._failed = len(done) - self._ok
            started = time.monotonic()
            if pending:
                interactive = sys.stderr.isatty()
                self._bar = tqdm(
                    total=n,
                    initial=n - len(pending),
                    unit="img",
                    desc=f"part {self.part_index:03d}",
                    disable=not self.progress,
                    mininterval=0.5 if interactive else PROGRESS_LOG_EVERY_S,
                    dynamic_ncols=True,
                    file=sys.stderr,
                )
                self._bar.set_postfix(self._postfix(), refresh=False)
                try:
                    asyncio.run(self._run(pending))
                except* StageError as group:
                    raise group.exceptions[0] from None
                finally:
                    self._bar.set_postfix(self._postfix(), refresh=False)
                    self._bar.close()
            elapsed = time.monotonic() - started
            self._remove_images_of_failed_rows()
            counts = self._write_manifest()
            rate = len(pending) / elapsed if pending and elapsed > 0 else 0.0
            log.info(
                "part %03d: %d rows, %d fetched this run in %.1f s (%.1f rows/s)",
                self.part_index,
                n,
                len(pending),
                elapsed,
                rate,
            )
            return counts
        finally:
            self.journal.close()
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
            with contextlib.suppress(OSError):  # images/.tmp itself, once no other part's job uses it
                self.tmp_dir.parent.rmdir()

    def _remove_images_of_failed_rows(self) -> None:
        """The image folder holds exactly the ok rows: a row that failed this time (a rerun with
        --fresh or a smaller max_bytes, a URL that now answers 404, a retry after a kill between the
        rename and the journal write) loses the file an earlier run stored for it."""
        removed, extensions = 0, set(IMAGE_FORMATS.values())
        for image_id, outcome in zip(self.rows["id"], self.outcomes):
            if outcome.status == OK or check_image_id(image_id):
                continue  # ok, or an unsafe id that never had a file
            for extension in extensions:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self._images_str, image_relpath(image_id, extension)))
                    removed += 1
        if removed:
            log.info(
                "part %03d: removed %d image(s) stored by an earlier run for rows that failed now",
                self.part_index,
                removed,
            )

    def _write_manifest(self) -> dict:
        rows, outcomes = self.rows, self.outcomes
        assert all(o is not None for o in outcomes), "every row has an outcome"
        columns = {name: rows[name] for name in ("id", "url", "landmark_id", "split")}
        for field in dataclasses.fields(Outcome):
            columns[field.name] = [getattr(o, field.name) for o in outcomes]
        columns["part"] = [self.part_index] * len(outcomes)
        columns["row"] = rows["row"]
        write_table(pa.table(columns, schema=MANIFEST_SCHEMA), self.out)
        by_status = Counter(o.status for o in outcomes)
        counts = {
            "part": self.part_index,
            "rows": len(outcomes),
            "ok": by_status.get(OK, 0),
            "failed": len(outcomes) - by_status.get(OK, 0),
            "by_status": dict(sorted(by_status.items())),
        }
        assert sum(by_status.values()) == len(rows["id"])
        write_json_atomic(counts_path(self.out), counts)
        summary = ", ".join(f"{status} {count}" for status, count in counts["by_status"].items())
        log.info("part %03d: %d rows = %s", self.part_index, len(outcomes), summary or "none")
        return counts


def place_file(data: bytes, tmp: str | Path, final: str | Path) -> None:
    """Write `data` to `tmp`, then rename it to `final`: readers see all of it or nothing."""
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, final)


def _proxy_configured() -> bool:
    """Use HTTP(S)_PROXY when set (clusters behind a proxy); aiohttp's trust_env also reads ~/.netrc
    on every request, which costs more CPU than the rest of the request, so only when needed."""
    return any(name.lower() in ("http_proxy", "https_proxy", "all_proxy") for name in os.environ)


def counts_path(out: Path) -> Path:
    """`manifest.parquet` -> `manifest.counts.json`."""
    return out.with_name(out.stem + ".counts.json")


def _host_of(url: str) -> str:
    try:
        parsed = yarl.URL(url.strip())
        return f"{parsed.host}:{parsed.port}"
    except (ValueError, TypeError):  # cannot happen after check_url, but never fail over a host name
        return ""


def _read_part(path: Path) -> dict[str, list]:
    """The part file's columns as Python lists (landmark_id, split and row may be absent)."""
    if not path.exists():
        raise StageError(f"{path}: file not found")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise StageError(f"{path}: not a readable Parquet table ({err})") from err
    missing = [c for c in ("id", "url") if c not in table.column_names]
    if missing:
        raise StageError(f"{path}: missing column(s) {', '.join(missing)} (is it a split part file?)")
    n = table.num_rows
    rows = {
        "id": table.column("id").cast(pa.string()).to_pylist(),
        "url": table.column("url").cast(pa.string()).to_pylist(),
        "landmark_id": table.column("landmark_id").cast(pa.int64()).to_pylist()
        if "landmark_id" in table.column_names
        else [None] * n,
        "split": table.column("split").cast(pa.string()).to_pylist() if "split" in table.column_names else [None] * n,
        "row": table.column("row").cast(pa.int64()).to_pylist()
        if "row" in table.column_names
        else list(range(1, n + 1)),
    }
    rows["id"] = ["" if v is None else v for v in rows["id"]]
    rows["url"] = ["" if v is None else v for v in rows["url"]]
    seen: dict[str, int] = {}
    for i, image_id in enumerate(rows["id"]):
        if image_id and seen.setdefault(image_id, i) != i:
            raise StageError(
                f"{path}: duplicate id {image_id!r} at rows {rows['row'][seen[image_id]]} and {rows['row'][i]}"
            )
    return rows


def part_index_from_name(path: Path) -> int:
    match = re.search(r"part-(\d+)", path.name)
    return int(match.group(1)) if match else 0


# ----------------------------------------------------------------------------- CLI

_FLAGS = {  # CLI flag -> (Settings field, type, help)
    "--concurrency": ("concurrency", int, "requests in flight"),
    "--per-host": ("per_host", int, "requests in flight to one host"),
    "--connect-timeout": ("connect_timeout_s", float, "seconds to open a connection"),
    "--read-timeout": ("read_timeout_s", float, "seconds the server may stay silent while answering"),
    "--total-timeout": ("total_timeout_s", float, "seconds for one whole attempt (headers and body)"),
    "--retries": ("retries", int, "extra attempts after a transient failure (5xx, 429, timeout, reset)"),
    "--backoff": ("backoff_s", float, "first retry delay in seconds; doubles each retry, with jitter"),
    "--max-retry-after": ("max_retry_after_s", float, "longest Retry-After honoured; a longer one fails the row"),
    "--max-bytes": ("max_bytes", int, "largest body accepted, after decompression"),
    "--max-redirects": ("max_redirects", int, "redirects followed"),
    "--max-pixels": ("max_pixels", int, "largest image (width x height) accepted"),
    "--max-pixels-per-byte": (
        "max_pixels_per_byte",
        float,
        f"decompression bomb: more pixels per file byte than this (images above {BOMB_MIN_PIXELS:,} pixels)",
    ),
    "--user-agent": ("user_agent", str, "User-Agent header; put your contact in it for large crawls"),
    "--threads": ("threads", int, "threads that decode, hash and write images"),
}


def load_settings(settings_json: str | None, overrides: dict) -> Settings:
    """Defaults <- the JSON object of --settings (config.yaml's download section) <- CLI flags."""
    values = {}
    if settings_json:
        try:
            values = json.loads(settings_json)
        except ValueError as err:
            raise StageError(f"--settings is not a JSON object ({err})") from err
        if not isinstance(values, dict):
            raise StageError("--settings must be a JSON object of download settings")
        from .config import section_settings

        section_settings("download", values, "--settings")  # types and ranges as config.yaml's; names the key
    # `mode` and `gldv2_*` belong to the same config section but steer the workflow, not this stage.
    values = {k: v for k, v in values.items() if k != "mode" and not k.startswith("gldv2_")}
    known = {f.name for f in dataclasses.fields(Settings)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise StageError(f"unknown download setting(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Settings(**values)


def main(argv: list[str] | None = None) -> int:
    defaults = Settings()
    parser = argparse.ArgumentParser(
        prog="python -m landmarks.download",
        description="Download one partition's image URLs into <images>/a/b/c/<id>.<ext> with a manifest row per "
        "URL (resumable: rerun the same command after a crash).",
    )
    parser.add_argument("--part", required=True, help="part file from the split stage (part-NNN.parquet)")
    parser.add_argument("--images", required=True, help="image root shared by all parts")
    parser.add_argument("--out", required=True, help="manifest Parquet to write; its journal and counts go beside it")
    parser.add_argument(
        "--part-index", type=int, default=None, help="part number for the manifest (default: from the part file name)"
    )
    parser.add_argument(
        "--settings", default=None, help="JSON object with config.yaml's download section (flags override it)"
    )
    for flag, (field, kind, text) in _FLAGS.items():
        parser.add_argument(
            flag, dest=field, type=kind, default=None, help=f"{text} (default {getattr(defaults, field)!r})"
        )
    parser.add_argument(
        "--retry-failed", action="store_true", help="on resume, retry the rows the journal lists as failed"
    )
    parser.add_argument("--fresh", action="store_true", help="ignore the journal: fetch every row again")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    settings = load_settings(args.settings, {field: getattr(args, field) for field, _, _ in _FLAGS.values()})
    part = Path(args.part)
    downloader = PartDownloader(
        part,
        Path(args.images),
        Path(args.out),
        settings,
        args.part_index if args.part_index is not None else part_index_from_name(part),
        progress=not args.no_progress,
    )
    downloader.run(retry_failed=args.retry_failed, fresh=args.fresh)
    return 0


if __name__ == "__main__":
    run_cli(main)
