"""The manifest of a part: one row per part row with what happened to it (MANIFEST_SCHEMA), and its counts."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from ..common import write_json_atomic, write_table
from ..tables import MANIFEST_SCHEMA, OK

log = logging.getLogger("landmarks.download")


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


def counts_path(out: Path) -> Path:
    """`manifest.parquet` -> `manifest.counts.json`."""
    return out.with_name(out.stem + ".counts.json")


def write_manifest(columns: dict[str, list], out: Path, part_index: int) -> dict:
    """Write a part's manifest (MANIFEST_SCHEMA's columns as lists) and its counts JSON beside it;
    return the counts: rows, ok, failed and rows by status, which add up to the part's rows."""
    write_table(pa.table(columns, schema=MANIFEST_SCHEMA), out)
    statuses = columns["status"]
    by_status = Counter(statuses)
    counts = {
        "part": part_index,
        "rows": len(statuses),
        "ok": by_status.get(OK, 0),
        "failed": len(statuses) - by_status.get(OK, 0),
        "by_status": dict(sorted(by_status.items())),
    }
    write_json_atomic(counts_path(out), counts)
    summary = ", ".join(f"{status} {count}" for status, count in counts["by_status"].items())
    log.info("part %03d: %d rows = %s", part_index, len(statuses), summary or "none")
    return counts
