"""A fault-injecting HTTP server on 127.0.0.1 for the download tests.

It speaks raw HTTP/1.1 over asyncio streams (one request per connection), so every fault is
exactly the bytes we choose: cut bodies, dropped connections, silence. It runs in a background
thread with its own event loop; `with FaultServer() as server:` starts and stops it.

Routes (`server.url(path)`):
    /img/<name>                   a file added with `add(name, data)`
    /status/<code>                that HTTP status with a short text body
    /flaky/<n>/<name>             503 for the first n requests of this path, then the file
    /ratelimit/<s>/<name>         429 with `Retry-After: s` on the first request, then the file
    /slow/<s>/<name>              headers only after s seconds (past the read timeout)
    /drip/<name>                  headers at once, then one byte every 0.2 s (past the total timeout)
    /loop                         302 to itself (redirect loop)
    /redirect/<n>/<name>          a chain of n redirects, then the file
    /redirect-scheme              302 to file:///etc/passwd
    /cut/<name>                   full Content-Length, half the body, connection closed
    /reset                        connection closed without an answer
    /html                         200 text/html page
    /gzip-bomb/<mb>               Content-Encoding: gzip body that inflates to <mb> MB of zeros
    /huge/<bytes>                 a body of that many bytes with Content-Length
    /huge-stream/<bytes>          the same without Content-Length (ends when the connection closes)
    /empty                        200 with an empty body
    /corrupt-once/<name>          the file with its bytes damaged on the first request, intact after
`/img/` honours `Range: bytes=N-` (206); `ranges[path]` lists the ranges asked for.
Every path may carry `?delay=<s>`: wait that long before answering (slows a run down for the
kill-and-resume test). `hits[path]` counts requests, `times[path]` lists their arrival times.
"""

from __future__ import annotations

import asyncio
import gzip
import threading
import time
import urllib.parse
from collections import Counter, defaultdict

MAX_SLEEP_S = 10.0  # no route keeps a connection longer than this, whatever the test asks


