"""The demo's fault-injecting HTTP server, and starting/stopping it as a child process.

It imports none of the drawing modules, so the Snakefile's onstart hook starts it without loading them.

URL scheme of the server (`serve`, `DemoServer`, `start_server_process`):

    /images/<file>             the photo
    /fault/not_found/<file>    404
    /fault/server_error/<file> 500, every time
    /fault/slow/<file>         answers only after `slow_seconds` (past any sensible client timeout)
    /fault/truncated/<file>    200 with the full Content-Length, half the body, connection closed
    /fault/html/<file>         200 text/html (a "photo removed" page instead of the image)
    /fault/corrupt/<file>      200 image/jpeg with intact headers but damaged, unterminated scan data
    /healthz                   "ok"
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

from ..common import StageError, write_json_atomic

log = logging.getLogger("landmarks.demo")  # the demo's one logger name, as before it became a package

FAULT_KINDS = ("not_found", "server_error", "slow", "truncated", "html", "corrupt")


def corrupt_jpeg(data: bytes) -> bytes:
    """Keep the JPEG headers (SOI, tables, SOF, SOS) but damage the scan and drop its end.

    `Image.open` succeeds (the header is fine), `Image.load` fails. Deterministic for given bytes.
    """
    sos = data.find(b"\xff\xda")
    if sos < 0:
        return data[: len(data) // 2]
    scan_start = sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")
    scan = data[scan_start:]
    keep = max(16, len(scan) * 2 // 5)
    noise = random.Random(zlib.crc32(data))
    # No 0xFF in the garbage, so it can never hold an end-of-image marker that would make the damaged
    # file decode "cleanly"; the invalid marker 0xFF02 right after the kept scan makes libjpeg fail.
    garbage = bytes(noise.randrange(255) for _ in range(min(4096, max(64, len(scan) // 10))))
    return data[:scan_start] + scan[:keep] + b"\xff\x02" + garbage


# ---------------------------------------------------------------------------------------------
# The fault-injecting HTTP server
# ---------------------------------------------------------------------------------------------

_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*\.(jpg|png)$")
CONTENT_TYPES = {"jpg": "image/jpeg", "png": "image/png"}
REMOVED_PAGE = (
    "<!DOCTYPE html>\n<html><head><title>Photo unavailable</title></head>\n"
    "<body><h1>This photo is no longer available</h1><p>It may have been removed by its owner.</p></body></html>\n"
)
# How long shutdown waits for in-flight requests; slow requests are woken at once anyway.
SHUTDOWN_GRACE_SECONDS = 2.0


def _build_app(root: Path, slow_seconds: float, stopping: asyncio.Event):
    from aiohttp import web

    images_dir = Path(root) / "images"

    def locate(name: str) -> tuple[Path, str]:
        """The photo's path and content type; names are plain file names, never paths."""
        match = _FILE_NAME.match(name)  # one dot, no slash: never leaves images/
        if not match:
            raise web.HTTPNotFound(text="not found\n")
        return images_dir / name, CONTENT_TYPES[match.group(1)]

    def read(path: Path) -> bytes:
        # Looked up per request: the server may start before `generate` has written the files.
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise web.HTTPNotFound(text="not found\n") from None

    async def photo(request: web.Request):
        path, content_type = locate(request.match_info["name"])
        return web.Response(body=read(path), content_type=content_type)

    async def fault(request: web.Request):
        kind = request.match_info["kind"]
        path, content_type = locate(request.match_info["name"])
        if kind == "not_found" or kind not in FAULT_KINDS:
            raise web.HTTPNotFound(text="not found\n")
        if kind == "server_error":
            raise web.HTTPInternalServerError(text="internal server error\n")
        if kind == "html":
            return web.Response(text=REMOVED_PAGE, content_type="text/html")
        data = read(path)
        if kind == "corrupt":
            return web.Response(body=corrupt_jpeg(data), content_type="image/jpeg")
        if kind == "slow":
            # Wait past the client's timeout, but wake at once when the server shuts down.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stopping.wait(), timeout=slow_seconds)
            if stopping.is_set():
                raise web.HTTPServiceUnavailable(text="shutting down\n")
            return web.Response(body=data, content_type=content_type)
        # truncated: promise the whole file, send half of it, then drop the connection.
        response = web.StreamResponse(headers={"Content-Type": content_type})
        response.content_length = len(data)
        response.force_close()
        await response.prepare(request)
        await response.write(data[: max(1, len(data) // 2)])
        if request.transport is not None:  # None when the client has already gone
            request.transport.close()  # flushes what was written, then closes
        return response

    async def healthz(request: web.Request):
        return web.Response(text="ok\n")

    app = web.Application()
    app.router.add_get("/images/{name}", photo)
    app.router.add_get("/fault/{kind}/{name}", fault)
    app.router.add_get("/healthz", healthz)
    return app


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, with a clear error when the port is taken."""
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as err:
        raise StageError(f"cannot resolve host {host!r}: {err}") from err
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart right after a stop
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise StageError(
                f"port {port} on {host} is already in use (is another demo server running?); "
                f"stop it or choose another port"
            ) from err
        raise StageError(f"cannot listen on {host}:{port}: {err}") from err
    sock.setblocking(False)
    return sock


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


async def _start(root, host: str, port: int, slow_seconds: float, stopping: asyncio.Event, access_log: bool):
    """Start serving; returns the runner (for cleanup) and the port actually bound."""
    from aiohttp import web

    if not _is_loopback(host):
        log.warning("serving the demo on non-loopback host %s: it is reachable from other machines", host)
    sock = _bind(host, port)
    app = _build_app(Path(root), slow_seconds, stopping)
    runner = web.AppRunner(app, access_log=log if access_log else None, shutdown_timeout=SHUTDOWN_GRACE_SECONDS)
    await runner.setup()
    site = web.SockSite(runner, sock)
    await site.start()
    return runner, sock.getsockname()[1]


class DemoServer:
    """The demo server in a background thread, for tests and notebooks.

    with DemoServer("data/demo", port=0, slow_seconds=2) as server:
        urllib.request.urlopen(server.base_url + "/healthz")
    """

    def __init__(
        self, root, host: str = "127.0.0.1", port: int = 0, slow_seconds: float = 600.0, access_log: bool = False
    ):
        self.root, self.host, self.port = Path(root), host, port
        self.slow_seconds, self.access_log = slow_seconds, access_log
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 10.0) -> DemoServer:
        self._thread = threading.Thread(target=self._run, name="demo-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError(f"demo server did not start within {timeout} s")
        if self._error is not None:
            raise self._error
        return self

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as err:  # reported to the starting thread
            self._error = err
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        runner, self.port = await _start(
            self.root, self.host, self.port, self.slow_seconds, self._stopping, self.access_log
        )
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            await runner.cleanup()

    def stop(self, timeout: float = 10.0) -> None:
        if self._loop is not None and self._stopping is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                self._loop.call_soon_threadsafe(self._stopping.set)
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError(f"demo server did not stop within {timeout} s")

    def __enter__(self) -> DemoServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def process_alive(pid: int) -> bool:
    """Whether process `pid` still runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (FileNotFoundError, IndexError):
        return not Path("/proc/self").exists()  # no procfs: trust kill()
    except OSError:
        return True


async def serve(
    root,
    host: str,
    port: int,
    *,
    parent_pid: int | None = None,
    ready_file=None,
    slow_seconds: float = 600.0,
    access_log: bool = True,
) -> None:
    """Serve until SIGTERM/SIGINT, or until process `parent_pid` is gone (checked every second)."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    runner, bound_port = await _start(root, host, port, slow_seconds, stopping, access_log)
    original_parent = os.getppid()
    try:
        if not Path(root, "images").is_dir():
            log.info("%s/images does not exist yet; photos are looked up per request", root)
        if ready_file:
            write_json_atomic(
                ready_file,
                {
                    "pid": os.getpid(),
                    "host": host,
                    "port": bound_port,
                    "base_url": f"http://{host}:{bound_port}",
                    "root": str(root),
                },
            )
        log.info("serving %s on http://%s:%d (pid %d)", root, host, bound_port, os.getpid())
        while not stopping.is_set():
            if parent_pid is not None:
                # Reparenting also means the parent died (its pid may be reused later).
                orphaned = parent_pid == original_parent and os.getppid() != original_parent
                if orphaned or not process_alive(parent_pid):
                    log.info("parent process %d is gone; stopping", parent_pid)
                    break
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stopping.wait(), timeout=1.0)
    finally:
        stopping.set()  # wakes slow requests
        await runner.cleanup()
        if ready_file:
            Path(ready_file).unlink(missing_ok=True)
        log.info("demo server stopped")


def start_server_process(
    root,
    host: str = "127.0.0.1",
    port: int = 8765,
    timeout: float = 30.0,
    *,
    log_path=None,
    slow_seconds: float | None = None,
) -> subprocess.Popen:
    """Start `python -m landmarks.demo serve` as a child of this process; return once it accepts
    connections. It exits by itself when this process dies. Raises StageError with its log if it fails."""
    tmp_dir = Path(tempfile.mkdtemp(prefix="landmarks-demo-server-"))
    ready_file = tmp_dir / "ready.json"
    log_file = Path(log_path) if log_path else tmp_dir / "server.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "landmarks.demo",
        "serve",
        "--root",
        str(root),
        "--host",
        host,
        "--port",
        str(port),
        "--parent-pid",
        str(os.getpid()),
        "--ready-file",
        str(ready_file),
    ]
    if slow_seconds is not None:
        command += ["--slow-seconds", str(slow_seconds)]
    with open(log_file, "ab") as log_fh:
        # The child imports this very package, installed or not (e.g. the Snakefile's src/ checkout).
        # parents[2]: the folder holding landmarks/ (this file is landmarks/demo/server.py).
        import_root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [import_root, os.environ.get("PYTHONPATH")]))}
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log_fh, stderr=log_fh, env=env)
    proc.demo_tmp_dir = tmp_dir  # removed by stop_server_process
    deadline = time.monotonic() + timeout
    while not ready_file.exists():
        exited = proc.poll() is not None
        if exited or time.monotonic() > deadline:
            why = f"exited with code {proc.returncode}" if exited else f"was not ready within {timeout} s"
            stop_server_process(proc, remove_tmp_dir=False)
            tail = log_file.read_text(errors="replace")[-3000:].strip()
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise StageError(f"demo server on {host}:{port} {why}; its log ({log_file}):\n{tail}")
        time.sleep(0.05)
    return proc


def stop_server_process(proc: subprocess.Popen, timeout: float = 10.0, *, remove_tmp_dir: bool = True) -> int | None:
    """Stop a server from start_server_process (SIGTERM, then SIGKILL after `timeout`)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    tmp_dir = getattr(proc, "demo_tmp_dir", None)
    if tmp_dir is not None and remove_tmp_dir:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return proc.returncode
