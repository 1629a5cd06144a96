"""Google Landmarks v2 mode: fetch the official tar shards instead of one URL per image.

Two steps, so each can run as its own Snakemake job:

    # job k of P: the k-th, (k+P)-th, ... shard of the list -> images in the shared tree + an index per shard
    python -m landmarks.gldv2 fetch --jobs P --job k --settings '{"gldv2_shards": "0-499"}' \
        --images results/download/images --index-dir results/download/gldv2

    # per split part (after all fetch jobs): the same manifest as the URL download stage
    python -m landmarks.gldv2 manifest --part results/split/part-000.parquet \
        --index-dir results/download/gldv2 --out results/download/part-000/manifest.parquet

`fetch` takes config.yaml's download section as `--settings`. It downloads `images_NNN.tar` and
`md5.images_NNN.txt` (URL templates gldv2_tar_url / gldv2_md5_url, the official train ones by default),
resumes a cut download with an HTTP Range request, checks the md5 and downloads again on a mismatch (up
to `retries` times), then extracts every `<id>.jpg` member to
`<images>/a/b/c/<id>.<ext>` (atomic, the member's own folder names are ignored, non-files are
skipped), checking each image with the same decoder checks as the URL stage. A shard is done when
its index `images_NNN.parquet` exists, so a rerun skips finished shards. Shards that still fail
are listed at the end and the job exits non-zero.

`manifest` gives one row per part row: the shard's facts for ids found in a shard, status
`not_in_shards` for the others. Same columns as landmarks.download (url = the CSV's url).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import os
import re
import shutil
import tarfile
import time
from pathlib import Path

import aiohttp
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .common import StageError, check_image_id, image_relpath, run_cli, setup_logging, write_table
from .config import add_settings_argument, parse_settings
from .download import ACCEPT, DEFAULT_USER_AGENT, Settings, inspect_image, load_settings, place_file, write_manifest
from .tables import GLDV2_INDEX_SCHEMA, MANIFEST_SCHEMA, OK, part_index_from_name, read_part

log = logging.getLogger("landmarks.gldv2")

TAR_URL = "https://s3.amazonaws.com/google-landmark/train/images_{shard:03d}.tar"
MD5_URL = "https://s3.amazonaws.com/google-landmark/md5sum/train/md5.images_{shard:03d}.txt"
CHUNK = 1 << 20


class ShardError(Exception):
    """One shard could not be fetched or verified (the other shards go on)."""


def parse_shards(spec: str) -> list[int]:
    """'0-499' or '0,3,7-9' -> shard numbers."""
    shards = []
    for piece in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", piece)
        if not match:
            raise StageError(f"--shards: cannot read {piece!r} (use e.g. 0-499 or 0,5,10-19)")
        first, last = int(match.group(1)), int(match.group(2) or match.group(1))
        shards.extend(range(first, last + 1))
    return sorted(set(shards))


def shards_for_job(spec: str, jobs: int, job: int) -> list[int]:
    """The shards fetch job `job` of `jobs` takes (the Snakefile uses it to declare the job's outputs)."""
    return parse_shards(spec)[job::jobs]


def index_name(shard: int) -> str:
    return f"images_{shard:03d}.parquet"


def work_dir(images: Path, index_dir: Path, shards: list[int]) -> Path:
    """A fetch job's own temporary folder (partial tars, images being written), inside the image tree
    so renames stay on one file system, and distinct for every job so none removes another's."""
    token = hashlib.sha1(f"{index_dir.resolve()}|{shards}".encode()).hexdigest()[:12]
    return images / ".tmp" / f"gldv2-{token}"


def read_md5(text: str) -> str:
    match = re.search(r"\b([0-9a-fA-F]{32})\b", text)
    if not match:
        raise ShardError(f"no md5 checksum in {text[:80]!r}")
    return match.group(1).lower()


async def _get_text(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(url) as response:
        if response.status != 200:
            raise ShardError(f"{url}: HTTP {response.status}")
        return await response.text()


async def _download(session: aiohttp.ClientSession, url: str, target: Path) -> str:
    """Download `url` into `target`, continuing a partial file with a Range request; return its md5."""
    digest = hashlib.md5()
    have = target.stat().st_size if target.exists() else 0
    if have:
        with open(target, "rb") as fh:
            while block := fh.read(CHUNK):
                digest.update(block)
    headers = {"Range": f"bytes={have}-"} if have else {}
    async with session.get(url, headers=headers) as response:
        if response.status == 416 and have:  # we already have all of it
            return digest.hexdigest()
        if response.status == 200 and have:  # the server ignored the range: start over
            log.info("%s: server does not resume, downloading from the start", url)
            digest, have = hashlib.md5(), 0
        elif response.status not in (200, 206):
            raise ShardError(f"{url}: HTTP {response.status}")
        with open(target, "ab" if have else "wb") as fh:
            async for block in response.content.iter_chunked(CHUNK):
                fh.write(block)
                digest.update(block)
    return digest.hexdigest()


async def fetch_tar(session, shard: int, tar_url: str, md5_url: str, work: Path, settings: Settings) -> Path:
    """The verified tar of `shard` in `work`, fetched with retries on errors and md5 mismatches."""
    url, target = tar_url.format(shard=shard), work / f"images_{shard:03d}.tar.part"
    problem = "not tried"
    for attempt in range(1, settings.retries + 2):
        try:
            expected = read_md5(await _get_text(session, md5_url.format(shard=shard)))
            actual = await _download(session, url, target)
            if actual == expected:
                return target
            problem = f"md5 {actual} does not match the published {expected}"
            target.unlink(missing_ok=True)  # a bad copy cannot be resumed
        except (aiohttp.ClientError, TimeoutError, ShardError) as err:
            problem = f"{type(err).__name__}: {err}"
        log.warning("shard %03d, attempt %d: %s", shard, attempt, problem)
        if attempt <= settings.retries:
            await asyncio.sleep(settings.backoff_s * 2 ** (attempt - 1))
    raise ShardError(f"shard {shard:03d} ({url}): {problem} after {settings.retries + 1} attempts")


def extract(tar_path: Path, shard: int, images: Path, work: Path, settings: Settings) -> pa.Table:
    """Put the shard's images in place (atomically) and describe each one."""
    rows = {name: [] for name in GLDV2_INDEX_SCHEMA.names}
    skipped = 0
    with tarfile.open(tar_path, "r|*") as tar:  # streaming: one pass over the file
        for member in tar:
            name = os.path.basename(member.name)
            image_id, ext = os.path.splitext(name)
            if not member.isfile() or ext.lower() not in (".jpg", ".jpeg") or check_image_id(image_id):
                skipped += 1
                continue
            data = tar.extractfile(member).read()
            check = inspect_image(data, settings.max_pixels, settings.max_pixels_per_byte)
            path = sha = None
            if check.status == OK:
                relpath = image_relpath(image_id, check.extension)
                final = images / relpath
                final.parent.mkdir(parents=True, exist_ok=True)
                try:
                    place_file(data, work / final.name, final)
                except OSError as err:
                    raise StageError(f"cannot write {final}: {err}") from err
                path, sha = relpath.as_posix(), hashlib.sha256(data).hexdigest()
            for key, value in (
                ("id", image_id),
                ("status", check.status),
                ("reason", check.reason),
                ("bytes", len(data)),
                ("width", check.width),
                ("height", check.height),
                ("format", check.format),
                ("sha256", sha),
                ("path", path),
                ("shard", shard),
            ):
                rows[key].append(value)
    if skipped:
        log.info("shard %03d: skipped %d members that are not <id>.jpg files", shard, skipped)
    return pa.table(rows, schema=GLDV2_INDEX_SCHEMA)


async def fetch_shards(
    shards: list[int],
    images: Path,
    index_dir: Path,
    settings: Settings,
    tar_url: str = TAR_URL,
    md5_url: str = MD5_URL,
    keep_tars: bool = False,
) -> None:
    index_dir.mkdir(parents=True, exist_ok=True)
    work = work_dir(images, index_dir, shards)
    work.mkdir(parents=True, exist_ok=True)
    timeout = aiohttp.ClientTimeout(
        total=None, sock_connect=settings.connect_timeout_s, sock_read=settings.read_timeout_s
    )
    failed = []
    headers = {"User-Agent": settings.user_agent or DEFAULT_USER_AGENT, "Accept": ACCEPT}
    async with aiohttp.ClientSession(timeout=timeout, headers=headers) as session:
        for shard in shards:
            index_path = index_dir / index_name(shard)
            if index_path.exists():
                log.info("shard %03d: done before (%s)", shard, index_path)
                continue
            started = time.monotonic()
            try:
                tar_path = await fetch_tar(session, shard, tar_url, md5_url, work, settings)
            except ShardError as err:
                log.error("%s", err)
                failed.append(str(err))
                continue
            table = await asyncio.to_thread(extract, tar_path, shard, images, work, settings)
            write_table(table, index_path)
            if keep_tars:
                os.replace(tar_path, index_dir / f"images_{shard:03d}.tar")
            else:
                tar_path.unlink()
            ok = sum(s == OK for s in table.column("status").to_pylist())
            log.info("shard %03d: %d images, %d ok, in %.0f s", shard, table.num_rows, ok, time.monotonic() - started)
    if failed:
        raise StageError(f"{len(failed)} shard(s) failed (rerun to retry them):\n  " + "\n  ".join(failed))
    shutil.rmtree(work, ignore_errors=True)


def build_manifest(part_path: Path, index_dir: Path, out: Path, part_index: int) -> dict:
    """The URL stage's manifest for one part, from the shard indexes."""
    rows = read_part(part_path)
    index_files = sorted(index_dir.glob("images_*.parquet"))
    if not index_files:
        raise StageError(
            f"{index_dir}: no shard index (images_NNN.parquet); run `python -m landmarks.gldv2 fetch` first"
        )
    wanted = set(rows["id"])
    found: dict[str, dict] = {}
    for path in index_files:
        table = pq.read_table(path)
        for record in table.filter(pc.is_in(table.column("id"), pa.array(list(wanted)))).to_pylist():
            found[record["id"]] = record
    columns = {name: [] for name in MANIFEST_SCHEMA.names}
    for i, image_id in enumerate(rows["id"]):
        record = found.get(image_id)
        if record is None:
            record = {
                "status": "not_in_shards",
                "reason": f"id not found in the {len(index_files)} GLDv2 shards fetched",
            }
        values = {
            "id": image_id,
            "url": rows["url"][i],
            "landmark_id": rows["landmark_id"][i],
            "split": rows["split"][i],
            "status": record["status"],
            "reason": record.get("reason") or "",
            "http_status": None,
            "attempts": 1 if "shard" in record else 0,
            "bytes": record.get("bytes"),
            "width": record.get("width"),
            "height": record.get("height"),
            "format": record.get("format"),
            "sha256": record.get("sha256"),
            "elapsed_s": 0.0,
            "path": record.get("path"),
            "part": part_index,
            "row": rows["row"][i],
        }
        for name in MANIFEST_SCHEMA.names:
            columns[name].append(values[name])
    return write_manifest(columns, out, part_index)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m landmarks.gldv2", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("fetch", help="download, verify and extract this job's tar shards")
    fetch.add_argument("--jobs", type=int, default=1, help="fetch jobs in all (P)")
    fetch.add_argument("--job", type=int, default=0, help="this job's number k: it takes the k-th, (k+P)-th, ... shard")
    fetch.add_argument("--images", required=True, help="image root shared with the other jobs")
    fetch.add_argument("--index-dir", required=True, help="folder for the per-shard indexes images_NNN.parquet")
    # gldv2_shards, gldv2_tar_url, gldv2_md5_url: which shards, from where; timeouts, retries, ...
    add_settings_argument(fetch, "download")
    fetch.add_argument("--keep-tars", action="store_true", help="keep the verified tars in --index-dir")
    manifest = commands.add_parser("manifest", help="one part's manifest from the shard indexes")
    manifest.add_argument("--part", required=True, help="part file from the split stage")
    manifest.add_argument("--index-dir", required=True, help="folder the fetch jobs wrote their indexes to")
    manifest.add_argument("--out", required=True, help="manifest Parquet to write (counts JSON beside it)")
    manifest.add_argument("--part-index", type=int, default=None, help="default: from the part file name")
    for sub in (fetch, manifest):
        sub.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    if args.command == "fetch":
        if not 0 <= args.job < args.jobs:
            raise StageError(f"--job must be between 0 and --jobs - 1 (got {args.job} of {args.jobs})")
        download = parse_settings(args.settings, "download")
        settings = load_settings(args.settings, {})
        shards = shards_for_job(download["gldv2_shards"], args.jobs, args.job)
        asyncio.run(
            fetch_shards(
                shards,
                Path(args.images),
                Path(args.index_dir),
                settings,
                download["gldv2_tar_url"],
                download["gldv2_md5_url"],
                args.keep_tars,
            )
        )
    else:
        part = Path(args.part)
        build_manifest(
            part,
            Path(args.index_dir),
            Path(args.out),
            args.part_index if args.part_index is not None else part_index_from_name(part),
        )
    return 0


if __name__ == "__main__":
    run_cli(main)
