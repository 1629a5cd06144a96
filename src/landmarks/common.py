"""Small helpers every stage shares: atomic writes, logging, table I/O, the image layout."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger("landmarks")

# The longest id we turn into a file name: ext4 allows 255 bytes per name component.
MAX_ID_LENGTH = 200
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class StageError(RuntimeError):
    """A problem the user must fix (bad input, bad config); printed without a traceback."""


def setup_logging(verbose: bool = False) -> None:
    """Log to stderr: Snakemake rules redirect it into the rule's `log:` file."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )


def run_cli(main) -> None:
    """Run a stage's `main()`, turning StageError into a one-line message and exit code 2."""
    try:
        code = main()
    except StageError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)


def current_umask() -> int:
    """The process's umask, read without changing it (os.umask can only be read by setting it, which
    would race with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no /proc (not Linux): read it by setting it back at once
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it into place only if the block succeeds.

    A killed or failing writer therefore never leaves a half-written `path` behind, and readers
    never see one. The temporary name starts with '.' so globs over the folder skip it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=suffix if suffix is not None else ".part", dir=path.parent
    )
    # mkstemp creates the file 0600; give it the mode a plain open() would (0666 minus the umask), so the
    # rest of a group can read what the pipeline writes into a shared project folder.
    os.fchmod(fd, 0o666 & ~current_umask())
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold an exclusive lock on `path` for the block, or refuse (StageError naming the holder) when
    another process holds it. The kernel lets go when the holder exits, killed or not; the file, which
    says who holds it (process id, host, since when), stays behind and is harmless."""
    import fcntl
    import socket
    import time

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "a process that did not say who"
            raise StageError(
                f"{path}: {what} is already running on this folder ({holder}); wait for it to end or stop it"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(
            fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0
        )
        yield
    finally:
        os.close(fd)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(obj):
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_table(table, path: str | os.PathLike) -> None:
    """Write a pandas DataFrame or pyarrow Table to Parquet atomically."""
    if not isinstance(table, pa.Table):
        table = pa.Table.from_pandas(table, preserve_index=False)
    with atomic_path(path, suffix=".parquet.part") as tmp:
        pq.write_table(table, tmp)


def read_table(path: str | os.PathLike, columns=None):
    """Read a Parquet table into pandas, naming the file when it is missing or not Parquet."""
    path = Path(path)
    if not path.exists():
        raise StageError(f"{path}: file not found")
    try:
        return pq.read_table(path, columns=columns).to_pandas()
    except (pa.ArrowInvalid, OSError) as err:
        raise StageError(f"{path}: not a readable Parquet table ({err})") from err


def check_image_id(image_id: str) -> str | None:
    """Return why `image_id` cannot be a file name, or None when it is safe.

    Safe ids start with a letter or digit and contain only letters, digits, '.', '_' and '-';
    so no '/', no '..' path, no NUL, nothing hidden, nothing longer than MAX_ID_LENGTH.
    """
    if not isinstance(image_id, str) or image_id == "":
        return "empty id"
    if len(image_id) > MAX_ID_LENGTH:
        return f"id longer than {MAX_ID_LENGTH} characters"
    if "\x00" in image_id:
        return "id contains a NUL byte"
    if not _SAFE_ID.match(image_id) or ".." in image_id:
        return "id is not a safe file name (allowed: letters, digits, '.', '_', '-'; no '..')"
    return None


def image_relpath(image_id: str, ext: str = ".jpg") -> Path:
    """Google Landmarks layout: `a/b/c/<id>.jpg` from the first three characters of the id."""
    reason = check_image_id(image_id)
    if reason:
        raise ValueError(f"{image_id!r}: {reason}")
    padded = (image_id + "___")[:3]
    return Path(padded[0], padded[1], padded[2], image_id + ext)