class FaultServer:
    def __init__(self) -> None:
        self.files: dict[str, tuple[bytes, str]] = {}
        self.hits: Counter[str] = Counter()
        self.times: dict[str, list[float]] = defaultdict(list)
        self.ranges: dict[str, list[str]] = defaultdict(list)
        self._gzip_cache: dict[int, bytes] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None
        self.port: int | None = None

    # -- setup

    def add(self, name: str, data: bytes, content_type: str = "image/jpeg") -> str:
        """Serve `data` at /img/<name>; returns the name."""
        self.files[name] = (data, content_type)
        return name

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def __enter__(self) -> FaultServer:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready,), daemon=True, name="faultserver")
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fault server did not start")
        return self

    def __exit__(self, *exc) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(timeout=15)

    def _serve(self, ready: threading.Event) -> None:
        async def run() -> None:
            self._loop = asyncio.get_running_loop()
            self._stopping = asyncio.Event()
            server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            self.port = server.sockets[0].getsockname()[1]
            ready.set()
            async with server:
                await self._stopping.wait()
                server.close()
                # Wake the handlers that are sleeping (slow, drip, delay) so they end now.
                for task in asyncio.all_tasks():
                    if task is not asyncio.current_task():
                        task.cancel()

        asyncio.run(run())

    # -- request handling

    async def _sleep(self, seconds: float) -> None:
        await asyncio.sleep(min(seconds, MAX_SLEEP_S))

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            target = request_line.split(" ")[1]
            headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines if h)}
            parsed = urllib.parse.urlsplit(target)
            path, query = parsed.path, urllib.parse.parse_qs(parsed.query)
            self.hits[path] += 1
            self.times[path].append(time.monotonic())
            if "delay" in query:
                await self._sleep(float(query["delay"][0]))
            await self._route(path, writer, headers)
        except (asyncio.CancelledError, ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            writer.close()

    @staticmethod
    def _send(
        writer,
        code: int,
        body: bytes = b"",
        content_type: str = "text/plain",
        headers: dict | None = None,
        length: int | None = None,
    ) -> None:
        lines = [
            f"HTTP/1.1 {code} {_REASONS.get(code, 'Status')}",
            f"Content-Type: {content_type}",
            "Connection: close",
        ]
        if length is not False:
            lines.append(f"Content-Length: {len(body) if length is None else length}")
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)

    def _file(self, name: str):
        return self.files.get(urllib.parse.unquote(name))

    async def _route(self, path: str, writer: asyncio.StreamWriter, headers: dict[str, str]) -> None:
        parts = path.strip("/").split("/")
        kind, args = parts[0], parts[1:]
        send = self._send

        if kind == "img" and self._file(args[0]):
            data, content_type = self._file(args[0])
            wanted = headers.get("range", "")
            if wanted.startswith("bytes=") and wanted.endswith("-"):
                self.ranges[path].append(wanted)
                start = int(wanted[6:-1])
                if start >= len(data):
                    send(writer, 416, b"")
                else:
                    send(
                        writer,
                        206,
                        data[start:],
                        content_type,
                        headers={"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"},
                    )
            else:
                send(writer, 200, data, content_type)
        elif kind == "corrupt-once":
            data, content_type = self._file(args[0])
            if self.hits[path] == 1:
                data = data[:100] + bytes(b ^ 0xFF for b in data[100:200]) + data[200:]
            send(writer, 200, data, content_type)
        elif kind == "status":
            code = int(args[0])
            send(writer, code, f"status {code}\n".encode())
        elif kind == "flaky":
            if self.hits[path] <= int(args[0]):
                send(writer, 503, b"busy, try again\n")
            else:
                send(writer, 200, *self._file(args[1]))
        elif kind == "ratelimit":
            if self.hits[path] == 1:
                send(writer, 429, b"slow down\n", headers={"Retry-After": args[0]})
            else:
                send(writer, 200, *self._file(args[1]))
        elif kind == "slow":
            await self._sleep(float(args[0]))
            send(writer, 200, *self._file(args[1]))
        elif kind == "drip":
            data, content_type = self._file(args[0])
            send(writer, 200, b"", content_type, length=len(data))
            for byte in data[:50]:  # bounded: at most 50 bytes, 10 s
                writer.write(bytes([byte]))
                await writer.drain()
                await self._sleep(0.2)
        elif kind == "loop":
            send(writer, 302, headers={"Location": "/loop"})
        elif kind == "redirect":
            n = int(args[0])
            location = f"/redirect/{n - 1}/{args[1]}" if n > 1 else f"/img/{args[1]}"
            send(writer, 302, headers={"Location": location})
        elif kind == "redirect-scheme":
            send(writer, 302, headers={"Location": "file:///etc/passwd"})
        elif kind == "cut":
            data, content_type = self._file(args[0])
            send(writer, 200, data[: len(data) // 2], content_type, length=len(data))
            await writer.drain()
        elif kind == "reset":
            pass  # close without a word
        elif kind == "html":
            page = b"<!DOCTYPE html><html><head><title>Photo removed</title></head><body>Gone.</body></html>"
            send(writer, 200, page, "text/html; charset=utf-8")
        elif kind == "gzip-bomb":
            megabytes = int(args[0])
            if megabytes not in self._gzip_cache:
                self._gzip_cache[megabytes] = gzip.compress(bytes(megabytes << 20), compresslevel=9)
            send(writer, 200, self._gzip_cache[megabytes], "image/jpeg", headers={"Content-Encoding": "gzip"})
        elif kind == "huge":
            send(writer, 200, b"\xff\xd8\xff" + bytes(int(args[0]) - 3), "image/jpeg")
        elif kind == "huge-stream":
            send(writer, 200, b"\xff\xd8\xff" + bytes(int(args[0]) - 3), "image/jpeg", length=False)
        elif kind == "empty":
            send(writer, 200, b"", "image/jpeg")
        else:
            send(writer, 404, b"not found\n")
        await writer.drain()


_REASONS = {
    200: "OK",
    206: "Partial Content",
    416: "Range Not Satisfiable",
    302: "Found",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    410: "Gone",
    429: "Too Many Requests",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
}
