"""The network half of the download stage: single HTTP attempts, and the scheduler that spreads them over hosts.

One asyncio event loop with aiohttp: `concurrency` requests in flight, at most `per_host` per host.
Jobs whose host is full wait in that host's queue while other hosts proceed, so one slow or
rate-limiting host never stalls the rest. Timeouts: connect, read (per socket read) and total (per
attempt); redirects and body bytes are capped. Transient failures (5xx except 501/505, 408, 429,
connection resets/refusals, timeouts, a body cut short) are worth a retry (`backoff_delay`); a
`Retry-After` on 429/503 pauses the whole host that long.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import os
import random
import re
import socket
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

import aiohttp
import yarl

from ..tables import OK
from .settings import Settings

log = logging.getLogger("landmarks.download")

# Prefer the original JPEG: CDNs that negotiate on Accept would otherwise send WebP or AVIF.
ACCEPT = "image/jpeg,image/png;q=0.9,image/*;q=0.8,*/*;q=0.5"
MAX_BACKOFF_S = 60.0


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


def host_of(url: str) -> str:
    try:
        parsed = yarl.URL(url.strip())
        return f"{parsed.host}:{parsed.port}"
    except (ValueError, TypeError):  # cannot happen after check_url, but never fail over a host name
        return ""


def proxy_configured() -> bool:
    """Use HTTP(S)_PROXY when set (clusters behind a proxy); aiohttp's trust_env also reads ~/.netrc
    on every request, which costs more CPU than the rest of the request, so only when needed."""
    return any(name.lower() in ("http_proxy", "https_proxy", "all_proxy") for name in os.environ)
