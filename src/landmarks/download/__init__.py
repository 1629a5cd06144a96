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

Modules: `settings` (the config section), `checks` (URL and image checks), `http` (single attempts,
the host scheduler, backoff), `journal` (resume), `manifest` (the output table and its counts),
`run` (PartDownloader: one part from start to end), `cli` (`python -m landmarks.download`). The
names below are the package's public API; `gldv2` and `predict` use them.
"""

from .checks import BOMB_MIN_PIXELS, ImageCheck, check_jpeg_data, check_url, inspect_image
from .cli import main
from .http import ACCEPT, MAX_BACKOFF_S, Attempt, Fetcher, HostScheduler, Job, backoff_delay, parse_retry_after
from .journal import Journal
from .manifest import Outcome, counts_path, write_manifest
from .run import PartDownloader, place_file
from .settings import DEFAULT_USER_AGENT, Settings, load_settings

__all__ = [
    "ACCEPT",
    "BOMB_MIN_PIXELS",
    "DEFAULT_USER_AGENT",
    "MAX_BACKOFF_S",
    "Attempt",
    "Fetcher",
    "HostScheduler",
    "ImageCheck",
    "Job",
    "Journal",
    "Outcome",
    "PartDownloader",
    "Settings",
    "backoff_delay",
    "check_jpeg_data",
    "check_url",
    "counts_path",
    "inspect_image",
    "load_settings",
    "main",
    "parse_retry_after",
    "place_file",
    "write_manifest",
]
