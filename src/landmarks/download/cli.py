"""`python -m landmarks.download`: one part file in, its images and manifest out."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..common import setup_logging
from ..tables import part_index_from_name
from .checks import BOMB_MIN_PIXELS
from .run import PartDownloader
from .settings import Settings, load_settings

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
