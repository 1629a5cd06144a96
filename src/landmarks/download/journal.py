"""Resuming a part: the journal of finished rows beside its manifest."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from ..common import exclusive_lock, write_bytes_atomic
from .manifest import Outcome

log = logging.getLogger("landmarks.download")


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


def journal_record(image_id: str, url: str, outcome: Outcome) -> dict:
    return {"id": image_id, "url": url, **vars(outcome)}  # vars: asdict's deep copy is slow per row
