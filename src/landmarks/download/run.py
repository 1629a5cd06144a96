"""Downloading one part file: the rows in, the images in place, the manifest out (see the package docstring)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp
from tqdm import tqdm

from ..common import StageError, check_image_id, image_relpath
from ..images import IMAGE_FORMATS
from ..tables import OK, read_part
from .checks import check_url, inspect_image
from .http import ACCEPT, Attempt, Fetcher, HostScheduler, Job, backoff_delay, host_of, proxy_configured
from .journal import Journal, journal_record
from .manifest import Outcome, write_manifest
from .settings import Settings

log = logging.getLogger("landmarks.download")

PROGRESS_LOG_EVERY_S = 30.0


class PartDownloader:
    """Downloads the rows of one part file; see the package docstring (landmarks.download)."""

    def __init__(
        self, part_path: Path, images: Path, out: Path, settings: Settings, part_index: int, progress: bool = True
    ):
        self.part_path = part_path
        self.images = images
        self.out = out
        self.settings = settings
        self.part_index = part_index
        self.progress = progress
        self.rows = read_part(part_path)
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
        jobs = (Job(i, self.rows["id"][i], self.rows["url"][i], host_of(self.rows["url"][i])) for i in pending)
        scheduler = HostScheduler(jobs, s.per_host, lookahead=max(1000, 20 * s.concurrency))
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(max_workers=s.threads, thread_name_prefix="decode") as pool:
            async with aiohttp.ClientSession(
                connector=connector,
                timeout=timeout,
                headers=headers,
                auto_decompress=True,
                trust_env=proxy_configured(),
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
        self.journal.append(journal_record(job.image_id, job.url, outcome))
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
        return write_manifest(columns, self.out, self.part_index)


def place_file(data: bytes, tmp: str | Path, final: str | Path) -> None:
    """Write `data` to `tmp`, then rename it to `final`: readers see all of it or nothing."""
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, final)
